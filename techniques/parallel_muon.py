"""Parallel Muon: Muon over parameter banks, each rank orthogonalising a shard of every bank, with
its own reduce-scatter of the gradients and all-gather of the updates in place of DDP's
all-reduce.

What: the matrices are grouped into banks by shape (every attention Q/O, every K/V, every MLP up,
every MLP down: one bank each on the baseline), in parameter order; bank b holds N_b matrices of
one shape (r, c), padded with zero matrices to a multiple of the world size W. Per step and bank:

1. the gradients are stacked into one (N_b, r, c) buffer and reduce-scattered (sum, then / W: the
   global mean gradient, as DDP would give) — rank k receives matrices k·N_b/W … (k+1)·N_b/W − 1;
   every bank's reduce-scatter is launched at once, largest bank first;
2. on its shard, each rank runs Muon exactly: buf ← μ·buf + G; U = G + μ·buf (Nesterov) or buf; U ← f(U)
   for each ``muon_update`` chain function; O = orthogonalize(U) (the ``orthogonalize`` slot:
   Newton–Schulz or Polar Express) batched over the shard; O ← √max(1, r/c)·O; then launches an
   all-gather of O;
3. when a bank's gather is done, every rank applies W ← W·(1 − lr·wd), W ← W − lr·O to all of its
   matrices (foreach ops over the bank).

One process (W = 1) runs the same steps without communication and gives the default Muon's result.
The optimizer sets ``owns_grad_sync``: the trainer leaves its parameters out of DDP (DDP still
all-reduces the embedding, head, gate and scalar gradients). Momentum is kept only for a rank's
shard (1/W of Muon's memory); its ``state_dict`` is per rank.

Why: plain Muon + DDP all-reduces every gradient (2× the bytes of a reduce-scatter) and then
all-reduces the updates again; with banks each rank only receives the gradients it orthogonalises
and sends its updates once, the communication overlaps the Newton–Schulz work of the other banks,
and the bank's batched Newton–Schulz replaces per-matrix calls.

Source: PR #399, ``R/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon`` (83.3 vs ≈85 ms/step, ±0 BPB);
dropped in ``R/2026-04-01`` for simplicity, used again by the 04-10+ lineage to PR #2135. The
records also stored the model's matrices as 3-D bank parameters (``qo_bank``, ``kv_bank``, …);
here the model keeps one Linear per matrix (its roles, kinds and per-tensor quantizers need them)
and the banks are the optimizer's contiguous buffers.

Sites: the ``matrix_optimizer`` slot (uses the ``orthogonalize`` slot and ``muon_update`` chain).

Interactions: composes with ``muon_eq_r`` and ``polar_express`` as the default Muon does;
``optim.matrix_lr``, ``matrix_wd``, ``muon_momentum`` (and its warm-up) and
``muon_backend_steps`` apply unchanged. Only one matrix optimizer may be in a stack.

Evidence (records, 8×H100): ±0 BPB, ≈2 % faster steps (``R/2026-03-23``). Measured with pgolf on CPU
(the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337
/ 1338; ``python bench/technique_effects.py --only parallel_muon``): Δval_bpb +0.0000 (+0.0000,
+0.0000): on one process the updates are Muon's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor

from pgolf.registry import Params, Technique, hook, register

Orthogonalizer = Callable[[Tensor, int], Tensor]


class ParallelMuonParams(Params):
    nesterov: bool = Field(True, description="Nesterov momentum (as the default Muon)")


@dataclass
class Bank:
    """Matrices of one shape, in parameter order, and their padded size."""

    params: list[Tensor]
    shape: tuple[int, int]
    padded: int  # N rounded up to a multiple of the world size

    @property
    def scale(self) -> float:
        return max(1.0, self.shape[0] / self.shape[1]) ** 0.5


def make_banks(params: Sequence[Tensor], world_size: int) -> list[Bank]:
    """Group 2-D parameters by shape (first appearance order), largest bank first."""
    by_shape: dict[tuple[int, int], list[Tensor]] = {}
    for p in params:
        by_shape.setdefault((p.shape[0], p.shape[1]), []).append(p)
    banks = [Bank(ps, s, -(-len(ps) // world_size) * world_size) for s, ps in by_shape.items()]
    return sorted(banks, key=lambda b: -b.padded * b.shape[0] * b.shape[1])


class ParallelMuon(torch.optim.Optimizer):
    """Muon over banks with sharded orthogonalisation; see the module docstring."""

    owns_grad_sync = True

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float,
        backend_steps: int,
        orthogonalize: Orthogonalizer,
        *,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        update_chain: Sequence[Callable[[Tensor], Tensor]] = (),
        rank: int = 0,
        world_size: int = 1,
    ):
        defaults = {"lr": lr, "momentum": momentum, "backend_steps": backend_steps, "nesterov": nesterov,
                    "weight_decay": weight_decay}  # fmt: skip
        super().__init__(params, defaults)
        self.ns, self.update_chain = orthogonalize, list(update_chain)
        self.rank, self.world_size = rank, world_size
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("parallel_muon takes 2-D (matrix) parameters only")
        self.banks = [make_banks(g["params"], world_size) for g in self.param_groups]

    def _shard(self, bank: Bank) -> slice:
        n = bank.padded // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def _momentum(self, bank: Bank, like: Tensor) -> Tensor:
        state = self.state[bank.params[0]]  # the bank's shard of momentum lives with its first matrix
        if "bank_momentum" not in state:
            state["bank_momentum"] = torch.zeros_like(like)
        buf: Tensor = state["bank_momentum"]
        return buf

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        assert closure is None
        distributed = self.world_size > 1
        for group, banks in zip(self.param_groups, self.banks, strict=True):
            # 1. every bank's gradients stacked (zero-padded) and reduce-scattered, largest first
            pending: list[tuple[Bank, Tensor, Any]] = []
            for bank in banks:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bank.params]
                pad = bank.padded - len(grads)
                full = torch.stack(grads + [torch.zeros_like(grads[0])] * pad)
                if distributed:
                    shard = full.new_empty((bank.padded // self.world_size, *bank.shape))
                    work = dist.reduce_scatter_tensor(shard, full, op=dist.ReduceOp.SUM, async_op=True)
                    pending.append((bank, shard, work))
                else:
                    pending.append((bank, full, None))
            # 2. Muon on this rank's shard of each bank; the updates are all-gathered
            gathers: list[tuple[Bank, Tensor, Any]] = []
            mu = group["momentum"]
            for bank, g, work in pending:
                if work is not None:
                    work.wait()
                    g.div_(self.world_size)
                buf = self._momentum(bank, g)
                buf.mul_(mu).add_(g)
                u = g.add(buf, alpha=mu) if group["nesterov"] else buf
                for fn in self.update_chain:
                    u = fn(u)
                ortho = self.ns(u, group["backend_steps"]) * bank.scale
                if distributed:
                    full = ortho.new_empty((bank.padded, *bank.shape))
                    gathers.append(
                        (bank, full, dist.all_gather_into_tensor(full, ortho.contiguous(), async_op=True))
                    )
                else:
                    gathers.append((bank, ortho, None))
            # 3. every matrix: decoupled weight decay, then the update
            lr, decay = group["lr"], group["lr"] * group["weight_decay"]
            for bank, full, work in gathers:
                if work is not None:
                    work.wait()
                params = bank.params
                updates = [u.to(p.dtype) for u, p in zip(full[: len(params)].unbind(0), params)]
                if decay:
                    torch._foreach_mul_(params, 1.0 - decay)
                torch._foreach_add_(params, updates, alpha=-lr)


@register("parallel_muon")
class ParallelMuonTechnique(Technique):
    """Parallel Muon: Muon over parameter banks, each rank orthogonalising a shard of every bank, with
    its own reduce-scatter of the gradients and all-gather of the updates in place of DDP's
    all-reduce."""

    Params = ParallelMuonParams
    params: ParallelMuonParams

    @hook
    def matrix_optimizer(
        self,
        params: list[Tensor],
        lr: float,
        weight_decay: float,
        momentum: float,
        backend_steps: int,
        orthogonalize: Orthogonalizer,
        update_chain: list[Callable[[Tensor], Tensor]],
        runtime: Any,
    ) -> ParallelMuon:
        return ParallelMuon(
            params,
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            orthogonalize=orthogonalize,
            nesterov=self.params.nesterov,
            weight_decay=weight_decay,
            update_chain=update_chain,
            rank=getattr(runtime, "rank", 0),
            world_size=getattr(runtime, "world_size", 1),
        )
