"""Weight-decay taper: full weight decay until a training fraction, then a linear taper to a final
factor at the end of the run.

What: the ``wd_schedule`` multiplier of every group's decoupled weight decay is
m(f) = 1 for f < s, else 1 − (1 − r)·(f − s)/(1 − s), with s = ``start_fraction``, r = ``final``
and f = ``state.fraction`` (by wall clock when the run is capped, inside the cap minus every
technique's time reserve; else step / iterations). Every decay W ← W·(1 − lr_t·wd·m(f)) (Muon WD
and AdamW alike).

Why: strong weight decay keeps the weights small, which makes them compress well (the records'
size knob), but late in the run it keeps pulling the weights away from the loss minimum while the
learning rate anneals; relaxing it over the warmdown lets the last steps fit.

Source: ``R/2026-04-18_PR1626_CaseOps_Taper`` (``WD_TAPER_START_FRAC`` 0.70,
``WD_TAPER_FINAL_MULT`` 0.50), kept in the 04-19+ lineage.

Sites: the ``wd_schedule`` slot.

Interactions: scales ``optim.matrix_wd``, ``embed_wd``, ``head_wd`` and ``scalar_wd`` (and the
``optim.groups`` overrides) together; with no weight decay configured it does nothing. Less decay
late in the run means larger weights in the artifact: check the size with ``pgolf check``.

Evidence (records, 8×H100): bundled with CaseOps, 1.06780 vs 1.07193 (``R/2026-04-18``). Measured
with pgolf on CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded
corpus, seeds 1337 / 1338; ``python bench/technique_effects.py --only wd_taper``): against the same
stack with ``optim.matrix_wd`` 0.04 untapered: Δval_bpb +0.0000 (+0.0000, +0.0000) (+0.00001 on each
seed: 36 tapered steps at lr ≤ 0.04 barely change the decay).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from pgolf.registry import Params, Technique, TrainState, hook, register


class WDTaperParams(Params):
    start_fraction: float = Field(
        0.70, ge=0.0, lt=1.0, description="s: training fraction where the taper starts"
    )
    final: float = Field(0.50, ge=0.0, le=1.0, description="r: weight-decay factor at the end of the run")


def taper_multiplier(fraction: float, start: float, final: float) -> float:
    """1 for f < s, then linear from 1 at f = s to ``final`` at f = 1 (f clamped to [0, 1])."""
    f = min(max(fraction, 0.0), 1.0)
    if f < start:
        return 1.0
    return 1.0 - (1.0 - final) * (f - start) / (1.0 - start)


@register("wd_taper")
class WDTaper(Technique):
    """Weight-decay taper: full weight decay until a training fraction, then a linear taper to a final
    factor at the end of the run."""

    Params = WDTaperParams
    params: WDTaperParams

    @hook
    def wd_schedule(self) -> Callable[[TrainState], float]:
        start, final = self.params.start_fraction, self.params.final

        def mult(state: TrainState) -> float:
            return taper_multiplier(state.fraction, start, final)

        return mult
