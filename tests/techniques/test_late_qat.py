"""late_qat: the STE fake quantization against a reference, its placement, the switch, and that a
compiled model sees the switch (the records' toggle was constant-folded by torch.compile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runs import technique, tiny_stack, tiny_trainer, token_shard

from pgolf.registry import Ctx, Kind
from pgolf.registry.run.model import Linear
from pgolf.registry.run.pipeline import build, eval_switches
from pgolf.registry.run.runtime import seed_everything
from pgolf.techniques._rowquant import FakeQuantWeight, Grid, fake_quantize, qmax_of, ste
from pgolf.techniques.late_qat import SWITCH


def reference(w: np.ndarray, bits: int) -> np.ndarray:
    """Row by row: s = max|w|/(2^(b−1) − 1) rounded to fp16 (at least its smallest positive
    value, as stored by the export), codes round-half-even(w/s) clamped, back to s·codes."""
    qmax = 2 ** (bits - 1) - 1
    out = np.zeros_like(w)
    for r, row in enumerate(w):
        s = float(np.float16(max(float(np.abs(row).max()) / qmax, 2.0**-24)))
        out[r] = np.clip(np.round(row / s), -qmax, qmax) * s
    return out


def absmax(bits: int) -> Grid:
    return Grid(qmax_of(bits), clip="absmax")


def fake(w: torch.Tensor, bits: int) -> torch.Tensor:
    return fake_quantize(w, absmax(bits))


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_fake_quantization_matches_a_row_by_row_reference(bits: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(7, 33) * torch.logspace(-3, 1, 7)[:, None]
    w[3] = 0.0
    got = fake(w, bits)
    assert np.allclose(got.numpy(), reference(w.numpy(), bits), rtol=1e-6, atol=1e-12)
    for r in range(7):  # each row lies on its own grid of at most 2^b − 1 levels
        assert len(torch.unique(got[r])) <= 2**bits - 1
    assert bool((got[3] == 0).all())


def test_ste_forward_is_quantized_and_gradient_is_identity() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 9, requires_grad=True)
    y = ste(w, fake(w, 6))
    assert torch.equal(y.detach(), fake(w.detach(), 6))
    upstream = torch.randn(5, 9)
    (y * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)  # type: ignore[arg-type]


def test_module_applies_only_while_the_switch_is_on() -> None:
    w = torch.randn(4, 8)
    m = FakeQuantWeight(absmax(6), SWITCH)
    idx = torch.zeros(1, 2, dtype=torch.long)
    assert m(w, None) is w and m(w, Ctx(idx, ())) is w
    assert torch.equal(m(w, Ctx(idx, (SWITCH,))), fake(w, 6))


def test_placed_on_the_selected_linear_kinds_only() -> None:
    b = build(tiny_stack({"late_qat": {"kinds": ["mlp_up", "attn_v"]}}), torch.device("cpu"))
    linears = [m for m in b.model.modules() if isinstance(m, Linear)]
    assert len(linears) == 12
    for m in linears:
        has = isinstance(m.weight_transform, FakeQuantWeight)
        assert has == (m.kind in (Kind.MLP_UP, Kind.ATTN_V)), m.kind


def test_switch_turns_on_below_the_threshold_and_stays_off_at_evaluation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # linear warmdown over 8 steps: the step at k = 7 runs at 1/8 < 0.15, so the switch is on after it
    rs = tiny_stack({"late_qat": {}}, train={"iterations": 8, "warmdown_iters": 8})
    b, trainer = tiny_trainer(rs, token_shard(tmp_path))
    flips: list[tuple[int, tuple[str, ...]]] = []
    original = trainer.advance

    def advance(state, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(state, *args, **kwargs)
        flips.append((state.step, state.switches))
        return out

    trainer.advance = advance  # type: ignore[method-assign]
    result = trainer.run()
    assert [s for s, on in flips if on] == [8]
    assert result.switches == (SWITCH,)
    assert trainer.eval_switches == () and eval_switches(b.sites) == ()
    assert technique(b, "late_qat").params.threshold == 0.15


@pytest.mark.slow
def test_compiled_model_follows_the_switch_and_agrees_with_eager() -> None:
    """The model compiled as the trainer compiles it (inductor, fullgraph, static shapes), first
    called with the switch off, then on: the per-token loss must change as it does in eager mode
    and agree with eager in both states (1e-5 nats)."""
    seed_everything(0)
    b = build(tiny_stack({"late_qat": {"bits": 3}}), torch.device("cpu"))
    model = b.model
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager_off = model(idx, tgt, "none", switches=())
        eager_on = model(idx, tgt, "none", switches=(SWITCH,))
        fast_off = compiled(idx, tgt, "none", switches=())
        fast_on = compiled(idx, tgt, "none", switches=(SWITCH,))
    assert (eager_on - eager_off).abs().max() > 1e-2  # fake quantization at 3 bits is visible
    assert torch.allclose(fast_off, eager_off, atol=1e-5)
    assert torch.allclose(fast_on, eager_on, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_fake_quantization_reaches_the_output_projection_tied_or_not(tied: bool) -> None:
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import build
    from pgolf.techniques.late_qat import SWITCH

    rs = stack_from_dict({"model": {"num_layers": 1, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2,
                                    "vocab_size": 64, "tie_embeddings": tied},
                          "techniques": {"late_qat": {"kinds": ["head"], "bits": 2}}})  # fmt: skip
    model = build(rs, torch.device("cpu")).model
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    idx = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        off, on = model.logits(idx), model.logits(idx, (SWITCH,))
    assert not torch.allclose(off, on)  # 2-bit output weights change the logits
