"""Warmdown by run fraction: full LR until the last ``fraction`` of the run, then a linear decay
to the floor ``min_lr`` (or the baseline's warmdown over the last ``iters`` steps, with that floor).

What: mult(f) = 1 for f < 1 − w, else max((1 − f)/w, min_lr), with w = ``fraction`` and
f = ``state.fraction`` — elapsed / (cap − every technique's time reserve) when the run is capped
by wall clock (the trainer subtracts the reserves, e.g. GPTQ calibration, from the cap), whichever
of that and step / iterations is larger; step / iterations without a cap.
With ``iters`` = N instead: mult = max(b, min_lr) with b the baseline's warmdown (the default LR
schedule): linear over the last N steps, or, when capped, from the moment the time left falls
below N times the mean step time so far, reaching 0 at the cap minus the reserves.

Why: the baseline's warmdown is sized in steps and converted to seconds with the mean step time
so far, which moves whenever the step time changes (depth recurrence switching on, validation,
sequence-length schedules); a fraction of the time budget is stable, and a non-zero floor keeps
the last updates useful ("final ~25 % keeps doing useful updates", 04-23).

Source: parameter-golf from ``R/2026-04-01_Vocab4096_MLPMult4_WD085`` on: ``WARMDOWN_FRAC`` 0.667
(04-05), 0.72 (04-09), 0.75 (04-14+), 0.85 (the 04-27 9-hparam stack); ``MIN_LR`` 0 → 0.10
(``R/2026-04-23``). Defaults: the last record's w = 0.85 and min_lr = 0.10.

Sites: the ``lr_schedule`` slot.

Interactions: conflicts with ``cosine_lr`` (both fill the slot); ``train.warmdown_iters`` is not
used when it is in the stack (``iters`` is this technique's own step count). With min_lr ≥ a switch threshold (``late_qat`` 0.15 with
min_lr 0.15 or more) that switch never turns on; with the defaults ``late_qat`` turns on at
f ≈ 0.87 and ``swa`` (0.4) at f ≈ 0.66.

Evidence: bundled with each record's other changes (no isolated number). Measured with pgolf on CPU
(the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337
/ 1338; ``python bench/technique_effects.py --only warmdown_fraction``): Δval_bpb −0.0036 (−0.0025,
−0.0047) (against the 40-step linear warmdown).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field, model_validator

from pgolf.registry import Params, Technique, TrainState, hook, register
from pgolf.registry.run.optim import lr_multiplier


class WarmdownFractionParams(Params):
    fraction: float = Field(0.85, gt=0.0, le=1.0, description="w: share of the run spent decaying")
    min_lr: float = Field(0.10, ge=0.0, le=1.0, description="floor of the multiplier during warmdown")
    iters: int | None = Field(
        None, ge=1, description="warm down over the last N steps (the baseline's form) instead of a fraction"
    )

    @model_validator(mode="after")
    def _one_form(self) -> WarmdownFractionParams:
        if self.iters is not None and "fraction" in self.model_fields_set:
            raise ValueError("give fraction or iters, not both")
        return self


def warmdown_multiplier(fraction: float, warmdown: float, min_lr: float) -> float:
    """1 for f < 1 − w, else max((1 − f)/w, min_lr)."""
    f = min(max(fraction, 0.0), 1.0)
    if f < 1.0 - warmdown:
        return 1.0
    return max((1.0 - f) / warmdown, min_lr)


@register("warmdown_fraction")
class WarmdownFraction(Technique):
    """Warmdown by run fraction: full LR until the last ``fraction`` of the run, then a linear decay
    to the floor ``min_lr`` (or the baseline's warmdown over the last ``iters`` steps, with that floor)."""

    Params = WarmdownFractionParams
    params: WarmdownFractionParams
    conflicts = ("cosine_lr",)

    @hook
    def lr_schedule(self) -> Callable[[TrainState], float]:
        w, floor, iters = self.params.fraction, self.params.min_lr, self.params.iters

        def mult(state: TrainState) -> float:
            if iters is not None:
                base = lr_multiplier(state.step, state.elapsed, iterations=state.iterations,
                                     warmdown_iters=iters, max_wallclock_seconds=state.max_seconds)  # fmt: skip
                return max(base, floor)
            return warmdown_multiplier(state.fraction, w, floor)

        return mult
