"""Parallel residuals (GPT-J single stream): from a start layer on, attention and MLP both read
the block's input and are added to the residual together, x ← x + A(x) + M(x).

What: for physical layers ℓ ≥ ``start_layer``, with x the block's input after resid_mix,
A(x) = attn_scale ⊙ Attn(norm x) and M(x) = mlp_scale ⊙ MLP(norm x) (the block's own branches,
norms and scales included): x ← x + A(x) + M(x). Earlier layers keep the sequential
x ← x + A(x); x ← x + M(x). No parameters.

Why: the two branches no longer wait on each other (one norm input, fusable matmuls), and late
layers lose little from not seeing their own attention output in the MLP; the records also found
a smaller quantization gap.

Source: GPT-J (Wang & Komatsuzaki, 2021); parameter-golf
``R/2026-04-06_SP8192_HessianSDClip_ProgressiveRecurrence`` and
``R/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT`` (start layer 7 of 11). The two-lane
variants (``R/2026-03-31``, ``R/2026-04-08``, 04-10+) are different techniques.

Sites: the ``block`` slot of layers ``start_layer`` … L−1.

Interactions: mutually exclusive with other residual-wiring techniques on the same layer (two-lane
variants); with depth recurrence every pass of a physical layer ≥ start is parallel.

Evidence (records, 8×H100): part of the 04-06 / 04-09 stacks (1.0835 / 1.0810), tightened the
quantization gap; the lane variant gave −0.0022 BPB (``R/2026-03-31``, one sample). Not yet
measured with pgolf.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Params, PgolfError, Technique, hook, register


class ParallelResidualsParams(Params):
    start_layer: int = Field(7, ge=0, description="first physical layer whose branches run in parallel")


class ParallelResidual(nn.Module):
    """x + A(x) + M(x): both branches read the same input."""

    def forward(self, x: Tensor, block: Any, ctx: Ctx) -> Tensor:
        return x + block.attn_branch(x, ctx) + block.mlp_branch(x, ctx)


@register("parallel_residuals")
class ParallelResiduals(Technique):
    """Parallel residuals (GPT-J single stream): from a start layer on, attention and MLP both read
    the block's input and are added to the residual together, x ← x + A(x) + M(x)."""

    Params = ParallelResidualsParams
    params: ParallelResidualsParams
    contract_params: ClassVar[dict[str, Any]] = {"start_layer": 1}  # the contract models have 2 and 4 layers

    @hook
    def block(self, layer: int) -> ParallelResidual | None:
        n = self.spec.num_layers
        if self.params.start_layer >= n:
            raise PgolfError(
                f"techniques.parallel_residuals.start_layer={self.params.start_layer} leaves no layer of "
                f"model.num_layers={n}; allowed: 0 … {n - 1}"
            )
        return ParallelResidual() if layer >= self.params.start_layer else None
