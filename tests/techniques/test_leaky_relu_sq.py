"""LeakyReLU(slope)²: maths and placement."""

from __future__ import annotations

import torch

from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.model import ReluSquared
from pgolf.registry.run.pipeline import build
from pgolf.techniques.leaky_relu_sq import LeakyReluSquared, leaky_relu_sq


def test_matches_the_definition() -> None:
    u = torch.linspace(-3, 3, 61)
    assert torch.allclose(leaky_relu_sq(u, 0.5), torch.where(u > 0, u, 0.5 * u) ** 2)
    assert torch.allclose(leaky_relu_sq(u, 0.0), torch.relu(u) ** 2)


def test_replaces_the_activation_of_selected_layers() -> None:
    rs = stack_from_dict({"model": {"num_layers": 3, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2},
                          "techniques": {"leaky_relu_sq": {"slope": 0.25, "layers": [0, 2]}}})  # fmt: skip
    model = build(rs, torch.device("cpu")).model
    acts = [b.mlp.act for b in model.blocks]
    assert isinstance(acts[0], LeakyReluSquared) and acts[0].slope == 0.25
    assert isinstance(acts[1], ReluSquared) and isinstance(acts[2], LeakyReluSquared)
