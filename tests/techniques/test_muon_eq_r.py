"""MuonEq-R: row normalisation against a per-row loop, and its place in the Muon step."""

from __future__ import annotations

import math

import pytest
import torch
from runs import tiny_stack, tiny_trainer, token_shard

from pgolf.registry.run.optim import Muon, newton_schulz
from pgolf.techniques.muon_eq_r import row_normalize


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_row_normalize_matches_a_per_row_loop() -> None:
    torch.manual_seed(0)
    u = torch.randn(3, 5, 7) * torch.logspace(-3, 2, 5)[None, :, None]
    u[1, 2] = 0.0  # a zero row stays zero (its norm is clamped, not divided by)
    out = row_normalize(u, 1e-7)
    for n in range(3):
        for r in range(5):
            norm = math.sqrt(sum(float(v) ** 2 for v in u[n, r]))
            want = [float(v) / max(norm, 1e-7) for v in u[n, r]]
            assert out[n, r].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
    norms = out.norm(dim=-1)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)
    assert out.shape == u.shape and bool((out[1, 2] == 0).all())
    assert row_normalize(u.bfloat16()).dtype == torch.bfloat16


def test_tiny_rows_are_clamped_not_blown_up() -> None:
    u = torch.tensor([[[1e-9, 0.0], [3.0, 4.0]]])
    out = row_normalize(u, 1e-7)
    assert out[0, 0].tolist() == pytest.approx([1e-2, 0.0])  # 1e-9 / 1e-7
    assert out[0, 1].tolist() == pytest.approx([0.6, 0.8])


def test_muon_orthogonalizes_the_row_normalised_nesterov_update(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shard = token_shard(tmp_path)
    optim = {"matrix_lr": 1.0, "muon_momentum": 0.5}
    b, trainer = tiny_trainer(tiny_stack({"muon_eq_r": {}}, optim=optim), shard)
    muon = trainer.opt.matrix
    assert isinstance(muon, Muon) and len(muon.update_chain) == 1
    w = b.model.blocks[0].attn.c_q.weight
    torch.manual_seed(1)
    grads = {}
    for p in b.model.parameters():
        g = torch.randn_like(p)
        if p.ndim == 2:
            g = g * torch.logspace(-2, 1, p.shape[0])[:, None]  # rows of very different norms
        p.grad = grads[id(p)] = g
    before = w.detach().clone()
    trainer.opt.set_multipliers(1.0)
    trainer.opt.step()
    update = before - w.detach()
    u = grads[id(w)] * 1.5  # Nesterov on the first step: G + μ·(μ·0 + G)
    scale = max(1.0, w.shape[0] / w.shape[1]) ** 0.5
    with_eq_r = scale * newton_schulz(row_normalize(u)[None], 5)[0].float()
    plain = scale * newton_schulz(u[None], 5)[0].float()
    assert rel(plain, with_eq_r) > 0.1  # the test can tell the two apart
    assert rel(update, with_eq_r) < 1e-4
