"""document_packing: best-fit rows of whole documents against a plain reference, every token used
once, rows that start at documents, the same global batch on any number of ranks, state."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.registry.run.data import write_shard
from pgolf.techniques.document_packing import DocumentPackingLoader, pack_row

BOS = 1


def reference_pack(docs: list[int], space: int) -> tuple[list[int], list[int]]:
    """Lengths taken into one row and the buffer left, written as plainly as possible."""
    docs, row = list(docs), []
    while space > 0 and docs:
        best = -1
        for i, n in enumerate(docs):
            if n <= space and (best < 0 or n > docs[best]):
                best = i
        if best >= 0:
            n = docs.pop(best)
        else:
            n, docs[0] = space, docs[0] - space
        row.append(n)
        space -= n
    return row, docs


def test_pack_row_takes_the_longest_piece_that_fits_and_splits_the_oldest_otherwise() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 40, rng.integers(1, 8)).tolist()
        space = int(rng.integers(1, 60))
        buffer = [(0, 100 * i, 100 * i + n) for i, n in enumerate(lengths)]
        row = pack_row(buffer, space)
        want_row, want_left = reference_pack(lengths, space)
        assert [e - s for _, s, e in row] == want_row
        assert [e - s for _, s, e in buffer] == want_left


def documents(seed: int, n: int, first: int) -> list[np.ndarray]:
    """n documents [BOS, first, first + 1, …]: every token of the shards is distinct (except BOS)."""
    rng = np.random.default_rng(seed)
    out, t = [], first
    for _ in range(n):
        k = int(rng.integers(1, 30))
        out.append(np.concatenate([[BOS], np.arange(t, t + k)]))
        t += k
    return out


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(2):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, np.concatenate(documents(i, 60, 2 + 5000 * i)))
        out.append(path)
    return out


def test_rows_are_runs_of_whole_documents_with_no_token_twice(shards: list[Path]) -> None:
    loader = DocumentPackingLoader(shards, 0, 1, vocab_size=16384, buffer_docs=8)
    rows = []
    for _ in range(8):  # 16 rows of 65 tokens: inside the first pass over the 120 documents
        x, y = loader.next_batch(2 * 64, 64)
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows += [torch.cat([xi, yi[-1:]]).tolist() for xi, yi in zip(x, y)]
    tokens = [t for r in rows for t in r if t != BOS]
    assert len(tokens) == len(set(tokens))  # no token read twice
    assert sum(r[0] == BOS for r in rows) >= 0.75 * len(rows)  # best fit: rows start at documents
    for r in rows:  # a row is a few runs, each a document or a split piece of one: consecutive ids
        runs = 1 + sum(1 for a, b in itertools.pairwise(r) if b != BOS and a != BOS and b != a + 1)
        assert runs <= 2 + sum(t == BOS for t in r)
    split = sum(1 for r in rows if r[-1] != BOS and r[-1] + 1 in tokens)  # a document continued later
    assert split < len(rows)


def test_two_ranks_read_the_halves_of_the_one_process_batch(shards: list[Path]) -> None:
    one = DocumentPackingLoader(shards, 0, 1, vocab_size=16384)
    ranks = [DocumentPackingLoader(shards, r, 2, vocab_size=16384) for r in range(2)]
    for _ in range(6):
        x, _ = one.next_batch(64, 16)
        assert torch.equal(torch.cat([r.next_batch(32, 16)[0] for r in ranks]), x)


def test_state_round_trips(shards: list[Path]) -> None:
    a = DocumentPackingLoader(shards, 0, 1, vocab_size=16384)
    a.next_batch(48, 16)
    b = DocumentPackingLoader(shards, 0, 1, vocab_size=16384)
    b.load_state_dict(a.state_dict())
    for seq in (16, 16, 8, 16):
        assert torch.equal(a.next_batch(48, seq)[0], b.next_batch(48, seq)[0])
