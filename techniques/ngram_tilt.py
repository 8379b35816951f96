"""Token-only causal n-gram tilt: boost one hinted token proposed by a hash of the strict prefix, and renormalise.

What: a hashed table over the tokens already scored maps the context of ``order`` tokens ending
at position t to the token that has most often followed it, h_t, with confidence
q_t = c(ctx, h_t) / c(ctx). Where q_t ≥ ``min_confidence`` (and the context was seen
``min_count`` times), the distribution is exponentially tilted towards h_t and renormalised over
the whole vocabulary:

    p′(a) = p(a)·e^{β_t·[a = h_t]} / Z,   Z = 1 + p(h_t)·(e^{β_t} − 1),   β_t = β·(1 − q_t)^γ

(γ = 0: a constant β). Everywhere else p′ = p. The hint depends only on tokens before t, the table
learns x_{t+1} only after position t is scored (the runner's ``observe``), and p′ sums to 1
exactly: legal under Issue #1017 conditions 1–4. The table is updated after each emit, so within
one emit every position sees the table as it was at the emit's start; the hashes of the context
itself are computed on the fly inside the evaluation (no precompute outside the timer).

Why: a 16-token context that has been seen before is followed by the same token with high
probability (repeated boilerplate, names, code); a one-token tilt captures most of that gain at
the cost of one hash lookup per position, unlike a full n-gram mixture.

Source: ``R/2026-04-09_A2_Muon097_3Seed`` (kernel from PR #1420: β = 2.0, hints at 23.6 % of
positions); PR #2130 → #2135 (current record: order-16 hash, q ≥ 0.8, β = 2.625, ~1.3 % of
positions hinted, hint precompute inside the evaluation timer); the confidence-adaptive β_t
variant (non-record). The kernel's within-word / word-start experts gated on the realised token
and are kept apart as ``ngram_gated_expert`` (illegal). techniques.md §3.M, §8.2.

Sites: the ``logprobs`` chain (``transform_logprobs`` + ``observe``).

Interactions: after ``temperature`` (it tilts the calibrated distribution); independent of the
scorer (sliding window, TTT). Some write-ups give Z = 1 + q·(e^β − 1); only p(h_t) in Z normalises
the distribution, which is what this file uses.

Evidence: part of PR #2135's 1.0565 (with asymmetric logit rescale and a TTT phase; not isolated).
Measured with pgolf on the tiny CPU model in ``bench/legality_probes.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import Params, Technique, hook, register
from pgolf.techniques.ngram_cache import context_hashes, pair_hashes


class NgramTiltParams(Params):
    order: int = Field(16, ge=1, le=64, description="context tokens hashed for the hint")
    buckets: int = Field(4_194_304, ge=16, le=1 << 30, description="hash buckets (3 int32 tables)")
    min_confidence: float = Field(0.8, ge=0, le=1, description="q at or above which the hint is used")
    min_count: int = Field(1, ge=1, description="times the context must have been seen")
    beta: float = Field(2.625, ge=0, le=20, description="β: log-boost of the hinted token")
    gamma: float = Field(0.0, ge=0, le=10, description="confidence-adaptive β·(1 − q)^γ; 0 = constant β")


def tilt(logprobs: Tensor, hint: Tensor, beta: Tensor) -> Tensor:
    """log p′ for log-distributions (N,V), hinted tokens (N,) and boosts β (N,): p′(a) ∝ p(a)·e^{β[a=h]}."""
    lp_h = logprobs.gather(1, hint[:, None])[:, 0]
    log_z = torch.log1p(lp_h.exp() * torch.expm1(beta))
    out = logprobs - log_z[:, None]
    return out.scatter_add(1, hint[:, None], beta[:, None].to(out.dtype))


class HintTable:
    """Hashed counts c(ctx), c(ctx, a) and each context bucket's most frequent next token."""

    def __init__(self, buckets: int):
        self.buckets = buckets
        self.ctx: Tensor | None = None
        self.pair: Tensor | None = None
        self.best: Tensor | None = None

    def ready(self, device: torch.device) -> None:
        if self.ctx is None:
            self.ctx = torch.zeros(self.buckets, dtype=torch.int32, device=device)
            self.pair = torch.zeros(self.buckets, dtype=torch.int32, device=device)
            self.best = torch.full((self.buckets,), -1, dtype=torch.int64, device=device)

    def hints(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(hinted token or −1, confidence q, context count) for context hashes (N,)."""
        assert self.ctx is not None and self.pair is not None and self.best is not None
        b = h % self.buckets
        n_ctx = self.ctx[b]
        hint = self.best[b]
        n_pair = self.pair[pair_hashes(h, hint.clamp(min=0)) % self.buckets]
        q = torch.where(hint >= 0, n_pair.float() / n_ctx.clamp(min=1).float(), 0.0)
        return hint, q, n_ctx

    def add(self, h: Tensor, targets: Tensor, vocab: int) -> None:
        """Count (context, next token) pairs, then let each context's most frequent token win."""
        assert self.ctx is not None and self.pair is not None and self.best is not None
        b = h % self.buckets
        pb = pair_hashes(h, targets) % self.buckets
        one = torch.ones_like(b, dtype=torch.int32)
        self.ctx.index_add_(0, b, one)
        self.pair.index_add_(0, pb, one)
        # per context bucket the largest (count, token) among this batch's tokens (deterministic:
        # reductions, not racing writes), against the count of the token it holds now
        key = self.pair[pb].long() * vocab + targets
        ub, inv = torch.unique(b, return_inverse=True)
        top = torch.full((ub.numel(),), -1, dtype=torch.int64, device=b.device)
        top = top.scatter_reduce(0, inv, key, reduce="amax", include_self=True)
        rep = torch.full((ub.numel(),), -1, dtype=torch.int64, device=b.device)
        rep = rep.scatter_reduce(0, inv, h, reduce="amax", include_self=True)  # a context of the bucket
        cur = self.best[ub]
        cur_n = torch.where(cur >= 0, self.pair[pair_hashes(rep, cur.clamp(min=0)) % self.buckets].long(), -1)
        win = top // vocab > cur_n
        self.best[ub[win]] = top[win] % vocab

    def state_dict(self) -> dict[str, Any]:
        if self.ctx is None:
            return {}
        assert self.pair is not None and self.best is not None
        return {"ctx": self.ctx.clone(), "pair": self.pair.clone(), "best": self.best.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ctx = state["ctx"].clone() if "ctx" in state else None
        self.pair = state["pair"].clone() if "pair" in state else None
        self.best = state["best"].clone() if "best" in state else None


@register("ngram_tilt")
class NgramTilt(Technique):
    """Token-only causal n-gram tilt: boost one hinted token proposed by a hash of the strict prefix, and renormalise."""

    Params = NgramTiltParams
    params: NgramTiltParams
    legality = ("score_first",)
    contract_params: ClassVar[dict[str, Any]] = {"buckets": 4096, "order": 2}

    def __init__(self, params: NgramTiltParams, spec: Any):
        super().__init__(params, spec)
        self.table = HintTable(params.buckets)
        self._pending: tuple[Tensor, Tensor] | None = None  # (hashes, valid) of the last emit
        self.hinted = 0  # positions tilted so far
        self.seen = 0

    def boosts(self, logprobs: Tensor, positions: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rows to tilt (N,) bool, hinted tokens (N,), β_t (N,)) from the table as it is now."""
        p = self.params
        self.table.ready(logprobs.device)
        h, valid = context_hashes(context, positions, p.order + 1)
        self._pending = (h, valid)
        hint, q, n_ctx = self.table.hints(h)
        use = valid & (hint >= 0) & (q >= p.min_confidence) & (n_ctx >= p.min_count)
        beta = p.beta * (1.0 - q).clamp(min=0) ** p.gamma if p.gamma else torch.full_like(q, p.beta)
        return use, hint.clamp(min=0), beta

    @hook
    def transform_logprobs(self, logprobs: Tensor, positions: Tensor, context: Tensor) -> Tensor:
        use, hint, beta = self.boosts(logprobs, positions, context)
        self.seen += int(positions.numel())
        if not bool(use.any()):
            return logprobs
        self.hinted += int(use.sum())
        out = logprobs.clone()
        out[use] = tilt(logprobs[use], hint[use], beta[use])
        return out

    @hook
    def observe(self, targets: Tensor) -> None:
        if self._pending is None:
            return
        h, valid = self._pending
        self.table.add(
            h[valid], targets[valid], self.spec.vocab_size if self.spec else int(targets.max()) + 1
        )
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {**self.table.state_dict(), "hinted": self.hinted, "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.table.load_state_dict(state)
        self.hinted, self.seen = int(state.get("hinted", 0)), int(state.get("seen", 0))
