"""N-gram backoff cache at evaluation, mixed into the model's distribution and normalised over the whole vocabulary.

What: for each n-gram order o in ``min_order … max_order`` two hashed count tables are built from
the tokens already scored (the runner's ``observe``, after each emit's NLLs are recorded): the
context (the o − 1 tokens before the target) → c(ctx), and (context, next token) → c(ctx, a). At
position t the cache backs off from the highest order whose context has been seen at least
``min_count`` times; its distribution over the **whole vocabulary** is

    p_ng(a) = c(ctx, a) / Σ_b c(ctx, b)        (every a of the vocabulary looked up)

and the evaluated distribution is the mixture p(a) = (1 − α)·p_model(a) + α·p_ng(a) with the
entropy-adaptive weight α = α_min + α_span·σ(slope·(H − center)), H the model's entropy in nats.
A convex mixture of two distributions is a distribution: it sums to 1 by construction. Positions
whose context no order has seen keep the model's distribution.

Why: long validation documents repeat names, phrases and boilerplate the small model cannot hold;
a cache of what was already read predicts them well, and the entropy gate trusts it more where
the model is unsure.

Source: the order-adaptive backoff caches of parameter-golf PRs #727 / #788 / #809 (orders 2–9,
α = 0.05 + 0.55·σ(2(H − 4))), which scored only the gold token with a ratio of two independently
hashed buckets — not a distribution (PR #886, #1147; ruled out on PR #779; kept as
``hashed_ngram_cache``, tagged illegal). PR #978 re-ran one with full-vocabulary normalisation (1.51
BPB there): the form implemented here, legal under Issue #1017 conditions 1–4.

Sites: the ``logprobs`` chain (``transform_logprobs`` + ``observe``).

Interactions: after ``temperature`` in stack order (it should see the calibrated distribution);
with a test-time-training scorer it mixes into every emitted position alike. Hash collisions (two
contexts in one bucket) blur p_ng but never break its normalisation; more ``buckets`` cost memory
(2 int32 tables per order).

Evidence: PR #978's normalised re-run: 1.51 BPB vs the model's own score on that stack (worse); the
unnormalised versions' 0.3–0.97 BPB were artefacts. Measured with pgolf on the tiny CPU model in
``bench/legality_probes.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pgolf.registry import Params, Technique, hook, register

MODULUS = 2_147_483_647  # 2^31 − 1: hashes stay below it, so products fit in int64
CTX_MULT = 1_000_003
PAIR_MULT = 7_368_787


def context_hashes(context: Tensor, positions: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """Hashes (N,) of the ``order − 1`` tokens ending at each target position (the n-gram's
    context: tokens p − order + 2 … p predict token p + 1) and whether that many tokens exist.

    ``context``: the stream up to at least max(positions) (1-D int64); order 1 has the empty
    context (one hash for all positions)."""
    length = order - 1
    h = torch.full_like(positions, order)
    valid = positions >= length - 1
    if length == 0:
        return h, valid
    offsets = torch.arange(length, device=positions.device)
    tok = context[(positions[:, None] - offsets).clamp(min=0)]  # (N, L): x_p, x_{p-1}, ...
    for j in range(length):
        h = (h * CTX_MULT + tok[:, j] + 1) % MODULUS
    return h, valid


def pair_hashes(ctx: Tensor, tokens: Tensor) -> Tensor:
    """Hashes of (context hash, next token) pairs; broadcasts (N,1) × (V,) -> (N,V)."""
    return (ctx * PAIR_MULT + tokens + 1) % MODULUS


class NgramTables:
    """Hashed counts per order: ``ctx[o][hash(ctx) % B]`` and ``pair[o][hash(ctx, a) % B]``."""

    def __init__(self, orders: range, buckets: int):
        self.orders, self.buckets = orders, buckets
        self.ctx: dict[int, Tensor] = {}
        self.pair: dict[int, Tensor] = {}

    def ready(self, device: torch.device) -> None:
        if not self.ctx:
            for o in self.orders:
                self.ctx[o] = torch.zeros(self.buckets, dtype=torch.int32, device=device)
                self.pair[o] = torch.zeros(self.buckets, dtype=torch.int32, device=device)

    def context_counts(self, order: int, h: Tensor) -> Tensor:
        return self.ctx[order][h % self.buckets]

    def pair_counts(self, order: int, h: Tensor, vocab: int) -> Tensor:
        """Counts (N,V) of every next token a after each context hash of ``h`` (N,)."""
        a = torch.arange(vocab, device=h.device)
        return self.pair[order][pair_hashes(h[:, None], a[None, :]) % self.buckets]

    def add(self, order: int, h: Tensor, valid: Tensor, targets: Tensor) -> None:
        h, t = h[valid], targets[valid]
        one = torch.ones_like(h, dtype=torch.int32)
        self.ctx[order].index_add_(0, h % self.buckets, one)
        self.pair[order].index_add_(0, pair_hashes(h, t) % self.buckets, one)

    def state_dict(self) -> dict[str, Any]:
        return {"ctx": {o: t.clone() for o, t in self.ctx.items()},
                "pair": {o: t.clone() for o, t in self.pair.items()}}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ctx = {int(o): t.clone() for o, t in (state.get("ctx") or {}).items()}
        self.pair = {int(o): t.clone() for o, t in (state.get("pair") or {}).items()}


def entropy_weight(
    logprobs: Tensor, alpha_min: float, alpha_span: float, center: float, slope: float
) -> Tensor:
    """α = α_min + α_span·σ(slope·(H − center)) per row, H = −Σ p log p in nats (N,)."""
    h = -(logprobs.exp() * logprobs).nan_to_num(0.0).sum(-1)
    return alpha_min + alpha_span * torch.sigmoid(slope * (h - center))


def mix(logprobs: Tensor, ngram: Tensor, alpha: Tensor) -> Tensor:
    """log((1 − α)·p + α·q) for log-distributions p (N,V), distributions q (N,V) and α (N,)."""
    a = alpha.clamp(1e-12, 1 - 1e-7)[:, None]
    return torch.logaddexp(torch.log1p(-a) + logprobs, a.log() + ngram.clamp_min(0).log())


class NgramCacheParams(Params):
    min_order: int = Field(2, ge=1, le=32, description="lowest n-gram order (1: the unigram)")
    max_order: int = Field(
        9, ge=1, le=32, description="highest n-gram order (context of max_order − 1 tokens)"
    )
    buckets: int = Field(
        4_194_304, ge=16, le=1 << 30, description="hash buckets per table (2 int32 tables per order)"
    )
    min_count: int = Field(1, ge=1, description="times a context must have been seen to be used")
    concentration: float = Field(
        0.0, ge=0, description="κ: Dirichlet prior on the model's distribution added to the counts (0 = raw)"
    )
    alpha_min: float = Field(0.05, ge=0, le=1, description="α at low model entropy")
    alpha_span: float = Field(0.55, ge=0, le=1, description="α_max − α_min")
    center: float = Field(4.0, description="entropy (nats) where α is halfway")
    slope: float = Field(2.0, ge=0, description="steepness of the entropy gate")
    row_chunk: int = Field(
        1024, ge=1, description="positions whose (N,V) counts are looked up at once (memory)"
    )

    @model_validator(mode="after")
    def _orders(self) -> NgramCacheParams:
        if self.min_order > self.max_order:
            raise ValueError(f"min_order={self.min_order} is above max_order={self.max_order}")
        if self.alpha_min + self.alpha_span > 1:
            raise ValueError(f"alpha_min + alpha_span = {self.alpha_min + self.alpha_span} must be at most 1")
        return self


@register("ngram_cache")
class NgramCache(Technique):
    """N-gram backoff cache at evaluation, mixed into the model's distribution and normalised over the whole vocabulary."""

    Params = NgramCacheParams
    params: NgramCacheParams
    legality = ("score_first",)
    contract_params: ClassVar[dict[str, Any]] = {"buckets": 4096}

    def __init__(self, params: NgramCacheParams, spec: Any):
        super().__init__(params, spec)
        self.tables = NgramTables(range(params.min_order, params.max_order + 1), params.buckets)
        self._pending: list[tuple[int, Tensor, Tensor]] = []  # (order, hashes, valid) of the last emit

    @hook
    def transform_logprobs(self, logprobs: Tensor, positions: Tensor, context: Tensor) -> Tensor:
        self.tables.ready(logprobs.device)
        self._pending = [(o, *context_hashes(context, positions, o)) for o in self.tables.orders]
        out = logprobs.clone()
        for lo in range(0, logprobs.size(0), self.params.row_chunk):
            hi = min(lo + self.params.row_chunk, logprobs.size(0))
            rows = [(o, h[lo:hi], v[lo:hi]) for o, h, v in self._pending]
            out[lo:hi] = self.mixed(logprobs[lo:hi], rows, context, positions[lo:hi])
        return out

    def mixed(
        self, logprobs: Tensor, hashes: list[tuple[int, Tensor, Tensor]], context: Tensor, positions: Tensor
    ) -> Tensor:
        """The mixture for rows (n,V) whose per-order context hashes are given (``context`` and
        ``positions``: the stream and the rows' positions, for variants that look at them)."""
        counts, found = self.backoff_counts(hashes, logprobs.size(-1))
        q = torch.zeros_like(logprobs)
        q[found] = self.smoothed(counts[found], logprobs[found])
        if not bool(found.any()):
            return logprobs
        alpha = self.entropy_alpha(logprobs)
        out = logprobs.clone()
        out[found] = mix(logprobs[found], q[found], alpha[found])
        return out

    def smoothed(self, counts: Tensor, logprobs: Tensor) -> Tensor:
        """(c(ctx, a) + κ·p_model(a)) / (Σ_b c(ctx, b) + κ) (n,V): the counts with a Dirichlet prior
        of strength κ = ``concentration`` centred on the model; κ = 0 gives the raw frequencies."""
        k = self.params.concentration
        return (counts + k * logprobs.exp()) / (counts.sum(-1, keepdim=True) + k)

    def entropy_alpha(self, logprobs: Tensor) -> Tensor:
        p = self.params
        return entropy_weight(logprobs, p.alpha_min, p.alpha_span, p.center, p.slope)

    def backoff_counts(
        self,
        hashes: list[tuple[int, Tensor, Tensor]],
        vocab: int,
        accept: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(c(ctx, ·) (n,V) of the highest order whose context was seen ``min_count`` times and whose
        counts ``accept`` (default: some token followed it), rows where some order's were): counts
        over the whole vocabulary. ``accept(counts (r,V), use (n,))``: which of the rows in ``use``
        take this order's counts (r,)."""
        n = hashes[0][1].numel()
        dev = hashes[0][1].device
        q = torch.zeros(n, vocab, device=dev)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        for o, h, valid in sorted(hashes, key=lambda x: -x[0]):
            use = valid & ~found & (self.tables.context_counts(o, h) >= self.params.min_count)
            if not bool(use.any()):
                continue
            counts = self.tables.pair_counts(o, h[use], vocab).float()
            ok = counts.sum(-1) > 0 if accept is None else accept(counts, use)
            rows = use.nonzero().flatten()[ok]
            q[rows] = counts[ok]
            found[rows] = True
        return q, found

    @hook
    def observe(self, targets: Tensor) -> None:
        for o, h, valid in self._pending:
            self.tables.add(o, h, valid, targets)
        self._pending = []

    def state_dict(self) -> dict[str, Any]:
        return self.tables.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tables.load_state_dict(state)
