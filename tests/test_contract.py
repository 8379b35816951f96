"""Contract tests generated from the registry: every technique, built-in or installed plugin.

Each technique registers, validates and round-trips its default params, builds on two model
sizes with every parameter labelled (role and kind), keeps the model causal in every switch
state, trains two steps with a finite loss, round-trips its own state, survives an export in
which tensors are really quantized (the reloaded model scores like the trained one), scores the
validation stream through its stack's scorer and logprobs chain, and is deterministic under a
fixed seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pgolf.registry import REGISTRY, Dispatcher
from pgolf.registry.api.config import ResolvedStack, stack_from_dict
from pgolf.registry.api.roles import Role, param_infos
from pgolf.registry.run.bpb import ByteLUT
from pgolf.registry.run.data import DistributedTokenLoader, write_shard
from pgolf.registry.run.evaluate import evaluate
from pgolf.registry.run.export import export_model, load_artifact, load_into, write_artifact
from pgolf.registry.run.model import count_params
from pgolf.registry.run.pipeline import Built, build, eval_switches
from pgolf.registry.run.runtime import Runtime, seed_everything
from pgolf.registry.run.train import Trainer

NAMES = REGISTRY.names()
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
SIZES = {
    "2x32-gqa2": {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2},
    "4x48-gqa4": {"num_layers": 4, "model_dim": 48, "num_heads": 4, "num_kv_heads": 1},
}
TRAIN = {"train_seq_len": 16, "train_batch_tokens": 64, "micro_batch_tokens": 32, "iterations": 2,
         "max_wallclock_seconds": 0, "warmup_steps": 0, "warmdown_iters": 0}  # fmt: skip
EXPORT = {"passthrough_max_numel": 0}  # every non-control float tensor goes through a quantizer


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contract") / "fineweb_train_000000.bin"
    write_shard(path, np.random.default_rng(0).integers(0, 128, 4096))
    return path


def stack_with(name: str, size: str = "2x32-gqa2") -> ResolvedStack:
    cls = REGISTRY.get(name)
    techniques: dict[str, Any] = {req: {} for req in cls.requires}
    # record defaults sized for 11 layers × 512 may not fit the contract models: a technique can
    # name the params its contract runs use (``contract_params``); its defaults are validated below
    techniques[name] = dict(cls.contract_params)
    return stack_from_dict(
        {
            "model": {**SIZES[size], "vocab_size": 128},
            "train": TRAIN,
            "export": EXPORT,
            "techniques": techniques,
        }
    )


def setup(rs: ResolvedStack, seed: int = 0) -> Built:
    seed_everything(seed)
    return build(rs, CPU.device)


def all_switches(sites: Dispatcher) -> tuple[str, ...]:
    return tuple(s.name for group in sites.chain("switches") for s in group)


def train_two_steps(rs: ResolvedStack, shard: Path, seed: int = 0) -> tuple[Built, Trainer, float]:
    b = setup(rs, seed)
    trainer = Trainer(b.model, b.sites, rs.stack, CPU, DistributedTokenLoader([shard], 0, 1))
    result = trainer.run()
    trainer.finalize()
    trainer.calibrate()
    return b, trainer, result.final_train_loss


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
    b = setup(rs)
    infos = param_infos(b.model)
    assert all(i.kind is not None for i in infos.values())
    for p in b.model.parameters():  # non-zero weights so every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(2, 128, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(2, 128, (2, 7))
    for switches in {(), all_switches(b.sites), eval_switches(b.sites)}:
        with torch.no_grad():
            a, c = b.model.logits(idx, switches), b.model.logits(changed, switches)
        assert torch.allclose(a[:, :9], c[:, :9], atol=1e-5), f"future tokens changed the past {switches}"
    assert count_params(b.model) > 0


@pytest.mark.parametrize("name", NAMES)
def test_trains_two_steps_and_round_trips_state_export_and_score(
    name: str, shard: Path, tmp_path: Path
) -> None:
    rs = stack_with(name)
    b, _, loss = train_two_steps(rs, shard)
    assert np.isfinite(loss)
    infos = param_infos(b.model)
    assert not any(p.requires_grad for n, p in b.model.named_parameters() if infos[n].role == Role.ADAPTER)
    for t in b.techniques:
        state = t.state_dict()
        fresh = type(t)(t.params, t.spec)
        fresh.load_state_dict(state)
        again = fresh.state_dict()
        assert state.keys() == again.keys()
        for k in state:
            v, w = state[k], again[k]
            if isinstance(v, dict):
                assert v.keys() == w.keys() and all(torch.equal(v[i], w[i]) for i in v)
            elif isinstance(v, torch.Tensor):
                assert torch.equal(v, w)
            else:
                assert v == w
    ex = export_model(b.model, b.sites, rs.stack.export)
    kinds = {e["q"] for e in ex.packed["tensors"].values()}
    assert kinds - {"float", "raw"}, "the contract export must quantize at least one tensor"
    path = tmp_path / "model.ptz"
    write_artifact(path, b.model, b.sites, rs.stack.export)  # verified on read-back
    reloaded = setup(rs, seed=123)
    load_into(reloaded.model, load_artifact(path, reloaded.sites, param_infos(reloaded.model)))
    x = torch.randint(0, 128, (2, 16))
    on = eval_switches(b.sites)
    with torch.no_grad():
        original = b.model(x, x, switches=on).item()
        restored = reloaded.model(x, x, switches=on).item()
    assert np.isfinite(restored) and abs(original - restored) < 0.05
    stream = torch.from_numpy(np.random.default_rng(1).integers(0, 128, 201).astype(np.int64))
    lut = ByteLUT(
        base_bytes=torch.ones(128, dtype=torch.int16),
        has_leading_space=torch.zeros(128, dtype=torch.bool),
        is_boundary=torch.zeros(128, dtype=torch.bool),
        vocab_size=128,
    )
    # a 64-token window: the default stride of the sliding scorers (64) fits in it
    res = evaluate(reloaded.model, stream, lut, seq_len=64, batch_tokens=128, runtime=CPU,
                   sites=reloaded.sites, switches=on)  # fmt: skip
    assert res.tokens == 200 and np.isfinite(res.val_bpb)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_fixed_seed(name: str, shard: Path) -> None:
    rs = stack_with(name)
    b1, _, l1 = train_two_steps(rs, shard, seed=7)
    b2, _, l2 = train_two_steps(rs, shard, seed=7)
    assert l1 == l2
    for (n, p), q in zip(b1.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(p, q), n
