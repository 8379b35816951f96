"""Gated skips: each U-Net skip is merged through a learned per-channel sigmoid gate,
x ← σ(γ_j)⊙x + (1−σ(γ_j))⊙(s_j⊙skip), instead of x + s_j⊙skip.

What: decoder layer j pops encoder output skip (B,T,D) and merges it with the stream x by
x ← σ(γ_j)⊙x + (1 − σ(γ_j))⊙(s_j⊙skip), γ_j ∈ R^D init 0 (at init the stream is halved and
mixed 50/50 with the skip — not an additive identity), s_j ∈ R^D init 1. One (γ_j, s_j) per
skip; the number of skips follows the block schedule (8 for the 17-virtual-layer looped stack).

Why: the decoder can choose, per channel, how much of the encoder activation to take, rather
than always adding it on top of the stream.

Source: parameter-golf PR #1089; ``R/2026-04-01_Vocab4096_MLPMult4_WD085`` onward (every later
record).

Sites: the ``skip_merge`` slot.

Interactions: sized by the schedule's largest skip count (depth recurrence: taken over the
virtual layer list); the two-lane parallel-residual variant merges into lane 0 only (not this
single-stream model). γ and s are control tensors (role ``scalar``: Adam at the scalar lr, fp32 in
the artifact).

Evidence: no isolated delta in the records (part of the 04-01 bundle, 1.0979 BPB). Not yet
measured with pgolf.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Params, Role, Technique, hook, register, set_role


class GatedSkipsParams(Params):
    gate_init: float = Field(0.0, description="initial γ (σ(0) = 0.5: half stream, half skip)")
    scale_init: float = Field(1.0, description="initial s, the skip's per-channel scale")


def gated_skip(x: Tensor, skip: Tensor, gate: Tensor, scale: Tensor) -> Tensor:
    """σ(γ)⊙x + (1−σ(γ))⊙(s⊙skip) for x, skip (B,T,D) and γ, s (D,)."""
    g = torch.sigmoid(gate).to(x.dtype)
    return g * x + (1 - g) * (scale.to(x.dtype) * skip)


class GatedSkipMerge(nn.Module):
    def __init__(self, num_skips: int, model_dim: int, gate_init: float, scale_init: float):
        super().__init__()
        self.gates = set_role(nn.Parameter(torch.full((num_skips, model_dim), gate_init)), Role.SCALAR)
        self.scales = set_role(nn.Parameter(torch.full((num_skips, model_dim), scale_init)), Role.SCALAR)

    def forward(self, x: Tensor, skip: Tensor, j: int, ctx: Ctx) -> Tensor:
        return gated_skip(x, skip, self.gates[j], self.scales[j])


@register("gated_skips")
class GatedSkips(Technique):
    """Gated skips: each U-Net skip is merged through a learned per-channel sigmoid gate,
    x ← σ(γ_j)⊙x + (1−σ(γ_j))⊙(s_j⊙skip), instead of x + s_j⊙skip."""

    Params = GatedSkipsParams
    params: GatedSkipsParams

    @hook
    def skip_merge(self, num_skips: int) -> GatedSkipMerge:
        p = self.params
        return GatedSkipMerge(num_skips, self.spec.model_dim, p.gate_init, p.scale_init)
