"""Late QAT: once the LR multiplier falls below ``threshold``, train the block matrices through
straight-through fake quantization at the export's bit width.

What: a switch ``late_qat`` turns on after the first step whose LR multiplier was below
``threshold``. While it is on, every pgolf ``Linear`` of the selected ``kinds`` computes with
W_q = W + stopgrad(Q(W) − W), where Q(W) = s·clamp(round(W/s), −q_max, q_max) with one scale per
output row s_r = max_j |W_rj| / q_max, q_max = 2^(bits−1) − 1 (rows of zeros keep s = 1e-12 and
quantize to 0). The forward sees the quantized weights; the backward is the identity
(∂W_q/∂W = I), so the fp32 master weights keep receiving the full gradient. The switch is
training-only (``at_eval`` false): validation, export and the final score use the plain weights.

The switch reaches the module as ``ctx.switches`` (a forward argument), never as a Python
attribute flipped after compilation: ``torch.compile`` guards on it and keeps one graph per
state, both compiled in the warm-up.

Why: weights that have adapted to the rounding grid in the last steps lose less when they are
quantized for the artifact, at no cost to the early, high-LR part of training.

Source: parameter-golf ``R/2026-03-19_Seq2048_FP16Emb_TunedLR`` (full-run STE int6 QAT);
late QAT from ``R/2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT`` (threshold 0.1 — dead code there:
the Python class attribute it toggled was constant-folded by ``torch.compile``) and
``R/2026-03-22_11L_EMA_GPTQ-lite_warmdown3500_QAT015`` (threshold 0.15; the defaults).

Sites: the ``linear_weight`` slot of each Linear of the selected kinds, and the ``switches``
chain.

Interactions: ``bits`` and ``kinds`` should match the export quantizer of those tensors (``gptq``
bits 6, scope matrices; int8 noise with an int5 export hurt, ``N/2026-03-21``). The switch follows
the ``lr_schedule`` slot: with ``warmdown_fraction``'s min_lr ≥ threshold it never turns on.
Selecting ``head`` fake-quantizes the output projection (the tied embedding as the head, or an
untied head). Another ``linear_weight`` filler on the same Linear is a conflict. Its gain only shows at the end of training (``gain_at_end``).

Evidence (records, 8×H100): threshold 0.1 → 0.15: −0.0001 BPB (``R/2026-03-22``); full-run STE int6
QAT: quantization gap ≈ 0 at 72 vs 69 ms/step. Dropped from the 04-01+ lineage (GPTQ + SDClip
instead). Not yet measured with pgolf.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Kind, Params, Switch, Technique, TrainState, hook, register
from pgolf.registry.api.roles import BLOCK_MATRIX_KINDS

SWITCH = "late_qat"
MIN_SCALE = 1e-12


class LateQATParams(Params):
    threshold: float = Field(
        0.15, gt=0.0, le=1.0, description="turn on after a step whose LR multiplier was below this"
    )
    bits: int = Field(
        6, ge=2, le=8, description="bit width of the fake quantization (q_max = 2^(bits−1) − 1)"
    )
    kinds: tuple[Kind, ...] = Field(
        BLOCK_MATRIX_KINDS, min_length=1, description="Linear kinds trained through fake quantization"
    )


def fake_quantize(w: Tensor, bits: int) -> Tensor:
    """Q(W): per-row symmetric round-to-nearest with s_r = max|W_r|/q_max (the values, no STE)."""
    qmax = 2 ** (bits - 1) - 1
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(MIN_SCALE)
    return (w32 / scale).round().clamp(-qmax, qmax).mul(scale).to(w.dtype)


def ste_fake_quantize(w: Tensor, bits: int) -> Tensor:
    """W + stopgrad(Q(W) − W): the values of Q(W), the gradient of the identity."""
    return w + (fake_quantize(w, bits) - w).detach()


class FakeQuantWeight(nn.Module):
    """The weight as is while the switch is off; ste_fake_quantize(W) while it is on."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: Tensor, ctx: Ctx | None) -> Tensor:
        if ctx is None or SWITCH not in ctx.switches:
            return w
        return ste_fake_quantize(w, self.bits)


@register("late_qat")
class LateQAT(Technique):
    """Late QAT: once the LR multiplier falls below ``threshold``, train the block matrices through
    straight-through fake quantization at the export's bit width."""

    Params = LateQATParams
    params: LateQATParams
    gain_at_end = True

    @hook
    def linear_weight(self, kind: Kind) -> nn.Module | None:
        return FakeQuantWeight(self.params.bits) if kind in self.params.kinds else None

    @hook
    def switches(self) -> list[Switch]:
        threshold = self.params.threshold

        def when(state: TrainState) -> bool:
            return state.lr_mult < threshold

        # expected: where a warmdown's multiplier typically crosses 0.15 (orders the warm-up only)
        return [Switch(SWITCH, when, expected=0.9, at_eval=False)]
