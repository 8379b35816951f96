"""The challenge's exact bits-per-byte accounting.

``val_bpb`` divides the summed cross-entropy (converted to bits) by the number of UTF-8 bytes the
scored tokens stand for. The byte count of each token comes from lookup tables built from the
SentencePiece model, exactly as the challenge's ``train_gpt.py`` builds them:

- control (``<s>``, ``</s>``, ``<pad>``), unknown and unused ids: 0 bytes, and they are *boundaries*;
- byte-fallback pieces (``<0x0A>``): 1 byte;
- any other piece: the UTF-8 length of the piece without its leading ``▁``; the ``▁`` itself
  (a space) counts 1 byte only when the previous token is not a boundary — a document's first
  word does not count the space SentencePiece would otherwise give it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from ..api.errors import DataError

SPACE_PIECE = "\u2581"


@dataclass(frozen=True)
class ByteLUT:
    """Per-token-id byte accounting tables (all of length ``vocab_size``)."""

    base_bytes: torch.Tensor
    has_leading_space: torch.Tensor
    is_boundary: torch.Tensor
    vocab_size: int

    def to(self, device: torch.device | str) -> ByteLUT:
        """The same tables on ``device``."""
        return ByteLUT(
            base_bytes=self.base_bytes.to(device),
            has_leading_space=self.has_leading_space.to(device),
            is_boundary=self.is_boundary.to(device),
            vocab_size=self.vocab_size,
        )


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model, with a :class:`DataError` naming ``path`` if that fails."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model file not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"{path}: not a valid SentencePiece model ({e})") from None


def _piece_bytes(sp: spm.SentencePieceProcessor, t: int) -> tuple[int, bool]:
    """(base bytes, has leading space) of the normal or byte piece ``t``."""
    if sp.is_byte(t):
        return 1, False
    piece = sp.id_to_piece(t)
    lead = piece.startswith(SPACE_PIECE)
    if lead:
        piece = piece[1:]
    return len(piece.encode("utf-8")), lead


def build_byte_lut(sp: spm.SentencePieceProcessor, vocab_size: int | None = None) -> ByteLUT:
    """The byte tables for ``sp``, covering ids ``[0, max(vocab_size, sp.vocab_size()))``.

    Ids beyond the tokenizer's vocabulary (a model vocabulary padded past it) count 0 bytes and are
    boundaries, as in the challenge's code. Raises :class:`DataError` when the tables do not count
    the probe text's UTF-8 bytes exactly (:func:`check_byte_accounting`).
    """
    lut = byte_tables(sp, vocab_size)
    check_byte_accounting(sp, lut)
    return lut


def byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int | None = None) -> ByteLUT:
    """The byte tables of :func:`build_byte_lut` without its check, for a tokenizer already
    checked (:func:`pgolf.registry.run.dataset.check_dataset` checks the probe text and
    validation documents before any run)."""
    sp_size = int(sp.vocab_size())
    size = max(sp_size, vocab_size if vocab_size is not None else sp_size)
    base = torch.zeros(size, dtype=torch.int16)
    lead = torch.zeros(size, dtype=torch.bool)
    boundary = torch.ones(size, dtype=torch.bool)
    for t in range(sp_size):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        n, space = _piece_bytes(sp, t)
        base[t], lead[t], boundary[t] = n, space, False
    return ByteLUT(base_bytes=base, has_leading_space=lead, is_boundary=boundary, vocab_size=size)


# --------------------------------------------------------------------------------------------
# the property the tables must have
# --------------------------------------------------------------------------------------------

PROBE_TEXT = (
    "The 3 cats sat on 42 mats. In 2024, prices rose 17% (from $1,250 to $1,462); see page 7, "
    "e.g. 'single' and \"double\" quotes - a [bracket] {brace} <angle> #tag @user & co * 9 + 1 = 10 "
    "/ 2 | x ~ y ^ z! Why? Because: 1.5 > 0.5, and _under_score `code` \\ back."
)
"""English with digits and punctuation after spaces: the places where a tokenizer without a usable
standalone ``▁`` mis-counts a space (challenge issue #897)."""


def probe_text(sp: spm.SentencePieceProcessor) -> str:
    """:data:`PROBE_TEXT` restricted to the characters ``sp`` has pieces for (all of them with byte
    fallback) — spaces always kept — with runs of spaces collapsed."""
    if any(sp.is_byte(t) for t in range(sp.vocab_size())):
        return PROBE_TEXT
    chars = {" "}
    for t in range(sp.vocab_size()):
        if not (sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t)):
            piece = sp.id_to_piece(t)
            if len(piece) == 1:
                chars.add(piece)
    return " ".join("".join(c for c in PROBE_TEXT if c in chars).split())


def counted_bytes(ids: Sequence[int], lut: ByteLUT, bos: int) -> int:
    """Bytes the tables give the document ``[bos] + ids`` (its targets after ``bos``)."""
    seq = torch.tensor([bos, *ids], dtype=torch.long)
    return int(target_bytes(seq[:-1], seq[1:], lut).sum())


def check_byte_accounting(sp: spm.SentencePieceProcessor, lut: ByteLUT, texts: Sequence[str] = ()) -> None:
    """Check the property val_bpb rests on: for the probe text (:func:`probe_text`) and each of
    ``texts``, ``decode(encode(text)) == text`` and the tables count exactly its UTF-8 bytes.

    ``texts`` must be text ``sp`` reproduces (e.g. validation documents decoded from their ids);
    raises :class:`DataError` with the text, the two byte counts and the pieces involved.
    """
    bos = sp.bos_id() if sp.bos_id() >= 0 else 0
    for i, text in enumerate([probe_text(sp), *texts]):
        what = "the probe text" if i == 0 else f"validation document {i - 1}"
        ids = sp.encode(text)
        back = sp.decode(ids)
        if back != text:
            lost = [sp.id_to_piece(t) for t in ids if sp.is_unknown(t)]
            raise DataError(
                f"tokenizer cannot reproduce {what}: {_clip(text)!r} decodes back as {_clip(back)!r}"
                + (f" ({len(lost)} piece(s) became <unk>)" if lost else "")
                + _space_hint(sp)
            )
        counted, actual = counted_bytes(ids, lut, bos), len(text.encode("utf-8"))
        if counted != actual:
            raise DataError(
                f"the tokenizer's byte tables count {counted} bytes for {what} ({_clip(text)!r}), "
                f"which has {actual} UTF-8 bytes, so val_bpb would be mis-counted; pieces: "
                f"{_clip(' '.join(sp.id_to_piece(t) for t in ids), 160)}" + _space_hint(sp)
            )


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _space_hint(sp: spm.SentencePieceProcessor) -> str:
    pid = sp.piece_to_id(SPACE_PIECE)
    usable = (
        pid != sp.unk_id()
        and sp.id_to_piece(pid) == SPACE_PIECE
        and not (sp.is_control(pid) or sp.is_unused(pid) or sp.is_unknown(pid))
    )
    if usable:
        return ""
    return (
        f"; the tokenizer has no usable standalone {SPACE_PIECE!r} piece, so a space before a digit or "
        "a rare character is not counted as one byte (challenge issue #897): retrain it so that the "
        "space piece is in the vocabulary"
    )


def target_bytes(x: torch.Tensor, y: torch.Tensor, lut: ByteLUT) -> torch.Tensor:
    """UTF-8 bytes stood for by each target ``y`` given its predecessor ``x`` (same shape, int32)."""
    x, y = x.long(), y.long()
    n = lut.base_bytes[y].to(torch.int32)
    return n + (lut.has_leading_space[y] & ~lut.is_boundary[x]).to(torch.int32)


def bits_per_byte(loss_sum_nats: float, n_bytes: int) -> float:
    """Summed cross-entropy in nats over the scored tokens, as bits per byte of their text."""
    if n_bytes <= 0:
        raise ValueError(f"cannot compute bits per byte over {n_bytes} bytes")
    return float(loss_sum_nats) / (math.log(2.0) * n_bytes)
