"""Shuffled loader: training sequences are windows read in a seeded random order over all
training shards, each window once per pass, instead of the baseline's front-to-back stream.

What: for a sequence length L, pass e cuts every training shard i into windows of L + 1 tokens
starting at φ_{e,i} + k·L (k = 0, 1, …, while the window fits), with a random phase
φ_{e,i} ∈ [0, L); the windows of all shards are visited in a random permutation π_e. Window w gives
one sequence: inputs w[:L], targets w[1:]. A step takes the next W × R windows of the
permutation (W ranks, R = local tokens / L sequences each); rank r keeps windows r·R … (r+1)·R − 1,
so the global batch does not depend on the number of GPUs. When a pass is used up the next one
starts with new phases and a new permutation; a new sequence length (progressive context) starts
a fresh pass at that length. φ and π come from numpy's PCG64 seeded with (``seed`` of the stack,
pass, L): the order is reproducible and changes with ``seed``.

Why: the sequential stream feeds the model one shard region at a time (correlated batches, the
same order every run); a shuffled order decorrelates consecutive batches, sees every shard early
and makes ``seed`` vary the data as well as the initialisation, so seeds measure data noise too.
Random phases make the window boundaries differ between passes.

Source: ``ShuffledSequenceLoader`` of ``R/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2`` and
``R/2026-04-09`` (each rank owned shards r::W, random phase and permutation per shard, shards
drawn ∝ remaining windows, which is the same distribution as one permutation of all windows);
the coprime-stride loader of ``R/2026-03-29`` (PR #726) had the same aim.

Sites: the ``train_loader`` slot (it only ever sees the training shards).

Interactions: with ``progressive_context`` each length change starts a new pass. Every token id
is range-checked when a shard is first read. A window never crosses a shard boundary; documents
inside a window run across their BOS boundaries as in the baseline (``varlen_attention`` masks
them).

Evidence: no isolated number in the records. Measured with pgolf on CPU (the baseline shrunk to 4
layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337 / 1338; ``python
bench/technique_effects.py --only shuffled_loader``): Δval_bpb −0.0584 (−0.0698, −0.0471) (the tiny
run reads 246 K of the 409 K training tokens: front to back, the first 60 %; shuffled, windows from
all of it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.registry import DataError, Params, Technique, hook, register
from pgolf.registry.run.data import check_ids, load_shard


class ShuffledLoaderParams(Params):
    """No parameters: the order follows the stack's ``seed``."""


class ShuffledLoader:
    """Windows of L + 1 tokens from every shard, in a seeded random order (see the module docstring)."""

    seq_len_agnostic = False  # a batch depends on the sequence length it is read at

    def __init__(self, paths: Sequence[Path], rank: int, world_size: int, seed: int, vocab_size: int | None):
        if not paths:
            raise DataError("no training shards to read")
        self.paths = [Path(p) for p in paths]
        self.rank, self.world_size, self.seed, self.vocab_size = rank, world_size, seed, vocab_size
        self._tokens: dict[int, np.ndarray] = {}
        self.reset()

    # -- the permutation of one pass ---------------------------------------------------------
    def _shard(self, i: int) -> np.ndarray:
        if i not in self._tokens:
            if self.vocab_size is not None:
                check_ids(self.paths[i], self.vocab_size)
            self._tokens[i] = load_shard(self.paths[i])
        return self._tokens[i]

    def _start_pass(self, length: int) -> None:
        rng = np.random.Generator(np.random.PCG64([self.seed, self.passes, length]))
        sizes = np.array([len(self._shard(i)) for i in range(len(self.paths))], dtype=np.int64)
        self.phase = rng.integers(0, length, size=len(self.paths))
        counts = np.maximum((sizes - self.phase - 1) // length, 0)
        if counts.sum() == 0:
            raise DataError(
                f"no training shard holds a window of {length + 1} tokens: the shards are shorter than "
                "one training sequence"
            )
        self.cum = np.cumsum(counts)
        self.order = rng.permutation(int(self.cum[-1]))
        self.length, self.cursor = length, 0

    def window_tokens(self, index: int) -> np.ndarray:
        """The L + 1 tokens of window ``index`` of the current pass (int64)."""
        shard = int(np.searchsorted(self.cum, index, side="right"))
        k = index - (int(self.cum[shard - 1]) if shard else 0)
        start = int(self.phase[shard]) + k * self.length
        return np.asarray(self._shard(shard)[start : start + self.length + 1], dtype=np.int64)

    # -- the loader interface ----------------------------------------------------------------
    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 (local_tokens // seq_len, seq_len): this rank's windows of the next W·R."""
        if seq_len < 1 or local_tokens < seq_len or local_tokens % seq_len:
            raise ValueError(
                f"local_tokens ({local_tokens}) must be a positive multiple of seq_len ({seq_len})"
            )
        rows = local_tokens // seq_len
        if seq_len != self.length:
            self._start_pass(seq_len)
        picked: list[int] = []
        need = rows * self.world_size
        while len(picked) < need:
            if self.cursor == len(self.order):
                self.passes += 1
                self._start_pass(seq_len)
            take = min(need - len(picked), len(self.order) - self.cursor)
            picked.extend(self.order[self.cursor : self.cursor + take].tolist())
            self.cursor += take
        mine = picked[self.rank * rows : (self.rank + 1) * rows]
        batch = torch.from_numpy(np.stack([self.window_tokens(i) for i in mine]))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def reset(self) -> None:
        self.passes, self.length, self.cursor = 0, 0, 0
        self.order = np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "length": self.length,
            "cursor": self.cursor,
            "num_shards": len(self.paths),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("num_shards", len(self.paths))) != len(self.paths):
            raise DataError(
                f"cannot restore shuffled-loader state {dict(state)} over {len(self.paths)} shards"
            )
        self.reset()
        self.passes = int(state["passes"])
        if int(state["length"]):
            self._start_pass(int(state["length"]))
            self.cursor = int(state["cursor"])


@register("shuffled_loader")
class ShuffledLoaderTechnique(Technique):
    """Shuffled loader: training sequences are windows read in a seeded random order over all
    training shards, each window once per pass, instead of the baseline's front-to-back stream."""

    Params = ShuffledLoaderParams
    params: ShuffledLoaderParams

    @hook
    def train_loader(self, files: list[Path], rank: int, world_size: int, seed: int) -> ShuffledLoader:
        return ShuffledLoader(files, rank, world_size, seed, self.spec.vocab_size)
