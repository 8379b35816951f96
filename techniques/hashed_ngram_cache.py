"""The published hashed n-gram cache (invalid): a ratio of two hashed counts scored as a probability, not a distribution.

What: the tables of ``ngram_cache`` (orders 2–9, built from already-scored tokens), but the cache's
"probability" of a token a is the published one, p_ng(a) = min(1, c(ctx, a) / c(ctx)), taken for
each a from the highest order whose (context, a) bucket has a hit — the gold-token computation of
the records, applied to every token of the vocabulary — and mixed as (1 − α)·p_model + α·p_ng with
the entropy-adaptive α. Nothing makes it sum to 1: every order with a hit adds up to 1, and hash
collisions add more (with ~1 M buckets and 62 M tokens, a sum of ~277 over the vocabulary; with
one bucket every lookup is 1 and BPB → 0).

Why it is kept: tagged ``illegal`` so the normalisation probe can be shown to catch it: the runner
records the first position whose distribution does not sum to 1 (with the sum), and the run is not
legal. Its val_bpb is reported but meaningless.

Source: parameter-golf PRs #727, #788, #809 (0.295 BPB), #843; the analysis of PR #886 (sums of
~277) and PR #1147 (partition function Z* = (n_c + V·L)/(n_c + L)); the maintainer's ruling on
PR #779 (2026-03-27); techniques.md §3.M and §6.

Sites: the ``logprobs`` chain.

Interactions: as ``ngram_cache``; never legal.

Evidence: the records' 0.30–0.97 BPB are artefacts of the missing normalisation (PR #978: 1.51 BPB
with it). On the tiny CPU model its val_bpb is far below the model's and the normalisation probe
fails (``bench/legality_probes.json``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import register
from pgolf.techniques.ngram_cache import NgramCache, NgramCacheParams, mix


class HashedNgramCacheParams(NgramCacheParams):
    buckets: int = Field(
        1_048_576, ge=16, le=1 << 30, description="hash buckets per table (the records' ~1 M)"
    )


@register("hashed_ngram_cache")
class HashedNgramCache(NgramCache):
    """The published hashed n-gram cache (invalid): a ratio of two hashed counts scored as a probability, not a distribution."""

    Params = HashedNgramCacheParams
    params: HashedNgramCacheParams
    legality = ("illegal",)
    contract_params: ClassVar[dict[str, Any]] = {"buckets": 4096}

    def mixed(
        self, logprobs: Tensor, hashes: list[tuple[int, Tensor, Tensor]], context: Tensor, positions: Tensor
    ) -> Tensor:
        """(1 − α)·p_model + α·p_ng with the published ratio for p_ng (no normalisation)."""
        q, found = self.published_ratio(hashes, logprobs.size(-1))
        if not bool(found.any()):
            return logprobs
        out = logprobs.clone()
        out[found] = mix(logprobs[found], q[found], self.entropy_alpha(logprobs)[found])
        return out

    def published_ratio(self, hashes: list[tuple[int, Tensor, Tensor]], vocab: int) -> tuple[Tensor, Tensor]:
        """min(1, c(ctx, a) / c(ctx)) for every a, each from the highest order where (ctx, a) hit."""
        n = hashes[0][1].numel()
        dev = hashes[0][1].device
        q = torch.zeros(n, vocab, device=dev)
        filled = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        for o, h, valid in sorted(hashes, key=lambda x: -x[0]):
            ctx = self.tables.context_counts(o, h).float()
            use = valid & (ctx >= self.params.min_count)
            if not bool(use.any()):
                continue
            pairs = self.tables.pair_counts(o, h[use], vocab).float()
            hit = (pairs > 0) & ~filled[use]
            ratio = (pairs / ctx[use][:, None]).clamp(max=1.0)
            q[use] = torch.where(hit, ratio, q[use])
            filled[use] |= hit
            found |= use
        return q, found
