"""Cosine LR schedule: the multiplier of every group follows a half cosine from 1 down to
``final`` over the run fraction.

What: mult(f) = final + (1 − final)·½(1 + cos(π·f)), f = ``state.fraction`` — the share of the run
done, by wall clock when the run is capped (elapsed / (cap − every technique's time reserve),
whichever of that and step / iterations is larger), else step / iterations. mult(0) = 1,
mult(1) = final. No warm-up (no record uses an LR warm-up; the compile warm-up is separate).

Why: a smooth decay over the whole run is the common alternative to warmup-stable-decay; the
"always decaying" runs of ``R/2026-03-19_WarmdownQuantization`` (warmdown over the whole run) cut
the post-quantization gap from 0.014 to 0.005 BPB, and a cosine keeps more of the early high-LR
progress than a full linear decay does.

Source: the cosine form the records use across TTT chunks (η_c = η0·½(1 + cos(π·c/(C−1))));
as a training schedule it is a pgolf variant (no record trained with it), kept as the
``lr_schedule`` slot's second filler to compare against ``warmdown_fraction``.

Sites: the ``lr_schedule`` slot.

Interactions: conflicts with ``warmdown_fraction`` (both fill the slot). Switches keyed on the LR
multiplier move with it: ``late_qat`` (threshold 0.15) turns on at f ≈ 0.75 with ``final`` = 0,
and ``swa`` (start_lr_scale 0.4) starts snapshots at f ≈ 0.56.

Evidence: Measured with pgolf on CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048
tokens on the embedded corpus, seeds 1337 / 1338; ``python bench/technique_effects.py --only
cosine_lr``): Δval_bpb +0.0309 (+0.0328, +0.0290) (against the 40-step linear warmdown).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import Field

from pgolf.registry import Params, Technique, TrainState, hook, register


class CosineLRParams(Params):
    final: float = Field(0.0, ge=0.0, le=1.0, description="multiplier at the end of the run (floor)")


def cosine_multiplier(fraction: float, final: float) -> float:
    """final + (1 − final)·½(1 + cos(π·f)) for f clamped to [0, 1]."""
    f = min(max(fraction, 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * f))


@register("cosine_lr")
class CosineLR(Technique):
    """Cosine LR schedule: the multiplier of every group follows a half cosine from 1 down to
    ``final`` over the run fraction."""

    Params = CosineLRParams
    params: CosineLRParams
    conflicts = ("warmdown_fraction",)

    @hook
    def lr_schedule(self) -> Callable[[TrainState], float]:
        final = self.params.final

        def mult(state: TrainState) -> float:
            return cosine_multiplier(state.fraction, final)

        return mult
