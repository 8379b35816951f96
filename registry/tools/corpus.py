"""Building challenge-format shard datasets from documents, and the embedded default corpus.

:func:`build_dataset` turns ``.jsonl`` / ``.txt`` documents into ``fineweb_val_*.bin`` and
``fineweb_train_*.bin`` shards: the first ``val_docs`` documents are the validation split, each
document is ``[BOS] + sp.encode(doc)``. The tokenizer is either given or trained with the
challenge's SentencePiece settings (:func:`train_tokenizer`).

:func:`default_dataset` needs no download: its corpus is the docstrings of the Python standard
library (:func:`stdlib_documents`), which is real English prose present wherever Python is.
Measured on CPython 3.11.7 (2 CPU cores): 2,246 documents, 1.23 MB, 2.2-3.7 s to extract; a
1024-piece tokenizer trains in about 0.15 s; at vocab 1024 the dataset is 112 validation documents
(19,249 tokens) and 2,134 training documents (409,391 tokens); at vocab 4096, 14,266 and 302,915.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import io
import itertools
import json
import os
import random
import re
import secrets
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from ..api.errors import DataError, os_error_text
from ..run.bpb import build_byte_lut, load_tokenizer
from ..run.data import BOS_ID, MAX_TOKEN_ID, check_shards, find_shards, shard_name, write_shard
from ..run.dataset import MANIFEST, check_dataset, file_sha256

TXT_MODES = ("file", "paragraph", "line")
DOC_SUFFIXES = (".jsonl", ".txt")
DATASET_JSON = MANIFEST
TOKENIZER_FILE = "tokenizer.model"
DATASET_FORMAT = "pgolf-dataset"
DATASET_FORMAT_VERSION = 1

# The challenge's tokenizer settings (the trainer_spec of fineweb_{1024,4096}_bpe.model).
TOKENIZER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "split_digits": True,
    "byte_fallback": False,
    "hard_vocab_limit": False,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
}
SP_DEFAULT_MAX_SENTENCE_LENGTH = 4192

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pgolf"
# 5% of the 2,246 stdlib docstring documents of CPython 3.11 (19k tokens at vocab 1024, far under 150k).
DEFAULT_VAL_DOCS = 112
DEFAULT_MIN_DOC_CHARS = 200
_DEFAULT_RECIPE = "stdlib-docstrings-v1"
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
)
_ENCODE_BATCH = 512


# --------------------------------------------------------------------------- documents


def _txt_documents(path: Path, txt_mode: str) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e})") from None
    if txt_mode == "file":
        parts = [text]
    elif txt_mode == "paragraph":
        parts = [p.strip() for p in re.split(r"\n[ \t]*\n", text)]
    else:
        parts = [line.strip() for line in text.splitlines()]
    yield from (p for p in parts if p.strip())


def _jsonl_document(path: Path, lineno: int, line: str, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: malformed JSON ({e.msg}); expected one JSON object per line"
        ) from None
    value = record.get(text_key) if isinstance(record, dict) else None
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(
            f"{path}:{lineno}: field {text_key!r} is {found}; expected a JSON object with a string "
            f"field {text_key!r}"
        )
    return value


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 text ({e})") from None
            if line.strip():
                doc = _jsonl_document(path, lineno, line, text_key)
                if doc.strip():
                    yield doc


def iter_documents(path: Path, txt_mode: str = "file", text_key: str = "text") -> Iterator[str]:
    """The non-empty documents of ``path``.

    ``.jsonl``: one document per line, the string field ``text_key``. ``.txt``: the whole file
    (``txt_mode="file"``), blank-line separated paragraphs (``"paragraph"``) or non-empty lines
    (``"line"``). The path, suffix and mode are checked at once, the contents while iterating.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DOC_SUFFIXES:
        raise DataError(f"{path}: unsupported document file type {suffix!r}; expected one of {DOC_SUFFIXES}")
    if txt_mode not in TXT_MODES:
        raise DataError(f"unknown txt mode {txt_mode!r}; expected one of {TXT_MODES}")
    if not path.is_file():
        raise DataError(f"{path}: document file not found")
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_key)
    return _txt_documents(path, txt_mode)


def _documents_of(inputs: Sequence[Path], txt_mode: str, text_key: str) -> Callable[[], Iterator[str]]:
    """A function that iterates all documents of ``inputs`` afresh each time it is called."""
    paths = [Path(p) for p in inputs]
    for p in paths:  # fail on a bad path or option before any work
        iter_documents(p, txt_mode, text_key)

    def docs() -> Iterator[str]:
        for p in paths:
            yield from iter_documents(p, txt_mode, text_key)

    return docs


# --------------------------------------------------------------------------- tokenizer


def _training_lines(docs: Iterable[str]) -> list[str]:
    """Documents split into their non-empty lines.

    SentencePiece silently skips training "sentences" longer than ``max_sentence_length`` bytes, so
    whole documents are not fed as sentences; a newline normalizes to a space anyway.
    """
    return [line for doc in docs for line in doc.splitlines() if line.strip()]


def train_tokenizer(
    docs: Iterable[str], vocab_size: int, out_prefix: Path, *, setting: str = "tokenizer vocab size"
) -> Path:
    """Train a SentencePiece BPE with the challenge's settings; return ``{out_prefix}.model``.

    Training is deterministic (one thread, every line used, none dropped for length). The
    challenge's settings make ``vocab_size`` a soft limit: on too little text SentencePiece
    stops early, which is refused here (:class:`DataError` naming ``setting`` and both sizes)
    rather than handing back a smaller vocabulary than asked for.
    """
    if not 8 <= vocab_size <= MAX_TOKEN_ID + 1:
        raise DataError(f"{setting} must be in [8, {MAX_TOKEN_ID + 1}], got {vocab_size}")
    lines = _training_lines(docs)
    if not lines:
        raise DataError("no text to train a tokenizer on")
    longest = max(len(line.encode("utf-8")) for line in lines)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            input_sentence_size=0,
            max_sentence_length=max(SP_DEFAULT_MAX_SENTENCE_LENGTH, longest),
            num_threads=1,
            minloglevel=2,
            **TOKENIZER_SETTINGS,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece could not train a {vocab_size}-piece tokenizer: {e}") from None
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    got = load_tokenizer(out).vocab_size()
    if got != vocab_size:
        out.unlink()
        raise DataError(
            f"{setting} {vocab_size:,}: this text supports only {got:,} SentencePiece pieces, so the "
            f"tokenizer would have {got:,} instead of {vocab_size:,}; ask for {got:,} or fewer, or give more text"
        )
    try:
        build_byte_lut(load_tokenizer(out))  # its byte tables must count text exactly
    except DataError as e:
        raise DataError(f"the {vocab_size}-piece tokenizer trained on these documents: {e}") from None
    return out


def _check_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    sp = load_tokenizer(path)
    if sp.vocab_size() > MAX_TOKEN_ID + 1:
        raise DataError(f"{path}: vocab size {sp.vocab_size()} does not fit uint16 shards (max 65536)")
    if sp.bos_id() != BOS_ID:
        raise DataError(f"{path}: tokenizer BOS id is {sp.bos_id()}; the challenge format expects {BOS_ID}")
    try:
        build_byte_lut(sp)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return sp


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class DatasetInfo:
    """A built dataset folder: shards, ``tokenizer.model`` and ``dataset.json``."""

    path: Path
    tokenizer: Path
    vocab_size: int
    train_docs: int
    val_docs: int
    train_tokens: int
    val_tokens: int

    def train_shards(self) -> list[Path]:
        """The sorted training shards."""
        return find_shards(self.path, "train")

    def val_shards(self) -> list[Path]:
        """The sorted validation shards."""
        return find_shards(self.path, "val")


def read_dataset_info(path: Path) -> DatasetInfo:
    """The :class:`DatasetInfo` of a folder written by :func:`build_dataset`."""
    meta_path = Path(path) / DATASET_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        splits = meta["splits"]
        return DatasetInfo(
            path=Path(path),
            tokenizer=Path(path) / meta["tokenizer"],
            vocab_size=int(meta["vocab_size"]),
            train_docs=int(splits["train"]["documents"]),
            val_docs=int(splits["val"]["documents"]),
            train_tokens=int(splits["train"]["tokens"]),
            val_tokens=int(splits["val"]["tokens"]),
        )
    except FileNotFoundError:
        raise DataError(f"{meta_path}: not found; expected a dataset folder made by build_dataset") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: malformed dataset description ({e!r})") from None


class _ShardWriter:
    """Appends documents to ``fineweb_{split}_NNNNNN.bin`` shards of at most ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[str] = []
        self.tokens = 0
        self.docs = 0

    def add(self, doc_tokens: np.ndarray) -> None:
        self.docs += 1
        self.tokens += len(doc_tokens)
        self.buf.append(doc_tokens)
        self.buffered += len(doc_tokens)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf)
        name = shard_name(self.split, len(self.shards))
        write_shard(self.out_dir / name, data[:n])
        self.shards.append(name)
        rest = data[n:]
        self.buf, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict[str, Any]:
        if self.buffered:
            self._flush(self.buffered)
        return {"documents": self.docs, "tokens": self.tokens, "shards": self.shards}


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_splits(
    sp: spm.SentencePieceProcessor, docs: Iterable[str], work: Path, val_docs: int, shard_tokens: int
) -> dict[str, Any]:
    val = _ShardWriter(work, "val", shard_tokens)
    train = _ShardWriter(work, "train", shard_tokens)
    index = 0
    for batch in _batches(docs, _ENCODE_BATCH):
        for ids in sp.encode(batch):
            writer = val if index < val_docs else train
            writer.add(np.array([BOS_ID, *ids], dtype=np.uint16))
            index += 1
    return {"val": val.close(), "train": train.close()}


OPTION_NAMES: dict[str, str] = {
    "tokenizer": "tokenizer",
    "vocab_size": "vocab_size",
    "val_docs": "val_docs",
    "shard_tokens": "shard_tokens",
    "tokenizer_train_docs": "tokenizer_train_docs",
}
"""How errors name :func:`build_dataset`'s arguments; the CLI passes its flags (``--val-docs``)."""


def _check_build_args(
    tokenizer: Path | None, vocab_size: int | None, val_docs: int, shard_tokens: int, names: Mapping[str, str]
) -> None:
    if (tokenizer is None) == (vocab_size is None):
        raise DataError(
            f"give exactly one of {names['tokenizer']} (a tokenizer model to use) or "
            f"{names['vocab_size']} (the size of one to train)"
        )
    if val_docs < 1:
        raise DataError(f"{names['val_docs']} must be at least 1 (the validation split), got {val_docs}")
    if shard_tokens < 1:
        raise DataError(f"{names['shard_tokens']} must be at least 1, got {shard_tokens}")


def _count_documents(
    docs: Callable[[], Iterator[str]], sources: Sequence[str], val_docs: int, names: Mapping[str, str]
) -> int:
    n = sum(1 for _ in docs())
    where = ", ".join(sources)
    if n == 0:
        raise DataError(f"no documents found in {where}")
    if n < val_docs + 1:
        raise DataError(
            f"found {n} documents in {where}, but {val_docs} validation documents plus at least one "
            f"training document need {val_docs + 1}; lower {names['val_docs']} or add documents"
        )
    return n


def _write_dataset(
    work: Path,
    docs: Callable[[], Iterator[str]],
    sources: Sequence[str],
    *,
    tokenizer: Path | None,
    vocab_size: int | None,
    val_docs: int,
    shard_tokens: int,
    settings: dict[str, Any],
    names: Mapping[str, str] = OPTION_NAMES,
    tokenizer_train_docs: int | None = None,
) -> None:
    """Write the whole dataset into the existing empty folder ``work``."""
    _count_documents(docs, sources, val_docs, names)
    model = work / TOKENIZER_FILE
    if vocab_size is not None:
        first = itertools.islice(docs(), tokenizer_train_docs) if tokenizer_train_docs else docs()
        train_tokenizer(first, vocab_size, work / "tokenizer", setting=names["vocab_size"])
    else:
        assert tokenizer is not None
        _check_tokenizer(Path(tokenizer))
        shutil.copyfile(tokenizer, model)
    sp = _check_tokenizer(model)
    splits = _write_splits(sp, docs(), work, val_docs, shard_tokens)
    meta = {
        "format": DATASET_FORMAT,
        "format_version": DATASET_FORMAT_VERSION,
        "vocab_size": int(sp.vocab_size()),
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(model),
        "tokenizer_source": str(tokenizer) if tokenizer is not None else None,
        "tokenizer_trained": vocab_size is not None,
        "requested_vocab_size": vocab_size,
        "tokenizer_train_docs": tokenizer_train_docs if vocab_size is not None else None,
        "bos_id": BOS_ID,
        "sources": list(sources),
        "settings": {"val_docs": val_docs, "shard_tokens": shard_tokens, **settings},
        "splits": splits,
    }
    (work / DATASET_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    # the shards must be scoreable with their tokenizer: ranges, round trip, byte accounting
    check_dataset(work, find_shards(work, "train"), find_shards(work, "val"), model, int(sp.vocab_size()))


def _missing_parents(target: Path) -> list[Path]:
    """The folders above ``target`` that do not exist yet, deepest first."""
    out = []
    p = target.absolute().parent
    while not p.exists():
        out.append(p)
        p = p.parent
    return out


def _temp_sibling(target: Path, tag: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _refuse_nonempty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: output folder already exists and is not empty; refusing to overwrite it")


def build_dataset(
    inputs: Sequence[Path],
    out_dir: Path,
    *,
    tokenizer: Path | None = None,
    vocab_size: int | None = None,
    val_docs: int = 50_000,
    shard_tokens: int = 100_000_000,
    txt_mode: str = "file",
    text_key: str = "text",
    option_names: Mapping[str, str] | None = None,
    tokenizer_train_docs: int | None = None,
) -> DatasetInfo:
    """Tokenize the documents of ``inputs`` into a challenge-format dataset folder ``out_dir``.

    Give either ``tokenizer`` (copied in as ``tokenizer.model``) or ``vocab_size`` (a tokenizer is
    trained with the challenge's settings on the first ``tokenizer_train_docs`` documents, all when
    None, validation ones included, as the challenge's pipeline did: its SP4096 and SP8192 were
    trained on the first 5,000,000 documents). The first
    ``val_docs`` documents form the validation split. The folder is written beside ``out_dir`` and
    renamed into place at the end, so a failure leaves no half-written ``out_dir`` and no folder
    it had to create. Errors name the arguments as ``option_names`` says (default
    :data:`OPTION_NAMES`).
    """
    out_dir = Path(out_dir)
    names = {**OPTION_NAMES, **(option_names or {})}
    _check_build_args(tokenizer, vocab_size, val_docs, shard_tokens, names)
    if tokenizer_train_docs is not None and tokenizer_train_docs < 1:
        raise DataError(f"{names['tokenizer_train_docs']} must be at least 1, got {tokenizer_train_docs}")
    if tokenizer_train_docs is not None and vocab_size is None:
        raise DataError(
            f"{names['tokenizer_train_docs']} applies when a tokenizer is trained ({names['vocab_size']})"
        )
    if not inputs:
        raise DataError("no input document files given")
    _refuse_nonempty(out_dir)
    docs = _documents_of(inputs, txt_mode, text_key)
    sources = [str(Path(p)) for p in inputs]
    settings = {"txt_mode": txt_mode, "text_key": text_key}
    made = _missing_parents(out_dir)
    work = _temp_sibling(out_dir, "building")
    try:
        _write_dataset(
            work,
            docs,
            sources,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            val_docs=val_docs,
            shard_tokens=shard_tokens,
            settings=settings,
            names=names,
            tokenizer_train_docs=tokenizer_train_docs,
        )
        _refuse_nonempty(out_dir)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in made:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return read_dataset_info(out_dir)


# --------------------------------------------------------------------------- default corpus


def _stdlib_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS)
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of ``path`` (parsed, never imported)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, kinds))
    return [d for d in found if d]


@functools.lru_cache(maxsize=1)
def _stdlib_documents_cached() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for path in _stdlib_files(root):
        for doc in _docstrings(path):
            if len(doc) >= DEFAULT_MIN_DOC_CHARS and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    random.Random(0).shuffle(docs)
    return tuple(docs)


def stdlib_documents() -> list[str]:
    """The docstrings (200+ characters, deduplicated) of this Python's standard library.

    Files are walked in sorted order, parsed with :mod:`ast` (never imported), and the documents
    shuffled with ``random.Random(0)`` so the validation split is not a single module.
    """
    return list(_stdlib_documents_cached())


def _corpus_digest(vocab_size: int) -> str:
    """A cheap key for the default corpus: the recipe, this Python's version and the names and
    sizes of its standard-library files (so a cache hit needs no docstring extraction)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256(f"{_DEFAULT_RECIPE}\n{DEFAULT_VAL_DOCS}\n{vocab_size}\n{sys.version}\n".encode())
    for path in _stdlib_files(root):
        try:
            size = path.stat().st_size
        except OSError:
            continue
        h.update(f"{path.relative_to(root).as_posix()}\t{size}\n".encode())
    return h.hexdigest()[:12]


def _valid_cached(path: Path) -> DatasetInfo | None:
    """The dataset at ``path`` if it is complete and every shard checks out, else None."""
    if not path.is_dir():
        return None
    try:
        info = read_dataset_info(path)
        load_tokenizer(info.tokenizer)
        val, train = check_shards(info.val_shards()), check_shards(info.train_shards())
    except DataError:
        return None
    return info if (val, train) == (info.val_tokens, info.train_tokens) else None


def _discard(path: Path) -> None:
    """Move ``path`` aside (atomically) and delete it."""
    if path.exists():
        aside = path.parent / f".{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(path, aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)


def _cache_error(cache_dir: Path, e: OSError) -> str:
    return (
        f"data.cache_dir {cache_dir}: cannot build the default corpus there ({os_error_text(e)}); "
        "nothing was kept (the partly built folder was removed); set data.cache_dir to a writable folder "
        "with a few MB free"
    )


def default_dataset(cache_dir: Path, vocab_size: int = 1024) -> DatasetInfo:
    """The default dataset (stdlib docstrings, a trained ``vocab_size`` tokenizer), built once.

    It lives in ``cache_dir / f"default-py{major}.{minor}-v{vocab_size}-{digest}"``, where the digest
    covers the Python version and its standard-library files, so another Python gets its own. The first :data:`DEFAULT_VAL_DOCS`
    documents are the validation split. Two processes may build at once: each builds in its own
    temporary folder and the first to rename it into place wins.
    """
    major, minor = sys.version_info[:2]
    target = Path(cache_dir) / f"default-py{major}.{minor}-v{vocab_size}-{_corpus_digest(vocab_size)}"
    if target.exists():
        cached = _valid_cached(target)
        if cached is not None:
            return cached
        _discard(target)  # only a corrupted one: complete datasets are renamed into place whole
    docs = stdlib_documents()
    try:
        work = _temp_sibling(target, "building")
    except OSError as e:
        raise DataError(_cache_error(cache_dir, e)) from None
    try:
        _write_dataset(
            work,
            lambda: iter(docs),
            [f"python{major}.{minor} stdlib docstrings"],
            tokenizer=None,
            vocab_size=vocab_size,
            val_docs=DEFAULT_VAL_DOCS,
            shard_tokens=100_000_000,
            settings={"corpus": _DEFAULT_RECIPE, "min_doc_chars": DEFAULT_MIN_DOC_CHARS},
            names={**OPTION_NAMES, "vocab_size": "model.vocab_size (the embedded default corpus)"},
        )
        os.rename(work, target)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        if (won := _valid_cached(target)) is not None:
            return won  # another process finished first
        raise DataError(_cache_error(cache_dir, e)) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return read_dataset_info(target)
