"""Optimizers: the matrix optimizer (Muon by default) for ``matrix`` parameters, Adam(W) for the
rest, one group per role with the stack's lr and decoupled weight decay.

Muon (Keller Jordan; as in the challenge baseline): Nesterov momentum, then the update is
orthogonalised by 5 Newton–Schulz iterations with fixed coefficients (3.4445, −4.7750, 2.0315)
in bf16, scaled by √max(1, rows/cols). With several processes each rank orthogonalises the
matrices i ≡ rank (mod world size) and one all-reduce shares the updates.

Sites: ``matrix_optimizer`` (slot), ``orthogonalize`` (slot; Newton–Schulz by default) and the
``muon_update`` chain (applied to the Nesterov update before orthogonalization, e.g. MuonEq-R).

Fast path: matrices of the same shape are stacked and orthogonalised in one batched
Newton–Schulz call (:func:`newton_schulz`); :func:`newton_schulz_reference` is the plain
per-matrix loop it must agree with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..api.config import OptimConfig
from ..api.roles import Role, role_table
from ..api.sites import Dispatcher

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz_reference(
    g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Orthogonalise one matrix (the baseline's ``zeropower_via_newtonschulz5``, in bf16)."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if transposed else x


def newton_schulz(
    g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Batched Newton–Schulz over the leading dim of g (N, rows, cols)."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    x = x / (x.flatten(1).norm(dim=1)[:, None, None] + eps)
    transposed = g.size(1) > g.size(2)
    if transposed:
        x = x.transpose(1, 2)
    for _ in range(steps):
        A = x @ x.transpose(1, 2)
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x.transpose(1, 2) if transposed else x


Orthogonalizer = Callable[[Tensor, int], Tensor]
UpdateFn = Callable[[Tensor], Tensor]


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D parameters.

    Per step and parameter W with gradient G: buf ← μ·buf + G; U = G + μ·buf (Nesterov) or buf;
    U ← f(U) for each ``update_chain`` function; O = orthogonalize(U) batched by shape;
    W ← W·(1 − lr·wd); W ← W − lr·√max(1, rows/cols)·O. With several processes each rank
    orthogonalises the matrices i ≡ rank (mod world size) and one all-reduce shares the updates.
    """

    owns_grad_sync = False

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float,
        backend_steps: int = 5,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        ns: Orthogonalizer = newton_schulz,
        update_chain: Sequence[UpdateFn] = (),
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                backend_steps=backend_steps,
                nesterov=nesterov,
                weight_decay=weight_decay,
            ),
        )
        self.rank, self.world_size, self.ns = rank, world_size, ns
        self.update_chain = list(update_chain)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        assert closure is None
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            if not params:
                continue
            mine = [i for i in range(len(params)) if i % self.world_size == self.rank]
            updates: dict[int, Tensor] = {}
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i in mine:
                p = params[i]
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                updates[i] = g
                by_shape.setdefault(tuple(g.shape), []).append(i)
            for shape, idxs in by_shape.items():
                stacked = torch.stack([updates[i] for i in idxs])
                for fn in self.update_chain:
                    stacked = fn(stacked)
                ortho = self.ns(stacked, group["backend_steps"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for j, i in enumerate(idxs):
                    updates[i] = ortho[j] * scale
            if self.world_size > 1:
                flat = torch.zeros(
                    sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16
                )
                offsets = [0]
                for p in params:
                    offsets.append(offsets[-1] + p.numel())
                for i, u in updates.items():
                    flat[offsets[i] : offsets[i + 1]] = u.flatten()
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                updates = {
                    i: flat[offsets[i] : offsets[i + 1]].view_as(params[i]) for i in range(len(params))
                }
            decay = group["lr"] * group["weight_decay"]
            for i, u in updates.items():
                if decay:
                    params[i].mul_(1.0 - decay)
                params[i].add_(u.to(params[i].dtype), alpha=-group["lr"])


@dataclass
class OptimizerSet:
    """The optimizers of a run, each group carrying its ``base_lr`` and ``base_wd``."""

    optimizers: list[torch.optim.Optimizer]
    matrix: torch.optim.Optimizer | None

    @property
    def self_synced(self) -> list[Tensor]:
        """Parameters whose optimizer does its own gradient reduction (left out of DDP)."""
        if self.matrix is None or not getattr(self.matrix, "owns_grad_sync", False):
            return []
        return [p for g in self.matrix.param_groups for p in g["params"]]

    def set_multipliers(self, lr_mult: float, wd_mult: float = 1.0) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mult
                group["weight_decay"] = group["base_wd"] * wd_mult

    def set_muon_momentum(self, momentum: float) -> None:
        if self.matrix is not None:
            for group in self.matrix.param_groups:
                if "momentum" in group:
                    group["momentum"] = momentum

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dicts(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dicts(self, states: Sequence[dict]) -> None:
        for opt, st in zip(self.optimizers, states, strict=True):
            opt.load_state_dict(st)


@functools.cache
def _compiled(fn: Orthogonalizer) -> Orthogonalizer:
    return cast(Orthogonalizer, torch.compile(fn, dynamic=False, fullgraph=True))


def compiled_newton_schulz() -> Orthogonalizer:
    """:func:`newton_schulz` through ``torch.compile`` (one graph per shape; as the baseline does)."""
    return _compiled(newton_schulz)


def build_optimizers(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    tied: bool,
    sites: Dispatcher | None = None,
    runtime: Any = None,
) -> OptimizerSet:
    """One Adam(W) group per non-matrix role and the matrix optimizer (the ``matrix_optimizer``
    slot, Muon by default) for role-``matrix`` parameters. Every trainable parameter is covered
    (checked by role_table); role-``adapter`` parameters (evaluation-time adapters) are not trained."""
    sites = sites or Dispatcher(())
    rank = getattr(runtime, "rank", 0)
    world_size = getattr(runtime, "world_size", 1)
    compile_ns = bool(getattr(runtime, "compile", False))
    roles = role_table(model)
    named = dict(model.named_parameters())
    by_role: dict[Role, list[Tensor]] = {r: [] for r in Role}
    for name, role in roles.items():
        by_role[role].append(named[name])
    for p in by_role[Role.ADAPTER]:
        p.requires_grad_(False)
    fused = next(iter(named.values())).is_cuda if named else False
    embed_lr = cfg.tied_embed_lr if tied else cfg.embed_lr
    defaults = {  # role -> (lr, weight decay)
        Role.EMBEDDING: (embed_lr, cfg.embed_wd),
        Role.HEAD: (cfg.head_lr, cfg.head_wd),
        Role.SCALAR: (cfg.scalar_lr, cfg.scalar_wd),
        Role.GATE: (cfg.scalar_lr, cfg.scalar_wd),
    }
    adam_groups: list[dict[str, Any]] = []
    for role, (lr, wd) in defaults.items():
        o = cfg.groups.get(role.value)  # type: ignore[call-overload]
        lr = o.lr if o is not None and o.lr is not None else lr
        wd = o.weight_decay if o is not None and o.weight_decay is not None else wd
        betas = (
            o.beta1 if o is not None and o.beta1 is not None else cfg.beta1,
            o.beta2 if o is not None and o.beta2 is not None else cfg.beta2,
        )
        eps = o.eps if o is not None and o.eps is not None else cfg.adam_eps
        group = {"lr": lr, "base_lr": lr, "weight_decay": wd, "base_wd": wd, "betas": betas, "eps": eps}
        same = next((g for g in adam_groups if all(g[k] == group[k] for k in group)), None)
        if same is not None:  # gate and scalar share one group unless configured apart
            same["params"] += by_role[role]
        elif by_role[role]:
            adam_groups.append({"params": list(by_role[role]), **group})
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = []
    if adam_groups:
        optimizers.append(
            torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
        )
    matrix = None
    mo = cfg.groups.get("matrix")
    matrix_lr = mo.lr if mo is not None and mo.lr is not None else cfg.matrix_lr
    matrix_wd = mo.weight_decay if mo is not None and mo.weight_decay is not None else cfg.matrix_wd
    if by_role[Role.MATRIX]:
        for p in by_role[Role.MATRIX]:
            if p.ndim != 2:
                raise ValueError(f"a matrix-role parameter must be 2-D; got shape {tuple(p.shape)}")
        ortho: Orthogonalizer = sites.slot("orthogonalize", lambda: newton_schulz)
        if compile_ns:
            ortho = _compiled(ortho)
        update_chain: list[UpdateFn] = sites.chain("muon_update")

        def muon() -> torch.optim.Optimizer:
            return Muon(
                by_role[Role.MATRIX],
                lr=matrix_lr,
                momentum=cfg.muon_momentum,
                backend_steps=cfg.muon_backend_steps,
                weight_decay=matrix_wd,
                rank=rank,
                world_size=world_size,
                ns=ortho,
                update_chain=update_chain,
            )

        matrix = sites.slot(
            "matrix_optimizer",
            muon,
            params=by_role[Role.MATRIX],
            lr=matrix_lr,
            weight_decay=matrix_wd,
            momentum=cfg.muon_momentum,
            backend_steps=cfg.muon_backend_steps,
            orthogonalize=ortho,
            update_chain=update_chain,
            runtime=runtime,
        )
        for group in matrix.param_groups:
            group.setdefault("base_lr", matrix_lr)
            group.setdefault("base_wd", matrix_wd)
        optimizers.append(matrix)
    return OptimizerSet(optimizers, matrix)


def lr_multiplier(
    step: int, elapsed_seconds: float, *, iterations: int, warmdown_iters: int, max_wallclock_seconds: float
) -> float:
    """The baseline's linear warmdown: by wall clock when capped, else over the last iterations.

    With a cap, warmdown starts when the remaining time falls below ``warmdown_iters`` times
    the mean step time so far, and reaches zero at the cap.
    """
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_seconds <= 0:
        start = max(iterations - warmdown_iters, 0)
        return max((iterations - step) / max(warmdown_iters, 1), 0.0) if start <= step < iterations else 1.0
    step_s = elapsed_seconds / max(step, 1)
    warmdown_s = warmdown_iters * step_s
    remaining = max(max_wallclock_seconds - elapsed_seconds, 0.0)
    return remaining / max(warmdown_s, 1e-9) if remaining <= warmdown_s else 1.0


def muon_momentum_at(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """Muon momentum warmed up linearly from ``start`` to ``end`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end
