"""Scoring: val_loss (nats per token) and val_bpb with the challenge's byte accounting.

Every target of the validation stream is scored: the stream of n tokens has n − 1 targets,
cut into consecutive windows of ``seq_len`` (the last, partial window is padded and its padding
masked out — unlike the baseline, which drops the tail). Each window starts with no context, as
in the baseline's non-overlapping evaluation.

val_loss = Σ NLL / N_targets;  val_bpb = Σ NLL / (ln 2 · Σ bytes) = val_loss / ln 2 · N / bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..api.errors import PgolfError
from .bpb import ByteLUT, target_bytes
from .runtime import Runtime


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: Tensor,
    lut: ByteLUT,
    *,
    seq_len: int,
    batch_tokens: int,
    runtime: Runtime,
    want_nll: bool = False,
) -> EvalResult:
    """Score every target of ``tokens`` (1-D ids) with ``model(x, y, reduction='none')``."""
    if want_nll and runtime.distributed:
        raise PgolfError("per-token NLL dumps are written by single-process evaluation only")
    t0 = time.perf_counter()
    n_targets = tokens.numel() - 1
    n_win = windows(tokens.numel(), seq_len)
    padded = torch.zeros(n_win * seq_len + 1, dtype=torch.int64)
    padded[: tokens.numel()] = tokens.to(torch.int64)
    x_all = padded[:-1].view(n_win, seq_len)
    y_all = padded[1:].view(n_win, seq_len)
    valid_all = (torch.arange(n_win * seq_len) < n_targets).view(n_win, seq_len)
    lo = n_win * runtime.rank // runtime.world_size
    hi = n_win * (runtime.rank + 1) // runtime.world_size
    per_batch = max(1, batch_tokens // seq_len)
    lut = lut.to(runtime.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    count = torch.zeros((), dtype=torch.float64, device=runtime.device)
    nll_parts: list[Tensor] = []
    was_training = model.training
    model.eval()
    for start in range(lo, hi, per_batch):
        end = min(start + per_batch, hi)
        x = x_all[start:end].to(runtime.device, non_blocking=True)
        y = y_all[start:end].to(runtime.device, non_blocking=True)
        valid = valid_all[start:end].to(runtime.device, non_blocking=True)
        with runtime.autocast():
            nll = model(x, y, reduction="none").float()
        nll = torch.where(valid, nll, torch.zeros_like(nll))
        loss_sum += nll.double().sum()
        byte_sum += (target_bytes(x, y, lut) * valid).double().sum()
        count += valid.double().sum()
        if want_nll:
            nll_parts.append(nll[valid].cpu())
    model.train(was_training)
    loss, nbytes, ntok = runtime.all_reduce_sum([loss_sum.item(), byte_sum.item(), count.item()])
    runtime.synchronize()
    nll_arr = torch.cat(nll_parts).numpy().astype(np.float32) if want_nll and nll_parts else None
    if want_nll and nll_arr is None:
        nll_arr = np.zeros(0, dtype=np.float32)
    assert int(ntok) == max(n_targets, 0), (ntok, n_targets)
    return EvalResult(loss, int(ntok), int(nbytes), time.perf_counter() - t0, nll_arr)
