"""Scoring: val_loss (nats per token) and val_bpb with the challenge's byte accounting.

The validation stream of n tokens has n − 1 targets; target position i is token i + 1 predicted
from tokens 0..i. The **scorer** slot emits logits for consecutive positions in stream order
(:class:`~pgolf.registry.api.context.Emit`); the default cuts the stream into consecutive windows of
``seq_len`` that each start with no context (the baseline's non-overlapping evaluation) and, unlike
the baseline, also scores the last, partial window. A scorer may change the model's weights only
between emits (test-time training on positions already scored).

For each emit the runner takes log-probabilities, runs the **logprobs** chain (temperature, n-gram
mixing; each must return a distribution normalised over the whole vocabulary, checked), records
every position's NLL and bytes, and only then calls ``observe`` on the chain and resumes the
scorer: score-first by construction.

val_loss = Σ NLL / N_targets;  val_bpb = Σ NLL / (ln 2 · Σ bytes) = val_loss / ln 2 · N / bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
) -> EvalResult:
    """Score every target of ``tokens`` (1-D ids) with the stack's scorer and logprobs chain."""
    if want_nll and runtime.distributed:
        raise PgolfError("per-token NLL dumps are written by single-process evaluation only")
    sites = sites or Dispatcher(())
    t0 = time.perf_counter()
    stream = tokens.to(torch.int64)
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
    dev_stream = stream.to(runtime.device)
    lut = lut.to(runtime.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    nll_parts: list[Tensor] = []
    # one process: emits must tile [0, N) in order; several: each rank's emits increase, and a
    # per-position count summed over ranks must be exactly one everywhere
    marks = torch.zeros(n_targets, dtype=torch.uint8, device=runtime.device) if runtime.distributed else None
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
                logits = emit.logits.float()
                if chain:
                    positions = torch.arange(start, start + n, device=runtime.device)
                    lp = F.log_softmax(logits, dim=-1)
                    for t in chain:
                        lp = t.call("transform_logprobs", logprobs=lp, positions=positions,
                                    context=dev_stream[: start + n])  # fmt: skip
                        check_normalised(lp, t.name, start)
                    nll = -lp.gather(1, targets[:, None]).squeeze(1)
                else:
                    nll = F.cross_entropy(logits, targets, reduction="none")
                loss_sum += nll.double().sum()
                byte_sum += target_bytes(dev_stream[start : start + n], targets, lut).double().sum()
                if want_nll:
                    nll_parts.append(nll.cpu())
            if observers:
                positions = torch.arange(start, start + n, device=runtime.device)
                for t in observers:
                    t.call("observe", positions=positions, targets=targets)
            nxt = start + n
    finally:
        model.train(was_training)
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
    loss, nbytes = runtime.all_reduce_sum([loss_sum.item(), byte_sum.item()])
    runtime.synchronize()
    nll_arr = torch.cat(nll_parts).numpy().astype(np.float32) if nll_parts else None
    if want_nll and nll_arr is None:
        nll_arr = np.zeros(0, dtype=np.float32)
    return EvalResult(loss, max(n_targets, 0), int(nbytes), time.perf_counter() - t0, nll_arr)


def check_normalised(logprobs: Tensor, technique: str, start: int) -> None:
    """Every row of ``logprobs`` must be a distribution over the whole vocabulary."""
    lse = torch.logsumexp(logprobs.double(), dim=-1)
    bad = ~(lse.abs() <= NORMALISATION_TOLERANCE)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise PgolfError(
            f"technique {technique!r} returned log-probabilities that are not a distribution over the "
            f"vocabulary at position {start + i}: they sum to {math.exp(float(lse[i])):.6g} instead of 1"
        )
