"""Gated attention: a per-head sigmoid gate, computed from the block's normalised input, scales
each head's attention output before the output projection.

What: with n_t the block's normalised (and LN-scaled) input (``ctx.attn_input``, (B,T,D)) and
y_{t,h} (B,T,H,Dh) the per-head attention output, y_{t,h,:} ← g_{t,h}·y_{t,h,:} where, by
``variant``:

* ``dense`` (Qwen "G1", arXiv:2505.06708): g_{t,h} = σ(W_g n_t), W_g ∈ R^{H×D} initialised
  N(0, ``init_std``²) (g ≈ 0.5 at init), D·H parameters per layer;
* ``sparse`` (modded-nanogpt, PR #1787, the current record): g_{t,h} = σ(α·W n_t[:w]),
  W ∈ R^{H×w} zero-initialised (g = 0.5 at init), α = ``scale``, w = ``width``;
* ``output`` (AttnOutGate, PR #1667): g_{t,h} = 2σ(W n_t[:w]), W zero-initialised (g = 1 at
  init, the identity).

Why: a query-dependent gate lets a head switch itself off for tokens where attending is useless
(no forced "attention sink"), and adds input-dependent non-linearity between the value and output
projections.

Source: Qiu et al., "Gated Attention for Large Language Models" (arXiv:2505.06708);
parameter-golf ``R/2026-04-16`` (output gate), ``R/2026-04-19`` and ``R/2026-04-22`` (dense),
``R/2026-04-23`` and ``R/2026-04-27_*`` (sparse; α = 1.0, then 0.5 in 04-27), PR #2135 (sparse).

Sites: the ``attn_out`` chain of its layers.

Interactions: the three variants are mutually exclusive in the records' code, which here is one
``variant`` parameter. After XSA in the records' order (attention → XSA → gate → O-proj): put
``xsa`` before this technique in the stack. At-init g = 0.5 variants halve the attention output
(attn_scale compensates). Gate weights take role ``gate`` (Adam at the scalar lr, as the records
route them) and kind ``gate``: the dense gate (4,096 per layer) is quantized by the quantizer that
claims kind ``gate`` (the records used int8 per row), small ones stay float.

Evidence (records, 8×H100): dense gate + int8 gate quantization + CaseOps −0.00644 BPB vs #1626
(bundle); sparse gate "no measurable BPB cost" with 44 K fewer parameters; output gate ≈1.5 %
throughput cost, no isolated delta. Measured with pgolf on CPU (the baseline shrunk to 4 layers ×
64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337 / 1338; ``python
bench/technique_effects.py --only gated_attention``): sparse gate: Δval_bpb −0.0053 (−0.0040,
−0.0065).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import (
    Ctx,
    Kind,
    Layers,
    LayerSelector,
    Params,
    PgolfError,
    Role,
    Technique,
    hook,
    register,
    set_role,
)


class GatedAttentionParams(Params):
    variant: Literal["dense", "sparse", "output"] = Field(
        "sparse", description="dense σ(W_g n) over all of n; sparse σ(α·W n[:width]); output 2σ(W n[:width])"
    )
    width: int = Field(12, ge=1, description="sparse/output: leading channels of n_t the gate reads")
    scale: float = Field(0.5, gt=0.0, description="sparse: α, the gate's input scale")
    init_std: float = Field(0.005, ge=0.0, description="dense: std of W_g's normal init")
    layers: Layers = Field(LayerSelector.parse("all"), description="layers whose attention output is gated")


def head_gates(n: Tensor, weight: Tensor, scale: float = 1.0, mult: float = 1.0) -> Tensor:
    """mult·σ(scale·n Wᵀ): gates (B,T,H) from n (B,T,w) and weight (H,w)."""
    return mult * torch.sigmoid(scale * (n @ weight.to(n.dtype).T))


def gate_heads(y: Tensor, gates: Tensor) -> Tensor:
    """y (B,T,H,Dh) with every head scaled by its gate (B,T,H)."""
    return y * gates.to(y.dtype).unsqueeze(-1)


class AttentionGate(nn.Module):
    def __init__(self, num_heads: int, in_dim: int, scale: float, mult: float, init_std: float):
        super().__init__()
        self.in_dim, self.scale, self.mult = in_dim, scale, mult
        self.weight = nn.Parameter(torch.zeros(num_heads, in_dim))
        if init_std > 0:
            nn.init.normal_(self.weight, std=init_std)
        set_role(self.weight, Role.GATE, Kind.GATE)

    def forward(self, y: Tensor, ctx: Ctx) -> Tensor:
        assert ctx.attn_input is not None
        n = ctx.attn_input[..., : self.in_dim]
        return gate_heads(y, head_gates(n, self.weight, self.scale, self.mult))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, scale={self.scale:g}, mult={self.mult:g}"


@register("gated_attention")
class GatedAttention(Technique):
    """Gated attention: a per-head sigmoid gate, computed from the block's normalised input, scales
    each head's attention output before the output projection."""

    Params = GatedAttentionParams
    params: GatedAttentionParams

    @hook
    def attn_out(self, layer: int) -> AttentionGate | None:
        p, spec = self.params, self.spec
        if layer not in p.layers.resolve(spec.num_layers):
            return None
        if p.variant == "dense":
            return AttentionGate(spec.num_heads, spec.model_dim, 1.0, 1.0, p.init_std)
        if p.width > spec.model_dim:
            raise PgolfError(
                f"techniques.gated_attention.width={p.width} is more than model.model_dim={spec.model_dim}"
            )
        scale, mult = (p.scale, 1.0) if p.variant == "sparse" else (1.0, 2.0)
        return AttentionGate(spec.num_heads, p.width, scale, mult, 0.0)
