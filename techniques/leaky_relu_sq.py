"""LeakyReLU(slope)² MLP activation: φ(u) = max(u, slope·u)² instead of relu².

What: MLP(x) = W_down φ(W_up x) with φ(u) = (max(u, s·u))²; s = 0 is the baseline's relu².
Why: keeps a (small, squared) gradient for negative pre-activations, so fewer hidden units die.
Source: parameter-golf PR #493, ``R/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon`` (s = 0.5).
Interactions: fills the ``mlp_act`` slot of its layers (two activation techniques may not
share a layer); a fused Triton up-projection + activation kernel appears in ``R/2026-04-10``.
Evidence (records, 8×H100): −0.0021 BPB post-TTT in the seed-1337 ablation, "−0.003" quoted
from PR #493; negligible in one non-record study. Not yet measured with pgolf.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Layers, LayerSelector, Params, Technique, hook, register


class LeakyReluSqParams(Params):
    slope: float = Field(0.5, ge=0.0, le=1.0, description="negative slope s; 0 gives relu²")
    layers: Layers = Field(LayerSelector.parse("all"), description="layers whose MLP uses it")


def leaky_relu_sq(u: Tensor, slope: float) -> Tensor:
    return F.leaky_relu(u, negative_slope=slope).square()


class LeakyReluSquared(nn.Module):
    def __init__(self, slope: float):
        super().__init__()
        self.slope = slope

    def forward(self, u: Tensor) -> Tensor:
        return leaky_relu_sq(u, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


@register("leaky_relu_sq")
class LeakyReluSq(Technique):
    """LeakyReLU(slope)² MLP activation: φ(u) = max(u, slope·u)² instead of relu²."""

    Params = LeakyReluSqParams
    params: LeakyReluSqParams

    @hook
    def mlp_act(self, layer: int) -> nn.Module | None:
        return (
            LeakyReluSquared(self.params.slope)
            if layer in self.params.layers.resolve(self.spec.num_layers)
            else None
        )
