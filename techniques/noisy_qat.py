"""Noisy QAT: during training, add uniform noise of one quantization step to the weights of the
chosen layers' matrices, so the model learns to tolerate the export's rounding (differentiable).

What: while training (a switch ``noisy_qat``, on from the first step, off at evaluation), every
pgolf ``Linear`` of ``kinds`` in ``layers`` computes with W + ε, ε_rj = (u_rj − ½)·Δ_r uniform in
(−Δ_r/2, Δ_r/2), Δ_r = max_j |W_rj| / q_max, q_max = 2^(bits−1) − 1 (the step of a per-row absmax
grid; ``bits`` 8: Δ = row max / 127). The noise is a constant for autograd: the gradient of W + ε
is the identity, and the forward sees weights perturbed as much as rounding would. u is drawn by
hashing each weight's fp32 bits with its position (murmur3's 32-bit finaliser): a fresh draw
whenever the weights change (every optimizer step), the same draw for the same weights, so a
forward stays a deterministic function of the model (micro-batches of one step share it).

Why: in a depth-recurrent model the looped blocks' rounding errors compound over the passes;
training with rounding-sized noise made the looped model's quantization gap fall from 0.37 to
0.002 BPB.

Source: parameter-golf ``N/2026-03-21`` (non-record), noise on the weights of the looped core
blocks (Δ = row max / 127).

Sites: the ``linear_weight`` slot of each selected Linear; the ``switches`` chain.

Interactions: put it on the layers ``depth_recurrence`` loops (its defaults: 3–5). Match
``bits`` to the export: int8 noise with an int5 export hurt (+0.006 BPB with late QAT + int5,
``N/2026-03-21``). Fills the same ``linear_weight`` slot as ``qat`` / ``late_qat`` (conflict).

Evidence (non-record, 8×H100): looped-model quantization gap 0.37 → 0.002 BPB. Not yet measured
with pgolf.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Kind, Layers, LayerSelector, Params, Switch, Technique, hook, register
from pgolf.registry.api.roles import BLOCK_MATRIX_KINDS

SWITCH = "noisy_qat"


class NoisyQATParams(Params):
    bits: int = Field(
        8, ge=2, le=8, description="noise width = one step of a per-row absmax grid at these bits"
    )
    layers: Layers = Field(LayerSelector.parse([3, 4, 5]), description="layers whose matrices get noise")
    kinds: tuple[Kind, ...] = Field(
        BLOCK_MATRIX_KINDS, min_length=1, description="Linear kinds that get noise"
    )


def noise_step(w: Tensor, bits: int) -> Tensor:
    """Δ_r = max_j |W_rj| / q_max per row (R,1) (rows = all but the last dimension)."""
    return w.detach().abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)


def hash_uniform(w: Tensor) -> Tensor:
    """u in [0, 1) (fp32, w's shape) from murmur3's finaliser of (w's fp32 bits XOR position ×
    0x9E3779B9), 24 bits of it."""
    mask = 0xFFFFFFFF
    bits = w.detach().float().contiguous().view(torch.int32).to(torch.int64) & mask
    pos = torch.arange(w.numel(), device=w.device, dtype=torch.int64).view(w.shape)
    h = (bits ^ (pos * 0x9E3779B9)) & mask
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).float() * 2.0**-24


def add_noise(w: Tensor, bits: int, u: Tensor) -> Tensor:
    """W + (u − ½)·Δ for u of W's shape in [0, 1): the noisy weight (gradient: identity)."""
    return w + ((u - 0.5) * noise_step(w, bits)).detach()


class NoisyWeight(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, w: Tensor, ctx: Ctx | None) -> Tensor:
        if ctx is None or SWITCH not in ctx.switches:
            return w
        return add_noise(w, self.bits, hash_uniform(w))


@register("noisy_qat")
class NoisyQAT(Technique):
    """Noisy QAT: during training, add uniform noise of one quantization step to the weights of the
    chosen layers' matrices, so the model learns to tolerate the export's rounding (differentiable)."""

    Params = NoisyQATParams
    params: NoisyQATParams
    gain_at_end = True
    conflicts = ("qat", "late_qat")
    contract_params: ClassVar[dict[str, Any]] = {"layers": "all"}  # the contract models have 2-4 layers

    @hook
    def linear_weight(self, kind: Kind, layer: int | None) -> nn.Module | None:
        p = self.params
        if kind not in p.kinds or layer is None or layer not in p.layers.resolve(self.spec.num_layers):
            return None
        return NoisyWeight(p.bits)

    @hook
    def switches(self) -> list[Switch]:
        return [Switch(SWITCH, lambda state: True, expected=0.0, at_eval=False)]
