"""LN scale: the factor against the explicit formula, and the physical factor on every pass of a
looped model."""

from __future__ import annotations

import torch
from conftest import tiny_build

from pgolf.registry import Ctx
from pgolf.registry.run.model import RMSNorm, rms_norm
from pgolf.techniques.ln_scale import ScaledRMSNorm


def test_matches_the_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) * 3
    eps = torch.finfo(x.dtype).eps
    for layer in (0, 3, 10):
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) / (layer + 1) ** 0.5
        out = ScaledRMSNorm(layer)(x, Ctx(torch.zeros(2, 5, dtype=torch.long)))
        assert torch.allclose(out, expected, atol=1e-6)


def test_every_pass_uses_its_physical_layer_factor() -> None:
    stack = {
        "depth_recurrence": {"loop_start": 1, "loop_end": 2, "num_loops": 1},
        "ln_scale": {"layers": "last(3)"},
    }
    b = tiny_build(stack, num_layers=4)
    model = b.model
    assert isinstance(model.blocks[0].norm, RMSNorm) and isinstance(model.blocks[3].norm, ScaledRMSNorm)
    calls: list[tuple[int, float]] = []
    for block in model.blocks:
        block.norm.register_forward_hook(
            lambda m, args, out: calls.append((args[1].layer, float((out / rms_norm(args[0])).mean())))
        )
    with torch.no_grad():
        model.logits(torch.randint(0, 64, (1, 16)), ("depth_recurrence",))
    layers = [layer for layer, _ in calls]
    assert layers == [0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 3, 3]  # attention and MLP norm of each pass
    for layer, factor in calls:
        assert abs(factor - (1.0 if layer == 0 else (layer + 1) ** -0.5)) < 1e-5
