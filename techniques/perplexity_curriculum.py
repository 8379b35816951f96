"""Perplexity-ranked shard curriculum: the training shards are read in the order of their
perplexity under a small bigram model fitted on training data, easiest first (or hardest first).

What: a bigram model is fitted on ``fit_tokens`` tokens from the start of every training shard:
p(b | a) = λ_a·c(a, b)/c(a) + (1 − λ_a)·p₁(b), with λ_a = c(a)/(c(a) + κ) (κ = ``smoothing``) and the
add-one unigram p₁(b) = (c(b) + 1)/(N + V). Each shard's score is the mean NLL (nats/token) of
``score_tokens`` tokens from its middle (not the tokens the model was fitted on) under that
model; perplexity = e^score. The shards are then read as the baseline reads them (front to back,
contiguous spans per rank, wrapping around) but sorted by score: ascending (``order:
easy_first``) or descending (``hard_first``); ties keep file order. Only the training shards the
stack uses are read: the ``train_loader`` slot is never handed a validation file.

The ranking is cached beside the shards, in ``pgolf_curriculum.json`` (keyed by the shards'
names, sizes and modification times and the model's settings), and reused by every later run; a
folder that cannot be written to is ranked again by each run (a log line says so).

Why: a curriculum from easy (predictable, repetitive) to hard text is a classic idea; the ranking
needs no validation data, and the order is the only change, so the tokens seen are the same.

Source: not in any record. PR #772 (non-record) scored all 80 shards eight ways (n-gram cosine,
JSD, Moore–Lewis, classifier, a validation-trained bigram CE, …): the CE spread was only 0.018
bits and neither hard selection nor curriculum ordering improved val_bpb ("diversity beats
selection"); ranking by similarity to *validation* data is at best a grey area, which is why this
model is fitted on training data only. Treat as experimental.

Sites: the ``train_loader`` slot.

Interactions: conflicts with the other loaders (one slot). Within a shard the order is the
baseline's, so ``data.train_shards`` limits which shards are ranked.

Evidence: PR #772: no gain on 8×H100 (CE spread 0.018 bits over 80 shards). Measured with pgolf on
CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds
1337 / 1338; ``python bench/technique_effects.py --only perplexity_curriculum``): Δval_bpb +0.0000
(+0.0000, +0.0000): the embedded corpus has one training shard, so there is nothing to reorder.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pgolf.registry import Params, Technique, hook, register
from pgolf.registry.run.data import DistributedTokenLoader, check_ids, load_shard

CACHE_FILE = "pgolf_curriculum.json"


class PerplexityCurriculumParams(Params):
    order: Literal["easy_first", "hard_first"] = Field(
        "easy_first", description="lowest or highest perplexity first"
    )
    fit_tokens: int = Field(1_000_000, ge=2, description="tokens per shard the bigram model is fitted on")
    score_tokens: int = Field(1_000_000, ge=2, description="tokens per shard its score is taken on")
    smoothing: float = Field(10.0, gt=0.0, description="κ of the bigram/unigram interpolation")


class BigramModel:
    """Interpolated bigram counts over a vocabulary of ``vocab`` ids (sparse: sorted pair codes)."""

    def __init__(self, samples: Sequence[np.ndarray], vocab: int, smoothing: float):
        self.vocab, self.kappa = vocab, smoothing
        uni = np.zeros(vocab, dtype=np.int64)
        codes = []
        for s in samples:
            s = np.asarray(s, dtype=np.int64)
            uni += np.bincount(s, minlength=vocab)
            codes.append(s[:-1] * vocab + s[1:])
        self.pairs, self.pair_counts = np.unique(np.concatenate(codes), return_counts=True)
        self.first = np.bincount(self.pairs // vocab, weights=self.pair_counts, minlength=vocab)  # c(a)
        self.unigram = (uni + 1) / (uni.sum() + vocab)

    def nll(self, tokens: np.ndarray) -> float:
        """Mean −log p(x_t | x_{t−1}) over the pairs of ``tokens`` (nats)."""
        t = np.asarray(tokens, dtype=np.int64)
        a, b = t[:-1], t[1:]
        code = a * self.vocab + b
        pos = np.searchsorted(self.pairs, code).clip(max=len(self.pairs) - 1)
        c_ab = np.where(self.pairs[pos] == code, self.pair_counts[pos], 0)
        c_a = self.first[a]
        lam = c_a / (c_a + self.kappa)
        p = lam * np.divide(c_ab, c_a, out=np.zeros(len(a)), where=c_a > 0) + (1 - lam) * self.unigram[b]
        return float(-np.log(p).mean())


def fit_slice(n: int, want: int) -> slice:
    return slice(0, min(want, max(n // 2, 2)))


def score_slice(n: int, want: int) -> slice:
    mid = max(n // 2, 0)
    return slice(mid, min(n, mid + want))


def rank_shards(paths: Sequence[Path], vocab: int, p: PerplexityCurriculumParams) -> dict[str, float]:
    """shard file name -> mean bigram NLL (nats/token) of its scored slice."""
    for f in paths:
        check_ids(Path(f), vocab)  # remembered per file version: the data check has already scanned them
    shards = [load_shard(Path(f)) for f in paths]
    model = BigramModel(
        [s[fit_slice(len(s), p.fit_tokens)] for s in shards if len(s) >= 2], vocab, p.smoothing
    )
    scores = {}
    for f, s in zip(paths, shards):
        part = s[score_slice(len(s), p.score_tokens)]
        scores[Path(f).name] = model.nll(part) if len(part) >= 2 else math.inf
    return scores


def cache_key(paths: Sequence[Path], vocab: int, p: PerplexityCurriculumParams) -> str:
    files = [(Path(f).name, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in paths]
    return json.dumps({"files": files, "vocab": vocab, "fit": p.fit_tokens, "score": p.score_tokens,
                       "smoothing": p.smoothing, "model": "bigram-interpolated-v1"}, sort_keys=True)  # fmt: skip


def cached_scores(
    paths: Sequence[Path], vocab: int, p: PerplexityCurriculumParams
) -> tuple[dict[str, float], str]:
    """The shards' scores and where they came from ("cache", "computed and cached", "computed")."""
    folder = Path(paths[0]).parent
    key = cache_key(paths, vocab, p)
    cache = folder / CACHE_FILE
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    if key in entries:
        return {k: float(v) for k, v in entries[key].items()}, "cache"
    scores = rank_shards(paths, vocab, p)
    entries[key] = scores
    tmp = folder / f".{CACHE_FILE}.{secrets.token_hex(6)}.tmp"
    try:
        tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)
        return scores, "computed (the shard folder is not writable: not cached)"
    return scores, f"computed and cached in {cache}"


def curriculum_order(paths: Sequence[Path], scores: dict[str, float], order: str) -> list[Path]:
    """The shards sorted by score (ascending for easy_first), ties in file order."""
    sign = 1.0 if order == "easy_first" else -1.0
    return [
        Path(f) for _, f in sorted(enumerate(paths), key=lambda x: (sign * scores[Path(x[1]).name], x[0]))
    ]


@register("perplexity_curriculum")
class PerplexityCurriculum(Technique):
    """Perplexity-ranked shard curriculum: the training shards are read in the order of their
    perplexity under a small bigram model fitted on training data, easiest first (or hardest first)."""

    Params = PerplexityCurriculumParams
    params: PerplexityCurriculumParams

    @hook
    def train_loader(self, files: list[Path], rank: int, world_size: int) -> Any:
        scores, how = cached_scores(files, self.spec.vocab_size, self.params)
        ordered = curriculum_order(files, scores, self.params.order)
        ranked = ", ".join(f"{f.name} ({math.exp(scores[f.name]):.1f})" for f in ordered[:5])
        self.log(f"{len(files)} training shard(s) by bigram perplexity ({how}), {self.params.order}: {ranked}"
                 + (" …" if len(ordered) > 5 else ""))  # fmt: skip
        return DistributedTokenLoader(ordered, rank, world_size, vocab_size=self.spec.vocab_size)
