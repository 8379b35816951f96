"""Orthogonal init: orthogonality and gain, zero projections and small or non-matrix weights
untouched, banks per slice, and a dry build on the meta device."""

from __future__ import annotations

import torch
from conftest import tiny_build
from torch import nn

from pgolf.registry import Role, set_role
from pgolf.techniques.orthogonal_init import orthogonal_init_


def assert_orthogonal(w: torch.Tensor, gain: float) -> None:
    g = w @ w.T if w.size(0) <= w.size(1) else w.T @ w
    assert torch.allclose(g, gain**2 * torch.eye(g.size(0)), atol=1e-5)


def test_large_nonzero_matrices_become_orthogonal_and_zero_ones_stay_zero() -> None:
    torch.manual_seed(0)
    before = tiny_build({}, model_dim=64, num_heads=4, num_kv_heads=2).model
    b = tiny_build({"orthogonal_init": {"gain": 1.5}}, model_dim=64, num_heads=4, num_kv_heads=2)
    model = b.model
    for block in model.blocks:
        assert_orthogonal(block.attn.c_q.weight, 1.5)  # 64 × 64
        assert_orthogonal(block.mlp.fc.weight, 1.5)  # 128 × 64 (tall: orthonormal columns)
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()  # zero-init stays zero
    # 32 × 64 K/V projections are below min_dim 64 and keep the default init; so does the embedding
    ref = before.state_dict()
    for name, t in model.state_dict().items():
        if any(k in name for k in ("c_k", "c_v", "tok_emb", "scale", "resid_mix", "q_gain", "skip")):
            assert torch.equal(t, ref[name]), name
    assert not torch.equal(model.blocks[0].attn.c_q.weight, before.blocks[0].attn.c_q.weight)


def test_min_dim_and_banks_per_slice() -> None:
    m = nn.Module()
    m.bank = set_role(nn.Parameter(torch.randn(3, 16, 24)), Role.MATRIX)
    m.small = set_role(nn.Parameter(torch.randn(8, 24)), Role.MATRIX)
    m.gate = set_role(nn.Parameter(torch.randn(16, 16)), Role.GATE)
    with torch.no_grad():
        m.bank[1].zero_()
    small, gate = m.small.detach().clone(), m.gate.detach().clone()
    changed = orthogonal_init_(m, gain=1.0, min_dim=16)
    assert len(changed) == 2
    assert_orthogonal(m.bank[0].detach(), 1.0)
    assert_orthogonal(m.bank[2].detach(), 1.0)
    assert not m.bank[1].any()
    assert torch.equal(m.small, small) and torch.equal(m.gate, gate)


def test_dry_build_on_the_meta_device() -> None:
    b = tiny_build({"orthogonal_init": {"min_dim": 16}}, device="meta")
    assert b.model.blocks[0].attn.c_q.weight.is_meta
