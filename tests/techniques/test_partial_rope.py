"""Partial RoPE: the rotation against a complex-number reference, untouched channels, NTK base
scaling, and its place in a built model."""

from __future__ import annotations

import cmath
import math

import pytest
import torch
from conftest import tiny_build

from pgolf.registry import PgolfError
from pgolf.registry.run.model import Rotary
from pgolf.techniques.partial_rope import PartialRoPEParams, PartialRotary, ntk_base


def reference_partial_rope(x: torch.Tensor, dims: int, base: float) -> torch.Tensor:
    """Pair (i, i + r/2) as the complex number x_i + j·x_{i+r/2}, multiplied by e^(−j·t·θ_i)."""
    out = x.clone().double()
    half = dims // 2
    B, T, H, _ = x.shape
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for i in range(half):
                    theta = base ** (-2 * i / dims)
                    z = complex(x[b, t, h, i], x[b, t, h, i + half]) * cmath.exp(-1j * t * theta)
                    out[b, t, h, i], out[b, t, h, i + half] = z.real, z.imag
    return out.float()


@pytest.mark.parametrize(("dims", "base"), [(4, 10000.0), (8, 500.0)])
def test_rotates_the_first_dims_like_complex_multiplication(dims: int, base: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 12)
    rope = PartialRotary(dims, base, None)
    out = rope.rotate(x, rope.tables(7, x.device))
    assert torch.allclose(out, reference_partial_rope(x, dims, base), atol=1e-5)
    assert torch.equal(out[..., dims:], x[..., dims:])  # the other channels pass bit for bit


def test_scores_depend_only_on_the_offset() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rope = PartialRotary(8, 10000.0, None)
    tables = rope.tables(12, q.device)

    def score(tq: int, tk: int) -> float:
        qs, ks = torch.zeros(1, 12, 1, 16), torch.zeros(1, 12, 1, 16)
        qs[:, tq], ks[:, tk] = q[0, 0], k[0, 0]
        return float((rope.rotate(qs, tables)[0, tq] * rope.rotate(ks, tables)[0, tk]).sum())

    assert score(5, 2) == pytest.approx(score(9, 6), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_all_dims_is_the_baseline_rope() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 9, 4, 16)
    full, partial = Rotary(16, 10000.0), PartialRotary(16, 10000.0, None)
    assert torch.allclose(
        partial.rotate(x, partial.tables(9, x.device)), full.rotate(x, full.tables(9, x.device))
    )


def test_ntk_base_scales_only_beyond_the_training_length() -> None:
    assert ntk_base(10000.0, 16, 2048, 2048) == 10000.0
    assert ntk_base(10000.0, 16, 1024, 2048) == 10000.0
    assert ntk_base(10000.0, 16, 4096, 2048) == pytest.approx(10000.0 * 2 ** (16 / 14))
    rope = PartialRotary(16, 10000.0, ntk_len=8)
    cos, sin = rope.tables(32, torch.device("cpu"))
    freqs = torch.atan2(sin[1], cos[1])  # angle at t = 1 is θ_i
    scaled = 10000.0 * 4 ** (16 / 14)
    expected = torch.tensor([scaled ** (-2 * i / 16) for i in range(8)])
    assert torch.allclose(freqs, expected, atol=1e-6)
    cos8, _ = rope.tables(8, torch.device("cpu"))
    assert torch.allclose(cos8, PartialRotary(16, 10000.0, None).tables(8, torch.device("cpu"))[0])


def test_ntk_needs_four_dims() -> None:
    with pytest.raises(ValueError, match="ntk scaling needs dims >= 4"):
        PartialRoPEParams(dims=2, ntk=True)


def test_fills_the_rotary_slot_with_the_model_base_or_its_own() -> None:
    rope = tiny_build({"partial_rope": {"dims": 4}}, rope_base=5000.0).model.rotary
    assert isinstance(rope, PartialRotary) and (rope.dims, rope.base, rope.ntk_len) == (4, 5000.0, None)
    rope = tiny_build({"partial_rope": {"dims": 6, "base": 300.0, "ntk": True}}).model.rotary
    assert (rope.dims, rope.base, rope.ntk_len) == (6, 300.0, 16)  # L0 = train.train_seq_len
    with pytest.raises(PgolfError, match=r"partial_rope.dims=16 is more than the head dim 8"):
        tiny_build({"partial_rope": {}})


def test_ntk_changes_the_model_only_on_longer_windows() -> None:
    plain = tiny_build({"partial_rope": {"dims": 4}}).model
    ntk = tiny_build({"partial_rope": {"dims": 4, "ntk": True}}).model
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ntk.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        assert torch.equal(plain.logits(idx[:, :16]), ntk.logits(idx[:, :16]))
        diff = (plain.logits(idx) - ntk.logits(idx)).abs().max()
    assert diff > 1e-4 and math.isfinite(float(diff))
