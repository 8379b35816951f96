"""Gated attention: the gate against a loop reference, each variant's init, its place between
attention and the output projection, labels and errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_build

from pgolf.registry import Kind, PgolfError, Role
from pgolf.registry.api.roles import kind_of, layer_of, role_of
from pgolf.techniques.gated_attention import AttentionGate, gate_heads, head_gates


def reference(y: torch.Tensor, n: torch.Tensor, w: torch.Tensor, scale: float, mult: float) -> torch.Tensor:
    out = y.clone()
    B, T, H, _ = y.shape
    for b in range(B):
        for t in range(T):
            for h in range(H):
                z = sum(float(w[h, i]) * float(n[b, t, i]) for i in range(w.size(1)))
                out[b, t, h] = y[b, t, h] * mult / (1 + math.exp(-scale * z))
    return out


@pytest.mark.parametrize(("scale", "mult"), [(1.0, 1.0), (0.5, 1.0), (1.0, 2.0)])
def test_gate_matches_the_loop_reference(scale: float, mult: float) -> None:
    torch.manual_seed(0)
    y, n, w = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6), torch.randn(4, 6)
    out = gate_heads(y, head_gates(n, w, scale, mult))
    assert torch.allclose(out, reference(y, n, w, scale, mult), atol=1e-5)


def gates(variant: str, **extra: object) -> list[AttentionGate]:
    model = tiny_build({"gated_attention": {"variant": variant, **extra}}, model_dim=64).model
    return [m for b in model.blocks for m in b.attn.out if isinstance(m, AttentionGate)]


def test_variants_shapes_and_init() -> None:
    torch.manual_seed(0)
    dense = gates("dense")
    assert len(dense) == 2 and dense[0].weight.shape == (4, 64)
    w = torch.cat([g.weight.flatten() for g in gates("dense", init_std=0.05)])
    assert 0.04 < float(w.detach().std()) < 0.06
    sparse = gates("sparse", width=8, scale=0.5)[0]
    assert sparse.weight.shape == (4, 8) and not sparse.weight.any() and sparse.scale == 0.5
    y, n = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 64)
    from pgolf.registry import Ctx

    ctx = Ctx(torch.zeros(1, 2, dtype=torch.long))
    ctx.attn_input = n
    assert torch.allclose(sparse(y, ctx), 0.5 * y)  # W = 0: g = σ(0) = 0.5
    assert torch.allclose(gates("output", width=8)[0](y, ctx), y)  # 2σ(0) = 1: identity at init


def test_labels_and_layers() -> None:
    model = tiny_build({"gated_attention": {"variant": "dense", "layers": [1]}}, num_layers=3).model
    placed = [[m for m in b.attn.out if isinstance(m, AttentionGate)] for b in model.blocks]
    assert [len(p) for p in placed] == [0, 1, 0]
    w = placed[1][0].weight
    assert role_of(w) == Role.GATE and kind_of(w) == Kind.GATE and layer_of(w) == 1


def test_gates_the_heads_before_the_output_projection_from_the_normalised_input() -> None:
    model = tiny_build({"gated_attention": {"variant": "sparse", "width": 12, "scale": 0.5}}).model
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    attn = model.blocks[1].attn
    got: dict[str, torch.Tensor] = {}
    attn.register_forward_pre_hook(lambda m, a: got.__setitem__("n", a[0].detach()))
    attn.kernel.register_forward_hook(lambda m, a, out: got.__setitem__("y", out.detach()))
    attn.proj.register_forward_pre_hook(lambda m, a: got.__setitem__("proj_in", a[0].detach()))
    with torch.no_grad():
        model.logits(torch.randint(0, 64, (2, 16)))
    gate = attn.out[0]
    expected = gate_heads(got["y"], head_gates(got["n"][..., :12], gate.weight, 0.5))
    assert torch.allclose(got["proj_in"], expected.reshape(got["proj_in"].shape), atol=1e-6)
    rms = got["n"].square().mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)  # it read the normalised input


def test_width_beyond_the_model_is_an_error() -> None:
    with pytest.raises(PgolfError, match=r"gated_attention.width=40 is more than model.model_dim=32"):
        tiny_build({"gated_attention": {"width": 40}})
