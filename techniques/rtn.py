"""Round-to-nearest: per-row integer codes at 2–8 bits per kind, with SDClip, GPTQ-lite
(percentile search) or absmax scales; the plain reference quantizer.

What: each claimed matrix W (R,C) gets one scale per row s_r from its grid's rule (``clip``: see
``_rowquant``: SDClip s_r = k·std(W_r)/q_max; GPTQ-lite: the clip percentile of |W_r| with the
lowest squared round-to-nearest error, per row or per tensor; absmax s_r = max|W_r|/q_max;
``scale_floor``: s_r ≥ 1/q_max), stored in fp16; codes q = clamp(round(w/s_r), −q_max, q_max),
q_max = 2^(b−1) − 1, stored as int8; Ŵ = q·s_r. Bits may differ by kind (mixed precision: e.g.
``{default: 6, mlp_up: 5, mlp_down: 5, embed: 8}``).

Why: the reference every other quantizer is measured against (GPTQ must beat it at the same
bits and scales), and the grid QAT trains on: ``qat`` / ``late_qat`` with the same bits and rule
reproduce its output exactly. GPTQ-lite alone was worth −0.0006 BPB at no training cost.

Source: ``R/2026-03-19_MixedQuant…`` / ``R/2026-03-20_Int6…`` (int5/int6 per category, absmax);
``R/2026-03-22_11L_EMA_GPTQ-lite…`` (percentile search, scale ≥ 1/31); ``R/2026-04-05`` (SDClip).

Sites: the per-tensor ``quantizer`` slot (``claims``, ``quantize``, ``dequantize``,
``error_bound``). Only 2-D tensors are claimed; the rest of the model goes to the default
``int8_rowwise`` (large) or float passthrough (small, control).

Interactions: ``gptq`` uses the same grid and stored form; give the two disjoint scopes to use
both. ``selective_pruning`` and ``lqer`` work on its codes. Its ``error_bound`` is the exact
worst case (half a step per element, or the clipped excess).

Evidence (records, 8×H100): int6 attention + int5 MLP with zstd saved 1.86 MB, spent on a 10th
layer (−0.003 BPB, ``R/2026-03-20``); GPTQ-lite −0.0006 (``R/2026-03-22``). Not yet measured
with pgolf.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from pgolf.registry import ParamInfo, Tensors, TensorScope, hook, register
from pgolf.techniques._rowquant import (
    RowGridParams,
    RowQuantizer,
    check_finite,
    pack_codes,
    round_to_nearest,
    rtn_error_bound,
)


class RTNParams(RowGridParams):
    scope: Tensors = Field(TensorScope.parse("matrices"), description="kinds/roles it claims (2-D only)")


@register("rtn")
class RTN(RowQuantizer):
    """Round-to-nearest: per-row integer codes at 2–8 bits per kind, with SDClip, GPTQ-lite
    (percentile search) or absmax scales; the plain reference quantizer."""

    Params = RTNParams
    params: RTNParams

    @hook
    def quantize(self, name: str, tensor: Tensor, info: ParamInfo) -> dict[str, Tensor]:
        w = tensor.detach().float().cpu()
        check_finite(name, w, "rtn")
        grid = self.grid(info.kind)
        scale = grid.scales(w)
        return pack_codes(round_to_nearest(w, scale, grid.qmax), scale)

    @hook
    def error_bound(self, info: ParamInfo, tensor: Tensor) -> float:
        w = tensor.detach().float().cpu()
        norm = float(w.double().norm())
        if norm == 0:
            return 0.0
        grid = self.grid(info.kind)
        return rtn_error_bound(w, grid.scales(w), grid.qmax) / norm
