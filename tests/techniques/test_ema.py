"""EMA: the update rule, and that the averaged weights are what gets exported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.registry import TrainState
from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.data import DistributedTokenLoader, write_shard
from pgolf.registry.run.pipeline import build
from pgolf.registry.run.runtime import Runtime
from pgolf.registry.run.train import Trainer
from pgolf.techniques.ema import EMA, EMAParams, ema_update_


def test_update_matches_the_definition() -> None:
    torch.manual_seed(0)
    avg = [torch.randn(3, 4), torch.randn(5)]
    start = [a.clone() for a in avg]
    params = [torch.randn(3, 4), torch.randn(5)]
    ema_update_(avg, params, 0.9)
    for a, s, p in zip(avg, start, params):
        assert torch.allclose(a, 0.9 * s + 0.1 * p)


def test_finalize_swaps_in_the_average_which_training_tracked(tmp_path: Path) -> None:
    shard = tmp_path / "fineweb_train_000000.bin"
    write_shard(shard, np.random.default_rng(0).integers(0, 64, 4096))
    rs = stack_from_dict({
        "model": {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 64},
        "train": {"train_seq_len": 16, "train_batch_tokens": 32, "micro_batch_tokens": 32, "iterations": 5,
                  "max_wallclock_seconds": 0, "warmup_steps": 2, "warmdown_iters": 0},
        "techniques": {"ema": {"decay": 0.5}},
    })  # fmt: skip
    torch.manual_seed(0)
    b = build(rs, torch.device("cpu"))
    model = b.model
    ema = next(t for t in b.techniques if isinstance(t, EMA))
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
    trainer = Trainer(model, b.sites, rs.stack, runtime, DistributedTokenLoader([shard], 0, 1))
    history: list[dict[str, torch.Tensor]] = []
    original_step = trainer.step

    def step(state: TrainState) -> torch.Tensor:
        out = original_step(state)
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return out

    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.step = step  # type: ignore[method-assign]
    trainer.run()
    trainer.finalize()
    assert ema.updates == 5 and len(history) == 2 + 5  # warm-up steps are undone and not averaged
    for name, p in model.named_parameters():
        expected = initial[name]
        for snap in history[-5:]:
            expected = 0.5 * expected + 0.5 * snap[name]
        assert torch.allclose(p.detach(), expected, atol=1e-6), name
        assert not torch.allclose(p.detach(), history[-1][name]) or torch.equal(
            initial[name], history[-1][name]
        )


def test_state_round_trips() -> None:
    e = EMA(EMAParams(decay=0.9), None)  # type: ignore[arg-type]
    e.on_train_start(torch.nn.Linear(2, 2), TrainState())
    e.updates = 3
    f = EMA(EMAParams(decay=0.9), None)  # type: ignore[arg-type]
    f.load_state_dict(e.state_dict())
    assert f.updates == 3 and all(torch.equal(f.shadow[k], e.shadow[k]) for k in e.shadow)
