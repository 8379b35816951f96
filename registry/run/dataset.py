"""Can these shards be scored with this tokenizer? The checks run before any training.

val_bpb is right only when the validation tokens are what the named tokenizer made of the text,
and when that tokenizer's byte tables count the text's UTF-8 bytes. :func:`check_dataset` refuses,
naming the files, every case where that cannot be shown:

1. **Recorded tokenizer.** A folder written by ``pgolf data build`` holds ``dataset.json``, which
   records its tokenizer's SHA-256 and size: a stack naming another tokenizer file is refused,
   naming both.
2. **Token ranges.** Every shard (train and validation) is scanned once (a max over the memory
   map): an id ≥ the vocabulary size is refused with the file, the position and the id.
3. **Validation statistics.** The validation split must hold something to score (two tokens or
   more, at least one byte), and no id the tokenizer never emits (padding, other control pieces
   than BOS/EOS, unused pieces).
4. **Round trip.** A sample of validation documents (split at BOS) is decoded and re-encoded: a
   tokenizer reproduces the ids it produced (every document without ``<unk>``, measured), while
   shards made by another tokenizer do not (sp1024 shards read with the sp4096 tokenizer: 2.7 %
   of tokens), so fewer than half is refused.
5. **Byte accounting.** On the probe text and on the sampled documents that round-trip, the byte
   tables count exactly the UTF-8 bytes and ``decode(encode(text)) == text``
   (:func:`.bpb.check_byte_accounting`).

Scans are remembered per process (by path, size and modification time), so a search that checks
its data once per trial pays once.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from ..api.errors import DataError
from . import bpb, data

MANIFEST = "dataset.json"
"""The description ``pgolf data build`` writes into a dataset folder."""

SAMPLE_DOCUMENTS = 64
SAMPLE_TOKENS = 200_000
MIN_ROUND_TRIP_TOKENS = 64  # below this the sample is too small to judge
MIN_ROUND_TRIP = 0.5
_CHUNK = 1 << 24


@dataclass(frozen=True)
class DatasetCheck:
    """What :func:`check_dataset` measured."""

    val_tokens: int
    train_tokens: int
    val_bytes: int
    vocab_size: int
    tokenizer_sha256: str
    round_trip: float | None  # share of sampled tokens reproduced; None: sample too small
    sampled_documents: int
    manifest: bool


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_record(path: Path, sp: spm.SentencePieceProcessor) -> dict[str, Any]:
    """What a dataset manifest records about its tokenizer."""
    return {"tokenizer_sha256": file_sha256(path), "vocab_size": int(sp.vocab_size())}


# --------------------------------------------------------------------------------------------
# shard scans
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _id_counts(key: tuple[str, int, int]) -> np.ndarray:
    tokens = data.load_shard(Path(key[0]))
    counts = np.zeros(data.MAX_TOKEN_ID + 1, dtype=np.int64)
    for i in range(0, len(tokens), _CHUNK):
        counts += np.bincount(tokens[i : i + _CHUNK], minlength=counts.size)
    return counts


def _never_emitted(sp: spm.SentencePieceProcessor) -> dict[int, str]:
    """Ids of ``sp`` that cannot appear in ``[BOS] + encode(text)`` streams, with their kind."""
    allowed = {sp.bos_id(), sp.eos_id()}
    out = {}
    for t in range(sp.vocab_size()):
        if sp.is_unused(t):
            out[t] = "unused"
        elif sp.is_control(t) and t not in allowed:
            out[t] = "control"
    return out


# --------------------------------------------------------------------------------------------
# the manifest of a built dataset
# --------------------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset description ({e})") from None
    return meta if isinstance(meta, dict) else None


def _check_recorded_tokenizer(folder: Path, tok: Path, sp: spm.SentencePieceProcessor, sha: str) -> bool:
    meta = _read_manifest(folder)
    if meta is None:
        return False
    rec_name = str(meta.get("tokenizer") or "tokenizer.model")
    rec_path = folder / rec_name
    rec_sha = meta.get("tokenizer_sha256")
    if not isinstance(rec_sha, str) and rec_path.is_file():  # written before the hash was recorded
        rec_sha = file_sha256(rec_path)
    if isinstance(rec_sha, str) and rec_sha != sha:
        size = meta.get("vocab_size", "?")
        raise DataError(
            f"data.tokenizer {tok} (sha256 {sha[:12]}…, {sp.vocab_size()} pieces) is not the tokenizer "
            f"the shards in {folder} were made with: {folder / MANIFEST} records {rec_name} "
            f"(sha256 {rec_sha[:12]}…, {size} pieces); scoring them with another tokenizer gives a "
            f"wrong val_bpb. Use data.tokenizer: {rec_path}"
        )
    return True


def _check_recorded_counts(folder: Path, split: str, paths: Sequence[Path], total: int) -> None:
    meta = _read_manifest(folder) or {}
    rec = (meta.get("splits") or {}).get(split) or {}
    want = rec.get("tokens")
    if isinstance(want, int) and want != total:
        raise DataError(
            f"{folder}: the {split} shards hold {total:,} tokens but {folder / MANIFEST} records "
            f"{want:,}: shards were added, removed or replaced after the dataset was built"
        )


# --------------------------------------------------------------------------------------------
# the validation sample
# --------------------------------------------------------------------------------------------


def _documents(val: Sequence[Path], bos: int) -> list[list[int]]:
    """Up to :data:`SAMPLE_DOCUMENTS` whole documents (the ids after each BOS) from the start of
    the validation split, about :data:`SAMPLE_TOKENS` tokens at most; none without BOS markers."""
    if bos < 0:
        return []
    parts, have, ended = [], 0, True
    for p in val:
        tokens = data.load_shard(Path(p))
        take = min(len(tokens), 2 * SAMPLE_TOKENS - have)
        parts.append(np.asarray(tokens[:take], dtype=np.int64))
        have += take
        if have >= 2 * SAMPLE_TOKENS:
            ended = take == len(tokens) and p == val[-1]
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(stream == bos)
    ends = [*starts[1:].tolist(), len(stream) if ended else None]
    docs: list[list[int]] = []
    taken = 0
    for s, e in zip(starts.tolist(), ends):
        if e is None or len(docs) >= SAMPLE_DOCUMENTS or taken >= SAMPLE_TOKENS:
            break
        if e - s > 1:
            docs.append(stream[s + 1 : e].tolist())
            taken += e - s - 1
    return docs


def _round_trip(sp: spm.SentencePieceProcessor, docs: list[list[int]]) -> tuple[float | None, list[str]]:
    """(share of tokens of ``<unk>``-free documents that re-encode to themselves, their texts)."""
    unk = sp.unk_id()
    same = total = 0
    texts = []
    for ids in docs:
        if unk in ids:
            continue
        text = sp.decode(ids)
        total += len(ids)
        if sp.encode(text) == ids:
            same += len(ids)
            texts.append(text)
    return (same / total if total >= MIN_ROUND_TRIP_TOKENS else None), texts


def _val_bytes(val: Sequence[Path], lut: bpb.ByteLUT) -> int:
    """Bytes of every target of the validation stream (the count val_bpb divides by)."""
    base = lut.base_bytes.numpy().astype(np.int64)
    lead = lut.has_leading_space.numpy()
    boundary = lut.is_boundary.numpy()
    total, prev = 0, None
    for p in val:
        tokens = data.load_shard(Path(p))
        for i in range(0, len(tokens), _CHUNK):
            chunk = np.asarray(tokens[i : i + _CHUNK], dtype=np.int64)
            x = chunk[:-1] if prev is None else np.concatenate([[prev], chunk[:-1]])
            y = chunk if prev is not None else chunk[1:]
            total += int(base[y].sum()) + int((lead[y] & ~boundary[x]).sum())
            if len(chunk):
                prev = int(chunk[-1])
    return total


# --------------------------------------------------------------------------------------------
# tokenizers named by size
# --------------------------------------------------------------------------------------------


def named_tokenizer_candidates(folder: Path, size: int) -> list[Path]:
    """Where the tokenizer ``sp<size>`` of a shard folder may be, in the order looked at: the
    ``tokenizer.model`` of a ``pgolf data build`` folder, then the challenge's layout
    (``data/datasets/fineweb10B_sp<size>`` beside ``data/tokenizers/fineweb_<size>_bpe.model``)."""
    folder = Path(folder)
    name = f"fineweb_{size}_bpe.model"
    return [
        folder / "tokenizer.model",
        folder.parent.parent / "tokenizers" / name,
        folder.parent / "tokenizers" / name,
        folder / name,
    ]


def find_named_tokenizer(folder: Path, name: str, size: int) -> Path:
    """The SentencePiece file of the tokenizer ``name`` (``sp8192``, ``size`` pieces) for the
    shards in ``folder``; :class:`DataError` naming every place looked at when none fits."""
    looked = []
    for cand in named_tokenizer_candidates(folder, size):
        if cand.is_file():
            pieces = int(bpb.load_tokenizer(cand).vocab_size())
            if pieces == size:
                return cand
            looked.append(f"{cand} ({pieces} pieces)")
        else:
            looked.append(f"{cand} (absent)")
    raise DataError(
        f"data.tokenizer {name}: no {size}-piece SentencePiece model found for the shards in {folder}; "
        f"looked at {', '.join(looked)}. Give data.tokenizer as the .model file"
    )


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------


def check_dataset(
    folder: Path, train: Sequence[Path], val: Sequence[Path], tokenizer: Path, vocab_size: int,
    *, all_train: bool = True,
) -> DatasetCheck:  # fmt: skip
    """Check that ``train`` and ``val`` shards of ``folder`` can be trained on and scored with
    ``tokenizer`` and a model of ``vocab_size`` (see the module docstring); raises
    :class:`DataError` naming the file and what is wrong. ``all_train``: ``train`` is every
    training shard of the folder (not a ``data.train_shards`` prefix)."""
    folder, tokenizer = Path(folder), Path(tokenizer)
    if not tokenizer.is_file():
        raise DataError(f"data.tokenizer: file {str(tokenizer)!r} does not exist")
    keys = (
        str(folder.resolve()),
        data.shard_key(tokenizer),
        tuple(data.shard_key(p) for p in (*train, *val)),
        vocab_size,
        all_train,
    )
    return _check_cached(keys, folder, tuple(map(Path, train)), tuple(map(Path, val)), tokenizer, vocab_size)


@functools.lru_cache(maxsize=64)
def _check_cached(
    keys: tuple[Any, ...], folder: Path, train: tuple[Path, ...], val: tuple[Path, ...], tok: Path, vocab: int
) -> DatasetCheck:
    all_train = bool(keys[-1])
    sp = bpb.load_tokenizer(tok)
    size = int(sp.vocab_size())
    if size != vocab:
        raise DataError(
            f"data.tokenizer {tok.name} has {size} pieces but model.vocab_size is {vocab}; "
            "remove model.vocab_size (it follows the tokenizer)"
        )
    if sp.bos_id() != data.BOS_ID:
        raise DataError(
            f"data.tokenizer {tok.name}: its BOS id is {sp.bos_id()}, but the challenge format starts every "
            f"document with id {data.BOS_ID} ([BOS] + tokens), which document-aware techniques rely on"
        )
    sha = file_sha256(tok)
    has_manifest = _check_recorded_tokenizer(folder, tok, sp, sha)
    n_train = sum(data.check_ids(p, size) for p in train)
    n_val = sum(data.check_ids(p, size) for p in val)
    if has_manifest:
        _check_recorded_counts(folder, "val", val, n_val)
        if all_train:
            _check_recorded_counts(folder, "train", train, n_train)
    if n_val < 2:
        raise DataError(
            f"{folder}: the validation split ({', '.join(p.name for p in val)}) holds {n_val} token(s), "
            "so there is nothing to score (a score needs at least one target)"
        )
    counts = np.zeros(data.MAX_TOKEN_ID + 1, dtype=np.int64)
    for p in val:
        counts += _id_counts(data.shard_key(p))
    never = _never_emitted(sp)
    found = [(t, never[t], int(counts[t])) for t in never if counts[t] > 0]
    if found:
        t, kind, n = found[0]
        raise DataError(
            f"{folder}: the validation shards hold {n:,} × id {t} ({sp.id_to_piece(t)!r}, a {kind} "
            f"piece of {tok.name}), which that tokenizer never produces"
            + (f", and {len(found) - 1} more such id(s)" if len(found) > 1 else "")
            + f": these shards were not made with {tok}"
        )
    try:
        lut = bpb.build_byte_lut(sp, vocab)
    except DataError as e:
        raise DataError(f"data.tokenizer {tok}: {e}") from None
    val_bytes = _val_bytes(val, lut)
    if val_bytes == 0:
        raise DataError(
            f"{folder}: the validation split's {n_val - 1:,} targets stand for 0 bytes of text "
            "(only control or unknown tokens), so val_bpb is undefined"
        )
    docs = _documents(val, sp.bos_id())
    rate, texts = _round_trip(sp, docs)
    if rate is not None and rate < MIN_ROUND_TRIP:
        raise DataError(
            f"the validation shards in {folder} were not made with data.tokenizer {tok}: decoding and "
            f"re-encoding {len(docs)} sampled documents with it reproduces {rate:.1%} of their tokens "
            "(a tokenizer reproduces its own output exactly), so val_bpb would be counted with the wrong "
            "bytes; name the tokenizer the shards were made with"
        )
    try:
        bpb.check_byte_accounting(sp, lut, texts)
    except DataError as e:
        raise DataError(f"data.tokenizer {tok}: {e}") from None
    return DatasetCheck(n_val, n_train, val_bytes, size, sha, rate, len(docs), has_manifest)
