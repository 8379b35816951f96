"""Data that cannot be scored right is refused before training: the recorded tokenizer, token
ranges, an empty or foreign validation split, and byte tables that do not count the text."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm
import yaml
from conftest import SP1024, tiny_stack

from pgolf.registry.api.errors import DataError
from pgolf.registry.run import bpb, data
from pgolf.registry.run.dataset import check_dataset, file_sha256
from pgolf.registry.tools.cli import main

SP4096 = SP1024.parent / "fineweb_4096_bpe.model"


def copy_dataset(src: Path, dst: Path, manifest: bool = True) -> Path:
    shutil.copytree(src, dst)
    if not manifest:
        (dst / "dataset.json").unlink()
    return dst


def shards(folder: Path) -> tuple[list[Path], list[Path]]:
    return data.find_shards(folder, "train"), data.find_shards(folder, "val")


def stack_file(tmp_path: Path, folder: Path, tokenizer: Path, vocab: int = 1024, **more: Any) -> Path:
    s = tiny_stack(data={"path": str(folder), "tokenizer": str(tokenizer)}, **more)
    s["model"]["vocab_size"] = vocab
    s["train"].update(iterations=1, threads=1)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(s))
    return f


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    for e in expected:
        assert e in err, (e, err)
    return err


# -- kind 1: the tokenizer the shards were made with ----------------------------------------------


def test_the_dataset_records_its_tokenizer(text_dataset: tuple[Path, list[str]]) -> None:
    folder, _ = text_dataset
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["tokenizer_sha256"] == file_sha256(SP1024) == file_sha256(folder / "tokenizer.model")
    assert meta["vocab_size"] == 1024 and meta["splits"]["val"]["documents"] == 12


def test_shards_run_with_another_tokenizer_are_refused_naming_both(
    text_dataset: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sp1024 shards scored with sp4096 used to run to the end with 5,168 bytes instead of 4,163."""
    folder, _ = text_dataset
    f = stack_file(tmp_path, folder, SP4096, vocab=4096)
    out = tmp_path / "out"
    for argv in (["run", str(f), "--out", str(out)], ["check", str(f), "--no-estimate"]):
        refused(argv, capsys, f"data.tokenizer {SP4096}", "is not the tokenizer", "tokenizer.model",
                str(folder / "dataset.json"))  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_tokenizer_named_by_size_is_found_where_the_challenge_puts_it(
    text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import prepare_data

    # the challenge's layout: data/datasets/fineweb10B_sp1024 beside data/tokenizers/fineweb_1024_bpe.model
    folder = copy_dataset(
        text_dataset[0], tmp_path / "data" / "datasets" / "fineweb10B_sp1024", manifest=False
    )
    (folder / "tokenizer.model").unlink()
    (tmp_path / "data" / "tokenizers").mkdir()
    shutil.copyfile(SP1024, tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model")
    rs = stack_from_dict({"data": {"path": str(folder), "tokenizer": "sp1024"}})
    assert rs.stack.model.vocab_size == 1024
    assert prepare_data(rs.stack).tokenizer == tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    # a `pgolf data build` folder holds its own tokenizer.model
    built = text_dataset[0]
    assert prepare_data(stack_from_dict({"data": {"path": str(built), "tokenizer": "sp1024"}}).stack).tokenizer == (
        built / "tokenizer.model")  # fmt: skip
    with pytest.raises(
        DataError, match=r"sp4096: no 4096-piece .* looked at .*tokenizer.model \(1024 pieces\)"
    ):
        prepare_data(stack_from_dict({"data": {"path": str(built), "tokenizer": "sp4096"}}).stack)


def test_a_tokenizer_whose_bos_is_not_1_is_refused(tmp_path: Path) -> None:
    sp_file = tmp_path / "bos2.model"
    text = [f"document number {i} with some words in it" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(sp_file.with_suffix("")),
                                   vocab_size=40, bos_id=2, eos_id=1, minloglevel=2)  # fmt: skip
    data.write_shard(tmp_path / "fineweb_train_000000.bin", [2, 5, 6] * 100)
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [2, 5, 6] * 100)
    with pytest.raises(
        DataError, match="its BOS id is 2, but the challenge format starts every document with id 1"
    ):
        check_dataset(tmp_path, *shards(tmp_path), sp_file, 40)


def test_foreign_shards_without_a_manifest_are_refused_by_their_statistics(
    text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder = copy_dataset(text_dataset[0], tmp_path / "d", manifest=False)
    train, val = shards(folder)
    with pytest.raises(
        DataError, match=r"were not made with data.tokenizer .*fineweb_4096_bpe.model.* reproduces"
    ):
        check_dataset(folder, train, val, SP4096, 4096)
    c = check_dataset(folder, train, val, SP1024, 1024)  # the right one passes, measured
    assert c.round_trip == 1.0 and c.sampled_documents == 12 and not c.manifest
    assert c.val_bytes == sum(len(d.encode()) for d in text_dataset[1])


def test_replaced_shards_do_not_match_the_manifest(
    text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder = copy_dataset(text_dataset[0], tmp_path / "d")
    val = data.find_shards(folder, "val")[0]
    data.write_shard(val, np.asarray(data.load_shard(val))[:-5])
    with pytest.raises(DataError, match=r"the val shards hold .* but .*dataset.json records"):
        check_dataset(folder, *shards(folder), SP1024, 1024)


def test_ids_the_tokenizer_never_emits_are_refused(
    text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder = copy_dataset(text_dataset[0], tmp_path / "d", manifest=False)
    val = data.find_shards(folder, "val")[0]
    tokens = np.asarray(data.load_shard(val)).copy()
    tokens[10] = bpb.load_tokenizer(SP1024).pad_id()  # a control piece no text encodes to
    data.write_shard(val, tokens)
    with pytest.raises(DataError, match=r"1 × id 0 \('<pad>', a control piece of .*never produces"):
        check_dataset(folder, *shards(folder), SP1024, 1024)


# -- kind 2: ranges and an empty validation split -------------------------------------------------


def test_an_id_past_the_vocabulary_is_refused_by_check_and_run(
    text_dataset: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_dataset(text_dataset[0], tmp_path / "d", manifest=False)
    train = data.find_shards(folder, "train")[0]
    tokens = np.asarray(data.load_shard(train)).copy()
    tokens[123] = 1024
    data.write_shard(train, tokens)
    f = stack_file(tmp_path, folder, SP1024)
    expected = (str(train), "token id 1024 at position 123", "vocabulary of 1024")
    refused(["check", str(f), "--no-estimate"], capsys, *expected)
    refused(["run", str(f), "--out", str(tmp_path / "out")], capsys, *expected)
    assert not (tmp_path / "out").exists()


def test_the_loader_and_the_validation_reader_check_ids_when_they_open_a_shard(tmp_path: Path) -> None:
    good, bad = tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"
    data.write_shard(good, np.arange(100) % 64)
    data.write_shard(bad, [1, 2, 70, 3])
    loader = data.DistributedTokenLoader([good, bad], 0, 1, vocab_size=64)
    loader.next_batch(64, 16)  # the first shard is fine
    with pytest.raises(
        DataError, match=r"fineweb_train_000001.bin: token id 70 at position 2 .* vocabulary of 64"
    ):
        loader.next_batch(64, 16)
    with pytest.raises(DataError, match="token id 70"):
        data.load_tokens([good, bad], vocab_size=64)
    assert data.check_shards([good], vocab_size=64) == 100


@pytest.mark.parametrize("val_tokens", [[], [1], [1, 1, 1, 1]], ids=["empty", "one token", "only BOS"])
def test_a_validation_split_with_nothing_to_score_is_refused(
    val_tokens: list[int],
    text_dataset: tuple[Path, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = copy_dataset(text_dataset[0], tmp_path / "d", manifest=False)
    data.write_shard(data.find_shards(folder, "val")[0], val_tokens)
    f = stack_file(tmp_path, folder, SP1024)
    refused(["run", str(f), "--out", str(tmp_path / "out")], capsys, "nothing to score" if len(val_tokens) < 2
            else "stand for 0 bytes of text")  # fmt: skip
    assert not (tmp_path / "out").exists()


# -- the byte tables' property --------------------------------------------------------------------


def _train(lines: list[str], **kw: Any) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   add_dummy_prefix=False, num_threads=1, minloglevel=2, hard_vocab_limit=False,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, **kw)  # fmt: skip
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


PHRASES = ["The cats sat on the mats and the dogs sat on the logs."] * 50 + [
    "In 2024 prices rose from 1 to 2."
] * 20


def test_pieces_spanning_a_space_are_refused_although_the_space_piece_exists() -> None:
    """The old name-only check accepted this tokenizer: it has a standalone '▁', but pieces such
    as '▁sat▁on▁the' count their inner spaces as 3 bytes each."""
    sp = _train(PHRASES, vocab_size=120, split_by_whitespace=False)
    assert sp.id_to_piece(sp.piece_to_id("▁")) == "▁" and sp.piece_to_id("▁sat▁on▁the") != sp.unk_id()
    with pytest.raises(DataError, match=r"count \d+ bytes for the probe text .* which has \d+ UTF-8 bytes"):
        bpb.build_byte_lut(sp)


def test_a_byte_fallback_space_is_refused() -> None:
    """Without a '▁' piece, byte fallback spells a space as the 3 bytes of U+2581 (issue #897)."""
    sp = _train(["abc12abd34bcd"] * 30, vocab_size=300, byte_fallback=True, split_digits=True)
    assert sp.piece_to_id("▁") == sp.unk_id()
    with pytest.raises(
        DataError, match=r"cannot reproduce the probe text: .* decodes back as .The▁3▁cats.*#897"
    ):
        bpb.build_byte_lut(sp)


def test_validation_documents_are_checked_as_well_as_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    sp = _train(PHRASES, vocab_size=120, split_by_whitespace=False)
    lut = bpb.byte_tables(sp, None)
    monkeypatch.setattr(bpb, "probe_text", lambda sp: "In")  # a probe this tokenizer gets right
    bpb.check_byte_accounting(sp, lut)
    with pytest.raises(DataError, match=r"for validation document 0 \('the dogs sat on the logs'\)"):
        bpb.check_byte_accounting(sp, lut, ["the dogs sat on the logs"])


@pytest.mark.parametrize("model", [SP1024, SP4096], ids=["sp1024", "sp4096"])
def test_the_challenge_tokenizers_pass_on_the_probe(model: Path) -> None:
    sp = bpb.load_tokenizer(model)
    text = bpb.probe_text(sp)
    assert " 3 " in text and " 42 " in text and "$1,250" in text  # digits after spaces kept
    bpb.check_byte_accounting(sp, bpb.build_byte_lut(sp))
