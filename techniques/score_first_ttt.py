"""Score-first test-time training: score a chunk of the validation stream, then train on it.

What: the sliding windows of the evaluation (length L = ``eval.seq_len``, ``stride``) are grouped
by the chunk of ``chunk_tokens`` target positions that holds their first scored position. For
chunk c = 0 … n−1: (1) every window of the chunk is scored with the current weights (no
gradient) and emitted — the runner records those NLLs; (2) unless c is the last chunk, the model
trains on the chunk's own tokens (rows of L tokens, ``batch_rows`` rows per step, ``epochs``
passes) with SGD (``momentum``) or AdamW (``optimizer``), learning rate
η_c = η0·½(1 + cos(π·c/(n−1))), global gradient clipping at ``grad_clip``. The physical blocks
``blocks`` selects adapt, except the first ``freeze_blocks``; every parameter outside the blocks
(embedding, head, skip weights) adapts. Weights persist across chunks. Gradients run through the
model's own forward (every technique of the stack is in it), and are averaged over ranks. The
scorer asks the future probe to cut inside the second chunk (after the first update) and at the
chunk boundary.

Why: the validation text is one long stream; adapting to what was just read lowers the loss of
what follows, and training only on tokens already scored keeps every score causal.

Source: parameter-golf PR #461 → #549 (legal score-first TTT); ``R/2026-03-23`` (η0 0.002),
``R/2026-04-06``+ (η0 0.005, 3 epochs, C = 32,768, 32 rows, all blocks trainable).

Interactions: fills the ``scorer`` slot (it does its own sliding windows: conflicts with
``sliding_window``); logprobs transforms apply to its emits. Reported neutral or negative on
full-GPTQ SP1024 stacks (``R/2026-03-25``); AdamW full-weight TTT destroys GPTQ's narrow minima
(SGD only). Evaluation time grows with epochs × chunk tokens.

Evidence (records, 8×H100): −0.0025 (03-23, 3 seeds), −0.0021 (04-06), −0.0017 (04-09). Not yet
measured with pgolf.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Emit, Layers, LayerSelector, Params, Technique, hook, register
from pgolf.registry.run.evaluate import rank_range
from pgolf.registry.run.runtime import Runtime
from pgolf.techniques.sliding_window import check_stride, scored_range, sliding_windows, window_starts


class ScoreFirstTTTParams(Params):
    chunk_tokens: int = Field(32_768, ge=1, description="C: target positions per chunk")
    epochs: int = Field(3, ge=0, le=100, description="passes over each scored chunk")
    lr: float = Field(0.005, ge=0, description="η0, cosine-decayed over chunks")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    batch_rows: int = Field(32, ge=1, description="rows of eval.seq_len tokens per SGD step (all ranks)")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 = none")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="SGD with momentum, or AdamW (β1 = momentum)"
    )
    blocks: Layers = Field(LayerSelector.parse("all"), description="physical blocks that adapt")
    freeze_blocks: int = Field(0, ge=0, description="the first N physical blocks stay frozen")
    stride: int = Field(64, ge=1, description="sliding-window stride of the scoring pass")


def chunk_lr(lr: float, chunk: int, n_chunks: int) -> float:
    """η_c = η0·½(1 + cos(π·c/(n−1))) (η0 when there is one chunk)."""
    if n_chunks <= 1:
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (n_chunks - 1)))


def adapted_parameters(model: nn.Module, blocks: LayerSelector, freeze_blocks: int) -> list[Tensor]:
    """The trainable parameters test-time training updates: those of the selected physical blocks
    beyond the first ``freeze_blocks``, and every parameter outside the blocks."""
    layers = model.blocks  # type: ignore[attr-defined]
    chosen = set(blocks.resolve(len(layers))) - set(range(freeze_blocks))
    frozen = {id(q) for i, b in enumerate(layers) if i not in chosen for q in b.parameters()}
    return [q for q in model.parameters() if q.requires_grad and id(q) not in frozen]


def make_optimizer(params: list[Tensor], kind: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """SGD(momentum) or AdamW(β1 = momentum, β2 = 0.999, no weight decay) over ``params``."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def train_rows(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    opt: torch.optim.Optimizer,
    params: list[Tensor],
    runtime: Runtime,
    switches: tuple[str, ...],
    *,
    epochs: int,
    batch_rows: int,
    grad_clip: float,
) -> None:
    """``epochs`` passes over rows (x, y) (R,T), ``batch_rows`` rows per step split across ranks,
    gradients summed over ranks (each rank's loss weighted by its share of the step's rows), the
    global norm clipped at ``grad_clip`` (0 = none), through the model's own forward."""
    rows = x.size(0)
    with torch.enable_grad():
        for _ in range(epochs):
            for r0 in range(0, rows, batch_rows):
                lo, hi = rank_range(min(batch_rows, rows - r0), runtime)
                xb = x[r0 + lo : r0 + hi].to(runtime.device)
                yb = y[r0 + lo : r0 + hi].to(runtime.device)
                opt.zero_grad(set_to_none=True)
                if xb.numel():
                    with runtime.autocast():
                        loss = model(xb, yb, switches=switches)
                    (loss * (hi - lo) / min(batch_rows, rows - r0)).backward()
                if runtime.distributed:
                    for q in params:
                        if q.grad is None:
                            q.grad = torch.zeros_like(q)
                        dist.all_reduce(q.grad, op=dist.ReduceOp.SUM)
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
    opt.zero_grad(set_to_none=True)


def chunk_windows(
    starts: list[int], n_targets: int, seq_len: int, stride: int, chunk_tokens: int
) -> list[list[int]]:
    """Window indices grouped by the chunk of their first scored position (consecutive groups)."""
    groups: dict[int, list[int]] = {}
    for i, ws in enumerate(starts):
        a, _ = scored_range(ws, n_targets, seq_len, stride)
        groups.setdefault(a // chunk_tokens, []).append(i)
    return [groups[c] for c in sorted(groups)]


def training_rows(stream: Tensor, lo: int, hi: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """(x, y) rows of ``seq_len`` over target positions [lo, hi) (a shorter last row is dropped
    unless it is the only one)."""
    toks = stream[lo : hi + 1]
    n = toks.numel() - 1
    rows = max(1, n // seq_len)
    length = seq_len if n >= seq_len else n
    x = toks[: rows * length].view(rows, length)
    y = toks[1 : rows * length + 1].view(rows, length)
    return x, y


@register("score_first_ttt")
class ScoreFirstTTT(Technique):
    """Score-first test-time training: score a chunk of the validation stream, then train on it."""

    Params = ScoreFirstTTTParams
    params: ScoreFirstTTTParams
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
        check_stride(self.name, self.params.stride, seq_len)
        return self._run(model, stream, runtime, seq_len, max(1, batch_tokens // seq_len), switches)

    @hook
    def probe_points(self, n_targets: int) -> list[int]:
        """The last position of chunk 0, the first of chunk 1 and the middle of chunk 1 (scored
        after the model trained on chunk 0)."""
        c = self.params.chunk_tokens
        return [k for k in (c - 1, c, c + c // 2) if k < n_targets]

    def _run(
        self,
        model: nn.Module,
        stream: Tensor,
        runtime: Runtime,
        seq_len: int,
        per_batch: int,
        switches: tuple[str, ...],
    ) -> Iterator[Emit]:
        p = self.params
        n_targets = stream.numel() - 1
        starts = window_starts(n_targets, seq_len, p.stride)
        groups = chunk_windows(starts, n_targets, seq_len, p.stride, p.chunk_tokens)
        params = adapted_parameters(model, p.blocks, p.freeze_blocks)
        opt = make_optimizer(params, p.optimizer, p.lr, p.momentum)
        for c, group in enumerate(groups):
            lo, hi = rank_range(len(group), runtime)
            if hi > lo:
                yield from sliding_windows(
                    model,
                    stream,
                    runtime,
                    seq_len,
                    p.stride,
                    per_batch,
                    group[lo],
                    group[hi - 1] + 1,
                    switches,
                )
            if c == len(groups) - 1 or p.epochs == 0:
                continue
            first = c * p.chunk_tokens
            x, y = training_rows(stream, first, min(first + p.chunk_tokens, n_targets), seq_len)
            for group_ in opt.param_groups:
                group_["lr"] = chunk_lr(p.lr, c, len(groups))
            train_rows(model, x, y, opt, params, runtime, switches,
                       epochs=p.epochs, batch_rows=p.batch_rows, grad_clip=p.grad_clip)  # fmt: skip
