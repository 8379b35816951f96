"""Scoring: val_loss (nats per token) and val_bpb with the challenge's byte accounting.

The validation stream of n tokens has n − 1 targets; target position i is token i + 1 predicted
from tokens 0..i. The **scorer** slot emits logits for consecutive positions in stream order
(:class:`~pgolf.registry.api.context.Emit`); the default cuts the stream into consecutive windows of
``seq_len`` that each start with no context (the baseline's non-overlapping evaluation) and, unlike
the baseline, also scores the last, partial window. A scorer may change the model's weights only
between emits (test-time training on positions already scored).

For each emit the runner takes log-probabilities, runs the **logprobs** chain (temperature, n-gram
mixing; each must return a distribution normalised over the whole vocabulary: every row is checked,
and one that is not is recorded as a :class:`Violation` that makes the run not legal), records
every position's NLL and bytes, and only then calls ``observe`` on the chain and resumes the
scorer: score-first by construction. :func:`scored_stream` is that loop; :func:`evaluate` runs it
over the whole stream, the legality probes (:mod:`.legality`) over a prefix.

val_loss = Σ NLL / N_targets;  val_bpb = Σ NLL / (ln 2 · Σ bytes) = val_loss / ln 2 · N / bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api.context import Emit
from ..api.errors import PgolfError
from ..api.sites import Dispatcher
from .bpb import ByteLUT, target_bytes
from .runtime import Runtime

NORMALISATION_TOLERANCE = 1e-3
"""Largest |log Σ p| accepted from the logprobs chain (a distribution must sum to 1)."""


@dataclass
class EvalResult:
    loss_sum: float  # nats
    tokens: int
    bytes: int
    seconds: float
    nll: np.ndarray | None = None  # per target, in stream order (single process only)
    violations: list[Violation] = field(default_factory=list)  # distributions that broke a rule

    @property
    def val_loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def val_bpb(self) -> float:
        return self.loss_sum / (math.log(2) * max(self.bytes, 1))


def windows(n_tokens: int, seq_len: int) -> int:
    """Number of windows that cover the n_tokens − 1 targets."""
    return max(0, math.ceil((n_tokens - 1) / seq_len))


def rank_range(n: int, runtime: Runtime) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n items."""
    return n * runtime.rank // runtime.world_size, n * (runtime.rank + 1) // runtime.world_size


def non_overlapping(
    model: nn.Module,
    stream: Tensor,
    runtime: Runtime,
    seq_len: int,
    batch_tokens: int,
    switches: tuple[str, ...] = (),
) -> Iterator[Emit]:
    """The default scorer: windows [k·L, (k+1)·L) of the targets, each with no earlier context,
    batched ``batch_tokens // seq_len`` at a time; the last window is padded (padding not emitted)."""
    n_targets = stream.numel() - 1
    n_win = windows(stream.numel(), seq_len)
    padded = torch.zeros(n_win * seq_len + 1, dtype=torch.int64)
    padded[: stream.numel()] = stream.to(torch.int64)
    x_all = padded[:-1].view(n_win, seq_len)
    lo, hi = rank_range(n_win, runtime)
    per_batch = max(1, batch_tokens // seq_len)
    for start in range(lo, hi, per_batch):
        end = min(start + per_batch, hi)
        x = x_all[start:end].to(runtime.device, non_blocking=True)
        with torch.no_grad(), runtime.autocast():
            logits = model.logits(x, switches)  # type: ignore[operator]
        first = start * seq_len
        n = min(end * seq_len, n_targets) - first
        yield Emit(first, logits.reshape(-1, logits.size(-1))[:n])


@dataclass(frozen=True)
class Violation:
    """A rule an evaluated distribution broke, found while scoring (recorded, not raised, so the
    run's result can say why it is not legal)."""

    probe: str  # the legality probe it belongs to ("normalisation")
    technique: str
    position: int  # the first target position where it happened
    message: str


@dataclass
class Scored:
    """One emit after the runner scored it: target positions ``start … start + n − 1``."""

    start: int
    targets: Tensor  # (n,) int64: stream[start + 1 : start + n + 1]
    nll: Tensor  # (n,) float32, nats
    logits: Tensor  # (n, V) fp32, as the scorer emitted them
    logprobs: Tensor | None  # (n, V) after the logprobs chain; None when the stack has no chain

    def rows(self) -> Tensor:
        """The evaluated log-distributions (n, V) whose target entries are the NLLs."""
        return self.logprobs if self.logprobs is not None else F.log_softmax(self.logits, dim=-1)


def scored_stream(
    model: nn.Module,
    stream: Tensor,
    runtime: Runtime,
    *,
    seq_len: int,
    batch_tokens: int,
    sites: Dispatcher | None = None,
    switches: tuple[str, ...] = (),
    violations: list[Violation] | None = None,
    marks: Tensor | None = None,
) -> Iterator[Scored]:
    """The runner's loop: each emit of the stack's scorer, through the logprobs chain, with its
    NLLs — yielded **before** ``observe`` is called, which happens when the consumer asks for the
    next one. A consumer may stop early (the legality probes do); :func:`evaluate` consumes it all.

    Raises :class:`PgolfError` when the scorer emits positions out of order (one process) or
    beyond the stream; a distribution of the chain that does not sum to 1 within
    :data:`NORMALISATION_TOLERANCE` is appended to ``violations`` (first position per technique)
    and scoring goes on. ``marks`` (several processes): per-position counts, incremented here."""
    sites = sites or Dispatcher(())
    stream = stream.to(torch.int64)
    n_targets = stream.numel() - 1
    scorer = sites.filler("scorer")
    if scorer is not None:
        emits: Iterator[Emit] = scorer.call(
            "score", model=model, stream=stream, runtime=runtime, seq_len=seq_len,
            batch_tokens=batch_tokens, switches=switches,
        )  # fmt: skip
        who = f"scorer {scorer.name!r}"
    else:
        emits = non_overlapping(model, stream, runtime, seq_len, batch_tokens, switches)
        who = "the default scorer"
    chain = sites.implementers("transform_logprobs")
    observers = sites.implementers("observe")
    flagged: set[str] = set()
    dev_stream = stream.to(runtime.device)
    nxt = 0
    was_training = model.training
    model.eval()
    try:
        for emit in emits:
            start, n = emit.start, int(emit.logits.size(0))
            in_order = start >= nxt if marks is not None else start == nxt
            if not in_order or n < 1 or start + n > n_targets:
                raise PgolfError(
                    f"{who} emitted positions {start}..{start + n - 1} after position {nxt - 1} "
                    f"(of {n_targets}): a scorer must emit every position once, in stream order"
                )
            if marks is not None:
                marks[start : start + n] += 1
            with torch.no_grad():
                targets = dev_stream[start + 1 : start + n + 1]
                logits = emit.logits.detach().float()
                lp: Tensor | None = None
                if chain:
                    positions = torch.arange(start, start + n, device=runtime.device)
                    lp = F.log_softmax(logits, dim=-1)
                    for t in chain:
                        lp = t.call("transform_logprobs", logprobs=lp, positions=positions,
                                    context=dev_stream[: start + n])  # fmt: skip
                        if t.name not in flagged:
                            bad = unnormalised(lp, t.name, start)
                            if bad is not None:
                                flagged.add(t.name)
                                if violations is not None:
                                    violations.append(bad)
                    nll = -lp.gather(1, targets[:, None]).squeeze(1)
                else:
                    nll = F.cross_entropy(logits, targets, reduction="none")
            yield Scored(start, targets, nll, logits, lp)
            if observers:
                positions = torch.arange(start, start + n, device=runtime.device)
                for t in observers:
                    t.call("observe", positions=positions, targets=targets)
            nxt = start + n
    finally:
        model.train(was_training)
        close = getattr(emits, "close", None)
        if close is not None:
            close()


def evaluate(
    model: nn.Module,
    tokens: Tensor,
    lut: ByteLUT,
    *,
    seq_len: int,
    batch_tokens: int,
    runtime: Runtime,
    sites: Dispatcher | None = None,
    switches: tuple[str, ...] = (),
    want_nll: bool = False,
    inspect: Callable[[Scored], None] | None = None,
) -> EvalResult:
    """Score every target of ``tokens`` (1-D ids) with the stack's scorer and logprobs chain;
    ``inspect`` sees each emit once scored (the legality probes record what they compare with)."""
    if want_nll and runtime.distributed:
        raise PgolfError("per-token NLL dumps are written by single-process evaluation only")
    t0 = time.perf_counter()
    stream = tokens.to(torch.int64)
    n_targets = stream.numel() - 1
    dev_stream = stream.to(runtime.device)
    lut = lut.to(runtime.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    nll_parts: list[Tensor] = []
    violations: list[Violation] = []
    # one process: emits must tile [0, N) in order; several: each rank's emits increase, and a
    # per-position count summed over ranks must be exactly one everywhere
    marks = torch.zeros(n_targets, dtype=torch.uint8, device=runtime.device) if runtime.distributed else None
    nxt = 0
    for sc in scored_stream(model, stream, runtime, seq_len=seq_len, batch_tokens=batch_tokens,
                            sites=sites, switches=switches, violations=violations, marks=marks):  # fmt: skip
        n = sc.nll.numel()
        loss_sum += sc.nll.double().sum()
        byte_sum += target_bytes(dev_stream[sc.start : sc.start + n], sc.targets, lut).double().sum()
        if want_nll:
            nll_parts.append(sc.nll.cpu())
        if inspect is not None:
            inspect(sc)
        nxt = sc.start + n
    scorer = (sites or Dispatcher(())).filler("scorer")
    who = f"scorer {scorer.name!r}" if scorer is not None else "the default scorer"
    if marks is not None:
        import torch.distributed as dist

        dist.all_reduce(marks, op=dist.ReduceOp.SUM)
        bad = (marks != 1).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise PgolfError(
                f"{who} scored position {i} {int(marks[i])} time(s) across ranks: every target must be "
                "scored exactly once"
            )
    elif nxt != n_targets:
        raise PgolfError(f"{who} scored positions 0..{nxt - 1} of {n_targets}: every target must be scored")
    loss, nbytes, n_bad = runtime.all_reduce_sum([loss_sum.item(), byte_sum.item(), float(len(violations))])
    if n_bad and not violations:  # another rank found it; the details stay in that rank's log
        violations.append(Violation("normalisation", "?", -1, "normalisation: a logprobs transform "
                                    "returned a distribution that does not sum to 1 on another rank"))  # fmt: skip
    runtime.synchronize()
    nll_arr = torch.cat(nll_parts).numpy().astype(np.float32) if nll_parts else None
    if want_nll and nll_arr is None:
        nll_arr = np.zeros(0, dtype=np.float32)
    return EvalResult(loss, max(n_targets, 0), int(nbytes), time.perf_counter() - t0, nll_arr, violations)


def unnormalised(logprobs: Tensor, technique: str, start: int) -> Violation | None:
    """The first row of ``logprobs`` (N,V) that is not a distribution over the whole vocabulary
    (|log Σ p| > :data:`NORMALISATION_TOLERANCE`), as a :class:`Violation`; None if every row is."""
    lse = torch.logsumexp(logprobs.double(), dim=-1)
    bad = ~(lse.abs() <= NORMALISATION_TOLERANCE)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0, 0])
    total = math.exp(min(float(lse[i]), 700.0)) if math.isfinite(float(lse[i])) else float(lse[i])
    return Violation(
        "normalisation",
        technique,
        start + i,
        f"normalisation: technique {technique!r} returned log-probabilities that are not a "
        f"distribution over the vocabulary at position {start + i}: they sum to {total:.6g} "
        f"instead of 1 ({int(bad.sum())} of {bad.numel()} positions of that emit)",
    )
