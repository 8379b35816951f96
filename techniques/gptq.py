"""Full-Hessian GPTQ: quantize each matrix column by column, pushing every column's rounding error
onto the columns not yet quantized, weighted by the layer's input Hessian from training batches.

What, per matrix W (rows = outputs, cols = inputs) at b bits, q_max = 2^(b−1) − 1:

1. Hessian H = Σ XᵀX over the calibration tokens, X the inputs the matrix multiplies: forward
   pre-hooks on the real model's Linear modules during the ``calibrate`` event (Q/K/V see the
   normalised attention input, O the attention output, MLP-up the normalised MLP input, MLP-down
   the activation; a layer a depth-recurrent schedule runs twice accumulates both passes). The
   output head's weight (the tied embedding) gets H from the head's input, the final-norm output
   (a pre-hook on the output projection ``model.lm_head``). Sums in fp32 with autocast off; all-reduced across ranks.
2. Per-row scales s_r, fixed before GPTQ and stored in fp16 (the quantization uses the stored
   value): ``sdclip``: s_r = k·std(W_r)/q_max (population std; max|W_r|/q_max for a constant row); ``percentile``: s_r =
   quantile_p(|W_r|)/q_max with p the candidate of ``percentiles`` whose round-to-nearest error of
   row r is lowest. Codes are clamp(round(·/s_r), −q_max, q_max).
3. Dead columns (H_jj = 0: an input never active in calibration): H_jj ← 1 and W_:j ← 0.
   Damping H ← H + λ·mean(diag H)·I, λ = ``damping``.
4. Act-order: columns permuted by descending diag(H).
5. U = upper Cholesky factor of H⁻¹ (damping ×10, up to three times, if the factorisation fails).
6. For column blocks of ``block_size``: for each column j, q_j = clamp(round(w_j/s)), err_j =
   (w_j − s·q_j)/U_jj, w_{j+1…block end} −= err_j·U_{j, j+1…}; after the block, the later columns
   receive the block's errors through U (lazy batch update, identical result).
7. Codes un-permuted, stored as int8 with the fp16 row scales; Ŵ = q·s.

Without a Hessian — the size estimate (built before any training), or a tensor no calibration batch
reached — a tensor falls back to round-to-nearest with the same scales. Every GPTQ result is also
held to a weight-space bound: if ‖W − Ŵ‖_F exceeds ``max_error_ratio`` × the round-to-nearest
worst case (plus the zeroed dead columns) the tensor is stored round-to-nearest instead, so
``error_bound`` is a guarantee the export verifies (``report`` records which tensors took which
path). Only 2-D tensors are claimed.

Why: round-to-nearest minimises each weight's error; GPTQ minimises the layer's output error
‖(W − Ŵ)X‖ on real inputs, which is what the loss sees — at int6 it recovers most of the gap.

Source: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ" (arXiv:2210.17323); parameter-golf
``R/2026-03-25_ValCalib_GPTQ…`` (AR self-generated calibration), ``R/2026-03-29_Loader_FullGPTQ…``
(training batches inside the cap), ``R/2026-04-05_SP8192_GPTQ-Embeddings_SDClip…`` (SDClip
k = 12.85, GPTQ'd tied embedding from the head input), ``R/2026-04-14`` (16 calibration batches),
the ``R/2026-04-29`` compliance rerun (8 s reserve; the defaults).

Sites: the per-tensor ``quantizer`` slot (``claims``, ``quantize``, ``dequantize``,
``error_bound``), the ``calibrate`` event, the ``time_reserve`` chain.

Interactions: calibration reads training batches inside the wall-clock cap (``reserve_seconds`` is
subtracted from it, so ``warmdown_fraction``/``cosine_lr`` fractions account for it); validation
data is never read. pgolf also counts the export, where the GPTQ solve runs (on the device that
gathered the Hessians), against the cap: size the reserve for both (one CPU thread solves a
512×2048 matrix in about 2 s). ``late_qat`` should use the same bits and kinds. After full GPTQ, score-first
TTT became neutral or negative on SP1024 stacks (``R/2026-03-25``, ``R/2026-03-29``); AdamW TTT
destroys GPTQ's narrow minima. Tensors outside ``scope`` go to the default ``int8_rowwise``. The
size estimate uses round-to-nearest codes, whose entropy is slightly below GPTQ's.

Evidence (records, 8×H100): full GPTQ (+ AR calibration, XSA-all, bigger bigram, lzma) −0.0046
BPB vs 1.1194 (``R/2026-03-25``); 64 → 16 calibration batches −0.0013 (72 more training steps,
``R/2026-04-14``); 16 → 32 −0.0002 (PR #2135). Not yet measured with pgolf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from pgolf.registry import (
    CalibrationData,
    Kind,
    ParamInfo,
    Params,
    Role,
    Technique,
    Tensors,
    TensorScope,
    hook,
    register,
)
from pgolf.registry.api.errors import RunFailed
from pgolf.registry.api.roles import param_infos

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


def for_kind(value: Any, kind: Kind) -> Any:
    """The entry of a per-kind parameter for ``kind`` (a plain value applies to every kind)."""
    if isinstance(value, Mapping):
        return value.get(kind.value, value["default"])
    return value


class GPTQParams(Params):
    bits: PerKindBits = Field(6, description="bit width: one value, or {default: 6, embed: 7, ...} by kind")
    scope: Tensors = Field(TensorScope.parse("matrices"), description="kinds/roles it claims (2-D only)")
    clip: Literal["sdclip", "percentile"] = Field("sdclip", description="how the per-row scales are set")
    sdclip_k: PerKindK = Field(
        12.85, description="k of SDClip s = k·std/q_max: one value or by kind (records: embed 15-20)"
    )
    percentiles: tuple[Percentile, ...] = Field(
        (99.9, 99.95, 99.99, 99.999, 100.0),
        min_length=1,
        description="clip percentiles of |w| tried per row (clip: percentile)",
    )
    calibration_batches: int = Field(16, ge=1, le=4096, description="training batches the Hessians see")
    damping: float = Field(0.01, gt=0, le=1, description="λ: H += λ·mean(diag H)·I")
    block_size: int = Field(128, ge=1, le=8192, description="columns per lazy-update block")
    act_order: bool = Field(True, description="quantize columns in descending diag(H) order")
    reserve_seconds: float = Field(
        8.0,
        ge=0,
        le=600,
        description="seconds kept free inside the wall-clock cap for calibration and the solve",
    )
    max_error_ratio: float = Field(
        4.0,
        ge=1,
        le=100,
        description="keep a GPTQ result only if ‖W−Ŵ‖ ≤ this × the round-to-nearest worst case",
    )


# --------------------------------------------------------------------------------------------
# The maths
# --------------------------------------------------------------------------------------------


def stored_scale(scale: Tensor) -> Tensor:
    """The fp32 value of each scale as it is stored (fp16, at least its smallest positive value)."""
    return scale.float().clamp(FP16_MIN, FP16_MAX).half().float()


def round_to_nearest(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Codes clamp(round(w / s_r), −q_max, q_max) of w (R,C) with row scales s (R,) (float, exact ints)."""
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)


def sdclip_scales(w: Tensor, qmax: int, k: float) -> Tensor:
    """s_r = k·std(W_r)/q_max (population std), as stored; a row whose std is 0 (constant or
    zero) takes max|W_r|/q_max instead."""
    w32 = w.float()
    std = w32.std(dim=1, correction=0)
    return stored_scale(torch.where(std > 0, k * std, w32.abs().amax(dim=1)) / qmax)


def row_quantile(x: Tensor, q: float) -> Tensor:
    """Per-row quantile of x (R,C) with torch.quantile's 'linear' rule, without its size limit."""
    srt = x.sort(dim=1).values
    pos = q * (x.shape[1] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, x.shape[1] - 1)
    return srt[:, lo] + (srt[:, hi] - srt[:, lo]) * (pos - lo)


def percentile_scales(w: Tensor, qmax: int, percentiles: tuple[float, ...]) -> Tensor:
    """Per row, the candidate s = quantile_p(|W_r|)/q_max (as stored) with the lowest
    round-to-nearest squared error of that row (first candidate on ties)."""
    w32 = w.float()
    best_err = torch.full((w32.shape[0],), math.inf)
    best = torch.ones(w32.shape[0])
    for p in percentiles:
        s = stored_scale(row_quantile(w32.abs(), p / 100.0))
        err = (w32 - round_to_nearest(w32, s, qmax) * s[:, None]).square().sum(dim=1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def rtn_error_bound(w: Tensor, scale: Tensor, qmax: int) -> float:
    """Worst-case ‖W − Ŵ‖_F of round-to-nearest with these (stored) scales: an element within the
    range is off by at most s/2, a clipped one by |w| − q_max·s."""
    w32 = w.double()
    s = scale.double()[:, None]
    per = torch.maximum(s / 2, w32.abs() - qmax * s)
    return float(per.square().sum().sqrt())


def upper_cholesky_of_inverse(h: Tensor, damping: float, tries: int = 4) -> Tensor | None:
    """U (upper triangular) with UᵀU = (H + λ·mean(diag H)·I)⁻¹; λ grows ×10 when H is not
    positive definite; None when every try fails."""
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for i in range(tries):
        damped = h + damping * 10**i * mean_diag * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            continue
        inv = torch.cholesky_inverse(chol)
        upper, info = torch.linalg.cholesky_ex(inv, upper=True)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper
    return None


def gptq_codes(
    w: Tensor,
    h: Tensor,
    scale: Tensor,
    qmax: int,
    *,
    block_size: int = 128,
    damping: float = 0.01,
    act_order: bool = True,
) -> tuple[Tensor, Tensor] | None:
    """GPTQ codes (R,C) (float tensor of integers in [−q_max, q_max]) of w (R,C) with input
    Hessian h (C,C) and row scales (R,), and the dead-column mask (C,); computed in float64 when
    w is float64, else float32, on h's device. None when H cannot be factorised."""
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = h.device
    W = w.to(dev, dt).clone()
    H = h.to(dev, dt).clone()
    s = scale.to(dev, dt)
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = (
        torch.argsort(H.diagonal(), descending=True, stable=True)
        if act_order
        else torch.arange(cols, device=dev)
    )
    W, H = W[:, perm], H[perm][:, perm]
    U = upper_cholesky_of_inverse(H, damping)
    if U is None:
        return None
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / s), -qmax, qmax)
            Q[:, i1 + i] = q
            err = (col - q * s) / U[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i : i2][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], dead


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Ŵ = q·s_r in fp32 (codes (R,C), scales (R,))."""
    return q.float() * scale.float()[:, None]


# --------------------------------------------------------------------------------------------
# The technique
# --------------------------------------------------------------------------------------------


@dataclass
class TensorReport:
    """How one tensor was quantized: ``gptq``, ``rtn`` (no Hessian), ``rtn-fallback`` (the GPTQ
    result broke the weight-space bound or H could not be factorised)."""

    method: str
    calibration_rows: int
    relative_error: float  # ‖W − Ŵ‖/‖W‖


@register("gptq")
class GPTQ(Technique):
    """Full-Hessian GPTQ: quantize each matrix column by column, pushing every column's rounding error
    onto the columns not yet quantized, weighted by the layer's input Hessian from training batches."""

    Params = GPTQParams
    params: GPTQParams

    def __init__(self, params: GPTQParams, spec: Any):
        super().__init__(params, spec)
        self.hessians: dict[str, Tensor] = {}  # weight name -> Σ XᵀX (cols, cols) fp32
        self.rows: dict[str, int] = {}  # weight name -> calibration rows (tokens × passes) seen
        self.report: dict[str, TensorReport] = {}

    # -- per-tensor choices -------------------------------------------------------------------
    def qmax(self, kind: Kind) -> int:
        return int(2 ** (int(for_kind(self.params.bits, kind)) - 1) - 1)

    def scales(self, w: Tensor, kind: Kind) -> Tensor:
        qmax = self.qmax(kind)
        if self.params.clip == "sdclip":
            return sdclip_scales(w, qmax, float(for_kind(self.params.sdclip_k, kind)))
        return percentile_scales(w, qmax, self.params.percentiles)

    def hessian(self, name: str, cols: int) -> Tensor | None:
        h = self.hessians.get(name)
        return h if h is not None and tuple(h.shape) == (cols, cols) else None

    def _bound(self, w: Tensor, scale: Tensor, qmax: int, h: Tensor | None) -> float:
        """Absolute bound on ‖W − Ŵ‖_F for the path this tensor takes."""
        rtn = rtn_error_bound(w, scale, qmax)
        if h is None:
            return rtn
        dead = (h.diagonal() == 0).cpu()
        zeroed = float(w.double()[:, dead].square().sum())
        return math.sqrt((self.params.max_error_ratio * rtn) ** 2 + zeroed)

    # -- the quantizer slot -------------------------------------------------------------------
    @hook
    def claims(self, info: ParamInfo) -> bool:
        return len(info.shape) == 2 and info.role != Role.ADAPTER and self.params.scope.contains(info)

    @hook
    def quantize(self, name: str, tensor: Tensor, info: ParamInfo) -> dict[str, Tensor]:
        w = tensor.detach().float().cpu()
        if not bool(torch.isfinite(w).all()):
            raise RunFailed(f"tensor {name} holds NaN or inf values; refusing to export it (gptq)")
        qmax = self.qmax(info.kind)
        scale = self.scales(w, info.kind)
        h = self.hessian(name, w.shape[1])
        method = "rtn"
        codes = round_to_nearest(w, scale, qmax)
        if h is not None:
            p = self.params
            got = gptq_codes(
                w, h, scale, qmax, block_size=p.block_size, damping=p.damping, act_order=p.act_order
            )
            method = "rtn-fallback"
            if got is not None:
                g = got[0].cpu()
                if float((w.double() - dequantize(g, scale).double()).norm()) <= self._bound(
                    w, scale, qmax, h
                ):
                    codes, method = g, "gptq"
        err = float((w - dequantize(codes, scale)).norm() / w.norm().clamp_min(1e-30))
        self.report[name] = TensorReport(method, self.rows.get(name, 0), err)
        if method != "gptq" and self.hessians:  # (without calibration, e.g. the size estimate: all rtn)
            self.log(
                f"{name}: {method} (relative error {err:.4f}, {self.rows.get(name, 0)} calibration rows)"
            )
        return {"q": codes.to(torch.int8), "scale": scale.half()}

    @hook
    def dequantize(self, data: dict[str, Tensor]) -> Tensor:
        return dequantize(data["q"], data["scale"])

    @hook
    def error_bound(self, info: ParamInfo, tensor: Tensor) -> float:
        w = tensor.detach().float().cpu()
        norm = float(w.double().norm())
        if norm == 0:
            return 0.0
        qmax = self.qmax(info.kind)
        scale = self.scales(w, info.kind)
        return self._bound(w, scale, qmax, self.hessian(info.name, w.shape[1])) / norm

    # -- calibration ---------------------------------------------------------------------------
    @hook
    def time_reserve(self) -> float:
        return float(self.params.reserve_seconds)

    @hook
    def calibrate(self, model: nn.Module, batches: CalibrationData, switches: tuple[str, ...]) -> None:
        self.hessians, self.rows, self.report = {}, {}, {}
        targets = self.targets(model)
        handles = [
            module.register_forward_pre_hook(self._collector(name)) for name, (module, _) in targets.items()
        ]
        try:
            with torch.no_grad():
                for x in batches.take(self.params.calibration_batches):
                    model.logits(x, switches)  # type: ignore[operator]
        finally:
            for handle in handles:
                handle.remove()
        if dist.is_available() and dist.is_initialized():
            self._all_reduce(targets, model)
        self.hessians = {n: h for n, h in self.hessians.items() if self.rows.get(n, 0) > 0}
        rows = sorted(self.rows.values())
        self.log(
            f"Hessians of {len(self.hessians)} tensor(s) from {self.params.calibration_batches} training "
            f"batch(es) ({rows[0] if rows else 0}–{rows[-1] if rows else 0} rows each)"
        )

    def targets(self, model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
        """Weight name -> (the module whose input X multiplies it, its input width), for every
        claimed weight: Linear modules, and the head for the output weight (tied embedding)."""
        infos = param_infos(model)
        names = {id(p): n for n, p in model.named_parameters()}
        # the output projection (model.lm_head): its input is the final-norm output, whether its
        # weight is the tied embedding or an untied head
        proj = getattr(model, "lm_head", None)
        head_weight = getattr(proj, "weight", None)
        head_name = names.get(id(head_weight)) if head_weight is not None else None
        out: dict[str, tuple[nn.Module, int]] = {}
        if proj is not None and head_name is not None and self.claims(infos[head_name]):
            out[head_name] = (proj, int(head_weight.shape[1]))  # type: ignore[union-attr]
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            name = names.get(id(module.weight))
            if name is None or name in out or not self.claims(infos[name]):
                continue
            out[name] = (module, module.in_features)
        return out

    def _collector(self, name: str) -> Any:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor):
                return  # called without a positional input: nothing pgolf's model does
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            with torch.autocast(x.device.type, enabled=False):
                x = x.float()
                h = self.hessians.get(name)
                if h is None:
                    h = self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                h.addmm_(x.T, x)
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return pre_hook

    def _all_reduce(self, targets: dict[str, tuple[nn.Module, int]], model: nn.Module) -> None:
        device = next(model.parameters()).device
        for name in sorted(targets):
            cols = targets[name][1]
            h = self.hessians.get(name)
            if h is None:
                h = torch.zeros(cols, cols, device=device)
            rows = torch.tensor([self.rows.get(name, 0)], dtype=torch.int64, device=h.device)
            dist.all_reduce(h)
            dist.all_reduce(rows)
            self.hessians[name], self.rows[name] = h, int(rows.item())

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "hessians": {k: v.detach().cpu().clone() for k, v in self.hessians.items()},
            "rows": {k: torch.tensor(v, dtype=torch.int64) for k, v in self.rows.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hessians = {k: v.clone() for k, v in state.get("hessians", {}).items()}
        self.rows = {k: int(v) for k, v in state.get("rows", {}).items()}
