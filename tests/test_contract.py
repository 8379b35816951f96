"""Contract tests generated from the registry: every technique, built-in or installed plugin.

Each technique registers, validates and round-trips its default params, builds on two model
sizes with every parameter labelled, keeps the model causal, trains two steps with a finite loss,
round-trips its own state and the export, and is deterministic under a fixed seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pgolf.registry import REGISTRY
from pgolf.registry.api.config import ResolvedStack, stack_from_dict
from pgolf.registry.api.roles import role_table
from pgolf.registry.api.technique import Technique
from pgolf.registry.run.data import DistributedTokenLoader, write_shard
from pgolf.registry.run.export import load_artifact, load_into, write_artifact
from pgolf.registry.run.model import count_params
from pgolf.registry.run.pipeline import build
from pgolf.registry.run.runtime import Runtime, seed_everything
from pgolf.registry.run.train import Trainer

NAMES = REGISTRY.names()
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
SIZES = {
    "2x32-gqa2": {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2},
    "3x48-gqa4": {"num_layers": 3, "model_dim": 48, "num_heads": 4, "num_kv_heads": 1},
}
TRAIN = {"train_seq_len": 16, "train_batch_tokens": 64, "micro_batch_tokens": 32, "iterations": 2,
         "max_wallclock_seconds": 0, "warmup_steps": 0, "warmdown_iters": 0}  # fmt: skip


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contract") / "fineweb_train_000000.bin"
    write_shard(path, np.random.default_rng(0).integers(0, 128, 4096))
    return path


def stack_with(name: str, size: str = "2x32-gqa2") -> ResolvedStack:
    cls = REGISTRY.get(name)
    techniques: dict[str, Any] = {req: {} for req in cls.requires}
    techniques[name] = {}
    return stack_from_dict(
        {"model": {**SIZES[size], "vocab_size": 128}, "train": TRAIN, "techniques": techniques}
    )


def setup(rs: ResolvedStack, seed: int = 0) -> tuple[torch.nn.Module, list[Technique]]:
    seed_everything(seed)
    techs = [r.instantiate(rs.spec) for r in rs.techniques]
    return build(rs, techs, CPU.device), techs


def train_two_steps(
    rs: ResolvedStack, shard: Path, seed: int = 0
) -> tuple[torch.nn.Module, list[Technique], float]:
    model, techs = setup(rs, seed)
    trainer = Trainer(model, techs, rs.stack, CPU, DistributedTokenLoader([shard], 0, 1))
    result = trainer.run()
    return model, techs, result.final_train_loss


@pytest.mark.parametrize("name", NAMES)
def test_registers_with_a_summary_and_checked_hooks(name: str) -> None:
    cls = REGISTRY.get(name)
    assert cls.name == name and cls.summary(), (
        "a technique needs a docstring whose first paragraph summarises it"
    )
    assert cls.hooks, "a technique implements at least one hook"


@pytest.mark.parametrize("name", NAMES)
def test_default_params_validate_and_round_trip_through_yaml(name: str) -> None:
    cls = REGISTRY.get(name)
    params = cls.Params()
    dumped = yaml.safe_load(yaml.safe_dump(params.model_dump(mode="json")))
    assert cls.Params.model_validate(dumped) == params


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", NAMES)
def test_builds_with_every_parameter_labelled_and_stays_causal(name: str, size: str) -> None:
    rs = stack_with(name, size)
    model, _ = setup(rs)
    role_table(model)
    for p in model.parameters():  # non-zero weights so every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(2, 128, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(2, 128, (2, 7))
    with torch.no_grad():
        a, b = model.logits(idx), model.logits(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5), "future tokens changed past predictions"
    assert count_params(model) > 0


@pytest.mark.parametrize("name", NAMES)
def test_trains_two_steps_and_round_trips_state_and_export(name: str, shard: Path, tmp_path: Path) -> None:
    rs = stack_with(name)
    model, techs, loss = train_two_steps(rs, shard)
    assert np.isfinite(loss)
    for t in techs:
        state = t.state_dict()
        fresh = type(t)(t.params, t.spec)
        fresh.load_state_dict(state)
        again = fresh.state_dict()
        assert state.keys() == again.keys()
        for k in state:
            v, w = state[k], again[k]
            if isinstance(v, dict):
                assert v.keys() == w.keys() and all(torch.equal(v[i], w[i]) for i in v)
            else:
                assert v == w
    path = tmp_path / "model.ptz"
    write_artifact(path, model, techs)
    reloaded, _ = setup(rs, seed=123)
    load_into(reloaded, load_artifact(path, techs))
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        original, restored = model(x, x).item(), reloaded(x, x).item()
    assert np.isfinite(restored) and abs(original - restored) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_fixed_seed(name: str, shard: Path) -> None:
    rs = stack_with(name)
    m1, _, l1 = train_two_steps(rs, shard, seed=7)
    m2, _, l2 = train_two_steps(rs, shard, seed=7)
    assert l1 == l2
    for (n, p), q in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p, q), n
