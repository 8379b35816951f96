"""GPTQ against round-to-nearest on a tiny model trained on CPU: at int5 and int6, on the same
grid (SDClip scales), GPTQ's codes have a lower Hessian-weighted reconstruction error in every
calibrated matrix, and the reloaded artifact scores a lower or equal val_bpb."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from runs import CPU, VOCAB, one_byte_lut, technique, tiny_stack, tiny_trainer

from pgolf.registry.run.data import write_shard
from pgolf.registry.run.evaluate import evaluate
from pgolf.registry.run.export import load_artifact, load_into, write_artifact
from pgolf.registry.run.pipeline import build

LUT = one_byte_lut()
SHAPE = {"model": {"model_dim": 64},
         "train": {"iterations": 60, "train_seq_len": 32, "train_batch_tokens": 512, "micro_batch_tokens": 512},
         "export": {"passthrough_max_numel": 0}}  # fmt: skip


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """A token stream with structure a tiny model learns in a few dozen steps: a fixed random
    chain over VOCAB ids where each id has 3 likely successors (probabilities .6, .25, .15)."""
    rng = np.random.default_rng(12345)  # the chain itself is fixed; ``seed`` draws the path
    succ = np.stack([rng.choice(VOCAB, 3, replace=False) for _ in range(VOCAB)])
    draw = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    choice = draw.choice(3, size=n, p=[0.6, 0.25, 0.15])
    for i in range(1, n):
        out[i] = succ[out[i - 1], choice[i]]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], torch.Tensor]:
    folder = tmp_path_factory.mktemp("markov")
    shard = folder / "fineweb_train_000000.bin"
    write_shard(shard, markov_tokens(40_000, seed=0))
    b, trainer = tiny_trainer(tiny_stack({}, **SHAPE), shard)
    trainer.run()
    val = torch.from_numpy(markov_tokens(4_097, seed=1))
    return shard, {k: v.clone() for k, v in b.model.state_dict().items()}, val


def round_trip_bpb(rs, shard, state, val, path):  # type: ignore[no-untyped-def]
    b, trainer = tiny_trainer(rs, shard)
    b.model.load_state_dict(state)
    trainer.calibrate()
    write_artifact(path, b.model, b.sites, rs.stack.export)
    fresh = build(rs, CPU.device)
    load_into(fresh.model, load_artifact(path, fresh.sites))
    fresh.model.eval()
    res = evaluate(fresh.model, val, LUT, seq_len=32, batch_tokens=1024, runtime=CPU, sites=fresh.sites)
    return b, fresh, res.val_bpb


def weighted(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ), ΔW = Q − W: the layer-output error on the calibration inputs."""
    d = q.detach().double() - w.double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


@pytest.mark.parametrize("bits", [5, 6])
def test_gptq_beats_round_to_nearest_on_a_trained_model(bits: int, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shard, state, val = trained
    g = tiny_stack({"gptq": {"bits": bits, "calibration_batches": 16}}, **SHAPE)
    r = tiny_stack({"rtn": {"bits": bits}}, **SHAPE)
    bg, fg, bpb_gptq = round_trip_bpb(g, shard, state, val, tmp_path / "g.ptz")
    _, fr, bpb_rtn = round_trip_bpb(r, shard, state, val, tmp_path / "r.ptz")
    gptq = technique(bg, "gptq")
    assert gptq.hessians  # calibrated on the training stream
    ours, theirs = dict(fg.model.named_parameters()), dict(fr.model.named_parameters())
    for name, h in gptq.hessians.items():
        assert weighted(ours[name], state[name], h) < weighted(theirs[name], state[name], h), name
    print(f"int{bits}: val_bpb after the round trip: gptq {bpb_gptq:.5f}, round-to-nearest {bpb_rtn:.5f}")
    assert bpb_gptq <= bpb_rtn


def test_the_int6_gptq_brotli_stack_is_the_baseline_made_larger() -> None:
    """stacks/gptq_int6_brotli.yaml (its fit is `pgolf check`'s, recorded in the file): the
    baseline's width and vocabulary with more layers and a wider MLP, int6 GPTQ and brotli."""
    from pgolf.registry.api.config import load_stack
    from pgolf.registry.run.pipeline import dry_build

    stacks = Path(__file__).resolve().parents[2] / "stacks"
    big, base = load_stack(stacks / "gptq_int6_brotli.yaml"), load_stack(stacks / "baseline_sp1024.yaml")
    m, b = big.stack.model, base.stack.model
    assert (m.model_dim, m.vocab_size, m.num_heads) == (b.model_dim, b.vocab_size, b.num_heads)
    assert m.num_layers > b.num_layers and m.mlp_mult > b.mlp_mult
    assert big.stack.techniques["gptq"]["bits"] == 6 and "brotli" in big.stack.techniques
    assert dry_build(big).params > 1.5 * dry_build(base).params
