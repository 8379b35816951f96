"""shuffled_loader: every window once per pass, a seeded order, the same global batch on any
number of ranks, state round trips, a new pass per length, and the prefetcher's rewind."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.registry.run.data import PrefetchingLoader, write_shard
from pgolf.techniques.shuffled_loader import ShuffledLoader


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    out = []
    for i, n in enumerate((203, 150, 97)):  # distinct tokens: every position is identifiable
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, np.arange(n) % 60000 + 1000 * (i + 1))
        out.append(path)
    return out


def windows_of_a_pass(loader: ShuffledLoader, seq_len: int) -> list[tuple[int, ...]]:
    loader._start_pass(seq_len)
    return [tuple(loader.window_tokens(i).tolist()) for i in range(len(loader.order))]


def test_a_pass_reads_every_window_once_with_its_targets(shards: list[Path]) -> None:
    loader = ShuffledLoader(shards, 0, 1, seed=5, vocab_size=None)
    seq = 8
    expected = set(windows_of_a_pass(loader, seq))
    # the windows of one shard start at its phase and step by L; each has L + 1 consecutive tokens
    assert all(len(w) == seq + 1 and all(b - a == 1 for a, b in itertools.pairwise(w)) for w in expected)
    per_shard = [sum(1 for w in expected if w[0] // 1000 == i + 1) for i in range(3)]
    assert per_shard == [(n - int(p) - 1) // seq for n, p in zip((203, 150, 97), loader.phase)]
    loader.reset()
    seen = []
    for _ in range(len(expected) // 4):
        x, y = loader.next_batch(4 * seq, seq)
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen += [tuple(torch.cat([xi, yi[-1:]]).tolist()) for xi, yi in zip(x, y)]
    assert len(seen) == len(set(seen)) and set(seen) <= expected  # no window twice in a pass


def test_the_order_follows_the_seed_and_the_pass(shards: list[Path]) -> None:
    a = ShuffledLoader(shards, 0, 1, seed=1, vocab_size=None).next_batch(64, 8)[0]
    b = ShuffledLoader(shards, 0, 1, seed=1, vocab_size=None).next_batch(64, 8)[0]
    c = ShuffledLoader(shards, 0, 1, seed=2, vocab_size=None).next_batch(64, 8)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    loader = ShuffledLoader(shards, 0, 1, seed=1, vocab_size=None)
    first = windows_of_a_pass(loader, 8)
    loader.passes = 1
    assert windows_of_a_pass(loader, 8) != first  # new phases and permutation every pass


def test_two_ranks_read_the_halves_of_the_one_process_batch(shards: list[Path]) -> None:
    one = ShuffledLoader(shards, 0, 1, seed=3, vocab_size=None)
    ranks = [ShuffledLoader(shards, r, 2, seed=3, vocab_size=None) for r in range(2)]
    for _ in range(5):  # across the end of a pass
        x, _ = one.next_batch(64, 8)
        parts = [r.next_batch(32, 8)[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)


def test_state_round_trips_and_a_new_length_starts_a_new_pass(shards: list[Path]) -> None:
    a = ShuffledLoader(shards, 0, 1, seed=4, vocab_size=None)
    a.next_batch(32, 8)
    b = ShuffledLoader(shards, 0, 1, seed=4, vocab_size=None)
    b.load_state_dict(a.state_dict())
    for _ in range(8):
        assert torch.equal(a.next_batch(32, 8)[0], b.next_batch(32, 8)[0])
    x, _ = a.next_batch(32, 16)
    assert x.shape == (2, 16) and a.length == 16 and a.cursor == 2


def test_the_prefetcher_gives_the_loaders_own_batches_across_a_length_change(shards: list[Path]) -> None:
    direct = ShuffledLoader(shards, 0, 1, seed=9, vocab_size=None)
    ahead = PrefetchingLoader(ShuffledLoader(shards, 0, 1, seed=9, vocab_size=None), 32, 8, depth=3)
    try:
        for i, seq in enumerate((8, 8, 8, 4, 4, 16, 8)):
            if i % 2:
                time.sleep(0.1)  # let it read ahead: the batches it holds are dropped at a change
            got, want = ahead.next_batch(32, seq)[0], direct.next_batch(32, seq)[0]
            assert torch.equal(got, want), seq
    finally:
        ahead.close()
