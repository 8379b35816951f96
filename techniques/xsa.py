"""XSA, exclusive self-attention: remove from each head's output its component along the
token's own value vector.

What: after attention, for token t and head h with KV group g(h):
v̂ = v_{t,g}/‖v_{t,g}‖,  y_{t,h} ← y_{t,h} − (y_{t,h}·v̂) v̂. Zero parameters. The GQA-efficient
form views the heads as (kv_heads, group) and broadcasts v̂ instead of repeating it.

Why: attention tends to copy a token's own value back into its output; removing that
direction makes the layer spend its output on context (arXiv:2603.09078).

Source: arXiv:2603.09078; parameter-golf ``R/2026-03-20_11L_EfficientPartialXSA_FA3_SWA120``
(last 3 layers), ``R/2026-03-20_11L_XSA4_EMA…`` (last 4), all layers from ``R/2026-03-25``.

Site: the ``attn_out`` chain of its layers (physical indices; on a looped stack every pass of a
selected layer gets it).

Interactions: acts on the values after any value-side technique; order in the records is
attention → XSA → output gate → output projection. On looped (depth-recurrent) stacks XSA on
every pass was slightly worse.

Evidence (records, 8×H100): last 3 layers ≈ −0.002 BPB; XSA-all vs XSA-4 −0.0016 (PR #634);
≈2 ms/step with the efficient form vs ≈7 ms naive. Not yet measured with pgolf.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Layers, LayerSelector, Params, Technique, hook, register


class XSAParams(Params):
    layers: Layers = Field(LayerSelector.parse("last(4)"), description="layers that get XSA")


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """y (B,T,H,D) minus its projection on the normalised own value v (B,T,KV,D), GQA-aware."""
    B, T, H, D = y.shape
    kv = v.size(2)
    yg = y.view(B, T, kv, H // kv, D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)  # (B,T,KV,1,D)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


class XSAModule(nn.Module):
    def forward(self, y: Tensor, ctx: Ctx) -> Tensor:
        assert ctx.v is not None
        return xsa(y, ctx.v)


@register("xsa")
class XSA(Technique):
    """XSA, exclusive self-attention: remove from each head's output its component along the
    token's own value vector."""

    Params = XSAParams
    params: XSAParams

    @hook
    def attn_out(self, layer: int) -> nn.Module | None:
        return XSAModule() if layer in self.params.layers.resolve(self.spec.num_layers) else None
