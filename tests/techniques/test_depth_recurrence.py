"""Depth recurrence: virtual orders against the records' table, the order a built model runs, the
switch flipping at its training fraction, and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_build
from pydantic import ValidationError

from pgolf.registry import PgolfError
from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.data import DistributedTokenLoader, write_shard
from pgolf.registry.run.pipeline import build, eval_switches
from pgolf.registry.run.runtime import Runtime, seed_everything
from pgolf.registry.run.train import Trainer
from pgolf.techniques.depth_recurrence import DepthRecurrenceParams, split_halves, virtual_layers

RECORD_ENC, RECORD_DEC = (0, 1, 2, 3, 4, 5, 3, 4), (5, 3, 4, 5, 6, 7, 8, 9, 10)


def test_virtual_orders_of_the_records() -> None:
    v = virtual_layers(11, 3, 5, 2)  # R/2026-04-09 … 04-29: 17 virtual layers
    assert v == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert split_halves(v) == (RECORD_ENC, RECORD_DEC)
    assert split_halves(virtual_layers(11, 4, 5, 2)) == ((0, 1, 2, 3, 4, 5, 4), (5, 4, 5, 6, 7, 8, 9, 10))


def run_order(model: torch.nn.Module, switches: tuple[str, ...]) -> list[tuple[int, int]]:
    """(ctx.layer, ctx.virtual) of every block call; each call must be the block of ctx.layer."""
    seen: list[tuple[int, int, int]] = []
    handles = [
        block.register_forward_pre_hook(
            lambda m, args: seen.append((m.layer, args[1].layer, args[1].virtual))
        )
        for block in model.blocks
    ]
    with torch.no_grad():
        model.logits(torch.randint(0, 64, (1, 8)), switches)
    for h in handles:
        h.remove()
    assert all(block == layer for block, layer, _ in seen)
    return [(layer, virtual) for _, layer, virtual in seen]


@pytest.mark.parametrize("form", ["loop", "explicit"])
def test_model_runs_the_looped_order_when_the_switch_is_on(form: str) -> None:
    params: dict[str, Any] = (
        {} if form == "loop" else {"encoder": list(RECORD_ENC), "decoder": list(RECORD_DEC)}
    )
    b = tiny_build({"depth_recurrence": params, "gated_skips": {}}, num_layers=11)
    model = b.model
    assert model.schedule.num_skips() == 8 and model.skip_merge.gates.shape == (8, 32)
    on = run_order(model, ("depth_recurrence",))
    assert [p for p, _ in on] == [*RECORD_ENC, *RECORD_DEC]
    assert [v for _, v in on] == list(range(17))
    off = run_order(model, ())
    assert [p for p, _ in off] == list(range(11)) and [v for _, v in off] == list(range(11))
    assert eval_switches(b.sites) == ("depth_recurrence",)  # stays on when the model is scored


def _trainer(tmp_path: Path, start_fraction: float) -> tuple[Any, Trainer]:
    shard = tmp_path / "fineweb_train_000000.bin"
    write_shard(shard, np.random.default_rng(0).integers(0, 64, 2048))
    train = {"train_seq_len": 16, "train_batch_tokens": 32, "micro_batch_tokens": 32, "iterations": 5,
             "max_wallclock_seconds": 0, "warmup_steps": 0, "warmdown_iters": 0}  # fmt: skip
    rs = stack_from_dict(
        {
            "model": {"num_layers": 3, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 64},
            "train": train,
            "techniques": {
                "depth_recurrence": {
                    "loop_start": 1,
                    "loop_end": 1,
                    "num_loops": 1,
                    "start_fraction": start_fraction,
                }
            },
        }
    )
    seed_everything(0)
    b = build(rs, torch.device("cpu"))
    cpu = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
    trainer = Trainer(b.model, b.sites, rs.stack, cpu, DistributedTokenLoader([shard], 0, 1))
    return b, trainer


def test_switch_flips_at_the_training_fraction(tmp_path: Path) -> None:
    b, trainer = _trainer(tmp_path, 0.35)
    per_forward: list[tuple[str, ...]] = []
    b.model.register_forward_pre_hook(lambda m, a, kw: per_forward.append(kw["switches"]), with_kwargs=True)
    blocks: list[int] = []
    b.model.blocks[1].register_forward_pre_hook(lambda m, a: blocks.append(len(per_forward)))
    lines: list[str] = []
    result = trainer.run(log=lines.append)
    on = ("depth_recurrence",)
    assert per_forward == [()] * 2 + [on] * 3  # fraction 2/5 = 0.4 ≥ 0.35 after step 2
    assert result.switches == on
    assert any("step 2: switch(es) depth_recurrence on (fraction 0.400)" in line for line in lines)
    assert blocks == [1, 2, 3, 3, 4, 4, 5, 5]  # block 1 runs twice per forward once looped


def test_a_switch_due_at_the_start_is_on_from_the_first_step(tmp_path: Path) -> None:
    b, trainer = _trainer(tmp_path, 0.0)
    per_forward: list[tuple[str, ...]] = []
    b.model.register_forward_pre_hook(lambda m, a, kw: per_forward.append(kw["switches"]), with_kwargs=True)
    lines: list[str] = []
    trainer.run(log=lines.append)
    assert per_forward == [("depth_recurrence",)] * 5
    assert any("step 0: switch(es) depth_recurrence on" in line for line in lines)


def test_orders_that_do_not_fit_the_model_are_errors() -> None:
    with pytest.raises(PgolfError, match=r"loop_end=5 is outside model.num_layers=4: physical layers 0 … 3"):
        tiny_build({"depth_recurrence": {}}, num_layers=4)
    with pytest.raises(PgolfError, match=r"depth_recurrence.decoder uses layer\(s\) \[4\] outside"):
        tiny_build({"depth_recurrence": {"encoder": [0, 1], "decoder": [2, 4]}}, num_layers=4)
    with pytest.raises(PgolfError, match=r"layer\(s\) \[3\] never run in the looped order"):
        tiny_build({"depth_recurrence": {"encoder": [0, 1], "decoder": [1, 2]}}, num_layers=4)


def test_params_take_one_form() -> None:
    with pytest.raises(ValidationError, match="give both encoder and decoder"):
        DepthRecurrenceParams(encoder=(0, 1))
    with pytest.raises(ValidationError, match="encoder/decoder or loop_end, not both"):
        DepthRecurrenceParams(encoder=(0, 1), decoder=(1,), loop_end=1)
    with pytest.raises(ValidationError, match="loop_start=4 is after loop_end=3"):
        DepthRecurrenceParams(loop_start=4, loop_end=3)
