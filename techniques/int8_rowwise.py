"""Baseline int8 export: per-row int8 for matrices, one int8 scale for other shapes.

What: a tensor it claims is stored as int8 codes and fp16 scales. Matrices per row: clip at the
``clip_percentile``-th percentile of |w| in the row, scale = max(clip/127, 1/127),
q = round(clamp(w, ±clip)/scale) ∈ [−127, 127]. Tensors of other shapes: one scale for the whole
tensor, scale = clip/127 with clip the percentile of all |w| (no floor: the baseline's
per-tensor rule). Dequantized ŵ = q·scale.

Why: the challenge baseline's export (``quantize_state_dict_int8``); int8 + zlib gets
the 17.06 M-parameter baseline to 15.8 MB (3.9× smaller than fp32).

Source: openai/parameter-golf ``train_gpt.py`` (2026-03-17 naive baseline).

Interactions: the default of the per-tensor ``quantizer`` slot: it takes every large tensor
(more than ``export.passthrough_max_numel`` elements) that no other quantizer's scope claims; with
``scope`` set it claims only those kinds and roles. Small and control tensors are float
passthrough (the framework's rule). Note the baseline's per-row scale floor 1/127: rows whose
largest value is below 1 are stored on a fixed grid of step 1/127.

Evidence: baseline 1.2172 → 1.2244 val_bpb after the int8 round trip
(``R/2026-03-17_NaiveBaseline/train.log``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import ParamInfo, Params, Technique, Tensors, TensorScope, hook, register


class Int8RowwiseParams(Params):
    clip_percentile: float = Field(99.99984, gt=50, le=100, description="clip percentile of |w|")
    scope: Tensors = Field(TensorScope.parse("all"), description="kinds/roles it claims")


def _quantile(x: Tensor, q: float, dim: int | None = None) -> Tensor:
    """torch.quantile with the 'linear' rule, also for tensors above its 16M-element limit."""
    if dim is not None or x.numel() <= (1 << 24):
        return torch.quantile(x, q) if dim is None else torch.quantile(x, q, dim=dim)
    flat = x.flatten().sort().values
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    return flat[lo] + (flat[hi] - flat[lo]) * (pos - lo)


def row_scales(w: Tensor, clip_percentile: float) -> tuple[Tensor, Tensor]:
    """Per-row (clip, scale) of a 2-D tensor, scale = max(clip/127, 1/127) (fp32, (R,))."""
    w32 = w.float()
    clip = _quantile(w32.abs(), clip_percentile / 100.0, dim=1)
    return clip, (clip / 127.0).clamp_min(1.0 / 127.0)


def whole_scale(w: Tensor, clip_percentile: float) -> tuple[Tensor, Tensor]:
    """One (clip, scale) for a tensor of any shape, scale = clip/127 (1 for an all-zero tensor)."""
    w32 = w.float()
    clip = _quantile(w32.abs(), clip_percentile / 100.0) if w32.numel() else torch.tensor(0.0)
    scale = clip / 127.0
    return clip, torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_rows(w: Tensor, clip_percentile: float) -> tuple[Tensor, Tensor]:
    """Per-row int8 of a 2-D tensor: (q int8 (R,C), scale fp32 (R,))."""
    w32 = w.float()
    if w32.numel() == 0:
        return torch.zeros_like(w32, dtype=torch.int8), torch.ones(w32.shape[0])
    clip, scale = row_scales(w32, clip_percentile)
    clipped = torch.maximum(torch.minimum(w32, clip[:, None]), -clip[:, None])
    q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_whole(w: Tensor, clip_percentile: float) -> tuple[Tensor, Tensor]:
    """One int8 scale for a whole tensor of any shape."""
    w32 = w.float()
    clip, scale = whole_scale(w32, clip_percentile)
    q = torch.clamp(torch.round(w32.clamp(-clip, clip) / scale), -127, 127).to(torch.int8)
    return q, scale


def stored_scale(scale: Tensor) -> Tensor:
    """Scales as stored: fp16 (the baseline's format) unless a scale would overflow it (weights
    above ~8.3 M), then fp32."""
    half = scale.to(torch.float16)
    return half if bool(torch.isfinite(half).all()) else scale.float()


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """q·scale in fp32 (per row for a 2-D code tensor with one scale per row)."""
    s = scale.float()
    if s.ndim == 1 and q.ndim == 2 and s.numel() == q.shape[0]:
        s = s[:, None]
    return q.float() * s


def error_bound(w: Tensor, clip_percentile: float) -> float:
    """Upper bound of ‖ŵ − w‖/‖w‖: every code is off by at most half a step, plus what clipping
    removes, plus 127 times the rounding of the scale to the fp16 that is stored."""
    w32 = w.float()
    if w32.ndim == 2:
        clip, scale = row_scales(w32, clip_percentile)
        clip, scale = clip[:, None], scale[:, None]
    else:
        clip, scale = whole_scale(w32, clip_percentile)
    stored = stored_scale(scale).float()
    per_element = scale / 2 + 127 * (stored - scale).abs() + (w32.abs() - clip).clamp_min(0)
    bound = float((per_element.expand_as(w32) ** 2).sum().sqrt())
    norm = float(w32.norm())
    return bound / norm if norm > 0 else 0.0


@register("int8_rowwise")
class Int8Rowwise(Technique):
    """Baseline int8 export: per-row int8 for matrices, one int8 scale for other shapes."""

    Params = Int8RowwiseParams
    params: Int8RowwiseParams
    size_estimate_note = (
        "rows whose trained max|w| stays below 1 use the fixed 1/127 step (the baseline's floor) and "
        "compress smaller than the surrogate's N(0, 1) rows, so the estimate errs high: +21 to +26 % on a "
        "2×64 model after 50 CPU steps, +0.5 % on the trained baseline (15,900,536 estimated, "
        "15,815,847 real)"
    )
    size_estimate_high = 0.30

    @hook
    def claims(self, info: ParamInfo) -> bool:
        return self.params.scope.contains(info)

    @hook
    def quantize(self, tensor: Tensor) -> dict[str, Tensor]:
        if tensor.ndim == 2:
            q, s = quantize_rows(tensor, self.params.clip_percentile)
        else:
            q, s = quantize_whole(tensor, self.params.clip_percentile)
        return {"q": q, "scale": stored_scale(s)}

    @hook
    def dequantize(self, data: dict[str, Tensor]) -> Tensor:
        return dequantize(data["q"], data["scale"])

    @hook
    def error_bound(self, tensor: Tensor) -> float:
        return error_bound(tensor, self.params.clip_percentile)
