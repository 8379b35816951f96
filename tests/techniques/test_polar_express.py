"""Polar Express: the batched iteration against a per-matrix loop, the coefficient table, the
singular values it reaches, and its place in the Muon step."""

from __future__ import annotations

import pytest
import torch
from runs import tiny_stack, tiny_trainer, token_shard

from pgolf.registry.run.optim import Muon, newton_schulz
from pgolf.techniques.polar_express import COEFFICIENTS, orthogonalizer, polar_express

RECORD_COEFFICIENTS = [  # techniques.md §3.G (PR #1344 → #1787)
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def reference(g: torch.Tensor, coeffs: list[tuple[float, float, float]], safety: float = 0.0) -> torch.Tensor:
    """One matrix at a time in float64: X = G/((1+safety)‖G‖_F + 1e-7) on the wide side, then
    X ← a·X + b·(XXᵀ)X + c·(XXᵀ)(XXᵀ)X per iteration."""
    out = []
    for m in g.double():
        wide = m.T if m.shape[0] > m.shape[1] else m
        x = wide / ((1 + safety) * torch.sqrt((wide**2).sum()) + 1e-7)
        for a, b, c in coeffs:
            s = x @ x.T
            x = a * x + b * (s @ x) + c * (s @ (s @ x))
        out.append(x.T if m.shape[0] > m.shape[1] else x)
    return torch.stack(out)


def test_coefficients_are_the_records() -> None:
    assert list(COEFFICIENTS) == RECORD_COEFFICIENTS


@pytest.mark.parametrize("shape", [(3, 24, 16), (2, 16, 40), (2, 12, 12)])
@pytest.mark.parametrize("safety", [0.0, 0.02])
def test_batched_iteration_matches_a_per_matrix_loop(shape: tuple[int, int, int], safety: float) -> None:
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    exact = polar_express(g, 5, safety, dtype=torch.float64)
    assert torch.allclose(exact, reference(g, RECORD_COEFFICIENTS, safety), atol=1e-10)
    fast = polar_express(g.float(), 5, safety)  # the default: bf16 (the first step's gain of 8 amplifies
    assert fast.dtype == torch.bfloat16 and fast.shape == g.shape  # bf16 rounding: 6-8 % here, 3 % for NS)
    assert float((fast.double() - exact).norm() / exact.norm()) < 0.1


def test_fewer_steps_use_the_first_coefficients_and_more_repeat_the_last() -> None:
    torch.manual_seed(1)
    g = torch.randn(2, 8, 12, dtype=torch.float64)
    three = polar_express(g, 3, dtype=torch.float64)
    assert torch.allclose(three, reference(g, RECORD_COEFFICIENTS[:3]), atol=1e-10)
    seven = polar_express(g, 7, dtype=torch.float64)
    assert torch.allclose(
        seven, reference(g, RECORD_COEFFICIENTS + [RECORD_COEFFICIENTS[-1]] * 2), atol=1e-10
    )
    with pytest.raises(ValueError, match="at least one iteration"):
        polar_express(g, 0)


@pytest.mark.parametrize("shape", [(4, 64, 32), (4, 32, 96)])
def test_singular_values_end_near_one_closer_than_newton_schulz(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(2)
    g = torch.randn(*shape)
    pe = torch.linalg.svdvals(polar_express(g, 5).float())
    ns = torch.linalg.svdvals(newton_schulz(g, 5).float())
    assert float(pe.min()) > 0.8 and float(pe.max()) < 1.2
    assert float((pe - 1).abs().max()) < 0.6 * float((ns - 1).abs().max())
    assert float(ns.min()) < 0.8  # the fixed quintic leaves small singular values behind


def test_zero_update_stays_zero_and_finite() -> None:
    out = polar_express(torch.zeros(2, 8, 4), 5)
    assert bool(torch.isfinite(out).all()) and bool((out == 0).all())


def test_muon_uses_it_for_the_orthogonalized_update(tmp_path) -> None:  # type: ignore[no-untyped-def]
    b, trainer = tiny_trainer(
        tiny_stack({"polar_express": {}}, optim={"matrix_lr": 1.0}), token_shard(tmp_path)
    )
    muon = trainer.opt.matrix
    assert isinstance(muon, Muon) and muon.ns is orthogonalizer(0.0)
    w = b.model.blocks[1].mlp.fc.weight
    torch.manual_seed(3)
    for p in b.model.parameters():
        p.grad = torch.randn_like(p)
    g = w.grad.clone()  # type: ignore[union-attr]
    before = w.detach().clone()
    trainer.opt.set_multipliers(1.0)
    trainer.opt.step()
    m = muon.param_groups[0]["momentum"]
    scale = max(1.0, w.shape[0] / w.shape[1]) ** 0.5
    want = scale * polar_express((g * (1 + m))[None], 5)[0].float()
    assert float(((before - w.detach()) - want).norm() / want.norm()) < 1e-2  # bf16, batched with layer 0
    other = scale * newton_schulz((g * (1 + m))[None], 5)[0].float()
    assert float((other - want).norm() / want.norm()) > 0.05
