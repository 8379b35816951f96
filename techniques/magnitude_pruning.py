"""Magnitude pruning: before quantization, zero the smallest-magnitude fraction of each large
matrix, so the quantized codes hold more zeros and compress better.

What: for every 2-D float tensor in ``scope`` with more than ``min_numel`` elements, τ = the
``fraction`` quantile of |W| over the whole tensor (torch.quantile's linear rule), and W_ij ← 0
where |W_ij| < τ. Other tensors pass unchanged. Runs on the float state the quantizers receive
(after the training-side weight averaging: EMA / SWA swap in at ``finalize``).

Why: quantized codes are entropy-coded; zeros that were already near zero cost little accuracy
and make the code distribution more peaked.

Source: parameter-golf ``R/2026-03-20_10L_Int5MLP_MuonWD04_SWA50`` (3 %, after SWA, tensors over
65,536 elements).

Sites: the ``float_state`` chain (before the per-tensor quantizers).

Interactions: the quantizers' ``error_bound`` is checked against the pruned weights (pruning is a
change of the model, not quantization error). With SDClip the row std shrinks a little, so the
grid gets finer. ``selective_pruning`` prunes after quantization toward a byte target instead.

Evidence (records, 8×H100): part of the 03-20 int5-MLP record (no isolated number). Not yet
measured with pgolf.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import ParamInfo, Params, Role, Technique, Tensors, TensorScope, hook, register
from pgolf.techniques._rowquant import row_quantile


class MagnitudePruningParams(Params):
    fraction: float = Field(
        0.03, gt=0, lt=1, description="share of each tensor's entries zeroed (smallest |w|)"
    )
    scope: Tensors = Field(TensorScope.parse("all"), description="kinds/roles pruned (2-D float tensors)")
    min_numel: int = Field(65_536, ge=0, description="only tensors with more elements than this")


def prune(w: Tensor, fraction: float) -> Tensor:
    """W with every entry of |W| below the ``fraction`` quantile of |W| set to 0."""
    a = w.detach().abs().float()
    tau = row_quantile(a.reshape(1, -1), fraction)[0]
    return torch.where(a < tau, torch.zeros_like(w), w)


@register("magnitude_pruning")
class MagnitudePruning(Technique):
    """Magnitude pruning: before quantization, zero the smallest-magnitude fraction of each large
    matrix, so the quantized codes hold more zeros and compress better."""

    Params = MagnitudePruningParams
    params: MagnitudePruningParams
    contract_params: ClassVar[dict[str, Any]] = {"min_numel": 0}  # the contract models are tiny

    @hook
    def float_state(self, state: dict[str, Tensor], infos: dict[str, ParamInfo]) -> dict[str, Tensor]:
        p = self.params
        out = dict(state)
        for name, t in state.items():
            info = infos.get(name)
            if (
                info is None
                or info.role in (Role.SCALAR, Role.ADAPTER)
                or not t.is_floating_point()
                or t.ndim != 2
                or t.numel() <= p.min_numel
                or not p.scope.contains(info)
            ):
                continue
            out[name] = prune(t, p.fraction)
        return out
