"""Parallel Muon: one process equals the default Muon; two gloo processes (reduce-scatter and
all-gather, parameters outside DDP) equal one process to 1e-6, for the optimizer alone and for
whole training steps."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.registry.run.optim import Muon, newton_schulz
from pgolf.techniques.muon_eq_r import row_normalize
from pgolf.techniques.parallel_muon import ParallelMuon, make_banks

SHAPES = [(8, 6)] * 5 + [(6, 8)] * 2 + [(4, 4)] * 3  # 5 and 3 matrices: banks padded for 2 ranks
fp32_ns = functools.partial(newton_schulz, dtype=torch.float32)


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def exact_grads(step: int, rank: int | None) -> list[torch.Tensor]:
    """G (rank None) or rank r's G + (−1)^r·D, with values on a 1/64 grid: the two ranks' mean is
    exactly G in fp32."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for s in SHAPES:
        G = torch.randint(-64, 65, s, generator=g).float() / 64
        D = torch.randint(-32, 33, s, generator=g).float() / 64
        out.append(G if rank is None else G + (1 - 2 * rank) * D)
    return out


def optimizer(
    params: list[torch.nn.Parameter], rank: int = 0, world: int = 1, ns=newton_schulz
) -> ParallelMuon:  # type: ignore[no-untyped-def]
    return ParallelMuon(params, lr=0.05, momentum=0.9, backend_steps=5, orthogonalize=ns, weight_decay=0.1,
                        update_chain=[row_normalize], rank=rank, world_size=world)  # fmt: skip


def run_steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], rank: int | None) -> None:
    for step in range(3):
        for p, grad in zip(params, exact_grads(step, rank)):
            p.grad = grad
        opt.step()


def test_banks_group_by_shape_largest_first_and_pad_to_the_world_size() -> None:
    banks = make_banks(matrices(), 2)
    assert [(b.shape, len(b.params), b.padded) for b in banks] == [
        ((8, 6), 5, 6),
        ((6, 8), 2, 2),
        ((4, 4), 3, 4),
    ]
    assert banks[1].scale == 1.0 and banks[0].scale == pytest.approx((8 / 6) ** 0.5)


def test_one_process_is_the_default_muon() -> None:
    a, b = matrices(), matrices()
    run_steps(optimizer(a), a, None)
    muon = Muon(b, lr=0.05, momentum=0.9, backend_steps=5, weight_decay=0.1, update_chain=[row_normalize])
    run_steps(muon, b, None)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _optimizer_rank(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        params = matrices()
        opt = optimizer(params, rank, 2)
        run_steps(opt, params, rank)
        momentum = {k: v["bank_momentum"] for k, v in enumerate(opt.state.values())}
        torch.save({"params": [p.detach() for p in params], "momentum": momentum}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_optimizer_rank, args=(str(tmp_path),), nprocs=2, join=True)
    single = matrices()
    opt = optimizer(single, 0, 1)
    run_steps(opt, single, None)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        for got, want in zip(shards[r]["params"], single):
            assert torch.allclose(got, want.detach(), atol=1e-6, rtol=0), r
    # each rank keeps only its half of every bank's momentum
    full = [v["bank_momentum"] for v in opt.state.values()]
    for i, m in enumerate(full):
        half = -(-m.size(0) // 2)
        ours = torch.cat([shards[0]["momentum"][i], shards[1]["momentum"][i]])[: m.size(0)]
        assert shards[0]["momentum"][i].size(0) == half and torch.allclose(ours, m, atol=1e-6)


def _trainer_rank(rank: int, world: int, folder: str, shard: str) -> None:
    from runs import CPU, tiny_stack

    from pgolf.registry.run.data import DistributedTokenLoader
    from pgolf.registry.run.pipeline import build
    from pgolf.registry.run.runtime import seed_everything
    from pgolf.registry.run.train import Trainer

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        rs = tiny_stack({"parallel_muon": {}}, train={"iterations": 3, "train_batch_tokens": 64})
        runtime = (
            CPU if world == 1 else type(CPU)(CPU.device, None, False, "sdpa", rank=rank, world_size=world)
        )
        seed_everything(0)
        b = build(rs, CPU.device)
        trainer = Trainer(
            b.model, b.sites, rs.stack, runtime, DistributedTokenLoader([Path(shard)], rank, world)
        )
        assert trainer.opt.matrix is not None and trainer.opt.self_synced  # its matrices are outside DDP
        trainer.opt.matrix.ns = fp32_ns  # type: ignore[attr-defined]  # isolate the communication from bf16 rounding
        trainer.run()
        torch.save(
            {n: p.detach() for n, p in b.model.named_parameters()}, f"{folder}/trained{world}-{rank}.pt"
        )
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.slow
def test_training_steps_on_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    from runs import token_shard

    shard = str(token_shard(tmp_path))
    mp.spawn(_trainer_rank, args=(2, str(tmp_path), shard), nprocs=2, join=True)
    _trainer_rank(0, 1, str(tmp_path), shard)  # gradient accumulation 2 in one process
    one = torch.load(tmp_path / "trained1-0.pt")
    for r in range(2):
        two = torch.load(tmp_path / f"trained2-{r}.pt")
        for name, p in one.items():
            assert torch.allclose(two[name], p, atol=1e-6, rtol=0), (r, name, (two[name] - p).abs().max())
