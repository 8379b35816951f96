"""The objects sites hand to techniques: the per-forward context, the training state, switches,
batch shapes, block schedules, evaluation emits and calibration batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


class Ctx:
    """Per-forward context every model-site module receives.

    ``idx``        token ids (B,T) int64
    ``x0``         the normalised embedding (B,T,D) (set after the embedding chain)
    ``layer``      physical index of the block being run; ``virtual`` its index in the schedule;
                   ``repeat`` how many times that physical block already ran in this forward (0 on
                   its first pass, 1 on the second pass of a looped block, ...)
    ``switches``   names of the switches that are on (a tuple, so torch.compile keeps one graph each)
    ``state``      a dict for cross-layer state (e.g. layer-0 values for value residual)
    ``rope``       the rotary tables of this forward; ``rotary`` the rotary module
    ``v`` / ``attn_input``  inside attention: the layer's values (B,T,KV,Dh) and its normalised input
    """

    __slots__ = (
        "attn_input", "idx", "layer", "repeat", "rope", "rotary", "state", "switches", "v", "virtual", "x0",
    )  # fmt: skip

    def __init__(self, idx: Tensor, switches: tuple[str, ...] = ()):
        self.idx = idx
        self.switches = switches
        self.state: dict[str, Any] = {}
        self.layer = -1
        self.virtual = -1
        self.repeat = 0
        self.x0: Tensor | None = None
        self.rope: Any = None
        self.rotary: Any = None
        self.v: Tensor | None = None
        self.attn_input: Tensor | None = None


@dataclass
class TrainState:
    """Where training stands, handed to schedule functions, switches and training events.

    ``fraction`` is the share of the run done: elapsed / max_seconds when capped by wall clock
    (whichever of that and step / iterations is larger), else step / iterations.
    ``max_seconds`` is the cap minus every technique's time reserve (0 = no cap).
    ``shared`` is a dict for state that techniques hand each other during training (e.g. the EMA
    weights, which SWA averages when both are in the stack); keys are technique names.
    """

    step: int = 0
    elapsed: float = 0.0
    iterations: int = 0
    max_seconds: float = 0.0
    lr_mult: float = 1.0
    switches: tuple[str, ...] = ()
    seq_len: int = 0
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        by_steps = self.step / self.iterations if self.iterations > 0 else 0.0
        if self.max_seconds > 0:
            return min(1.0, max(by_steps, self.elapsed / self.max_seconds))
        return min(1.0, by_steps)

    @property
    def step_seconds(self) -> float:
        """Mean seconds per step so far."""
        return self.elapsed / max(self.step, 1)


@dataclass(frozen=True)
class Switch:
    """A flag flipped once (off → on) by training progress.

    ``when(state)`` is checked after every step; ``expected`` is the run fraction at which it is
    expected to flip (orders the warm-up, which compiles every switch state before the timed run);
    ``at_eval`` switches stay on when the model is evaluated (structural ones such as depth
    recurrence), the others are training-only (late QAT).
    """

    name: str
    when: Callable[[TrainState], bool]
    expected: float = 0.5
    at_eval: bool = False


@dataclass(frozen=True)
class BatchShape:
    """The training sequence length over the run: every length it may return is in ``lengths``.

    ``lr_scale(state)``, when given, multiplies every group's learning rate on top of the LR
    schedule (a short re-warm-up after a length change); ``state.lr_mult``, which switches and
    weight averaging read, stays the schedule's multiplier.
    """

    lengths: tuple[int, ...]
    seq_len: Callable[[TrainState], int]
    lr_scale: Callable[[TrainState], float] | None = None


class BlockSchedule:
    """The order of physical blocks over virtual layers, split into encoder and decoder halves.

    The base model runs the encoder blocks pushing their outputs, then the decoder blocks, each
    popping one encoder output (last in, first out) through the skip-merge slot while any is left.
    ``orders()`` lists every order the schedule can produce; the skip count is the largest
    ``min(len(encoder), len(decoder))`` among them.
    """

    def __init__(self, encoder: tuple[int, ...], decoder: tuple[int, ...]):
        self.encoder, self.decoder = tuple(encoder), tuple(decoder)

    def order(self, switches: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.encoder, self.decoder

    def orders(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(self.encoder, self.decoder)]

    def num_skips(self) -> int:
        return max(min(len(e), len(d)) for e, d in self.orders())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.orders()})"


def unet_halves(num_layers: int) -> BlockSchedule:
    """The baseline: the first ⌊L/2⌋ blocks are the encoder, the rest the decoder."""
    n = num_layers // 2
    return BlockSchedule(tuple(range(n)), tuple(range(n, num_layers)))


@dataclass
class Emit:
    """Logits for the consecutive target positions ``start … start + N − 1`` of the stream.

    Target position i is token ``stream[i + 1]`` predicted from ``stream[: i + 1]``.
    """

    start: int
    logits: Tensor  # (N, V)


@dataclass
class CalibrationData:
    """Token batches for the ``calibrate`` event, drawn once and shared by every technique."""

    source: Iterator[Tensor]
    drawn: list[Tensor] = field(default_factory=list)

    def take(self, n: int) -> Iterator[Tensor]:
        """The first ``n`` batches (B,T) int64 (the same batches for every caller)."""
        for i in range(n):
            if i == len(self.drawn):
                self.drawn.append(next(self.source))
            yield self.drawn[i]
