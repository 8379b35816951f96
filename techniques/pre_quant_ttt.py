"""Pre-quantization test-time training on the validation tokens (invalid): fine-tune on the text to be scored, before export.

What: after training and before calibration and export (the ``finalize`` event), the model is
fine-tuned for ``epochs`` passes over the validation split — rows of ``train_seq_len`` tokens,
``batch_rows`` per step, AdamW (``lr``, β = (0.9, 0.95), no weight decay), through the model's own
forward — and the result is quantized and scored. It finds the validation shards the way the
published scripts did: next to the training shards (``fineweb_val_*.bin`` in the folder of the
files handed to the ``train_loader`` slot, which it fills with the baseline's loader).

Why it is kept: tagged ``illegal`` so the data probe can be shown to catch it: the probe records
every shard file the process opens between the size estimate and the artifact on disk and names the
validation shard, the phase (finalize) and the training step. Training on tokens before they are
scored breaks condition 3 of Issue #1017 (score before update) however the tokens are reached.

Source: parameter-golf PRs #1376 (closed 2026-04-10), #1416, #1423, #1485–#1489, #1517, #1852 —
multi-epoch AdamW on the validation tokens before quantization; Issue #677. Same verdict for
AWQ-style calibration on validation activations (PR #1919 thread). techniques.md §3.M, §6.

Sites: ``train_loader`` (the baseline's sequential loader, to learn where the data lives) and the
``finalize`` event.

Interactions: conflicts with any other ``train_loader`` filler; with EMA / SWA the fine-tuning sees
whichever weights ``finalize`` events before it in stack order left.

Evidence: the records reported large gains that were the model memorising the validation text;
on the tiny CPU model the data probe fails (``bench/legality_probes.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pgolf.registry import Params, Technique, TrainState, hook, register
from pgolf.registry.run.data import VAL_PATTERN, DistributedTokenLoader


class PreQuantTTTParams(Params):
    epochs: int = Field(2, ge=0, le=100, description="passes over the validation tokens")
    lr: float = Field(3e-4, ge=0, description="AdamW learning rate")
    batch_rows: int = Field(8, ge=1, description="rows of train_seq_len tokens per step")


@register("pre_quant_ttt")
class PreQuantTTT(Technique):
    """Pre-quantization test-time training on the validation tokens (invalid): fine-tune on the text to be scored, before export."""

    Params = PreQuantTTTParams
    params: PreQuantTTTParams
    legality = ("illegal",)

    def __init__(self, params: PreQuantTTTParams, spec: Any):
        super().__init__(params, spec)
        self.folder: Path | None = None

    @hook
    def train_loader(self, files: list[Path], rank: int, world_size: int) -> DistributedTokenLoader:
        self.folder = Path(files[0]).parent if files else None
        return DistributedTokenLoader(files, rank, world_size, vocab_size=self.spec.vocab_size)

    @hook
    def finalize(self, model: nn.Module, state: TrainState) -> None:
        if self.folder is None or self.params.epochs == 0:
            return
        shards = sorted(self.folder.glob(VAL_PATTERN))
        if not shards:
            return
        tokens = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in shards]).astype(np.int64)
        seq = self.spec.train_seq_len
        rows = (len(tokens) - 1) // seq
        if rows < 1:
            return
        x = torch.from_numpy(tokens[: rows * seq]).view(rows, seq)
        y = torch.from_numpy(tokens[1 : rows * seq + 1]).view(rows, seq)
        device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.params.lr, betas=(0.9, 0.95), weight_decay=0.0)
        was = model.training
        model.train()
        with torch.enable_grad():
            for _ in range(self.params.epochs):
                for r in range(0, rows, self.params.batch_rows):
                    opt.zero_grad(set_to_none=True)
                    loss = model(
                        x[r : r + self.params.batch_rows].to(device),
                        y[r : r + self.params.batch_rows].to(device),
                    )
                    loss.backward()
                    opt.step()
        opt.zero_grad(set_to_none=True)
        model.train(was)
        self.log(f"fine-tuned on {rows * seq:,} validation tokens for {self.params.epochs} epoch(s)")
