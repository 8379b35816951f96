"""An n-gram expert gated on the realised token (invalid): the cache's order is chosen by whether the token being predicted has been seen after its context.

What: the normalised cache of ``ngram_cache`` (orders 1–9), except that at position t the expert
(the order whose distribution is mixed in) is the highest order whose table has seen the
**realised** token x_{t+1} after its context — the gold-token backoff of the published caches —
and the model alone is used when no order has. Each order's distribution is normalised over the
vocabulary, so every evaluated distribution sums to 1; but which distribution is evaluated depends
on the token it predicts. (Where the runner has not handed over that token — the last position of
an emit — it backs off by context, like the legal cache.)

Why it is kept: tagged ``illegal`` so the future probe can be shown to catch it: changing the
tokens after a cut k changes x_{k+1}, hence the expert and the distribution at position k; the
probe names k. The normalisation probe passes, as it should.

Source: the within-word and word-start experts of the n-gram tilt kernel (PR #1420), disabled in
``R/2026-04-09_A2`` because "their gating read the target token", and the ruling after the close
that "n-gram experts that gate on the realised token break causality" (techniques.md §3.M, §8.3);
the gold-token backoff of PRs #727 / #809.

Sites: the ``logprobs`` chain (it reads the realised token from ``context``).

Interactions: as ``ngram_cache``; never legal.

Evidence: lower val_bpb than the legal cache on the tiny CPU model, and caught by the future probe
(``bench/legality_probes.json``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import register
from pgolf.techniques.ngram_cache import NgramCache, NgramCacheParams, mix


class NgramGatedExpertParams(NgramCacheParams):
    min_order: int = Field(1, ge=1, le=32, description="lowest n-gram order (1: the unigram)")


@register("ngram_gated_expert")
class NgramGatedExpert(NgramCache):
    """An n-gram expert gated on the realised token (invalid): the cache's order is chosen by whether the token being predicted has been seen after its context."""

    Params = NgramGatedExpertParams
    params: NgramGatedExpertParams
    legality = ("illegal",)
    contract_params: ClassVar[dict[str, Any]] = {"buckets": 4096}

    def mixed(
        self, logprobs: Tensor, hashes: list[tuple[int, Tensor, Tensor]], context: Tensor, positions: Tensor
    ) -> Tensor:
        nxt = positions + 1
        known = nxt < context.numel()
        realised = torch.where(known, context[nxt.clamp(max=context.numel() - 1)], -1)  # -1: not handed over

        def gate(c: Tensor, use: Tensor) -> Tensor:
            """The gate reads x_{t+1}; without it, the order backs off by context like the legal cache."""
            r = realised[use]
            return torch.where(r >= 0, c.gather(1, r.clamp(min=0)[:, None])[:, 0] > 0, c.sum(-1) > 0)

        counts, found = self.backoff_counts(hashes, logprobs.size(-1), gate)
        if not bool(found.any()):
            return logprobs
        out = logprobs.clone()
        q = self.smoothed(counts[found], logprobs[found])
        out[found] = mix(logprobs[found], q, self.entropy_alpha(logprobs)[found])
        return out
