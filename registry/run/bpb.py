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


def _check_space_piece(sp: spm.SentencePieceProcessor) -> None:
    pid = sp.piece_to_id(SPACE_PIECE)
    if pid == sp.unk_id() or sp.id_to_piece(pid) != SPACE_PIECE:
        raise DataError(
            f"tokenizer has no standalone {SPACE_PIECE!r} piece: a space before a digit or a rare "
            "character would become <unk> and count 0 bytes, so val_bpb would be mis-counted "
            "(challenge issue #897); retrain it so that the space piece is in the vocabulary"
        )


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
    boundaries, as in the challenge's code.
    """
    _check_space_piece(sp)
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
