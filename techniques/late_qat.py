"""Late QAT: once the LR multiplier falls below ``threshold``, train the block matrices through
straight-through fake quantization on the export's grid (bits and scale rule).

What: a switch ``late_qat`` turns on after the first step whose LR multiplier was below
``threshold``. While it is on, every pgolf ``Linear`` of the selected ``kinds`` computes with
W_q = W + stopgrad(Q(W) − W), where Q(W) = s·clamp(round(W/s), −q_max, q_max) with one scale per
output row on the grid ``rtn`` and ``gptq`` use (``_rowquant``): q_max = 2^(bits−1) − 1 per kind,
s_r by ``clip`` — ``absmax`` (the records' s_r = max_j |W_rj| / q_max), ``sdclip`` (k·std/q_max,
gptq's default) or ``percentile`` — held at its stored fp16 value. With the same bits and rule as
the export, Q(W) is exactly what ``rtn`` stores for W. The forward sees the quantized weights;
the backward is the identity (∂W_q/∂W = I), so the fp32 master weights keep receiving the full
gradient. The switch is training-only (``at_eval`` false): validation, export and the final score
use the plain weights.

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

Interactions: ``bits``, ``clip`` (and ``sdclip_k``) and ``kinds`` should match the export quantizer
of those tensors (``gptq`` defaults: bits 6, ``clip: sdclip``, k 12.85, scope matrices; int8
noise with an int5 export hurt, ``N/2026-03-21``). ``qat`` is the same from a training fraction
(the start by default); the two fill the same slot. The switch follows
the ``lr_schedule`` slot: with ``warmdown_fraction``'s min_lr ≥ threshold it never turns on.
Selecting ``head`` fake-quantizes the output projection (the tied embedding as the head, or an
untied head). Another ``linear_weight`` filler on the same Linear is a conflict. Its gain only shows at the end of training (``gain_at_end``).

Evidence (records, 8×H100): threshold 0.1 → 0.15: −0.0001 BPB (``R/2026-03-22``); full-run STE int6
QAT: quantization gap ≈ 0 at 72 vs 69 ms/step. Dropped from the 04-01+ lineage (GPTQ + SDClip
instead). Not yet measured with pgolf.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from pgolf.registry import Kind, Switch, Technique, TrainState, hook, register
from pgolf.techniques._rowquant import FakeQuantParams, FakeQuantWeight, Grid

SWITCH = "late_qat"


class LateQATParams(FakeQuantParams):
    threshold: float = Field(
        0.15, gt=0.0, le=1.0, description="turn on after a step whose LR multiplier was below this"
    )


@register("late_qat")
class LateQAT(Technique):
    """Late QAT: once the LR multiplier falls below ``threshold``, train the block matrices through
    straight-through fake quantization on the export's grid (bits and scale rule)."""

    Params = LateQATParams
    params: LateQATParams
    gain_at_end = True
    conflicts = ("qat",)

    @hook
    def linear_weight(self, kind: Kind) -> nn.Module | None:
        return FakeQuantWeight(Grid.of(self.params, kind), SWITCH) if kind in self.params.kinds else None

    @hook
    def switches(self) -> list[Switch]:
        threshold = self.params.threshold

        def when(state: TrainState) -> bool:
            return state.lr_mult < threshold

        # expected: where a warmdown's multiplier typically crosses 0.15 (orders the warm-up only)
        return [Switch(SWITCH, when, expected=0.9, at_eval=False)]
