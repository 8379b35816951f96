"""Row-wise integer quantization shared by the quantizers (``rtn``, ``gptq``) and QAT (``qat``,
``late_qat``): the scale rules, round-to-nearest, the stored form and its dequantization, the
worst-case error. One piece of code, so a fake-quantized training forward and the export's codes
use the same grid bit for bit.

Grid. A matrix W (R rows = outputs, C columns = inputs) at b bits has q_max = 2^(b−1) − 1 and one
scale s_r per row, fixed before any rounding and held at the value that is stored (fp16, at least
its smallest positive value 2^−24). Codes are q = clamp(round(w/s_r), −q_max, q_max) (round half
to even, as ``torch.round``) and Ŵ = q·s_r.

Scale rules (``clip``):

* ``sdclip`` — SDClip: s_r = k·std(W_r)/q_max with the population std (a constant row takes
  max|W_r|/q_max); optionally Hessian-aware: s_r ← s_r·(1 + λ(ρ_r − 1)) with the row importance
  ρ_r = mean_j(|W_rj|·d_j/mean(d)) / mean_r(·), d the (damped) Hessian diagonal (gptq only).
  Source: ``R/2026-04-05`` (k = 12.85), ``R/2026-04-06_…HessianSDClip…`` (λ = 0.175).
* ``percentile`` — GPTQ-lite: per row (or per tensor) the candidate s = quantile_p(|W_r|)/q_max of
  ``percentiles`` whose round-to-nearest squared error is lowest (first candidate on ties).
  Source: ``R/2026-03-22_11L_EMA_GPTQ-lite…``.
* ``absmax`` — s_r = max|W_r|/q_max (the records' STE QAT grid).

``scale_floor`` applies the baseline's floor s_r ≥ 1/q_max (GPTQ-lite's ``max(clip/31, 1/31)``).

Stored form (``rowwise`` codes): ``{"q": int8 (R,C), "scale": fp16 (R,)}``, and for AWQ-lite
columns kept at a higher precision ``"hi_cols": int32 (n,)``, ``"hi_scale": fp16 (R,)``: those
columns use the second scale. :func:`code_steps` gives each code's step, which dequantization
and selective pruning share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, Field, model_validator
from torch import Tensor, nn

from pgolf.registry import Ctx, Kind, ParamInfo, Params, Role, Technique, TensorScope, hook
from pgolf.registry.api.errors import RunFailed
from pgolf.registry.api.roles import BLOCK_MATRIX_KINDS

FP16_MIN = 2.0**-24  # smallest positive fp16 (subnormal): scales never round to 0
FP16_MAX = 65504.0
KIND_NAMES = tuple(k.value for k in Kind)


def _per_kind(value: Any) -> Any:
    if isinstance(value, Mapping):
        bad = [k for k in value if k != "default" and k not in KIND_NAMES]
        if bad:
            raise ValueError(f"unknown kind {bad[0]!r}; keys are 'default' or kinds: {', '.join(KIND_NAMES)}")
        if "default" not in value:
            raise ValueError("a per-kind mapping needs a 'default' entry, e.g. {default: 6, embed: 7}")
    return value


Bits = Annotated[int, Field(ge=2, le=8)]
ClipK = Annotated[float, Field(gt=0, le=1000)]
Percentile = Annotated[float, Field(gt=50, le=100)]
PerKindBits = Annotated[Bits | dict[str, Bits], AfterValidator(_per_kind)]
PerKindK = Annotated[ClipK | dict[str, ClipK], AfterValidator(_per_kind)]
Clip = Literal["sdclip", "percentile", "absmax"]


def for_kind(value: Any, kind: Kind) -> Any:
    """The entry of a per-kind parameter for ``kind`` (a plain value applies to every kind)."""
    if isinstance(value, Mapping):
        return value.get(kind.value, value["default"])
    return value


class RowGridParams(Params):
    """The grid of a row-wise integer quantizer: bits and scale rule (per kind where it matters)."""

    bits: PerKindBits = Field(6, description="bit width: one value, or {default: 6, embed: 7, ...} by kind")
    clip: Clip = Field(
        "sdclip", description="scale rule: sdclip (k·std), percentile (GPTQ-lite search) or absmax"
    )
    sdclip_k: PerKindK = Field(
        12.85, description="k of SDClip s = k·std/q_max: one value or by kind (records: embed 14-20)"
    )
    percentiles: tuple[Percentile, ...] = Field(
        (99.9, 99.95, 99.99, 99.999, 100.0),
        min_length=1,
        description="clip percentiles of |w| tried (clip: percentile, GPTQ-lite)",
    )
    percentile_search: Literal["row", "tensor"] = Field(
        "row", description="GPTQ-lite picks a percentile per row, or one per tensor (the 03-22 code)"
    )
    scale_floor: bool = Field(False, description="floor every scale at 1/q_max (the baseline's rule)")

    @model_validator(mode="after")
    def _per_kind_entries_are_in_scope(self) -> RowGridParams:
        """A per-kind entry for a kind the technique never applies to would do nothing
        (``bits: {default: 6, embed: 8}`` under a quantizer's ``scope: matrices`` left the
        embedding to the default quantizer; under a QAT's ``kinds`` it trains nothing at 8 bits):
        refused, naming the entry and the scope or kinds."""
        scope = getattr(self, "scope", None)
        kinds = getattr(self, "kinds", None)
        if isinstance(scope, TensorScope):
            applies, where = scope.may_claim_kind, f"the scope {scope} never claims"
            fix = "add {key} to the scope (e.g. scope: [matrices, {key}])"
        elif kinds is not None:
            applies, where = (lambda k: k in kinds), f"kinds {[k.value for k in kinds]} never include"
            fix = "add {key} to the kinds (e.g. kinds: [..., {key}])"
        else:
            return self
        for field in ("bits", "sdclip_k"):
            value = getattr(self, field)
            if not isinstance(value, Mapping):
                continue
            for key in value:
                if key != "default" and not applies(Kind(key)):
                    raise ValueError(
                        f"{field}.{key}: {where} {key} tensors, so this entry would do nothing; "
                        f"{fix.format(key=key)} or remove the entry"
                    )
        return self


class FakeQuantParams(RowGridParams):
    """The grid a QAT technique trains for (the export's bits and scale rule) and the Linear kinds
    it fake-quantizes (``qat``, ``late_qat``)."""

    clip: Clip = Field(
        "absmax", description="scale rule of the export it trains for: absmax, sdclip, percentile"
    )
    kinds: tuple[Kind, ...] = Field(
        BLOCK_MATRIX_KINDS, min_length=1, description="Linear kinds trained through fake quantization"
    )


@dataclass(frozen=True)
class Grid:
    """The grid of one tensor: q_max and how its row scales are chosen."""

    qmax: int
    clip: str = "sdclip"
    k: float = 12.85
    percentiles: tuple[float, ...] = (99.9, 99.95, 99.99, 99.999, 100.0)
    per_tensor: bool = False
    floor: bool = False

    @classmethod
    def of(cls, p: RowGridParams, kind: Kind) -> Grid:
        return cls(
            qmax=qmax_of(int(for_kind(p.bits, kind))),
            clip=p.clip,
            k=float(for_kind(p.sdclip_k, kind)),
            percentiles=tuple(p.percentiles),
            per_tensor=p.percentile_search == "tensor",
            floor=p.scale_floor,
        )

    def with_qmax(self, qmax: int) -> Grid:
        return Grid(qmax, self.clip, self.k, self.percentiles, self.per_tensor, self.floor)

    def scales(self, w: Tensor, adjust: Tensor | None = None) -> Tensor:
        """The stored row scales (R,) of w (R,C) on this grid (``adjust``: per-row factors of
        the clip, Hessian-aware SDClip)."""
        return row_scales(w, self, adjust)


def qmax_of(bits: int) -> int:
    return int(2 ** (bits - 1) - 1)


def fp16_round(x: Tensor) -> Tensor:
    """x (fp32, 0 ≤ x ≤ 65,504) rounded to the nearest fp16 value (ties to even), kept in fp32:
    equal to ``x.half().float()``, written with integer and power-of-two arithmetic so that
    ``torch.compile`` keeps the rounding (inductor may elide a ``.half().float()`` round trip)."""
    bits = x.float().contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    normal = ((bits + 0x0FFF + lsb) & ~0x1FFF).view(torch.float32)  # 10 mantissa bits, ties to even
    subnormal = torch.round(x.float() * 2.0**24) * 2.0**-24  # below 2^-14: steps of 2^-24
    return torch.where(x < 2.0**-14, subnormal, normal)


def stored_scale(scale: Tensor) -> Tensor:
    """The fp32 value of each scale as it is stored (fp16, at least its smallest positive value)."""
    return fp16_round(scale.float().clamp(FP16_MIN, FP16_MAX))


def round_to_nearest(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Codes clamp(round(w / s_r), −q_max, q_max) of w (R,C) with row scales s (R,) (float, exact ints)."""
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)


def row_quantile(x: Tensor, q: float) -> Tensor:
    """Per-row quantile of x (R,C) with torch.quantile's 'linear' rule, without its size limit."""
    srt = x.sort(dim=1).values
    pos = q * (x.shape[1] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, x.shape[1] - 1)
    return srt[:, lo] + (srt[:, hi] - srt[:, lo]) * (pos - lo)


def _floored(clip: Tensor, qmax: int, floor: bool) -> Tensor:
    s = clip / qmax
    return stored_scale(s.clamp_min(1.0 / qmax) if floor else s)


def sdclip_scales(
    w: Tensor, qmax: int, k: float, adjust: Tensor | None = None, floor: bool = False
) -> Tensor:
    """s_r = k·std(W_r)·adjust_r/q_max (population std), as stored; a row whose std is 0
    (constant or zero) takes max|W_r|/q_max instead."""
    w32 = w.float()
    std = w32.std(dim=1, correction=0)
    clip = torch.where(std > 0, k * std * (adjust if adjust is not None else 1.0), w32.abs().amax(dim=1))
    return _floored(clip, qmax, floor)


def absmax_scales(w: Tensor, qmax: int, floor: bool = False) -> Tensor:
    """s_r = max|W_r|/q_max, as stored."""
    return _floored(w.float().abs().amax(dim=1), qmax, floor)


def percentile_scales(
    w: Tensor, qmax: int, percentiles: tuple[float, ...], *, per_tensor: bool = False, floor: bool = False
) -> Tensor:
    """Per row (or one for the whole tensor), the candidate s = quantile_p(|W_r|)/q_max (as
    stored) with the lowest round-to-nearest squared error (first candidate on ties)."""
    w32 = w.float()
    rows = w32.shape[0]
    best_err = torch.full((rows,), math.inf)
    best = torch.ones(rows)
    for p in percentiles:
        if per_tensor:
            flat = w32.abs().reshape(1, -1)
            s = _floored(row_quantile(flat, p / 100.0).expand(rows), qmax, floor)
        else:
            s = _floored(row_quantile(w32.abs(), p / 100.0), qmax, floor)
        err = (w32 - round_to_nearest(w32, s, qmax) * s[:, None]).square().sum(dim=1)
        if per_tensor:
            err = err.sum().expand(rows)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def row_scales(w: Tensor, grid: Grid, adjust: Tensor | None = None) -> Tensor:
    """The stored row scales (R,) of w (R,C) under ``grid``'s rule."""
    if grid.clip == "sdclip":
        return sdclip_scales(w, grid.qmax, grid.k, adjust, grid.floor)
    if grid.clip == "percentile":
        return percentile_scales(w, grid.qmax, grid.percentiles, per_tensor=grid.per_tensor, floor=grid.floor)
    return absmax_scales(w, grid.qmax, grid.floor)


def hessian_row_adjust(w: Tensor, h_diag: Tensor, lam: float) -> Tensor:
    """Hessian-aware SDClip's per-row clip factor 1 + λ(ρ_r − 1): column importance
    d_j/mean(d) (d the damped Hessian diagonal, at least 1e-8), ρ_r = mean_j |W_rj|·importance_j,
    normalised to mean 1 over the rows (``R/2026-04-06``)."""
    d = h_diag.double().clamp_min(1e-8)
    col = d / d.mean()
    rho = (w.double().abs() * col[None, :]).mean(dim=1)
    rho = rho / rho.mean().clamp_min(1e-30)
    return (1.0 + lam * (rho - 1.0)).float()


def fake_quantize(w: Tensor, grid: Grid) -> Tensor:
    """Q(W) = s_r·clamp(round(W/s_r)) on ``grid`` (the values; 2-D and higher: rows = all but
    the last dimension), in W's dtype. Equal to what round-to-nearest export stores for W."""
    w32 = w.detach().float().reshape(-1, w.shape[-1])
    s = row_scales(w32, grid)
    return (round_to_nearest(w32, s, grid.qmax) * s[:, None]).reshape(w.shape).to(w.dtype)


def ste(w: Tensor, quantized: Tensor) -> Tensor:
    """W + stopgrad(Q − W): the values of Q, the gradient of the identity."""
    return w + (quantized - w).detach()


# --------------------------------------------------------------------------------------------
# The stored form
# --------------------------------------------------------------------------------------------


def pack_codes(
    q: Tensor, scale: Tensor, hi_cols: Tensor | None = None, hi_scale: Tensor | None = None
) -> dict[str, Tensor]:
    """The stored form of codes q (R,C) with stored row scales (R,): int8 codes, fp16 scales
    (and the higher-precision columns with their own scales)."""
    data = {"q": q.to(torch.int8), "scale": scale.half()}
    if hi_cols is not None and hi_cols.numel() and hi_scale is not None:
        data["hi_cols"] = hi_cols.to(torch.int32)
        data["hi_scale"] = hi_scale.half()
    return data


def is_rowwise(data: Mapping[str, Any]) -> bool:
    """Whether a stored entry holds row-wise codes: an int8 matrix ``q`` and one scale per row."""
    q, s = data.get("q"), data.get("scale")
    return (
        isinstance(q, Tensor)
        and isinstance(s, Tensor)
        and q.dtype == torch.int8
        and q.ndim == 2
        and s.ndim == 1
        and s.numel() == q.shape[0]
    )


def code_steps(data: Mapping[str, Tensor]) -> Tensor:
    """The step (fp32, (R,C)) of every code of a row-wise entry: its row's scale, or the
    higher-precision scale in ``hi_cols``."""
    q = data["q"]
    steps = data["scale"].float()[:, None].expand(q.shape).clone()
    cols = data.get("hi_cols")
    if cols is not None and cols.numel():
        steps[:, cols.long()] = data["hi_scale"].float()[:, None]
    return steps


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Ŵ = q·s_r in fp32 (codes (R,C), scales (R,))."""
    return q.float() * scale.float()[:, None]


def dequantize_codes(data: Mapping[str, Tensor]) -> Tensor:
    """Ŵ of a row-wise entry (fp32): each code times its step."""
    if "hi_cols" not in data:
        return dequantize(data["q"], data["scale"])
    return data["q"].float() * code_steps(data)


def rtn_error_bound(w: Tensor, steps: Tensor, qmax: Tensor | int) -> float:
    """Worst-case ‖W − Ŵ‖_F of round-to-nearest on a grid with these (stored) steps ((R,) per
    row or (R,C) per code; q_max an int or (C,) per column): an element within the range is off
    by at most s/2, a clipped one by |w| − q_max·s."""
    w32 = w.double()
    s = steps.double()
    if s.ndim == 1:
        s = s[:, None]
    qm = qmax.double()[None, :] if isinstance(qmax, Tensor) else float(qmax)
    per = torch.maximum(s / 2, w32.abs() - qm * s)
    return float(per.square().sum().sqrt())


# --------------------------------------------------------------------------------------------
# The quantizer slot, shared by rtn and gptq
# --------------------------------------------------------------------------------------------


class RowQuantizer(Technique):
    """Base of the row-wise integer quantizers: claims 2-D tensors in ``scope``, stores
    row-wise codes (:func:`pack_codes`), dequantizes them (:func:`dequantize_codes`)."""

    params: Any
    size_estimate_note = (
        "trained rows are heavier-tailed than the surrogate's N(0, 1) draws and take fewer bits on the same "
        "grid (a Gaussian has the most entropy for its variance), so the estimate errs high: +1.0 to +2.1 % "
        "on a 2×64 model after 50 CPU steps (every grid and codec)"
    )
    size_estimate_high = 0.03

    def grid(self, kind: Kind) -> Grid:
        return Grid.of(self.params, kind)

    @hook
    def claims(self, info: ParamInfo) -> bool:
        return len(info.shape) == 2 and info.role != Role.ADAPTER and self.params.scope.contains(info)

    @hook
    def dequantize(self, data: dict[str, Tensor]) -> Tensor:
        return dequantize_codes(data)


def check_finite(name: str, w: Tensor, who: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise RunFailed(f"tensor {name} holds NaN or inf values; refusing to export it ({who})")


class FakeQuantWeight(nn.Module):
    """QAT's ``linear_weight`` module: the weight as is while ``switch`` is off;
    W + stopgrad(Q(W) − W) on ``grid`` while it is on (Q = :func:`fake_quantize`)."""

    def __init__(self, grid: Grid, switch: str):
        super().__init__()
        self.grid, self.switch = grid, switch

    def forward(self, w: Tensor, ctx: Ctx | None) -> Tensor:
        if ctx is None or self.switch not in ctx.switches:
            return w
        return ste(w, fake_quantize(w, self.grid))
