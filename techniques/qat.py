"""QAT: from a training fraction on (the start by default), train the block matrices through
straight-through fake quantization on the export's grid (bits and scale rule).

What: a switch ``qat`` turns on at the first step whose training fraction is at least
``start_fraction`` (0: from step 1). While it is on, every pgolf ``Linear`` of the selected
``kinds`` computes with W_q = W + stopgrad(Q(W) − W): Q(W) = s_r·clamp(round(W/s_r), −q_max,
q_max) on the grid ``rtn`` and ``gptq`` use (``_rowquant``: q_max = 2^(bits−1) − 1 per kind, s_r
by ``clip`` — ``absmax`` (the records' row max / 31 at int6), ``sdclip``, ``percentile`` — at its
stored fp16 value). The forward sees the quantized weights, the backward is the identity. With the
same bits and rule, Q(W) is exactly what ``rtn`` stores for W. Training-only (``at_eval`` false).

Why: the weights learn to sit where the export's grid puts them; the quantization gap of the
int6 round trip fell to about zero in the 03-19 records.

Source: parameter-golf ``R/2026-03-19_Seq2048_FP16Emb_TunedLR`` and ``R/2026-03-19_smeargate…``
(full-run STE int6 QAT, per-row absmax scale, codes [−32, 31] in the records; pgolf's grids are
symmetric, [−31, 31]).

Sites: the ``linear_weight`` slot of each Linear of ``kinds``; the ``switches`` chain.

Interactions: match ``bits``, ``clip`` and ``kinds`` to the export quantizer (``gptq``: bits 6,
``clip: sdclip``). ``late_qat`` is the same switched by the LR multiplier (conflict: one fills the
slot). Fake quantization costs time each step (``percentile`` most: a sort per row).

Evidence (records, 8×H100): full-run STE int6 QAT: quantization gap ≈ 0 at 72 vs 69 ms/step
(``R/2026-03-19_Seq2048…``), gap 0.0001 (``R/2026-03-19_smeargate…``). Not yet measured with pgolf.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from pgolf.registry import Kind, Switch, Technique, TrainState, hook, register
from pgolf.techniques._rowquant import FakeQuantParams, FakeQuantWeight, Grid

SWITCH = "qat"


class QATParams(FakeQuantParams):
    start_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="turn on at this fraction of training (0 = from the first step)"
    )


@register("qat")
class QAT(Technique):
    """QAT: from a training fraction on (the start by default), train the block matrices through
    straight-through fake quantization on the export's grid (bits and scale rule)."""

    Params = QATParams
    params: QATParams
    gain_at_end = True
    conflicts = ("late_qat",)

    @hook
    def linear_weight(self, kind: Kind) -> nn.Module | None:
        return FakeQuantWeight(Grid.of(self.params, kind), SWITCH) if kind in self.params.kinds else None

    @hook
    def switches(self) -> list[Switch]:
        start = self.params.start_fraction

        def when(state: TrainState) -> bool:
            return state.fraction >= start

        return [Switch(SWITCH, when, expected=start, at_eval=False)]
