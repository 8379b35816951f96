"""Muon and the optimizer groups against plain references; the LR and momentum schedules."""

from __future__ import annotations

import pytest
import torch
from conftest import small_spec
from torch import nn

from pgolf.registry.api.config import OptimConfig
from pgolf.registry.api.roles import Role, role_table, set_role
from pgolf.registry.run.model import GPT
from pgolf.registry.run.optim import (
    Muon,
    build_optimizers,
    lr_multiplier,
    muon_momentum_at,
    newton_schulz,
    newton_schulz_reference,
)

SPEC = small_spec()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_batched_newton_schulz_agrees_with_the_per_matrix_reference() -> None:
    torch.manual_seed(0)
    for shape in [(16, 32), (32, 16), (24, 24)]:
        g = torch.randn(3, *shape)
        exact = newton_schulz(g, 5, dtype=torch.float32)
        fast = newton_schulz(g, 5)
        for i in range(3):
            assert torch.allclose(exact[i], newton_schulz_reference(g[i], 5, dtype=torch.float32), atol=1e-5)
            # in bf16 both are ~3% from the exact result, and their summation orders differ
            assert rel_err(fast[i], newton_schulz_reference(g[i], 5)) < 0.06


def test_newton_schulz_makes_singular_values_near_one() -> None:
    torch.manual_seed(0)
    s = torch.linalg.svdvals(newton_schulz_reference(torch.randn(32, 64), 5).float())
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's fixed point band, not exactly 1


def reference_muon(
    params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, momentum: float
) -> None:
    """The baseline's Muon written out per matrix, one step per list of gradients."""
    bufs = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, g, buf in zip(params, step_grads, bufs):
            buf.mul_(momentum).add_(g)
            u = g.add(buf, alpha=momentum)
            u = newton_schulz_reference(u, 5, dtype=torch.float32) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.add_(u.to(p.dtype), alpha=-lr)


def test_muon_step_matches_the_reference() -> None:
    torch.manual_seed(0)
    shapes = [(16, 32), (16, 32), (48, 16)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    ours = [nn.Parameter(t.clone()) for t in init]
    opt = Muon(ours, lr=0.02, momentum=0.9, ns=lambda g, steps: newton_schulz(g, steps, dtype=torch.float32))
    for step_grads in grads:
        for p, g in zip(ours, step_grads):
            p.grad = g.clone()
        opt.step()
    ref = [t.clone() for t in init]
    reference_muon(ref, grads, lr=0.02, momentum=0.9)
    for a, b, start in zip(ours, ref, init):
        assert torch.allclose(a.detach(), b, atol=1e-5)
        assert (a.detach() - start).abs().max() > 0.01  # it moved


def test_every_parameter_lands_in_exactly_one_group_by_role() -> None:
    model = GPT(SPEC)
    cfg = OptimConfig(matrix_lr=0.04, scalar_lr=0.03, tied_embed_lr=0.05, head_lr=0.008)
    opts = build_optimizers(model, cfg, tied=True)
    seen: dict[int, float] = {}
    for opt in opts.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                assert id(p) not in seen
                seen[id(p)] = group["lr"]
    roles = role_table(model)
    named = dict(model.named_parameters())
    assert set(seen) == {id(p) for p in named.values()}
    expected = {Role.MATRIX: 0.04, Role.SCALAR: 0.03, Role.EMBEDDING: 0.05}
    for name, role in roles.items():
        assert seen[id(named[name])] == expected[role], name
    assert isinstance(opts.matrix, Muon) and len(opts.matrix.param_groups[0]["params"]) == 2 * 6
    opts.set_multipliers(0.5)
    assert opts.matrix.param_groups[0]["lr"] == pytest.approx(0.02)


def test_weight_decay_is_decoupled_and_follows_the_lr_and_wd_multipliers() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    start = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.0, weight_decay=0.5)
    opt.param_groups[0].update(base_lr=0.1, base_wd=0.5)
    w.grad = torch.zeros_like(w)  # no gradient: only the decay moves the weights
    opt.step()
    assert torch.allclose(w.detach(), start * (1 - 0.1 * 0.5), atol=1e-6)
    from pgolf.registry.run.optim import OptimizerSet

    OptimizerSet([opt], opt).set_multipliers(0.5, 0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)


def test_the_update_chain_runs_before_orthogonalization() -> None:
    seen: list[tuple[int, ...]] = []

    def ortho(g: torch.Tensor, steps: int) -> torch.Tensor:
        seen.append(tuple(g.shape))
        return g

    def double(u: torch.Tensor) -> torch.Tensor:
        return u * 2

    w = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Muon([w], lr=1.0, momentum=0.0, nesterov=False, ns=ortho, update_chain=[double])
    w.grad = torch.ones(4, 4)
    opt.step()
    assert seen == [(1, 4, 4)] and torch.allclose(w.detach(), torch.full((4, 4), -2.0))


def test_warmdown_by_iterations() -> None:
    kw = dict(iterations=100, warmdown_iters=20, max_wallclock_seconds=0.0)
    assert lr_multiplier(0, 0.0, **kw) == 1.0
    assert lr_multiplier(79, 0.0, **kw) == 1.0
    assert lr_multiplier(80, 0.0, **kw) == pytest.approx(1.0)
    assert lr_multiplier(90, 0.0, **kw) == pytest.approx(0.5)
    assert lr_multiplier(99, 0.0, **kw) == pytest.approx(0.05)


def test_warmdown_by_wall_clock_reaches_zero_at_the_cap() -> None:
    kw = dict(iterations=10_000, warmdown_iters=100, max_wallclock_seconds=60.0)
    # 100 steps in 10 s: 0.1 s per step, warmdown spans the last 10 s
    assert lr_multiplier(100, 10.0, **kw) == 1.0
    assert lr_multiplier(500, 50.0, **kw) == pytest.approx(1.0)
    assert lr_multiplier(550, 55.0, **kw) == pytest.approx(0.5)
    assert lr_multiplier(600, 60.0, **kw) == 0.0
    assert lr_multiplier(5, 1.0, iterations=10, warmdown_iters=0, max_wallclock_seconds=60.0) == 1.0


def test_muon_momentum_warms_up_linearly() -> None:
    kw = dict(start=0.85, end=0.95, warmup_steps=500)
    assert muon_momentum_at(0, **kw) == pytest.approx(0.85)
    assert muon_momentum_at(250, **kw) == pytest.approx(0.90)
    assert muon_momentum_at(500, **kw) == pytest.approx(0.95)
    assert muon_momentum_at(10_000, **kw) == pytest.approx(0.95)


@pytest.mark.slow
def test_compiled_newton_schulz_agrees_with_the_reference() -> None:
    from pgolf.registry.run.optim import compiled_newton_schulz

    torch.manual_seed(0)
    g = torch.randn(2, 16, 32)
    fast = compiled_newton_schulz()(g, 5)
    for i in range(2):
        assert rel_err(fast[i], newton_schulz_reference(g[i], 5)) < 0.06


def test_per_role_groups_override_lr_weight_decay_betas_and_eps() -> None:
    from pgolf.registry import ConfigError
    from pgolf.registry.api.config import stack_from_dict

    model = GPT(SPEC)
    gate = torch.nn.Parameter(torch.zeros(4, 8))
    set_role(gate, Role.GATE)
    model.register_parameter("gate_w", gate)
    cfg = OptimConfig(scalar_lr=0.03, beta2=0.95, groups={"gate": {"lr": 0.01, "beta2": 0.99, "eps": 1e-6},
                                                          "matrix": {"lr": 0.02, "weight_decay": 0.1}})  # fmt: skip
    opts = build_optimizers(model, cfg, tied=True)
    adam = opts.optimizers[0]
    by_param = {id(p): g for g in adam.param_groups for p in g["params"]}
    g = by_param[id(gate)]
    assert (g["lr"], g["betas"], g["eps"]) == (0.01, (0.9, 0.99), 1e-6)
    s = by_param[id(model.blocks[0].attn_scale)]
    assert (s["lr"], s["betas"], s["eps"]) == (0.03, (0.9, 0.95), 1e-8)
    assert opts.matrix is not None and opts.matrix.param_groups[0]["lr"] == 0.02
    assert opts.matrix.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="optim.groups.matrix takes lr and weight_decay only"):
        stack_from_dict({"optim": {"groups": {"matrix": {"beta2": 0.9}}}})
    with pytest.raises(ConfigError, match="optim.groups.attn"):
        stack_from_dict({"optim": {"groups": {"attn": {"lr": 0.1}}}})
