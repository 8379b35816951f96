"""Baseline int8 export: per-row int8 for large tensors; small and control tensors kept as floats.

What: every float tensor with more than ``keep_float_max_numel`` elements is quantized to int8,
per row for matrices (clip at the ``clip_percentile``-th percentile of |w| in the row,
scale = max(clip/127, 1/127) stored in fp16, q = round(clamp(w)/scale) ∈ [−127, 127]) and with
one scale for other shapes. Smaller tensors are stored as fp16, except ``scalar``-role
(control) tensors, which stay fp32. Non-float tensors are stored as they are.

Why: the challenge baseline's export (``quantize_state_dict_int8``); int8 + zlib gets
the 17.06 M-parameter baseline to 15.8 MB (3.9× smaller than fp32).

Source: openai/parameter-golf ``train_gpt.py`` (2026-03-17 naive baseline).

Interactions: fills the exclusive ``quantizer`` slot (the default when a stack names none);
replaced by GPTQ-style quantizers. The policy is decided by parameter role, not by name.

Evidence: baseline 1.2172 → 1.2244 val_bpb after the int8 round trip
(``R/2026-03-17_NaiveBaseline/train.log``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import Params, Role, Technique, hook, register

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMAT = "int8_rowwise/1"


class Int8RowwiseParams(Params):
    clip_percentile: float = Field(99.99984, gt=50, le=100, description="per-row clip percentile of |w|")
    keep_float_max_numel: int = Field(65_536, ge=0, description="tensors this small are stored as floats")
    keep_float_dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="dtype of small tensors")


def _quantile(x: Tensor, q: float, dim: int | None = None) -> Tensor:
    """torch.quantile with the 'linear' rule, also for tensors above its 16M-element limit."""
    if dim is not None or x.numel() <= (1 << 24):
        return torch.quantile(x, q) if dim is None else torch.quantile(x, q, dim=dim)
    flat = x.flatten().sort().values
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.numel() - 1)
    return flat[lo] + (flat[hi] - flat[lo]) * (pos - lo)


def quantize_rows(w: Tensor, clip_percentile: float) -> tuple[Tensor, Tensor]:
    """Per-row int8 of a 2-D tensor: (q int8 (R,C), scale fp32 (R,))."""
    w32 = w.float()
    if w32.numel() == 0:
        return torch.zeros_like(w32, dtype=torch.int8), torch.ones(w32.shape[0])
    clip = _quantile(w32.abs(), clip_percentile / 100.0, dim=1)
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    clipped = torch.maximum(torch.minimum(w32, clip[:, None]), -clip[:, None])
    q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_whole(w: Tensor, clip_percentile: float) -> tuple[Tensor, Tensor]:
    """One int8 scale for a whole tensor of any shape."""
    w32 = w.float()
    clip = _quantile(w32.abs(), clip_percentile / 100.0) if w32.numel() else torch.tensor(0.0)
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    q = torch.clamp(torch.round(w32.clamp(-clip, clip) / scale), -127, 127).to(torch.int8)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    s = scale.float()
    if s.ndim == 1 and q.ndim >= 1 and s.numel() == q.shape[0] and q.ndim > 1:
        s = s.view(q.shape[0], *([1] * (q.ndim - 1)))
    return (q.float() * s).to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@register("int8_rowwise")
class Int8Rowwise(Technique):
    """Baseline int8 export: per-row int8 for large tensors; small and control tensors kept as floats."""

    Params = Int8RowwiseParams
    params: Int8RowwiseParams

    @hook
    def quantize(self, state: dict[str, Tensor], roles: dict[str, Role]) -> dict[str, Any]:
        p = self.params
        out: dict[str, Any] = {
            "format": FORMAT,
            "quantized": {},
            "scales": {},
            "dtypes": {},
            "passthrough": {},
        }
        for name, t in state.items():
            out["dtypes"][name] = _dtype_name(t.dtype)
            if not t.is_floating_point():
                out["passthrough"][name] = t
            elif roles.get(name) == Role.SCALAR:
                out["passthrough"][name] = t.float()
            elif t.numel() <= p.keep_float_max_numel:
                out["passthrough"][name] = t.to(_DTYPES[p.keep_float_dtype])
            else:
                q, s = (
                    quantize_rows(t, p.clip_percentile)
                    if t.ndim == 2
                    else quantize_whole(t, p.clip_percentile)
                )
                out["quantized"][name] = q
                out["scales"][name] = s.to(torch.float16)
        return out

    @hook
    def dequantize(self, packed: dict[str, Any]) -> dict[str, Tensor]:
        if packed.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} artifact (format={packed.get('format')!r})")
        state: dict[str, Tensor] = {}
        for name, dtype_name in packed["dtypes"].items():
            dtype = getattr(torch, dtype_name)
            if name in packed["quantized"]:
                state[name] = dequantize(packed["quantized"][name], packed["scales"][name], dtype)
            else:
                state[name] = packed["passthrough"][name].to(dtype)
        return state
