"""XSA: the GQA-efficient form against the repeat-interleave reference; placement by layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.pipeline import build
from pgolf.techniques.xsa import XSAModule, xsa


def reference_xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    vh = F.normalize(v.repeat_interleave(y.size(2) // v.size(2), dim=2), dim=-1)
    return y - (y * vh).sum(-1, keepdim=True) * vh


def test_matches_reference_and_removes_the_own_value_direction() -> None:
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 8, 16), torch.randn(2, 5, 2, 16)
    out = xsa(y, v)
    assert torch.allclose(out, reference_xsa(y, v), atol=1e-6)
    vh = F.normalize(v.repeat_interleave(4, dim=2), dim=-1)
    assert (out * vh).sum(-1).abs().max() < 1e-5
    same = xsa(y, torch.randn(2, 5, 8, 16))  # MHA: one value per head
    assert same.shape == y.shape


def test_placed_on_the_selected_layers_only() -> None:
    rs = stack_from_dict({"model": {"num_layers": 4, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2},
                          "techniques": {"xsa": {"layers": "last(2)"}}})  # fmt: skip
    model = build(rs, torch.device("meta")).model
    placed = [any(isinstance(m, XSAModule) for m in b.attn.out) for b in model.blocks]
    assert placed == [False, False, True, True]
