"""The challenge's token shard format and sequential token streaming.

A shard (``fineweb_train_000000.bin``, ``fineweb_val_000000.bin``, ...) is a 1024-byte header of
256 little-endian int32 — ``[20240520, 1, n, 0, ...]`` — followed by ``n`` little-endian uint16
token ids; the file size must be exactly ``1024 + 2 * n`` bytes.

Training data is read the way the challenge baseline reads it: shards in sorted order, front to back,
wrapping around to the first shard at the end, with no shuffling. :class:`DistributedTokenLoader`
splits each contiguous chunk of the stream between ranks exactly like the baseline's loader.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import queue
import secrets
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api.errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2
MAX_TOKEN_ID = 65535
BOS_ID = 1
"""The token that starts every document (``[BOS] + tokens``; the challenge's tokenizers and every
tokenizer ``pgolf data build`` writes use id 1). Document-aware techniques (SmearGate's BOS
mask, BigramHash's reserved row, document-masked attention, document-packed loading) read it."""

assert HEADER_BYTES == 1024


def shard_name(split: str, index: int) -> str:
    """The challenge's file name for shard ``index`` of ``split`` (``fineweb_val_000000.bin``)."""
    return f"fineweb_{split}_{index:06d}.bin"


def _as_uint16(tokens: np.ndarray | Sequence[int], path: Path) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"{path}: tokens to write must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<u2")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > MAX_TOKEN_ID:
        raise DataError(
            f"{path}: token ids must be in [0, {MAX_TOKEN_ID}] to fit uint16 shards, "
            f"got values in [{lo}, {hi}]"
        )
    return arr.astype("<u2", copy=False)


def _header(n_tokens: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = n_tokens
    return header


def write_shard(path: Path, tokens: np.ndarray | Sequence[int]) -> None:
    """Write ``tokens`` as a challenge shard at ``path``, atomically (temp file + ``os.replace``)."""
    path = Path(path)
    payload = _as_uint16(tokens, path)
    if payload.size > np.iinfo(np.int32).max:
        raise DataError(f"{path}: {payload.size} tokens do not fit one shard (int32 header count)")
    if not path.parent.is_dir():
        raise DataError(f"{path}: cannot write shard, folder {path.parent} does not exist")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with tmp.open("xb") as f:  # unlike mkstemp, keeps the umask's permissions
            f.write(_header(int(payload.size)).tobytes())
            f.write(payload.tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_header(path: Path) -> int:
    """Validate the shard header and file size of ``path``; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(
            f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte shard header "
            "(truncated or not a shard)"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad shard magic {magic}, expected {SHARD_MAGIC} (not a challenge shard)")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {version}, expected {SHARD_VERSION}")
    if n < 0:
        raise DataError(f"{path}: negative token count {n} in shard header")
    expected = HEADER_BYTES + TOKEN_BYTES * n
    if size != expected:
        raise DataError(
            f"{path}: size mismatch: header says {n} tokens so the file should be {expected} bytes, "
            f"but it is {size} bytes (truncated or corrupted)"
        )
    return n


def load_shard(path: Path) -> np.ndarray:
    """Validate ``path`` and return its tokens as a read-only uint16 memory map."""
    n = read_header(path)
    if n == 0:  # np.memmap cannot map zero bytes
        empty = np.zeros(0, dtype="<u2")
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def find_shards(data_dir: Path, split: str, limit: int | None = None) -> list[Path]:
    """The sorted ``fineweb_{split}_*.bin`` shards in ``data_dir`` (the first ``limit`` if given)."""
    data_dir = Path(data_dir)
    pattern = f"fineweb_{split}_*.bin"
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist (expected shards named {pattern})")
    paths = sorted(p for p in data_dir.glob(pattern) if p.is_file())
    if not paths:
        raise DataError(f"{data_dir}: no {split} shards found (expected files matching {pattern})")
    if limit is not None:
        if limit < 1:
            raise DataError(f"{data_dir}: shard limit must be at least 1, got {limit}")
        paths = paths[:limit]
    return paths


_SCAN_CHUNK = 1 << 24


def shard_key(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, modification time): a shard file's version, for remembered scans."""
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4096)
def _scan(key: tuple[str, int, int]) -> tuple[int, int]:
    tokens = load_shard(Path(key[0]))
    top = max(
        (int(tokens[i : i + _SCAN_CHUNK].max()) for i in range(0, len(tokens), _SCAN_CHUNK)), default=-1
    )
    return len(tokens), top


def check_ids(path: Path, vocab_size: int) -> int:
    """Validate a shard's header and that every id is below ``vocab_size`` (one max over the
    memory map, remembered per file version); returns its token count. Raises
    :class:`DataError` naming the file, the first offending position and its id."""
    if not Path(path).is_file():
        raise DataError(f"{path}: shard file not found")
    n, top = _scan(shard_key(path))
    if top >= vocab_size:
        tokens = load_shard(Path(path))
        pos = int(np.argmax(tokens >= vocab_size))
        raise DataError(
            f"{path}: token id {int(tokens[pos])} at position {pos:,} (largest id {top}) is outside "
            f"the vocabulary of {vocab_size} (ids 0..{vocab_size - 1}): these shards were made with "
            "another tokenizer, or are corrupted"
        )
    return n


def check_shards(paths: Sequence[Path], vocab_size: int | None = None) -> int:
    """Read every shard header (so a bad shard fails before training) and, given ``vocab_size``,
    check every id is below it (:func:`check_ids`); return the total token count."""
    if vocab_size is not None:
        return sum(check_ids(Path(p), vocab_size) for p in paths)
    return sum(read_header(Path(p)) for p in paths)


def load_tokens(paths: Sequence[Path], vocab_size: int | None = None) -> torch.Tensor:
    """Concatenate whole shards (e.g. the validation split) into one 1-D int32 tensor; given
    ``vocab_size``, every id is checked to be below it first."""
    if not paths:
        raise DataError("no shards given to load")
    if vocab_size is not None:
        check_shards(paths, vocab_size)
    parts = [np.asarray(load_shard(Path(p)), dtype=np.int32) for p in paths]
    return torch.from_numpy(np.concatenate(parts))


class TokenStream:
    """Reads the shards front to back in the given order, wrapping around at the end.

    Shards are memory-mapped lazily, one at a time. The position is ``(shard, pos)``: the next
    token is ``pos`` in shard number ``shard``. Given ``vocab_size``, each shard's ids are checked
    to be below it when the shard is opened (:func:`check_ids`).
    """

    def __init__(self, paths: Sequence[Path], vocab_size: int | None = None):
        if not paths:
            raise DataError("no shards given to stream tokens from")
        self.vocab_size = vocab_size
        self.paths = [Path(p) for p in paths]
        self.shard = 0
        self.pos = 0
        self._tokens: np.ndarray | None = None

    def _current(self) -> np.ndarray:
        if self._tokens is None:
            if self.vocab_size is not None:
                check_ids(self.paths[self.shard], self.vocab_size)
            self._tokens = load_shard(self.paths[self.shard])
        return self._tokens

    def _advance(self) -> None:
        self.shard = (self.shard + 1) % len(self.paths)
        self.pos = 0
        self._tokens = None

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` tokens as int64, crossing shard boundaries and wrapping around."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens ({n})")
        out = np.empty(n, dtype=np.int64)
        filled, empty_in_a_row = 0, 0
        while filled < n:
            tokens = self._current()
            k = min(n - filled, len(tokens) - self.pos)
            if k <= 0:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.paths):
                    raise DataError(f"all {len(self.paths)} shards are empty; nothing to stream")
                self._advance()
                continue
            empty_in_a_row = 0
            out[filled : filled + k] = tokens[self.pos : self.pos + k]
            filled += k
            self.pos += k
        return out

    def state_dict(self) -> dict[str, Any]:
        """The stream position, to restore with :meth:`load_state_dict`."""
        return {"shard": self.shard, "pos": self.pos, "num_shards": len(self.paths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (over the same shard list)."""
        shard, pos = int(state["shard"]), int(state["pos"])
        num = int(state.get("num_shards", len(self.paths)))
        if num != len(self.paths) or not 0 <= shard < len(self.paths) or pos < 0:
            raise DataError(
                f"cannot restore token stream state {state}: it was saved over {num} shards, "
                f"this stream has {len(self.paths)}"
            )
        self.shard, self.pos, self._tokens = shard, pos, None

    def reset(self) -> None:
        """Back to the first token of the first shard."""
        self.shard, self.pos, self._tokens = 0, 0, None


class DistributedTokenLoader:
    """The baseline's loader: every rank reads the same stream and keeps its own span.

    A batch is one contiguous span whatever the sequence length (``seq_len_agnostic``): a batch
    at another length is a reshape of the same tokens.

    Each :meth:`next_batch` takes ``world_size * (local_tokens + 1)`` contiguous tokens; rank ``r``
    keeps span ``r`` of length ``local_tokens + 1`` and returns inputs ``span[:-1]`` and targets
    ``span[1:]``, each shaped ``(local_tokens // seq_len, seq_len)``.
    """

    seq_len_agnostic = True

    def __init__(self, paths: Sequence[Path], rank: int, world_size: int, vocab_size: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not valid for world_size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.stream = TokenStream(paths, vocab_size)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` int64 CPU tensors of shape ``(local_tokens // seq_len, seq_len)``."""
        if seq_len < 1 or local_tokens < seq_len or local_tokens % seq_len:
            raise ValueError(
                f"local_tokens ({local_tokens}) must be a positive multiple of seq_len ({seq_len})"
            )
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span])
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def state_dict(self) -> dict[str, Any]:
        """The underlying stream's position."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        self.stream.load_state_dict(state)

    def reset(self) -> None:
        """Back to the start of the first shard."""
        self.stream.reset()


_Prefetched = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


class PrefetchingLoader:
    """Prepares the next batches of a training loader on a background thread.

    Reading the memory-mapped shards, widening to int64 and (on CUDA) pinning happen while the
    GPU works on the current batch, so ``x.to(device, non_blocking=True)`` is a true async copy.
    The batches and their order are exactly those of the wrapped loader (its reference path).

    A loader whose batches are one contiguous span (``seq_len_agnostic``, the baseline's) is read
    at one length and any ``seq_len`` dividing it is a view. Any other loader (the ``train_loader``
    slot's fillers that pick windows or pack documents per sequence) is read at the length asked
    for; when that changes, the batches read ahead are dropped and the loader is put back, with its
    ``load_state_dict``, where the first of them began, so the batch order is still the loader's own.
    """

    def __init__(self, loader: Any, local_tokens: int, seq_len: int, *, depth: int = 4, pin: bool = False):
        self.loader, self.local_tokens, self.seq_len, self.depth, self.pin = (
            loader, local_tokens, seq_len, depth, pin)  # fmt: skip
        self.agnostic = bool(getattr(loader, "seq_len_agnostic", False))
        self._queue: queue.Queue[_Prefetched | BaseException] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._consumed: dict[str, Any] | None = None  # the stream position after the last batch served

    def _work(self, q: queue.Queue[_Prefetched | BaseException], seq_len: int) -> None:
        while not self._stop.is_set():
            try:
                x, y = self.loader.next_batch(self.local_tokens, seq_len)
                after = self.loader.state_dict()
                item: _Prefetched | BaseException = (
                    (x.pin_memory(), y.pin_memory(), after) if self.pin else (x, y, after))  # fmt: skip
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = e
            while not self._stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _start(self, seq_len: int) -> None:
        self._stop.clear()
        self.seq_len = seq_len
        if self._consumed is None and not self.agnostic:  # where a rewind returns to
            self._consumed = self.loader.state_dict()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, args=(self._queue, seq_len), daemon=True,
                                        name="pgolf-prefetch")  # fmt: skip
        self._thread.start()

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; any ``seq_len`` dividing ``local_tokens`` (a view of the same span for a
        contiguous loader, batches read at that length otherwise)."""
        if local_tokens != self.local_tokens or local_tokens % seq_len:
            raise ValueError(
                f"this prefetcher serves batches of {self.local_tokens} tokens (any seq_len dividing it)"
            )
        if self._queue is not None and not self.agnostic and seq_len != self.seq_len:
            self._rewind()
        if self._queue is None:
            self._start(self.seq_len if self.agnostic else seq_len)
        assert self._queue is not None
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        x, y, self._consumed = item
        return x.view(-1, seq_len), y.view(-1, seq_len)

    def _rewind(self) -> None:
        """Stop reading ahead and put the loader back where the last batch served left it."""
        self.close()
        if self._consumed is not None:
            self.loader.load_state_dict(self._consumed)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch served (not the read-ahead one), to restore with
        :meth:`load_state_dict`."""
        return dict(self._consumed) if self._consumed is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._consumed = dict(state)

    def close(self) -> None:
        """Stop the thread and drop the batches read ahead (the wrapped loader's position is then
        ahead of what was consumed; call :meth:`reset` to start over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread, self._queue = None, None

    def reset(self) -> None:
        self.close()
        self.loader.reset()
        self._consumed = None

    def __del__(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------------------
# which data files the process opens (the data probe)
# --------------------------------------------------------------------------------------------

VAL_PATTERN = "fineweb_val_*.bin"


@dataclass
class FileWatch:
    """The shard files (``*.bin``) opened while the watch is active, with where the run was then.

    Every Python-level open in the process is seen (the ``open`` audit event, raised by ``open``,
    ``io.open``, ``os.open``, ``np.fromfile``, ``np.memmap``, ``torch.load`` …), whoever opens the
    file: the data layer, a technique or a library it calls. Files opened by native code that
    bypasses Python (a C extension's own ``fopen``) are not seen.

    ``validation``: the real paths of the validation shards; a file whose name matches
    :data:`VAL_PATTERN` counts as validation wherever it lies. ``where()`` describes the moment
    of an open of a validation file (e.g. ``"train step 12"``).
    """

    validation: frozenset[str]
    where: Callable[[], str] = lambda: ""
    phase: str = ""
    shards: dict[str, str] = field(default_factory=dict)  # path -> where it was first opened
    validation_opened: dict[str, str] = field(default_factory=dict)
    active: bool = True

    def stop(self) -> None:
        """Stop recording (what was recorded is kept)."""
        self.active = False

    def saw(self, path: str) -> None:
        if not self.active or not path.endswith(".bin"):
            return
        full = os.path.abspath(path)
        if full in self.shards:
            return
        is_val = (
            fnmatch.fnmatch(os.path.basename(full), VAL_PATTERN) or os.path.realpath(full) in self.validation
        )
        here = self.phase
        if is_val:
            with contextlib.suppress(Exception):  # a description must never break the open itself
                extra = self.where()
                here = f"{here}, {extra}" if here and extra else (extra or here)
            self.validation_opened[full] = here
        self.shards[full] = here


_WATCHES: list[FileWatch] = []
_HOOKED = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or not _WATCHES or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    elif isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, str):
        for w in _WATCHES:
            w.saw(path)


@contextlib.contextmanager
def watch_opens(validation: Sequence[Path], where: Callable[[], str] = lambda: "") -> Iterator[FileWatch]:
    """Record the shard files the process opens inside the ``with`` block (see :class:`FileWatch`)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)  # process-wide and permanent: it does nothing while no watch is active
        _HOOKED = True
    w = FileWatch(frozenset(os.path.realpath(p) for p in validation), where)
    _WATCHES.append(w)
    try:
        yield w
    finally:
        _WATCHES.remove(w)
