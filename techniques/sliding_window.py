"""Sliding-window evaluation: score every token with at least ``seq_len − stride`` tokens of context.

What: windows of L = ``eval.seq_len`` input tokens start at ws = 0, S, 2S, … (S = ``stride``)
while ws + L − S < N (N = number of targets). Window 0 scores all its L positions; every later
window scores only its last S positions, so each target is scored exactly once, all but the first
L with ≥ L − S tokens of context. The last window may be shorter than L (it ends at the last
target). Windows are batched (``eval.batch_tokens // L`` per forward) and split across ranks in
contiguous runs; each batch is emitted as one run of consecutive positions. With L longer than the
training length this is long-context evaluation.

Why: the baseline's non-overlapping windows score the first tokens of every window with almost no
context; overlapping windows give each token a long context for the price of L/S forwards per
token.

Source: parameter-golf ``R/2026-03-19_SlidingWindowEval`` (L 1024, S 64); every later record
(L 2048, S 64). The pre-04-01 filter that double-counted ≈2 k tail tokens is not reproduced: the
runner checks that every target is scored exactly once.

Interactions: fills the ``scorer`` slot (conflicts with other scorers such as score-first TTT,
which does its own sliding windows); logprobs transforms (temperature, n-gram) apply on top.
Evaluation time grows by L/S.

Evidence (records, 8×H100): 1.2244 → 1.1925 (−0.0319) on the unchanged baseline, eval 70 s;
SP8192 stack −0.017. Not yet measured with pgolf.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Emit, Params, PgolfError, Technique, hook, register
from pgolf.registry.run.evaluate import rank_range
from pgolf.registry.run.runtime import Runtime


class SlidingWindowParams(Params):
    stride: int = Field(64, ge=1, description="S: positions scored per window after the first")


def check_stride(technique: str, stride: int, seq_len: int) -> None:
    """A stride longer than the evaluation window would leave targets unscored."""
    if stride > seq_len:
        raise PgolfError(
            f"{technique}.stride={stride} is longer than the evaluation window eval.seq_len={seq_len}"
        )


def window_starts(n_targets: int, seq_len: int, stride: int) -> list[int]:
    """Start token ws of every window: 0, S, 2S, … while ws + L − S < N (at least one window)."""
    if n_targets <= 0:
        return []
    starts = [0]
    while starts[-1] + seq_len < n_targets:
        starts.append(starts[-1] + stride)
    return starts


def scored_range(ws: int, n_targets: int, seq_len: int, stride: int) -> tuple[int, int]:
    """Target positions [a, b) window ``ws`` scores: all of window 0, the last S of the others."""
    end = min(ws + seq_len, n_targets)
    return (0 if ws == 0 else ws + seq_len - stride), end


def sliding_windows(
    model: nn.Module,
    stream: Tensor,
    runtime: Runtime,
    seq_len: int,
    stride: int,
    windows_per_batch: int,
    lo: int = 0,
    hi: int | None = None,
    switches: tuple[str, ...] = (),
) -> Iterator[Emit]:
    """Emit the scored positions of windows [lo, hi) of the stream, batch by batch."""
    n_targets = stream.numel() - 1
    starts = window_starts(n_targets, seq_len, stride)
    hi = len(starts) if hi is None else hi
    for b0 in range(lo, hi, windows_per_batch):
        batch = starts[b0 : min(b0 + windows_per_batch, hi)]
        x = torch.zeros(len(batch), seq_len, dtype=torch.int64)
        for i, ws in enumerate(batch):
            piece = stream[ws : min(ws + seq_len, n_targets)]
            x[i, : piece.numel()] = piece
        with torch.no_grad(), runtime.autocast():
            logits = model.logits(x.to(runtime.device), switches)  # type: ignore[operator]
        parts, first = [], None
        for i, ws in enumerate(batch):
            a, b = scored_range(ws, n_targets, seq_len, stride)
            if first is None:
                first = a
            parts.append(logits[i, a - ws : b - ws])
        assert first is not None
        yield Emit(first, torch.cat(parts))


@register("sliding_window")
class SlidingWindow(Technique):
    """Sliding-window evaluation: score every token with at least ``seq_len − stride`` tokens of context."""

    Params = SlidingWindowParams
    params: SlidingWindowParams
    legality = ("score_first",)

    @hook
    def score(
        self,
        model: nn.Module,
        stream: Tensor,
        runtime: Runtime,
        seq_len: int,
        batch_tokens: int,
        switches: tuple[str, ...],
    ) -> Iterator[Emit]:
        stride = self.params.stride
        check_stride(self.name, stride, seq_len)
        lo, hi = rank_range(len(window_starts(stream.numel() - 1, seq_len, stride)), runtime)
        per_batch = max(1, batch_tokens // seq_len)
        return sliding_windows(model, stream, runtime, seq_len, stride, per_batch, lo, hi, switches)
