"""Where a run's data came from: the dataset's fingerprint and the train/validation document overlap.

A **document** is a run of tokens that starts at a BOS token (the tokenizer's ``bos_id``; the
challenge's shards begin every document with it) and ends before the next one; tokens before a
shard's first BOS form a document of their own. Each document is hashed (BLAKE2b, 128 bits, over
its little-endian uint16 ids, BOS included); a validation document whose hash is also a training
document's is an **overlap**. Documents with no token after their BOS are not counted.

The challenge's rule: a run whose training and validation documents overlap is invalid (the
case-operator dataset prepared with the default ``--val-docs=10000`` put 80 % of the validation
documents into training; techniques.md §8.3). Exact duplicates occur naturally in web text
(boilerplate pages), so a share up to :data:`MAX_OVERLAP_SHARE` of the validation documents is
reported but accepted; above it ``pgolf run`` refuses the data, naming how many documents overlap.

The **fingerprint** names every shard with its token count, document count and the BLAKE2b of its
tokens, and a SHA-256 over all of them, so two runs can be told apart by their data.

Cost (2 cores, measured in ``bench/legality_probes.py``): one pass over the tokens at about
0.2 s per 10 M tokens, remembered per process by (path, size, mtime).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..api.errors import DataError
from . import data

MAX_OVERLAP_SHARE = 0.001
"""Largest share of validation documents that may also be training documents (exact duplicates)."""

DIGEST_BYTES = 16


@dataclass(frozen=True)
class ShardDigest:
    """One shard's identity: file name, tokens, documents and the BLAKE2b of its token bytes."""

    name: str
    tokens: int
    documents: int
    blake2b: str


@dataclass(frozen=True)
class Overlap:
    """Validation documents that are also training documents (by hash)."""

    val_documents: int  # counted validation documents (at least one token after BOS)
    train_documents: int
    overlapping: int  # validation documents whose hash is a training document's
    overlapping_tokens: int
    first: int | None  # index of the first overlapping validation document (stream order)

    @property
    def share(self) -> float:
        return self.overlapping / max(self.val_documents, 1)

    @property
    def acceptable(self) -> bool:
        return self.share <= MAX_OVERLAP_SHARE

    def describe(self) -> str:
        if not self.overlapping:
            return (
                f"no validation document (of {self.val_documents:,}) is among the "
                f"{self.train_documents:,} training documents"
            )
        return (
            f"{self.overlapping:,} of {self.val_documents:,} validation documents ({self.share:.2%}, "
            f"{self.overlapping_tokens:,} tokens; the first is validation document {self.first}) are also "
            f"training documents (identical token ids)"
        )


@dataclass(frozen=True)
class Provenance:
    """The dataset's fingerprint and the train/validation overlap of one run's data."""

    fingerprint: dict[str, Any]
    overlap: Overlap
    seconds: float


def document_spans(tokens: np.ndarray, bos: int) -> np.ndarray:
    """Start offsets of the documents of a 1-D token array (ends are the next start or the end)."""
    starts = np.flatnonzero(tokens == bos) if bos >= 0 else np.zeros(0, dtype=np.int64)
    if len(tokens) and (not len(starts) or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    return starts.astype(np.int64)


def document_hashes(tokens: np.ndarray, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes ``S16`` (D,), lengths (D,)) of every document of ``tokens`` (uint16 ids)."""
    arr = np.ascontiguousarray(tokens, dtype="<u2")
    starts = document_spans(arr, bos)
    ends = np.concatenate([starts[1:], [len(arr)]]).astype(np.int64)
    view = memoryview(arr).cast("B")  # type: ignore[arg-type]
    digests = b"".join(
        hashlib.blake2b(view[2 * a : 2 * e], digest_size=DIGEST_BYTES).digest()
        for a, e in zip(starts.tolist(), ends.tolist())
    )
    return np.frombuffer(digests, dtype=f"S{DIGEST_BYTES}"), ends - starts


@functools.lru_cache(maxsize=512)
def _shard(key: tuple[str, int, int], bos: int) -> tuple[ShardDigest, np.ndarray, np.ndarray]:
    path = Path(key[0])
    tokens = data.load_shard(path)
    hashes, lengths = document_hashes(np.asarray(tokens), bos)
    buf = memoryview(np.ascontiguousarray(tokens)).cast("B")  # type: ignore[arg-type]
    whole = hashlib.blake2b(buf, digest_size=32).hexdigest()
    return ShardDigest(path.name, len(tokens), len(hashes), whole), hashes, lengths


def shard_documents(path: Path, bos: int) -> tuple[ShardDigest, np.ndarray, np.ndarray]:
    """A shard's :class:`ShardDigest`, its document hashes and lengths (remembered per file version)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: shard file not found")
    return _shard(data.shard_key(Path(path)), bos)


def fingerprint(train: Sequence[Path], val: Sequence[Path], bos: int) -> dict[str, Any]:
    """Shard names, token and document counts, per-shard BLAKE2b and one SHA-256 over all of them."""
    out: dict[str, Any] = {}
    h = hashlib.sha256()
    for split, paths in (("train", train), ("val", val)):
        shards = [shard_documents(Path(p), bos)[0] for p in paths]
        out[split] = {
            "shards": len(shards),
            "tokens": sum(s.tokens for s in shards),
            "documents": sum(s.documents for s in shards),
            "files": [asdict(s) for s in shards],
        }
        for s in shards:
            h.update(f"{split}:{s.name}:{s.tokens}:{s.blake2b}\n".encode())
    out["bos_id"] = bos
    out["sha256"] = h.hexdigest()
    return out


def overlap(train: Sequence[Path], val: Sequence[Path], bos: int) -> Overlap:
    """Which validation documents also appear, token for token, among the training documents."""
    val_h, val_len = [], []
    for p in val:
        _, hs, ln = shard_documents(Path(p), bos)
        val_h.append(hs)
        val_len.append(ln)
    vh = np.concatenate(val_h) if val_h else np.zeros(0, dtype=f"S{DIGEST_BYTES}")
    vl = np.concatenate(val_len) if val_len else np.zeros(0, dtype=np.int64)
    counted = vl > 1  # BOS and at least one token
    found = np.zeros(len(vh), dtype=bool)
    n_train = 0
    for p in train:
        _, hs, ln = shard_documents(Path(p), bos)
        n_train += int((ln > 1).sum())
        found |= np.isin(vh, hs[ln > 1])
    found &= counted
    idx = np.flatnonzero(found)
    return Overlap(
        val_documents=int(counted.sum()),
        train_documents=n_train,
        overlapping=int(found.sum()),
        overlapping_tokens=int(vl[found].sum()),
        first=int(idx[0]) if len(idx) else None,
    )


def provenance(train: Sequence[Path], val: Sequence[Path], bos: int) -> Provenance:
    """The fingerprint and the overlap of a run's data (one pass over every shard)."""
    import time

    t0 = time.perf_counter()
    fp = fingerprint(train, val, bos)
    ov = overlap(train, val, bos)
    return Provenance(fp, ov, time.perf_counter() - t0)


def check_overlap(ov: Overlap, folder: Path) -> None:
    """Refuse data whose validation documents are also training documents (beyond natural duplicates)."""
    if not ov.acceptable:
        raise DataError(
            f"{folder}: {ov.describe()}: the model would be scored on text it was trained on, which "
            f"the challenge rules out (at most {MAX_OVERLAP_SHARE:.1%} exact duplicates are accepted "
            "as natural web-text repeats). Rebuild the dataset so the validation documents are not "
            "in the training shards (e.g. `pgolf data build --val-docs N` puts the first N documents "
            "in validation only)"
        )
