"""Documents, tokenizer training, dataset building and the embedded default corpus."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pgolf.registry.api.errors import DataError
from pgolf.registry.run.bpb import build_byte_lut, load_tokenizer
from pgolf.registry.run.data import check_shards, find_shards, load_tokens, read_header
from pgolf.registry.tools import corpus
from pgolf.registry.tools.corpus import (
    DEFAULT_VAL_DOCS,
    DatasetInfo,
    build_dataset,
    default_dataset,
    iter_documents,
    read_dataset_info,
    stdlib_documents,
    train_tokenizer,
)

SP1024 = Path(__file__).parent / "assets" / "fineweb_1024_bpe.model"  # the challenge tokenizer

# ASCII, single-spaced, characters the challenge tokenizer knows: encode/decode round-trips exactly.
DOCS = [
    "The first document is about cats and dogs.",
    "A second one talks about the weather in spring.",
    "Number three has digits: 12345 and 678.",
    "Four is short.",
    "Five explains why small models can still learn a lot from text.",
    "Six: the quick brown fox jumps over the lazy dog.",
    "Seven is the last document in this tiny corpus, and it is a little longer than most.",
]

WORDS = re.findall(
    r"\w+",
    "the model learns to predict the next token from the previous ones and the loss measures how "
    "surprised it is by the text while bits per byte normalizes that loss by the length of the text "
    "in bytes so that tokenizers with different vocabularies can be compared fairly",
)


def _english(n_docs: int, words: int = 40) -> list[str]:
    """Deterministic English-like documents (a few KB in all)."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) + "." for i in range(n_docs)]


def _jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _split_docs(tokens: np.ndarray) -> list[list[int]]:
    """Documents of a token stream, each starting at a BOS (id 1)."""
    starts = [*np.flatnonzero(tokens == 1).tolist(), len(tokens)]
    assert starts[0] == 0
    return [tokens[a + 1 : b].tolist() for a, b in itertools.pairwise(starts)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The challenge's 1024 tokenizer, or (where it is absent) one trained like it."""
    if SP1024.is_file():
        return SP1024
    prefix = tmp_path_factory.mktemp("tok") / "sp"
    return train_tokenizer(_english(20) + DOCS * 50, 400, prefix)


# --------------------------------------------------------------------------- documents


def test_jsonl_documents(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": "two\\nlines", "x": 1}\n')
    assert list(iter_documents(path)) == ["one", "two\nlines"]
    other = _jsonl(tmp_path / "k.jsonl", ["a", "b"], key="body")
    assert list(iter_documents(other, text_key="body")) == ["a", "b"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "malformed JSON"),
        ('{"txt": "x"}', "'text' is missing"),
        ('{"text": 5}', "'text' is a int"),
        ('["text"]', "'text' is missing"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    docs = iter_documents(path)
    assert next(docs) == "ok"
    with pytest.raises(DataError, match=match) as e:
        next(docs)
    assert f"{path}:2" in str(e.value)


def test_txt_modes(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    text = "First para line one.\nline two.\n\n  \nSecond para.\n\n\nThird.\n"
    path.write_text(text)
    assert list(iter_documents(path)) == [text]
    assert list(iter_documents(path, txt_mode="file")) == [text]
    assert list(iter_documents(path, txt_mode="paragraph")) == [
        "First para line one.\nline two.",
        "Second para.",
        "Third.",
    ]
    assert list(iter_documents(path, txt_mode="line")) == [
        "First para line one.",
        "line two.",
        "Second para.",
        "Third.",
    ]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert list(iter_documents(blank)) == []


def test_document_file_errors(tmp_path: Path) -> None:
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.jsonl.*\.txt") as e:
        iter_documents(csv)
    assert str(csv) in str(e.value)
    with pytest.raises(DataError, match="paragraph"):
        iter_documents(_jsonl(tmp_path / "d.jsonl", ["x"]), txt_mode="paragraphs")
    with pytest.raises(DataError, match="not found"):
        iter_documents(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- tokenizer


def test_train_tokenizer_challenge_settings_and_deterministic(tmp_path: Path) -> None:
    docs = [*_english(40)] + ["in 2024 and 2024 again, 2024 was the year"] * 20
    a = train_tokenizer(docs, 300, tmp_path / "a")
    b = train_tokenizer(iter(docs), 300, tmp_path / "b")
    assert a == tmp_path / "a.model" and a.read_bytes() == b.read_bytes()
    sp = load_tokenizer(a)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() <= 300 and sp.piece_to_id("▁") != sp.unk_id()
    build_byte_lut(sp)
    assert [sp.id_to_piece(i) for i in sp.encode("the 2024")] == [
        "the",
        "▁",
        "2",
        "0",
        "2",
        "4",
    ]  # digits split
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]


def test_train_tokenizer_keeps_long_lines(tmp_path: Path) -> None:
    # "zyxwvut" occurs only on one 8 KB line: longer than SentencePiece's default max_sentence_length.
    docs = [*_english(20), " ".join(["zyxwvut"] * 1000)]
    sp = load_tokenizer(train_tokenizer(docs, 300, tmp_path / "t"))
    assert sp.unk_id() not in sp.encode("zyxwvut")


def test_train_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(["", "  \n"], 300, tmp_path / "t")
    with pytest.raises(DataError, match="vocab size"):
        train_tokenizer(["hello world"], 70000, tmp_path / "t")


# --------------------------------------------------------------------------- build_dataset


def test_build_with_given_tokenizer(tmp_path: Path, tokenizer: Path) -> None:
    inputs = [_jsonl(tmp_path / "a.jsonl", DOCS[:4]), tmp_path / "b.txt"]
    inputs[1].write_text("\n".join(DOCS[4:]) + "\n")
    out = tmp_path / "ds"
    info = build_dataset(inputs, out, tokenizer=tokenizer, val_docs=3, shard_tokens=25, txt_mode="line")
    sp = load_tokenizer(tokenizer)
    assert info == read_dataset_info(out)
    assert (info.path, info.tokenizer) == (out, out / "tokenizer.model")
    assert (info.val_docs, info.train_docs, info.vocab_size) == (3, 4, sp.vocab_size())
    assert info.tokenizer.read_bytes() == tokenizer.read_bytes()

    val, train = find_shards(out, "val"), find_shards(out, "train")
    assert all(read_header(p) <= 25 for p in val + train) and len(train) > 1
    assert [p.name for p in val] == [f"fineweb_val_{i:06d}.bin" for i in range(len(val))]
    val_tokens, train_tokens = load_tokens(val).numpy(), load_tokens(train).numpy()
    assert (len(val_tokens), len(train_tokens)) == (info.val_tokens, info.train_tokens)
    assert [sp.decode(d) for d in _split_docs(val_tokens)] == DOCS[:3]
    assert [sp.decode(d) for d in _split_docs(train_tokens)] == DOCS[3:]
    assert _split_docs(val_tokens)[0] == sp.encode(DOCS[0])

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["splits"]["val"] == {
        "documents": 3,
        "tokens": info.val_tokens,
        "shards": [p.name for p in val],
    }
    assert meta["splits"]["train"]["documents"] == 4
    assert meta["vocab_size"] == sp.vocab_size() and meta["tokenizer"] == "tokenizer.model"
    assert meta["tokenizer_trained"] is False and meta["sources"] == [str(p) for p in inputs]
    assert meta["settings"] == {"val_docs": 3, "shard_tokens": 25, "txt_mode": "line", "text_key": "text"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.txt", "ds"]  # no temp folder left


def test_build_training_tokenizer(tmp_path: Path) -> None:
    docs = _english(60)
    info = build_dataset([_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "ds", vocab_size=300, val_docs=5)
    assert (info.val_docs, info.train_docs) == (5, 55)
    sp = load_tokenizer(info.tokenizer)
    assert info.vocab_size == sp.vocab_size() <= 300
    build_byte_lut(sp)
    assert [sp.decode(d) for d in _split_docs(load_tokens(info.val_shards()).numpy())] == docs[:5]
    assert check_shards(info.train_shards()) == info.train_tokens
    meta = json.loads((info.path / "dataset.json").read_text())
    assert meta["tokenizer_trained"] is True and meta["requested_vocab_size"] == 300


def test_build_into_existing_empty_folder(tmp_path: Path, tokenizer: Path) -> None:
    (tmp_path / "ds").mkdir()
    info = build_dataset(
        [_jsonl(tmp_path / "d.jsonl", DOCS)], tmp_path / "ds", tokenizer=tokenizer, val_docs=1
    )
    assert info.train_docs == 6


def test_build_refuses_non_empty_out_dir(tmp_path: Path, tokenizer: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty") as e:
        build_dataset([_jsonl(tmp_path / "d.jsonl", DOCS)], out, tokenizer=tokenizer, val_docs=1)
    assert str(out) in str(e.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "ds"]


def test_build_argument_errors(tmp_path: Path, tokenizer: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(DataError, match="exactly one"):
        build_dataset([src], tmp_path / "a", val_docs=1)
    with pytest.raises(DataError, match="exactly one"):
        build_dataset([src], tmp_path / "a", tokenizer=tokenizer, vocab_size=300, val_docs=1)
    with pytest.raises(DataError, match="found 7 documents") as e:
        build_dataset([src], tmp_path / "a", tokenizer=tokenizer, val_docs=7)
    assert str(src) in str(e.value)
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        build_dataset([empty], tmp_path / "a", tokenizer=tokenizer, val_docs=1)
    with pytest.raises(DataError, match="not found"):
        build_dataset([src], tmp_path / "a", tokenizer=tmp_path / "none.model", val_docs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "e.txt"]


def test_failed_build_leaves_nothing(
    tmp_path: Path, tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise DataError("disk on fire")

    monkeypatch.setattr(corpus, "_write_splits", boom)
    with pytest.raises(DataError, match="disk on fire"):
        build_dataset([_jsonl(tmp_path / "d.jsonl", DOCS)], tmp_path / "ds", tokenizer=tokenizer, val_docs=1)
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


# --------------------------------------------------------------------------- default corpus


def test_stdlib_documents() -> None:
    docs = stdlib_documents()
    assert len(docs) > 1000
    assert all(len(d) >= 200 for d in docs) and len(set(docs)) == len(docs)
    assert stdlib_documents() == docs  # deterministic
    assert sum(len(d) for d in docs) > 500_000


def test_default_dataset_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = default_dataset(tmp_path, vocab_size=512)
    assert info.path.parent == tmp_path and info.path.name.startswith("default-py3.")
    assert "-v512-" in info.path.name
    assert info.val_docs == DEFAULT_VAL_DOCS and info.train_docs == len(stdlib_documents()) - DEFAULT_VAL_DOCS
    assert check_shards(info.val_shards()) == info.val_tokens > 5_000
    assert check_shards(info.train_shards()) == info.train_tokens > 20 * info.val_tokens
    assert info.vocab_size == 512 == load_tokenizer(info.tokenizer).vocab_size()
    assert [p.name for p in tmp_path.iterdir()] == [info.path.name]

    def no_rebuild(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached dataset should be reused")

    monkeypatch.setattr(corpus, "_write_dataset", no_rebuild)
    assert default_dataset(tmp_path, vocab_size=512) == info


def _copy_then(real: Callable[..., None], target: Path) -> Callable[..., None]:
    """A _write_dataset that also lets a 'concurrent process' finish ``target`` first."""

    def write(work: Path, *args: Any, **kwargs: Any) -> None:
        real(work, *args, **kwargs)
        shutil.copytree(work, target)

    return write


def test_default_dataset_concurrent_winner_and_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = default_dataset(tmp_path / "a", vocab_size=300)
    target = tmp_path / "b" / first.path.name
    monkeypatch.setattr(corpus, "_write_dataset", _copy_then(corpus._write_dataset, target))
    won = default_dataset(tmp_path / "b", vocab_size=300)
    assert won.path == target and [p.name for p in (tmp_path / "b").iterdir()] == [target.name]
    monkeypatch.undo()

    shard = won.train_shards()[0]  # corrupt the cache: it is rebuilt
    shard.write_bytes(shard.read_bytes()[:-2])
    repaired = default_dataset(tmp_path / "b", vocab_size=300)
    assert isinstance(repaired, DatasetInfo) and check_shards(repaired.train_shards()) == first.train_tokens
    assert [p.name for p in (tmp_path / "b").iterdir()] == [target.name]
    assert os.path.samefile(repaired.path, target)
