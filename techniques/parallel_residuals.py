"""Parallel residuals: from a start layer on, attention and MLP no longer run one after the other:
both read the block's input (GPT-J), or run in two lanes merged after the last block.

What: for physical layers ℓ ≥ ``start_layer``, with x the block's input after resid_mix,
A(·) = attn_scale ⊙ Attn(norm ·) and M(·) = mlp_scale ⊙ MLP(norm ·) (the block's own branches,
norms and scales included). Earlier layers keep the sequential x ← x + A(x); x ← x + M(x).

* ``variant: gptj`` (single stream): x ← x + A(x) + M(x). No parameters.
* ``variant: lanes`` (separate lanes, scalar merge): at the first such layer a second lane
  l ← x opens; then x ← x + A(x) (the attention lane: resid_mix and the U-Net skips act on it) and
  l ← l + M(l) (the MLP lane). After the last block h = μ·x + (1 − μ)·l, μ learned (init
  ``merge_init``), before the final norm. One parameter.
* ``variant: routed`` (two lanes, learned 2×2 routing): per layer, with a = A(x) and m = M(l):
  x ← ρ_a·x + P_aa·a + P_ma·m and l ← ρ_m·l + P_al·a + P_ml·m (both branches read the lanes as they
  entered the block); ρ init ``lane_residual_init`` (1.1), P init ``route_init`` (1); after the last
  block h = (x + l)/2. Six parameters per layer (ρ (2,), P (2,2)).

The lane l lives in the forward's cross-layer state; a block below ``start_layer`` that runs after
the lanes opened (a looped order) updates the attention lane x only. Lane parameters are control
tensors (role ``scalar``: Adam at the scalar lr, fp32 in the artifact).

Why: the two branches no longer wait on each other (one norm input, fusable matmuls), and late
layers lose little from not seeing their own attention output in the MLP; with lanes, the MLP
stream is kept apart from the attention stream and the model learns how much each writes into the
other. The records also found a smaller quantization gap.

Source: GPT-J (Wang & Komatsuzaki, 2021): ``R/2026-04-06_SP8192_HessianSDClip_ProgressiveRecurrence``
and ``R/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT`` (start 7 of 11); separate lanes with a
scalar merge: ``R/2026-04-08_SP8192_ParallelResid_ScoreFirstTTT``; two lanes with 2×2 routing
(modded-nanogpt #230): ``R/2026-03-31`` (start 7), ``R/2026-04-10`` … PR #2135 (start 8, ρ = 1.1).

Sites: the ``block`` slot of layers ``start_layer`` … L−1 and, for the lane variants, the
``final`` chain (the merge).

Interactions: exclusive with other residual-wiring techniques on the same layer. U-Net skips
merge into the attention lane only (as the records). With depth recurrence every pass of a
physical layer ≥ start uses the wiring (the records start lanes after the looped layers). In the
routed form the records found the MLP barely writes into the attention lane (learned P).

Evidence (records, 8×H100): GPT-J form part of the 04-06 / 04-09 stacks (1.0835 / 1.0810), tightened
the quantization gap; routed lanes −0.0022 BPB (``R/2026-03-31``, one sample); separate lanes 1.0828
→ 1.0822 with TTT (``R/2026-04-08``). Measured with pgolf on CPU (the baseline shrunk to 4 layers ×
64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337 / 1338; ``python
bench/technique_effects.py --only 'parallel_residuals (lanes)' 'parallel_residuals (routed)'``):
from layer 2: lanes Δval_bpb +0.0010 (+0.0015, +0.0006), routed +0.0000 (+0.0022, −0.0022).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Params, PgolfError, Role, Technique, hook, register, set_role

LANE = "parallel_residuals.lane"


class ParallelResidualsParams(Params):
    variant: Literal["gptj", "lanes", "routed"] = Field(
        "gptj",
        description="gptj: x + A(x) + M(x); lanes: attention and MLP lanes, μ-merge; routed: 2×2 routing",
    )
    start_layer: int = Field(7, ge=0, description="first physical layer whose branches run in parallel")
    lane_residual_init: float = Field(
        1.1, description="routed: initial ρ_a, ρ_m (residual scale of each lane)"
    )
    route_init: float = Field(
        1.0, description="routed: initial P (how much each branch writes into each lane)"
    )
    merge_init: float = Field(0.5, description="lanes: initial μ, the attention lane's share of the merge")


def routed_lanes(
    x: Tensor, lane: Tensor, a: Tensor, m: Tensor, rho: Tensor, route: Tensor
) -> tuple[Tensor, Tensor]:
    """(ρ_a·x + P_aa·a + P_ma·m, ρ_m·l + P_al·a + P_ml·m) with rho (2,) and route (2,2) = [[P_aa, P_al],
    [P_ma, P_ml]] (row: branch a, m; column: lane x, l)."""
    r, p = rho.to(x.dtype), route.to(x.dtype)
    return r[0] * x + p[0, 0] * a + p[1, 0] * m, r[1] * lane + p[0, 1] * a + p[1, 1] * m


class ParallelResidual(nn.Module):
    """x + A(x) + M(x): both branches read the same input."""

    def forward(self, x: Tensor, block: Any, ctx: Ctx) -> Tensor:
        return x + block.attn_branch(x, ctx) + block.mlp_branch(x, ctx)


class SeparateLanes(nn.Module):
    """x ← x + A(x), l ← l + M(l); l opens as x at the first lane layer."""

    def forward(self, x: Tensor, block: Any, ctx: Ctx) -> Tensor:
        lane = ctx.state.get(LANE, x)
        ctx.state[LANE] = lane + block.mlp_branch(lane, ctx)
        return x + block.attn_branch(x, ctx)


class RoutedLanes(nn.Module):
    """The 2×2-routed lanes of one layer (ρ and P are this layer's)."""

    def __init__(self, rho: float, route: float):
        super().__init__()
        self.rho = set_role(nn.Parameter(torch.full((2,), rho)), Role.SCALAR)
        self.route = set_role(nn.Parameter(torch.full((2, 2), route)), Role.SCALAR)

    def forward(self, x: Tensor, block: Any, ctx: Ctx) -> Tensor:
        lane = ctx.state.get(LANE, x)
        a, m = block.attn_branch(x, ctx), block.mlp_branch(lane, ctx)
        x, ctx.state[LANE] = routed_lanes(x, lane, a, m, self.rho, self.route)
        return x


class MergeLanes(nn.Module):
    """After the last block: μ·x + (1 − μ)·l (lanes) or (x + l)/2 (routed); x when no lane opened."""

    def __init__(self, merge_init: float | None):
        super().__init__()
        self.mu = (
            None if merge_init is None else set_role(nn.Parameter(torch.tensor(merge_init)), Role.SCALAR)
        )

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        lane = ctx.state.get(LANE)
        if lane is None:
            return x
        if self.mu is None:
            return 0.5 * (x + lane)
        mu = self.mu.to(x.dtype)
        return mu * x + (1 - mu) * lane


@register("parallel_residuals")
class ParallelResiduals(Technique):
    """Parallel residuals: from a start layer on, attention and MLP no longer run one after the other:
    both read the block's input (GPT-J), or run in two lanes merged after the last block."""

    Params = ParallelResidualsParams
    params: ParallelResidualsParams
    contract_params: ClassVar[dict[str, Any]] = {"start_layer": 1}  # the contract models have 2 and 4 layers

    @hook
    def block(self, layer: int) -> nn.Module | None:
        p, n = self.params, self.spec.num_layers
        if p.start_layer >= n:
            raise PgolfError(
                f"techniques.parallel_residuals.start_layer={p.start_layer} leaves no layer of "
                f"model.num_layers={n}; allowed: 0 … {n - 1}"
            )
        if layer < p.start_layer:
            return None
        if p.variant == "gptj":
            return ParallelResidual()
        if p.variant == "lanes":
            return SeparateLanes()
        return RoutedLanes(p.lane_residual_init, p.route_init)

    @hook
    def final(self) -> MergeLanes | None:
        p = self.params
        if p.variant == "gptj":
            return None
        return MergeLanes(p.merge_init if p.variant == "lanes" else None)
