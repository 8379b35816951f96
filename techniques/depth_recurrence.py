"""Depth recurrence: from a training fraction on, run a range of physical blocks several times
(weights shared), so the model gets more virtual layers than it stores.

What: before the switch the blocks run as the baseline's U-Net halves. Once the switch
``depth_recurrence`` is on (training fraction ≥ ``start_fraction``; it stays on for evaluation),
the P physical blocks run in the virtual order
[0 … a−1] + [a … b]×(n+1) + [b+1 … P−1] with a = ``loop_start``, b = ``loop_end``,
n = ``num_loops``; the first ⌊V/2⌋ of the V virtual layers are the encoder (they push U-Net
skips), the rest the decoder. Alternatively ``encoder`` and ``decoder`` give the two lists of
physical indices explicitly. P = 11, a = 3, b = 5, n = 2 gives 17 virtual layers:
encoder [0,1,2,3,4,5,3,4], decoder [5,3,4,5,6,7,8,9,10]. The skip count is the largest of the
two orders (8 here), so skip-merge weights are sized for the looped order.

Why: more depth for the same artifact bytes; switching late keeps the cheaper, more stable
shallow model for the first part of training, when step time matters most.

Source: parameter-golf ``R/2026-03-31`` (layers 4–5 once, from step 3000), ``R/2026-04-05``
(loop 4–5 ×2 from fraction 0.50), ``R/2026-04-09`` … ``R/2026-04-29`` and PR #2135 (loop 3–5 ×2
from fraction 0.35).

Sites: the ``schedule`` slot (a BlockSchedule whose order depends on the switch) and the
``switches`` chain (the switch, ``at_eval``: structural, so it stays on when the model is
scored; the warm-up compiles both orders before the timed run).

Interactions: every physical block must appear in the looped order (a block that never runs gets
no gradient). Quantization error compounds through the repeats (GPTQ, noisy QAT); value residual
and BigramHash were harmful or redundant on looped stacks; per-layer techniques act per
physical layer on every pass (ln_scale reuses the physical factor; XSA on every pass was
slightly worse); gated_skips is sized by the looped order's skip count.

Evidence (records, 8×H100): layers 4–5 ≈ −0.003 BPB (``R/2026-04-03``); delayed start 1.1163 →
1.1153; step time ≈ 96 → 141 ms at activation (04-27). Measured with pgolf on CPU (the baseline
shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337 / 1338;
``python bench/technique_effects.py --only depth_recurrence``): layers 1–2 looped once from 35 %:
Δval_bpb +0.0046 (+0.0071, +0.0022) (the extra passes start late in a short run).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from pgolf.registry import BlockSchedule, Params, PgolfError, Switch, Technique, hook, register
from pgolf.registry.api.context import unet_halves

SWITCH = "depth_recurrence"
Order = tuple[tuple[int, ...], tuple[int, ...]]


class DepthRecurrenceParams(Params):
    loop_start: int = Field(3, ge=0, description="a: first physical layer of the looped range")
    loop_end: int = Field(5, ge=0, description="b: last physical layer of the looped range (inclusive)")
    num_loops: int = Field(2, ge=1, le=64, description="n: extra passes over layers a … b")
    encoder: tuple[int, ...] | None = Field(
        None, min_length=1, description="explicit encoder order (physical indices), with decoder"
    )
    decoder: tuple[int, ...] | None = Field(
        None, min_length=1, description="explicit decoder order (physical indices), with encoder"
    )
    start_fraction: float = Field(
        0.35,
        ge=0.0,
        le=1.0,
        description="training fraction at which the looped order switches on (0: from the first step)",
    )

    @model_validator(mode="after")
    def _one_form(self) -> DepthRecurrenceParams:
        if (self.encoder is None) != (self.decoder is None):
            raise ValueError("give both encoder and decoder, or neither")
        loop_keys = {"loop_start", "loop_end", "num_loops"} & self.model_fields_set
        if self.encoder is not None and loop_keys:
            raise ValueError(f"give either encoder/decoder or {'/'.join(sorted(loop_keys))}, not both")
        if self.loop_start > self.loop_end:
            raise ValueError(f"loop_start={self.loop_start} is after loop_end={self.loop_end}")
        return self


def virtual_layers(num_layers: int, loop_start: int, loop_end: int, num_loops: int) -> list[int]:
    """[0 … a−1] + [a … b]×(n+1) + [b+1 … P−1]."""
    looped = list(range(loop_start, loop_end + 1))
    return [*range(loop_start), *looped * (num_loops + 1), *range(loop_end + 1, num_layers)]


def split_halves(order: list[int]) -> Order:
    """The first ⌊V/2⌋ virtual layers are the encoder, the rest the decoder."""
    n = len(order) // 2
    return tuple(order[:n]), tuple(order[n:])


class RecurrentSchedule(BlockSchedule):
    """U-Net halves until the switch is on, then the looped order."""

    def __init__(self, plain: Order, looped: Order, switch: str = SWITCH):
        super().__init__(*plain)
        self.looped, self.switch = looped, switch

    def order(self, switches: tuple[str, ...]) -> Order:
        return self.looped if self.switch in switches else (self.encoder, self.decoder)

    def orders(self) -> list[Order]:
        return [(self.encoder, self.decoder), self.looped]


@register("depth_recurrence")
class DepthRecurrence(Technique):
    """Depth recurrence: from a training fraction on, run a range of physical blocks several times
    (weights shared), so the model gets more virtual layers than it stores."""

    Params = DepthRecurrenceParams
    params: DepthRecurrenceParams
    # the contract models have 2 and 4 layers; switch on after the first of its two steps
    contract_params: ClassVar[dict[str, Any]] = {
        "loop_start": 0,
        "loop_end": 1,
        "num_loops": 1,
        "start_fraction": 0.5,
    }

    def looped_order(self) -> Order:
        """The order once the switch is on; raises naming the key when it does not fit the model."""
        p, n = self.params, self.spec.num_layers
        where = f"model.num_layers={n}: physical layers 0 … {n - 1}"
        if p.encoder is not None and p.decoder is not None:
            for key, seq in (("encoder", p.encoder), ("decoder", p.decoder)):
                bad = [i for i in seq if not 0 <= i < n]
                if bad:
                    raise PgolfError(f"techniques.depth_recurrence.{key} uses layer(s) {bad} outside {where}")
            order: Order = (p.encoder, p.decoder)
        else:
            if p.loop_end >= n:
                raise PgolfError(f"techniques.depth_recurrence.loop_end={p.loop_end} is outside {where}")
            order = split_halves(virtual_layers(n, p.loop_start, p.loop_end, p.num_loops))
        missing = sorted(set(range(n)) - {*order[0], *order[1]})
        if missing:
            raise PgolfError(
                f"techniques.depth_recurrence: layer(s) {missing} never run in the looped order "
                f"encoder {list(order[0])} decoder {list(order[1])}; every physical layer must appear "
                "(a layer that never runs gets no gradient)"
            )
        return order

    @hook
    def schedule(self) -> RecurrentSchedule:
        plain = unet_halves(self.spec.num_layers)
        return RecurrentSchedule((plain.encoder, plain.decoder), self.looped_order())

    @hook
    def switches(self) -> list[Switch]:
        f = self.params.start_fraction
        return [Switch(SWITCH, lambda s: s.fraction >= f, expected=f, at_eval=True)]
