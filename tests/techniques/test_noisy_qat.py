"""noisy_qat: the noise against its definition (one absmax step wide, uniform, gradient of the
identity), a deterministic draw per weight state, placement by layer and kind, off at evaluation."""

from __future__ import annotations

import pytest
import torch
from runs import tiny_stack

from pgolf.registry import Ctx, Kind
from pgolf.registry.api.roles import layer_of
from pgolf.registry.run.model import Linear
from pgolf.registry.run.pipeline import build, eval_switches
from pgolf.techniques.noisy_qat import SWITCH, NoisyWeight, add_noise, hash_uniform, noise_step


def test_noise_is_within_half_a_step_of_a_per_row_absmax_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 200) * torch.logspace(-2, 0, 16)[:, None]
    u = hash_uniform(w)
    noisy = add_noise(w, 6, u)
    for r in range(16):
        step = float(w[r].abs().max()) / 31
        assert float(noise_step(w, 6)[r]) == pytest.approx(step, rel=1e-6)
        d = (noisy[r] - w[r]).abs()
        assert float(d.max()) <= step / 2 + 1e-7
    assert 0.45 < float(u.mean()) < 0.55 and abs(float(u.std()) - 12**-0.5) < 0.01


def test_the_draw_is_fixed_by_the_weights_and_changes_with_them() -> None:
    w = torch.randn(8, 8)
    assert torch.equal(hash_uniform(w), hash_uniform(w.clone()))
    w2 = w.clone()
    w2[0, 0] += 1e-3
    assert not torch.equal(hash_uniform(w), hash_uniform(w2))
    assert bool(hash_uniform(torch.zeros(4, 4)).unique().numel() == 16)  # position decorrelates


def test_gradient_is_the_identity_and_evaluation_is_clean() -> None:
    w = torch.randn(4, 6, requires_grad=True)
    m = NoisyWeight(8)
    idx = torch.zeros(1, 2, dtype=torch.long)
    y = m(w, Ctx(idx, (SWITCH,)))
    assert not torch.equal(y.detach(), w.detach())
    g = torch.randn(4, 6)
    (y * g).sum().backward()
    assert torch.equal(w.grad, g)  # type: ignore[arg-type]
    assert m(w, Ctx(idx, ())) is w


def test_placed_on_the_chosen_layers_and_kinds_only() -> None:
    b = build(
        tiny_stack({"noisy_qat": {"layers": [1], "kinds": ["mlp_up", "mlp_down"]}}), torch.device("cpu")
    )
    placed = {
        (m.kind, layer_of(m.weight))
        for m in b.model.modules()
        if isinstance(m, Linear) and m.weight_transform is not None
    }
    assert placed == {(Kind.MLP_UP, 1), (Kind.MLP_DOWN, 1)}
    assert eval_switches(b.sites) == ()
