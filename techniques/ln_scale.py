"""LN scale: the norm in front of attention and MLP is multiplied by 1/√(ℓ+1), ℓ the block's
physical layer index.

What: the inputs to a block's attention and MLP become RMSNorm(x)·(ℓ+1)^(−1/2), ℓ = physical
layer (0-based). The factor belongs to the physical block, so every pass of a looped (depth-
recurrent) layer reuses it. No parameters.

Why: deeper blocks write smaller updates into the residual stream at init, which keeps the stream's
scale in check as depth grows and stabilises early training of the deeper layers.

Source: parameter-golf ``R/2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248`` (``LN_SCALE=1``);
every later record.

Sites: the ``norm`` slot of its layers.

Interactions: gates that read the normalised input (gated_attention) see the scaled input, as in
the records; another norm technique may fill the slot only on other layers.

Evidence (records, 8×H100): with partial RoPE 1.1271 → 1.1248 (−0.0023 BPB, ``R/2026-03-21``).
Not yet measured with pgolf.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Layers, LayerSelector, Params, Technique, hook, register
from pgolf.registry.run.model import rms_norm


class LNScaleParams(Params):
    layers: Layers = Field(LayerSelector.parse("all"), description="layers whose norm is scaled")


def ln_scale_factor(layer: int) -> float:
    """(ℓ+1)^(−1/2) for physical layer ℓ."""
    return float((layer + 1) ** -0.5)


class ScaledRMSNorm(nn.Module):
    def __init__(self, layer: int):
        super().__init__()
        self.factor = ln_scale_factor(layer)

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        return rms_norm(x) * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6f}"


@register("ln_scale")
class LNScale(Technique):
    """LN scale: the norm in front of attention and MLP is multiplied by 1/√(ℓ+1), ℓ the block's
    physical layer index."""

    Params = LNScaleParams
    params: LNScaleParams

    @hook
    def norm(self, layer: int) -> ScaledRMSNorm | None:
        return ScaledRMSNorm(layer) if layer in self.params.layers.resolve(self.spec.num_layers) else None
