"""XSA, exclusive self-attention: remove from each head's output its component along the
token's own value vector.

What: after attention, for token t and head h with KV group g(h):
v̂ = v_{t,g}/‖v_{t,g}‖,  y_{t,h} ← y_{t,h} − (y_{t,h}·v̂) v̂. Zero parameters. The GQA-efficient
form views the heads as (kv_heads, group) and broadcasts v̂ instead of repeating it.
``gated: true`` (gated / learnable XSA): y_{t,h} ← y_{t,h} − tanh(α_h)(y_{t,h}·v̂) v̂ with a learned
per-head α_h starting at ``gate_init`` (0: the layer starts without XSA and learns how much to
remove; H parameters per layer, role ``scalar``). ``repeats: false`` applies it only on the first
pass of a looped layer (``ctx.repeat == 0``).

Why: attention tends to copy a token's own value back into its output; removing that
direction makes the layer spend its output on context (arXiv:2603.09078).

Source: arXiv:2603.09078; parameter-golf ``R/2026-03-20_11L_EfficientPartialXSA_FA3_SWA120``
(last 3 layers), ``R/2026-03-20_11L_XSA4_EMA…`` (last 4), all layers from ``R/2026-03-25`` to
PR #2135 (every pass of the looped layers); the gated form after the records' close (§8.2 of the
catalog).

Site: the ``attn_out`` chain of its layers (physical indices; on a looped stack every pass of a
selected layer gets it).

Interactions: acts on the values after any value-side technique; order in the records is
attention → XSA → output gate → output projection. On looped (depth-recurrent) stacks the records
apply it on every pass; on a heavily looped model XSA on every pass was slightly worse
(``N/2026-03-21``), which ``repeats: false`` tests.

Evidence (records, 8×H100): last 3 layers ≈ −0.002 BPB; XSA-all vs XSA-4 −0.0016 (PR #634); ≈2
ms/step with the efficient form vs ≈7 ms naive. Measured with pgolf on CPU (the baseline shrunk to 4
layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337 / 1338; ``python
bench/technique_effects.py --only 'xsa (gated)'``): gated on the last 2 layers: Δval_bpb −0.0013
(−0.0001, −0.0025).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Layers, LayerSelector, Params, Role, Technique, hook, register, set_role


class XSAParams(Params):
    layers: Layers = Field(LayerSelector.parse("last(4)"), description="layers that get XSA")
    gated: bool = Field(False, description="remove tanh(α_h)·(the projection), α_h learned per head")
    gate_init: float = Field(0.0, description="gated: initial α_h (0: no removal at the start)")
    repeats: bool = Field(True, description="also on the repeated passes of a looped layer")


def xsa(y: Tensor, v: Tensor, coef: Tensor | None = None) -> Tensor:
    """y (B,T,H,D) minus its projection on the normalised own value v (B,T,KV,D), GQA-aware; with
    ``coef`` (H,) the projection of head h is scaled by coef[h] first."""
    B, T, H, D = y.shape
    kv = v.size(2)
    yg = y.view(B, T, kv, H // kv, D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)  # (B,T,KV,1,D)
    proj = (yg * vn).sum(-1, keepdim=True) * vn
    if coef is not None:
        proj = proj * coef.to(y.dtype).view(kv, H // kv, 1)
    return (yg - proj).view(B, T, H, D)


class XSAModule(nn.Module):
    def __init__(self, num_heads: int = 0, gated: bool = False, gate_init: float = 0.0, repeats: bool = True):
        super().__init__()
        self.repeats = repeats
        self.alpha = (
            set_role(nn.Parameter(torch.full((num_heads,), gate_init)), Role.SCALAR) if gated else None
        )

    def forward(self, y: Tensor, ctx: Ctx) -> Tensor:
        assert ctx.v is not None
        if not self.repeats and ctx.repeat > 0:
            return y
        return xsa(y, ctx.v, None if self.alpha is None else torch.tanh(self.alpha))


@register("xsa")
class XSA(Technique):
    """XSA, exclusive self-attention: remove from each head's output its component along the
    token's own value vector."""

    Params = XSAParams
    params: XSAParams

    @hook
    def attn_out(self, layer: int) -> nn.Module | None:
        p = self.params
        if layer not in p.layers.resolve(self.spec.num_layers):
            return None
        return XSAModule(self.spec.num_heads, p.gated, p.gate_init, p.repeats)
