"""Document packing: training rows are packed with whole documents, best fit first, so that a
row starts at a document and documents are split only when nothing else fits.

What: documents are read in shard order (a document is a BOS and the tokens up to the next BOS; a
shard boundary also ends one) into a buffer of up to ``buffer_docs`` pieces. A row of L + 1
tokens (inputs row[:L], targets row[1:]) is filled repeatedly with the longest buffered piece that
fits the space left; when none fits, the oldest piece is split: its beginning fills the row and
its rest goes back to the buffer as a piece of its own (no token is dropped; a document longer
than a row is spread over several rows). A step packs the next W × R rows (W ranks, R = local
tokens / L each) and rank r keeps rows r·R … (r+1)·R − 1, so the global batch does not depend on
the number of GPUs. The order is deterministic (shards front to back, as the baseline).

Why: the baseline's stream cuts rows at arbitrary points, so most rows start inside a document
whose beginning is in another row (or another GPU's batch), and with ``varlen_attention`` the
first tokens of every row see almost no context. Packing whole documents keeps each document's
beginning with its body; best fit keeps the splits rare.

Source: the ``DocumentPackingLoader`` of ``R/2026-04-10_VarLenAttn`` … ``R/2026-04-29`` (it
emitted the BOS-derived ``cu_seqlens`` for varlen attention); best-fit packing of whole documents
into rows as in nanochat's BOS-aligned loader.

Sites: the ``train_loader`` slot (training shards only).

Interactions: made for ``varlen_attention`` (which derives the document mask from the BOS tokens
of each row, so no ``cu_seqlens`` need to be passed) and SmearGate's BOS fix. With
``progressive_context`` rows are packed at the current length. Token ids are range-checked when a
shard is first read.

Evidence: part of the 04-10 VarLen bundle (≈0.001 nats with the attention change). Measured with
pgolf on CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded
corpus, seeds 1337 / 1338; ``python bench/technique_effects.py --only document_packing``): Δval_bpb
−0.0052 (−0.0013, −0.0091).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from pgolf.registry import DataError, Params, Technique, hook, register
from pgolf.registry.run.data import BOS_ID, check_ids, load_shard

Piece = tuple[int, int, int]  # (shard, start, end) in that shard's tokens


class DocumentPackingParams(Params):
    buffer_docs: int = Field(64, ge=1, le=1 << 16, description="documents held to choose the best fit from")


def pack_row(buffer: list[Piece], space: int) -> list[Piece]:
    """Fill ``space`` tokens from ``buffer`` (changed in place): the longest piece that fits, again
    and again; when none fits, the oldest is split and its rest stays first in the buffer."""
    row: list[Piece] = []
    while space > 0 and buffer:
        fits = [i for i, (_, s, e) in enumerate(buffer) if e - s <= space]
        if fits:
            i = max(fits, key=lambda j: (buffer[j][2] - buffer[j][1], -j))  # longest; oldest on ties
            piece = buffer.pop(i)
        else:
            shard, s, e = buffer[0]
            piece, buffer[0] = (shard, s, s + space), (shard, s + space, e)
        row.append(piece)
        space -= piece[2] - piece[1]
    return row


class DocumentPackingLoader:
    """Rows of whole documents, best fit first (see the module docstring)."""

    seq_len_agnostic = False  # rows are packed at the length they are asked for

    def __init__(self, paths: Sequence[Path], rank: int, world_size: int, vocab_size: int | None,
                 buffer_docs: int = 64):  # fmt: skip
        if not paths:
            raise DataError("no training shards to read")
        self.paths = [Path(p) for p in paths]
        self.rank, self.world_size, self.vocab_size, self.buffer_docs = (
            rank,
            world_size,
            vocab_size,
            buffer_docs,
        )
        self._tokens: dict[int, np.ndarray] = {}
        self._starts: dict[int, np.ndarray] = {}
        self.reset()

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._tokens:
            if self.vocab_size is not None:
                check_ids(self.paths[i], self.vocab_size)
            tokens = load_shard(self.paths[i])
            starts = np.flatnonzero(np.asarray(tokens) == BOS_ID)
            if len(tokens) and (len(starts) == 0 or starts[0] != 0):
                starts = np.concatenate([[0], starts])  # the shard starts inside a document
            self._tokens[i], self._starts[i] = tokens, starts
        return self._tokens[i]

    def _next_document(self) -> Piece:
        empty = 0
        while True:
            tokens = self._shard(self.shard)
            starts = self._starts[self.shard]
            if self.doc < len(starts):
                s = int(starts[self.doc])
                e = int(starts[self.doc + 1]) if self.doc + 1 < len(starts) else len(tokens)
                self.doc += 1
                return self.shard, s, e
            self.shard, self.doc = (self.shard + 1) % len(self.paths), 0
            empty += 1
            if empty > len(self.paths):
                raise DataError(f"all {len(self.paths)} training shards are empty; nothing to pack")

    def _row(self, length: int) -> list[Piece]:
        while len(self.buffer) < self.buffer_docs:
            self.buffer.append(self._next_document())
        pieces = pack_row(self.buffer, length)
        while sum(e - s for _, s, e in pieces) < length:  # a buffer of 1 emptied: keep filling
            self.buffer.append(self._next_document())
            pieces += pack_row(self.buffer, length - sum(e - s for _, s, e in pieces))
        return pieces

    def row_tokens(self, pieces: list[Piece]) -> np.ndarray:
        return np.concatenate([np.asarray(self._shard(i)[s:e], dtype=np.int64) for i, s, e in pieces])

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 (local_tokens // seq_len, seq_len): this rank's rows of the next W·R."""
        if seq_len < 1 or local_tokens < seq_len or local_tokens % seq_len:
            raise ValueError(
                f"local_tokens ({local_tokens}) must be a positive multiple of seq_len ({seq_len})"
            )
        rows = local_tokens // seq_len
        packed = [self._row(seq_len + 1) for _ in range(rows * self.world_size)]  # every rank packs all rows
        mine = packed[self.rank * rows : (self.rank + 1) * rows]
        batch = torch.from_numpy(np.stack([self.row_tokens(p) for p in mine]))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def reset(self) -> None:
        self.shard, self.doc = 0, 0
        self.buffer: list[Piece] = []

    def state_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "doc": self.doc, "buffer": [list(p) for p in self.buffer],
                "num_shards": len(self.paths)}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("num_shards", len(self.paths))) != len(self.paths):
            raise DataError(f"cannot restore document-packing state over {len(self.paths)} shards")
        self.shard, self.doc = int(state["shard"]), int(state["doc"])
        self.buffer = [(int(a), int(b), int(c)) for a, b, c in state["buffer"]]


@register("document_packing")
class DocumentPacking(Technique):
    """Document packing: training rows are packed with whole documents, best fit first, so that a
    row starts at a document and documents are split only when nothing else fits."""

    Params = DocumentPackingParams
    params: DocumentPackingParams

    @hook
    def train_loader(self, files: list[Path], rank: int, world_size: int) -> DocumentPackingLoader:
        return DocumentPackingLoader(files, rank, world_size, self.spec.vocab_size, self.params.buffer_docs)
