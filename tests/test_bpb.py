"""The challenge's byte accounting, checked against hand-counted text."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
import torch

from pgolf.registry.api.errors import DataError
from pgolf.registry.run.bpb import ByteLUT, bits_per_byte, build_byte_lut, load_tokenizer, target_bytes

TOKENIZERS = Path(__file__).parent / "assets"  # copies of the challenge tokenizers
SP1024 = TOKENIZERS / "fineweb_1024_bpe.model"
SP4096 = TOKENIZERS / "fineweb_4096_bpe.model"
needs_real = pytest.mark.skipif(not SP1024.is_file(), reason="challenge tokenizers not present")

# ASCII, single spaces, no leading/trailing space: NFKC normalization leaves them unchanged.
SENTENCES = [
    "The cat sat on 42 mats.",
    "Hello, world!",
    "I paid $1,250 in 2023, which was 17% more than last year.",
    "Parameter Golf asks for the best language model that fits in 16MB.",
    'She said: "Don\'t split digits like 3.14159 or 1e-9 wrongly."',
    "Semicolons; (parentheses), question marks? and e-mail: name at example.com work.",
]


def _train(lines: list[str], **kwargs: Any) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        hard_vocab_limit=False,
        add_dummy_prefix=False,
        num_threads=1,
        minloglevel=2,
        **kwargs,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def sp1024() -> spm.SentencePieceProcessor:
    if not SP1024.is_file():
        pytest.skip("challenge tokenizers not present")
    return load_tokenizer(SP1024)


@pytest.fixture(scope="module")
def byte_fallback_sp() -> spm.SentencePieceProcessor:
    text = [
        "The quick brown fox jumps over the lazy dog.",
        "Pack my box with five dozen liquor jugs.",
        "How vexingly quick daft zebras jump!",
    ] * 20
    return _train(text, vocab_size=300, byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3)


def _doc_bytes(sp: spm.SentencePieceProcessor, text: str, lut: ByteLUT) -> torch.Tensor:
    """Bytes of each target of the stream [BOS] + encode(text)."""
    ids = torch.tensor([sp.bos_id(), *sp.encode(text)])
    return target_bytes(ids[:-1], ids[1:], lut)


@needs_real
@pytest.mark.parametrize("model", [SP1024, SP4096], ids=["sp1024", "sp4096"])
@pytest.mark.parametrize("text", SENTENCES)
def test_sentence_bytes_match_utf8_length(model: Path, text: str) -> None:
    sp = load_tokenizer(model)
    assert sp.decode(sp.encode(text)) == text  # normalization-invariant, no <unk>
    assert int(_doc_bytes(sp, text, build_byte_lut(sp)).sum()) == len(text.encode("utf-8"))


def test_hand_worked_example(sp1024: spm.SentencePieceProcessor) -> None:
    text = "The cat sat on 42 mats."
    ids = sp1024.encode(text)
    pieces = [sp1024.id_to_piece(i) for i in ids]
    assert pieces == ["The", "▁c", "at", "▁s", "at", "▁on", "▁", "4", "2", "▁m", "at", "s", "."]
    # "The"=3; "▁c"=1+1 ... the space piece "▁" alone is 0 base bytes + 1 for its space.
    expected = [3, 2, 2, 2, 2, 3, 1, 1, 1, 2, 2, 1, 1]
    lut = build_byte_lut(sp1024)
    assert _doc_bytes(sp1024, text, lut).tolist() == expected
    assert sum(expected) == len(text) == 23


def test_leading_space_not_counted_after_bos(sp1024: spm.SentencePieceProcessor) -> None:
    lut = build_byte_lut(sp1024)
    world, hello = sp1024.piece_to_id("▁world"), sp1024.piece_to_id("H")
    assert world != sp1024.unk_id() and bool(lut.has_leading_space[world]) and int(lut.base_bytes[world]) == 5
    bos, eos = sp1024.bos_id(), sp1024.eos_id()
    x = torch.tensor([[bos, hello, eos, sp1024.unk_id()]])
    y = torch.tensor([[world, world, world, world]])
    assert target_bytes(x, y, lut).tolist() == [[5, 6, 5, 5]]


def test_special_tokens_and_padding_ids(sp1024: spm.SentencePieceProcessor) -> None:
    lut = build_byte_lut(sp1024, vocab_size=1100)
    assert lut.vocab_size == 1100 and lut.base_bytes.shape == (1100,)
    for t in (0, 1, 2, 3, *range(1024, 1100)):  # pad, bos, eos, unk, beyond the tokenizer
        assert int(lut.base_bytes[t]) == 0 and bool(lut.is_boundary[t]) and not bool(lut.has_leading_space[t])
    assert not bool(lut.is_boundary[4:1024].any())
    assert build_byte_lut(sp1024).vocab_size == 1024


def test_unknown_characters_count_zero_bytes(sp1024: spm.SentencePieceProcessor) -> None:
    # The challenge's rule: <unk> is a 0-byte boundary, so "_" (not in the 1024 vocab) counts nothing,
    # and the "▁b" after it does not count its space.
    text = "a_ b"
    assert [sp1024.id_to_piece(i) for i in sp1024.encode(text)] == ["a", "<unk>", "▁b"]
    assert _doc_bytes(sp1024, text, build_byte_lut(sp1024)).tolist() == [1, 0, 1]


@needs_real
def test_real_tokenizers_have_space_piece() -> None:
    for model in (SP1024, SP4096):
        sp = load_tokenizer(model)
        space = sp.piece_to_id("▁")
        assert space != sp.unk_id()
        lut = build_byte_lut(sp)
        assert int(lut.base_bytes[space]) == 0 and bool(lut.has_leading_space[space])


def test_byte_fallback_token_counts_one_byte(byte_fallback_sp: spm.SentencePieceProcessor) -> None:
    sp = byte_fallback_sp
    lut = build_byte_lut(sp)
    text = "the fox paid € for ä"  # € (3 bytes) and ä (2 bytes) were never seen in training
    ids = sp.encode(text)
    byte_ids = [i for i in ids if sp.is_byte(i)]
    assert [sp.id_to_piece(i) for i in byte_ids] == ["<0xE2>", "<0x82>", "<0xAC>", "<0xC3>", "<0xA4>"]
    assert all(int(lut.base_bytes[i]) == 1 and not bool(lut.is_boundary[i]) for i in byte_ids)
    assert int(_doc_bytes(sp, text, lut).sum()) == len(text.encode("utf-8"))


def test_tokenizer_without_space_piece_is_refused() -> None:
    sp = _train(["abcabcabd", "bcdbcdabc"] * 10, vocab_size=20)
    with pytest.raises(DataError, match="#897"):
        build_byte_lut(sp)


def test_target_bytes_shape_dtype_and_device_copy(sp1024: spm.SentencePieceProcessor) -> None:
    lut = build_byte_lut(sp1024).to("cpu")
    x = torch.randint(0, 1024, (3, 5), dtype=torch.int32)
    y = torch.randint(0, 1024, (3, 5))
    out = target_bytes(x, y, lut)
    assert out.shape == (3, 5) and out.dtype in (torch.int32, torch.int64)
    assert lut.base_bytes.dtype in (torch.int16, torch.int32) and lut.is_boundary.dtype == torch.bool


def test_bits_per_byte() -> None:
    assert bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0)
    assert bits_per_byte(0.0, 3) == 0.0
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(DataError, match="not found") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model") as e:
        load_tokenizer(junk)
    assert str(junk) in str(e.value)
