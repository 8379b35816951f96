"""perplexity_curriculum: the bigram NLL against its formula, the ranking, the cache beside the
shards, and the loader's order; validation shards are never read."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.registry.run.data import write_shard
from pgolf.techniques import perplexity_curriculum as pc
from pgolf.techniques.perplexity_curriculum import (
    BigramModel,
    PerplexityCurriculum,
    PerplexityCurriculumParams,
)


def test_nll_matches_the_interpolated_bigram_formula() -> None:
    rng = np.random.default_rng(0)
    fit = [rng.integers(0, 12, 300), rng.integers(0, 12, 200)]
    model = BigramModel(fit, vocab=16, smoothing=3.0)
    joined = np.concatenate(fit)
    pairs: dict[tuple[int, int], int] = {}
    for s in fit:
        for a, b in itertools.pairwise(s):
            pairs[int(a), int(b)] = pairs.get((int(a), int(b)), 0) + 1
    test = rng.integers(0, 16, 50)  # ids 12-15 were never seen
    total = 0.0
    for a, b in itertools.pairwise(test):
        c_a = sum(n for (x, _), n in pairs.items() if x == a)
        lam = c_a / (c_a + 3.0)
        uni = (int((joined == b).sum()) + 1) / (len(joined) + 16)
        p = lam * (pairs.get((int(a), int(b)), 0) / c_a if c_a else 0.0) + (1 - lam) * uni
        total -= math.log(p)
    assert model.nll(test) == pytest.approx(total / 49, rel=1e-9)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(2, 200, 4000))  # noise: hard
    write_shard(tmp_path / "fineweb_train_000001.bin", np.tile([5, 6, 7, 8], 1000))  # a loop: easy
    write_shard(tmp_path / "fineweb_train_000002.bin", np.tile(rng.integers(2, 200, 40), 100))  # middling
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(2, 200, 100))
    return tmp_path


def technique(order: str = "easy_first") -> PerplexityCurriculum:
    from conftest import small_spec

    params = PerplexityCurriculumParams(order=order, fit_tokens=1500, score_tokens=1500)
    return PerplexityCurriculum(params, small_spec(vocab_size=256))


def train_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("fineweb_train_*.bin"))


def test_shards_are_read_easiest_first_and_the_ranking_is_cached_beside_them(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = technique().train_loader(train_files(folder), 0, 1)
    assert [p.name[-10:-4] for p in loader.stream.paths] == ["000001", "000002", "000000"]
    x, _ = loader.next_batch(16, 8)
    assert set(x.flatten().tolist()) <= {5, 6, 7, 8}  # the easiest shard comes first
    cache = json.loads((folder / pc.CACHE_FILE).read_text())
    (scores,) = cache.values()
    assert sorted(scores) == [p.name for p in train_files(folder)]  # training shards only
    calls: list[int] = []
    monkeypatch.setattr(pc, "rank_shards", lambda *a: calls.append(1) or {})
    hard = technique("hard_first").train_loader(train_files(folder), 0, 1)
    assert not calls  # the cached ranking is reused
    assert [p.name[-10:-4] for p in hard.stream.paths] == ["000000", "000002", "000001"]


def test_a_changed_shard_is_ranked_again(folder: Path) -> None:
    technique().train_loader(train_files(folder), 0, 1)
    write_shard(folder / "fineweb_train_000001.bin", np.random.default_rng(5).integers(2, 200, 4000))
    technique().train_loader(train_files(folder), 0, 1)
    assert len(json.loads((folder / pc.CACHE_FILE).read_text())) == 2


def test_a_folder_that_cannot_be_written_is_ranked_without_a_cache(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pc.os, "replace", refuse)
    scores, how = pc.cached_scores(train_files(folder), 256, technique().params)
    assert "not writable: not cached" in how and len(scores) == 3
    assert not (folder / pc.CACHE_FILE).exists() and not list(folder.glob(".pgolf_curriculum*"))


def test_two_ranks_read_spans_of_one_ordered_stream(folder: Path) -> None:
    one = technique().train_loader(train_files(folder), 0, 1)
    ranks = [technique().train_loader(train_files(folder), r, 2) for r in range(2)]
    x, _ = one.next_batch(32, 8)
    parts = [r.next_batch(16, 8)[0] for r in ranks]
    assert parts[0].shape == (2, 8) and torch.equal(parts[0], x[:2])
