"""Tiny CPU training runs shared by the technique tests: a token shard, a stack, a trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.registry.api.config import ResolvedStack, stack_from_dict
from pgolf.registry.run.bpb import ByteLUT
from pgolf.registry.run.data import DistributedTokenLoader, write_shard
from pgolf.registry.run.pipeline import Built, build
from pgolf.registry.run.runtime import Runtime, seed_everything
from pgolf.registry.run.train import Trainer

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
VOCAB = 64
MODEL = {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": VOCAB}
TRAIN = {"train_seq_len": 16, "train_batch_tokens": 32, "micro_batch_tokens": 32, "iterations": 4,
         "max_wallclock_seconds": 0, "warmup_steps": 0, "warmdown_iters": 0}  # fmt: skip


def one_byte_lut(vocab: int = VOCAB) -> ByteLUT:
    """Byte accounting where every token is one byte (no leading spaces, no boundaries)."""
    return ByteLUT(torch.ones(vocab, dtype=torch.int16), torch.zeros(vocab, dtype=torch.bool),
                   torch.zeros(vocab, dtype=torch.bool), vocab)  # fmt: skip


def token_shard(folder: Path, n: int = 4096, seed: int = 0) -> Path:
    """A training shard of ``n`` random tokens below VOCAB."""
    path = folder / "fineweb_train_000000.bin"
    write_shard(path, np.random.default_rng(seed).integers(0, VOCAB, n))
    return path


def tiny_stack(techniques: dict[str, Any], **sections: dict[str, Any]) -> ResolvedStack:
    """A 2-layer width-32 stack with ``techniques``; keyword sections update model/train/export/optim."""
    raw: dict[str, Any] = {"model": dict(MODEL), "train": dict(TRAIN), "techniques": techniques}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return stack_from_dict(raw)


def tiny_trainer(rs: ResolvedStack, shard: Path, seed: int = 0) -> tuple[Built, Trainer]:
    """A fresh build of ``rs`` on CPU and its trainer over ``shard``."""
    seed_everything(seed)
    b = build(rs, CPU.device)
    return b, Trainer(b.model, b.sites, rs.stack, CPU, DistributedTokenLoader([shard], 0, 1))


def technique(built: Built, name: str) -> Any:
    """The instance of technique ``name`` in a build."""
    return next(t for t in built.techniques if t.name == name)
