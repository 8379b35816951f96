"""XSA: the GQA-efficient form against the repeat-interleave reference; placement by layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_build

from pgolf.registry import Ctx
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


def test_gated_form_removes_tanh_alpha_of_the_projection_per_head() -> None:
    torch.manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    alpha = torch.tensor([0.0, 0.4, -1.2, 3.0])
    out = xsa(y, v, torch.tanh(alpha))
    full = reference_xsa(y, v)
    for h in range(4):  # y − tanh(α_h)·(y·v̂)v̂, i.e. y + tanh(α_h)·(full XSA − y)
        expected = y[:, :, h] + torch.tanh(alpha[h]) * (full[:, :, h] - y[:, :, h])
        assert torch.allclose(out[:, :, h], expected, atol=1e-6)
    mod = XSAModule(4, gated=True)  # α starts at 0: the identity, with a gradient for α
    ctx = Ctx(torch.zeros(2, 5, dtype=torch.long))
    ctx.v = v
    yy = y.clone().requires_grad_(True)
    res = mod(yy, ctx)
    assert torch.equal(res, yy)
    res.square().sum().backward()
    assert mod.alpha is not None and mod.alpha.grad is not None and mod.alpha.grad.abs().sum() > 0


def test_repeats_false_skips_the_repeated_passes_of_a_looped_layer() -> None:
    loop = {"loop_start": 0, "loop_end": 1, "num_loops": 1, "start_fraction": 0.0}
    applied: list[tuple[int, int]] = []
    for repeats in (True, False):
        b = tiny_build({"xsa": {"layers": "all", "repeats": repeats}, "depth_recurrence": loop})
        for blk in b.model.blocks:
            mod = blk.attn.out[0]
            orig = mod.forward

            def spy(y, ctx, orig=orig, repeats=repeats):
                out = orig(y, ctx)
                if not torch.equal(out, y):
                    applied.append((int(repeats), ctx.virtual))
                return out

            mod.forward = spy
        with torch.no_grad():
            for p in b.model.parameters():
                p.normal_(std=0.2)
            b.model.logits(torch.randint(0, 64, (1, 8)), ("depth_recurrence",))
    # looped order over 2 layers: 0, 1, 0, 1 (virtual 0-3); the second pass is repeat 1
    assert [v for r, v in applied if r == 1] == [0, 1, 2, 3]
    assert [v for r, v in applied if r == 0] == [0, 1]
