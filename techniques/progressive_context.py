"""Progressive context growth: the training sequence length rises with the run fraction
(1024 → 2048 → 3072), with a short LR re-warm-up after each switch.

What: with lengths L_0 < L_1 < … < L_k and boundaries b_1 < … < b_k in (0, 1), a step at run
fraction f trains on sequences of L_i, i = #{j : b_j ≤ f} (f = ``state.fraction``: by wall clock
when the run is capped, inside the cap minus every technique's time reserve; else step /
iterations). The global batch stays ``train.train_batch_tokens`` tokens (fewer, longer sequences).
For the first ``rewarm_steps`` = R steps after a switch, every group's LR is multiplied by
(k + 1)/R at the k-th step on the new length (k = 0 … R − 1); the LR schedule's multiplier, which
switches and SWA read, is unchanged. Every length is compiled in the warm-up (one graph per
shape), so a switch costs no compile inside the timed run.

Why: short sequences are cheaper per token early, when the model learns local statistics; long
ones teach long-range use of the context late, and match a long evaluation window (the record
evaluates at 3072). The re-warm-up absorbs the jump in gradient statistics at a switch.

Source: PR #2014 (1024 until 10 %, 2048 until 70 %, then 3072; a 32-step re-warm-up; evaluation at
3072 with stride 1536) and the current record PR #2135.

Sites: the ``batch_shape`` slot (lengths, the length at each step, the re-warm-up factor).

Interactions: every length must divide ``train.micro_batch_tokens`` (checked by the trainer) and
none may exceed ``train.train_seq_len``, the model's training length (``partial_rope``'s NTK
extension treats longer forwards as extrapolation, and the default evaluation window is
``train.train_seq_len``): set it to the longest length. Loaders that read whole windows per
sequence (``shuffled_loader``, ``document_packing``) start new windows at each length; the
baseline's sequential stream only reshapes.

Evidence (records, 8×H100): −0.0010 BPB together with short-document TTT chunks (PR #2014). Measured
with pgolf on CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded
corpus, seeds 1337 / 1338; ``python bench/technique_effects.py --only progressive_context``):
lengths 32 → 64 → 128: Δval_bpb −0.0022 (−0.0034, −0.0009).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field, model_validator

from pgolf.registry import BatchShape, Params, PgolfError, Technique, TrainState, hook, register


class ProgressiveContextParams(Params):
    lengths: tuple[int, ...] = Field(
        (1024, 2048, 3072), min_length=1, description="training sequence lengths, shortest first"
    )
    boundaries: tuple[float, ...] = Field(
        (0.10, 0.70), description="run fractions at which each next length starts (one fewer than lengths)"
    )
    rewarm_steps: int = Field(
        32, ge=0, description="R: steps of linear LR re-warm-up after each switch (0: none)"
    )

    @model_validator(mode="after")
    def _shape(self) -> ProgressiveContextParams:
        if any(n < 2 for n in self.lengths) or list(self.lengths) != sorted(set(self.lengths)):
            raise ValueError(f"lengths must be increasing and at least 2, got {list(self.lengths)}")
        if len(self.boundaries) != len(self.lengths) - 1:
            raise ValueError(
                f"{len(self.lengths)} lengths need {len(self.lengths) - 1} boundaries, got {len(self.boundaries)}"
            )
        if list(self.boundaries) != sorted(set(self.boundaries)) or not all(
            0 < b < 1 for b in self.boundaries
        ):
            raise ValueError(
                f"boundaries must be increasing fractions in (0, 1), got {list(self.boundaries)}"
            )
        return self


def length_at(fraction: float, lengths: tuple[int, ...], boundaries: tuple[float, ...]) -> int:
    """L_i with i the number of boundaries ≤ fraction."""
    return lengths[bisect.bisect_right(boundaries, fraction)]


def rewarm_factor(steps_since_switch: int | None, rewarm_steps: int) -> float:
    """(k + 1)/R for the k-th step after a switch (k < R), else 1; 1 before any switch."""
    if steps_since_switch is None or rewarm_steps <= 0:
        return 1.0
    return min(1.0, (steps_since_switch + 1) / rewarm_steps)


@register("progressive_context")
class ProgressiveContext(Technique):
    """Progressive context growth: the training sequence length rises with the run fraction
    (1024 → 2048 → 3072), with a short LR re-warm-up after each switch."""

    Params = ProgressiveContextParams
    params: ProgressiveContextParams
    # the contract models train on 16-token sequences in 32-token micro-batches
    contract_params: ClassVar[dict[str, Any]] = {"lengths": [8, 16], "boundaries": [0.5], "rewarm_steps": 2}

    def __init__(self, params: ProgressiveContextParams, spec: Any):
        super().__init__(params, spec)
        self.current: int | None = None  # the length of the last step
        self.switched_at: int | None = None  # the step that trained first on it, after a switch

    def length(self, state: TrainState) -> int:
        return length_at(state.fraction, self.params.lengths, self.params.boundaries)

    def lr_scale(self, state: TrainState) -> float:
        n = self.length(state)
        if n != self.current:
            if self.current is not None:
                self.switched_at = state.step
                self.log(f"step {state.step}: training length {self.current} → {n}")
            self.current = n
        since = None if self.switched_at is None else state.step - self.switched_at
        return rewarm_factor(since, self.params.rewarm_steps)

    @hook
    def batch_shape(self) -> BatchShape:
        longest = self.params.lengths[-1]
        if longest > self.spec.train_seq_len:
            raise PgolfError(
                f"techniques.progressive_context.lengths reaches {longest}, more than train.train_seq_len="
                f"{self.spec.train_seq_len}; set train.train_seq_len to the longest length (the model's "
                "positional extension and the default evaluation window use it)"
            )
        return BatchShape(self.params.lengths, self.length, self.lr_scale)

    @hook
    def on_train_start(self) -> None:
        self.current, self.switched_at = None, None

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "switched_at": self.switched_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current, self.switched_at = state.get("current"), state.get("switched_at")
