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
   value), by the rule shared with ``rtn`` and QAT (``_rowquant``): ``sdclip``: s_r =
   k·std(W_r)/q_max (population std; max|W_r|/q_max for a constant row), Hessian-aware when
   ``hessian_clip_lambda`` λ > 0: s_r ← s_r·(1 + λ(ρ_r − 1)) with ρ_r the row's mean |W_rj|
   weighted by the damped diag(H)/mean, normalised to mean 1; ``percentile`` (GPTQ-lite): the
   candidate quantile_p(|W_r|)/q_max of ``percentiles`` with the lowest round-to-nearest error;
   ``absmax``: max|W_r|/q_max. Codes are clamp(round(·/s_r), −q_max, q_max).
   AWQ-lite (``awq_groups`` > 0): after calibration every claimed matrix's columns are cut into
   groups of ``awq_group_size``; a column's salience is RMS(x_j)·mean_i|W_ij| (RMS(x_j) =
   √(H_jj/rows)); the ``awq_groups`` groups with the largest summed salience over the whole model
   are quantized inside the same solve on a finer grid, q_max' = 2^(``awq_bits``−1) − 1 with
   their own row scales (same rule, q_max'), and stored with their column indices.
3. Dead columns (H_jj = 0: an input never active in calibration): H_jj ← 1 and W_:j ← 0.
   Damping H ← H + λ·mean(diag H)·I, λ = ``damping``.
4. Act-order: columns permuted by descending diag(H).
5. U = upper Cholesky factor of H⁻¹ (damping ×10, up to three times, if the factorisation fails).
6. For column blocks of ``block_size``: for each column j, q_j = clamp(round(w_j/s)), err_j =
   (w_j − s·q_j)/U_jj, w_{j+1…block end} −= err_j·U_{j, j+1…}; after the block, the later columns
   receive the block's errors through U (lazy batch update, identical result).
7. Codes un-permuted, stored as int8 with the fp16 row scales (and the AWQ-lite columns with
   their scales); Ŵ = q·s. The solve's seconds are logged apart (``calibration`` is its own
   phase; the solve runs in the export phase).

Without a Hessian — the size estimate (built before any training), or a tensor no calibration batch
reached — a tensor falls back to round-to-nearest with the same scales. Every GPTQ result is also
held to a weight-space bound: if ‖W − Ŵ‖_F exceeds ``max_error_ratio`` × the round-to-nearest
worst case (plus the zeroed dead columns) the tensor is stored round-to-nearest instead, so
``error_bound`` is a guarantee the export verifies (``report`` records which tensors took which
path). Only 2-D tensors are claimed.

Why: round-to-nearest minimises each weight's error; GPTQ minimises the layer's output error
‖(W − Ŵ)X‖ on real inputs, which is what the loss sees — at int6 it recovers most of the gap.

Source: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ" (arXiv:2210.17323); AWQ-lite from PR #1908 /
#1945 (one 64-column group at int8); Hessian-aware SDClip from ``R/2026-04-06`` (PR #1412, λ =
0.175; later records use 0); parameter-golf
``R/2026-03-25_ValCalib_GPTQ…`` (AR self-generated calibration), ``R/2026-03-29_Loader_FullGPTQ…``
(training batches inside the cap), ``R/2026-04-05_SP8192_GPTQ-Embeddings_SDClip…`` (SDClip
k = 12.85, GPTQ'd tied embedding from the head input), ``R/2026-04-14`` (16 calibration batches),
the ``R/2026-04-29`` compliance rerun (8 s reserve; the defaults).

Sites: the per-tensor ``quantizer`` slot (``claims``, ``quantize``, ``dequantize``,
``error_bound``), the ``calibrate`` event, the ``time_reserve`` chain.

Interactions: ``self_generated_calibration`` replaces the training batches by the model's own
samples. Calibration reads training batches inside the wall-clock cap (``reserve_seconds`` is
subtracted from it, so ``warmdown_fraction``/``cosine_lr`` fractions account for it); validation
data is never read. pgolf also counts the export, where the GPTQ solve runs (on the device that
gathered the Hessians), against the cap: size the reserve for both (one CPU thread solves a
512×2048 matrix in about 2 s). ``late_qat`` should use the same bits and kinds. After full GPTQ, score-first
TTT became neutral or negative on SP1024 stacks (``R/2026-03-25``, ``R/2026-03-29``); AdamW TTT
destroys GPTQ's narrow minima. Tensors outside ``scope`` go to the default ``int8_rowwise``. The
size estimate calibrates on its surrogate model (random tokens), so it runs the real solve.

Evidence (records, 8×H100): full GPTQ (+ AR calibration, XSA-all, bigger bigram, lzma) −0.0046
BPB vs 1.1194 (``R/2026-03-25``); 64 → 16 calibration batches −0.0013 (72 more training steps,
``R/2026-04-14``); 16 → 32 −0.0002 (PR #2135); AWQ-lite ≈ −0.0003 BPB for ≈ +87 KB (PR #1945);
Hessian-aware SDClip λ = 0.175 (0.30 worse, ``R/2026-04-06``). Measured with pgolf on a CPU-trained
tiny model: lower weighted reconstruction error and val_bpb than round-to-nearest at int5 and
int6 (``tests/techniques/test_gptq.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import CalibrationData, Kind, ParamInfo, Tensors, TensorScope, hook, register
from pgolf.registry.api.roles import param_infos
from pgolf.techniques._rowquant import (
    Bits,
    Grid,
    RowGridParams,
    RowQuantizer,
    check_finite,
    code_steps,
    dequantize_codes,
    hessian_row_adjust,
    pack_codes,
    qmax_of,
    rtn_error_bound,
)


class GPTQParams(RowGridParams):
    scope: Tensors = Field(TensorScope.parse("matrices"), description="kinds/roles it claims (2-D only)")
    calibration_batches: int = Field(16, ge=1, le=4096, description="training batches the Hessians see")
    damping: float = Field(0.01, gt=0, le=1, description="λ: H += λ·mean(diag H)·I")
    block_size: int = Field(128, ge=1, le=8192, description="columns per lazy-update block")
    act_order: bool = Field(True, description="quantize columns in descending diag(H) order")
    hessian_clip_lambda: float = Field(
        0.0, ge=0, lt=1, description="Hessian-aware SDClip: clip × (1 + λ(row importance − 1)); 0 = plain"
    )
    awq_groups: int = Field(
        0, ge=0, le=4096, description="AWQ-lite: column groups (model-wide) kept at awq_bits; 0 = off"
    )
    awq_group_size: int = Field(64, ge=1, le=8192, description="AWQ-lite: columns per group")
    awq_bits: Bits = Field(8, description="AWQ-lite: bit width of the salient groups")
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


SIZE_ALLOWANCE = {5: 0.085, 6: 0.025, 7: 0.012, 8: 0.005}
"""Relative extra bytes of GPTQ codes on trained weights over the size estimate's (≤ 5 bits use
the 5-bit figure): the largest per-tensor excess of GPTQ's compressed codes over round-to-nearest's
measured on a CPU-trained 2×64 model (int5 8.2 %, int6 2.0 %, int8 0.3 %; the surrogate's own
GPTQ codes are within 1 % of round-to-nearest): trained activations have a few dominant directions
(a Hessian of effective rank ~3 of 64), which the estimate's random-weight calibration does not."""


# --------------------------------------------------------------------------------------------
# The maths
# --------------------------------------------------------------------------------------------


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
    hi_cols: Tensor | None = None,
    hi_scale: Tensor | None = None,
    hi_qmax: int = 127,
) -> tuple[Tensor, Tensor] | None:
    """GPTQ codes (R,C) (float tensor of integers in [−q_max, q_max]) of w (R,C) with input
    Hessian h (C,C) and row scales (R,), and the dead-column mask (C,); computed in float64 when
    w is float64, else float32, on h's device. Columns in ``hi_cols`` (AWQ-lite) use
    ``hi_scale`` and ``hi_qmax`` inside the same solve. None when H cannot be factorised."""
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = h.device
    W = w.to(dev, dt).clone()
    H = h.to(dev, dt).clone()
    s = scale.to(dev, dt)
    cols = W.shape[1]
    hi = torch.zeros(cols, dtype=torch.bool, device=dev)
    if hi_cols is not None and hi_cols.numel():
        hi[hi_cols.to(dev).long()] = True
    s_hi = hi_scale.to(dev, dt) if hi_scale is not None else s
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = (
        torch.argsort(H.diagonal(), descending=True, stable=True)
        if act_order
        else torch.arange(cols, device=dev)
    )
    W, H, hi = W[:, perm], H[perm][:, perm], hi[perm].tolist()
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
            sc, qm = (s_hi, hi_qmax) if hi[i1 + i] else (s, qmax)
            q = torch.clamp(torch.round(col / sc), -qm, qm)
            Q[:, i1 + i] = q
            err = (col - q * sc) / U[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i : i2][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], dead


def awq_salience(w: Tensor, h: Tensor, rows: int) -> Tensor:
    """AWQ-lite column salience RMS(x_j)·mean_i|W_ij| (C,), with RMS(x_j) = √(H_jj/rows)."""
    act_rms = (h.diagonal().double().clamp_min(0) / max(rows, 1)).sqrt().cpu()
    return act_rms * w.detach().double().abs().mean(dim=0).cpu()


def awq_select(candidates: Mapping[str, Tensor], group_size: int, groups: int) -> dict[str, Tensor]:
    """The ``groups`` column groups (contiguous, ``group_size`` wide, the remainder of a matrix
    in no group) with the largest summed salience over all ``candidates`` (name -> salience
    (C,)); returns name -> selected column indices (sorted). Ties go to the earlier name/group."""
    scored: list[tuple[float, int, str, int]] = []
    for order, (name, sal) in enumerate(sorted(candidates.items())):
        for g in range(sal.numel() // group_size):
            scored.append((float(sal[g * group_size : (g + 1) * group_size].sum()), -order, name, g))
    scored.sort(key=lambda t: (-t[0], -t[1], t[3]))
    out: dict[str, list[int]] = {}
    for _, _, name, g in scored[:groups]:
        out.setdefault(name, []).extend(range(g * group_size, (g + 1) * group_size))
    return {n: torch.tensor(sorted(c), dtype=torch.int32) for n, c in out.items()}


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
    awq_columns: int = 0


@register("gptq")
class GPTQ(RowQuantizer):
    """Full-Hessian GPTQ: quantize each matrix column by column, pushing every column's rounding error
    onto the columns not yet quantized, weighted by the layer's input Hessian from training batches."""

    Params = GPTQParams
    params: GPTQParams
    size_estimate_note = (
        "the estimate adds GPTQ's size_allowance (codes on trained weights may compress worse than "
        "round-to-nearest's) to round-to-nearest-like codes of the surrogate, so it errs high: +4.8 to "
        "+10.2 % on a 2×64 model after 50 CPU steps (int5 most)"
    )
    size_estimate_high = 0.12

    def __init__(self, params: GPTQParams, spec: Any):
        super().__init__(params, spec)
        self.hessians: dict[str, Tensor] = {}  # weight name -> Σ XᵀX (cols, cols) fp32
        self.rows: dict[str, int] = {}  # weight name -> calibration rows (tokens × passes) seen
        self.awq: dict[str, Tensor] = {}  # weight name -> AWQ-lite columns (int32)
        self.report: dict[str, TensorReport] = {}
        self.solve_seconds = 0.0

    # -- per-tensor choices -------------------------------------------------------------------
    def qmax(self, kind: Kind) -> int:
        return self.grid(kind).qmax

    def hessian(self, name: str, cols: int) -> Tensor | None:
        h = self.hessians.get(name)
        return h if h is not None and tuple(h.shape) == (cols, cols) else None

    def scales(self, w: Tensor, kind: Kind, h: Tensor | None = None, qmax: int | None = None) -> Tensor:
        """Stored row scales of w on its kind's grid (q_max overridden for the AWQ-lite columns),
        Hessian-aware when λ > 0 and H is known."""
        grid = self.grid(kind) if qmax is None else self.grid(kind).with_qmax(qmax)
        adjust = None
        lam = self.params.hessian_clip_lambda
        if lam > 0 and h is not None and grid.clip == "sdclip":
            d = h.diagonal().double().cpu().clone()
            d[d == 0] = 1.0
            d = d + self.params.damping * d.mean()
            adjust = hessian_row_adjust(w, d, lam)
        return grid.scales(w, adjust)

    def _plan(self, name: str, w: Tensor, kind: Kind) -> tuple[Grid, Tensor, Tensor | None, dict[str, Any]]:
        """(grid, row scales, H, the AWQ-lite columns' settings) of one tensor."""
        grid = self.grid(kind)
        h = self.hessian(name, w.shape[1])
        scale = self.scales(w, kind, h)
        hi: dict[str, Any] = {}
        cols = self.awq.get(name)
        hi_qmax = qmax_of(self.params.awq_bits)
        if cols is not None and cols.numel() and hi_qmax > grid.qmax and int(cols.max()) < w.shape[1]:
            hi = {"hi_cols": cols, "hi_scale": self.scales(w, kind, h, hi_qmax), "hi_qmax": hi_qmax}
        return grid, scale, h, hi

    def _bound(self, w: Tensor, grid: Grid, scale: Tensor, h: Tensor | None, hi: dict[str, Any]) -> float:
        """Absolute bound on ‖W − Ŵ‖_F for the path this tensor takes."""
        data = pack_codes(
            torch.zeros(w.shape, dtype=torch.int8), scale, hi.get("hi_cols"), hi.get("hi_scale")
        )
        qmax = torch.full((w.shape[1],), grid.qmax)
        if hi:
            qmax[hi["hi_cols"].long()] = hi["hi_qmax"]
        rtn = rtn_error_bound(w, code_steps(data), qmax)
        if h is None:
            return rtn
        dead = (h.diagonal() == 0).cpu()
        zeroed = float(w.double()[:, dead].square().sum())
        return math.sqrt((self.params.max_error_ratio * rtn) ** 2 + zeroed)

    # -- the quantizer slot -------------------------------------------------------------------
    @hook
    def quantize(self, name: str, tensor: Tensor, info: ParamInfo) -> dict[str, Tensor]:
        w = tensor.detach().float().cpu()
        check_finite(name, w, "gptq")
        t0 = time.perf_counter()
        grid, scale, h, hi = self._plan(name, w, info.kind)
        method = "rtn"
        stored = pack_codes(
            torch.zeros(w.shape, dtype=torch.int8), scale, hi.get("hi_cols"), hi.get("hi_scale")
        )
        steps = code_steps(stored)
        qmax = torch.full((w.shape[1],), grid.qmax, dtype=torch.float32)
        if hi:
            qmax[hi["hi_cols"].long()] = hi["hi_qmax"]
        codes = torch.clamp(torch.round(w / steps), -qmax, qmax)
        if h is not None:
            p = self.params
            got = gptq_codes(
                w, h, scale, grid.qmax, block_size=p.block_size, damping=p.damping, act_order=p.act_order,
                hi_cols=hi.get("hi_cols"), hi_scale=hi.get("hi_scale"), hi_qmax=hi.get("hi_qmax", 127),
            )  # fmt: skip
            method = "rtn-fallback"
            if got is not None:
                g = got[0].cpu()
                if float((w.double() - (g * steps).double()).norm()) <= self._bound(w, grid, scale, h, hi):
                    codes, method = g, "gptq"
        data = pack_codes(codes, scale, hi.get("hi_cols"), hi.get("hi_scale"))
        err = float((w - dequantize_codes(data)).norm() / w.norm().clamp_min(1e-30))
        self.solve_seconds += time.perf_counter() - t0
        n_hi = int(hi["hi_cols"].numel()) if hi else 0
        self.report[name] = TensorReport(method, self.rows.get(name, 0), err, n_hi)
        if method != "gptq" and self.hessians:  # (without calibration, e.g. a tensor never reached)
            self.log(
                f"{name}: {method} (relative error {err:.4f}, {self.rows.get(name, 0)} calibration rows)"
            )
        if self.hessians and set(self.hessians) <= set(self.report) and not getattr(self, "_told", False):
            self._told = True
            methods = [r.method for r in self.report.values()]
            self.log(
                f"solve: {len(methods)} tensor(s) in {self.solve_seconds:.1f}s ("
                + ", ".join(f"{m} {methods.count(m)}" for m in sorted(set(methods)))
                + (f"; AWQ-lite columns in {len(self.awq)} tensor(s)" if self.awq else "")
                + ")"
            )
        return data

    @hook
    def error_bound(self, info: ParamInfo, tensor: Tensor) -> float:
        w = tensor.detach().float().cpu()
        norm = float(w.double().norm())
        if norm == 0:
            return 0.0
        grid, scale, h, hi = self._plan(info.name, w, info.kind)
        return self._bound(w, grid, scale, h, hi) / norm

    @hook
    def size_allowance(self, info: ParamInfo) -> float:
        return SIZE_ALLOWANCE[min(max(self.grid(info.kind).qmax.bit_length() + 1, 5), 8)]

    # -- calibration ---------------------------------------------------------------------------
    @hook
    def time_reserve(self) -> float:
        return float(self.params.reserve_seconds)

    @hook
    def calibrate(self, model: nn.Module, batches: CalibrationData, switches: tuple[str, ...]) -> None:
        self.hessians, self.rows, self.report, self.awq = {}, {}, {}, {}
        self.solve_seconds, self._told = 0.0, False
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
        if self.params.awq_groups:
            self.awq = self.select_awq(targets)
            self.log(
                "AWQ-lite: "
                + ", ".join(f"{n} columns {int(c[0])}–{int(c[-1])}" for n, c in self.awq.items())
                + f" at int{self.params.awq_bits}"
            )

    def select_awq(self, targets: dict[str, tuple[nn.Module, int]]) -> dict[str, Tensor]:
        """AWQ-lite's salient column groups over every calibrated matrix whose bits are below
        ``awq_bits`` (weights as they are now: calibration runs after training and finalize)."""
        weights = {
            n: m.weight for n, (m, _) in targets.items() if isinstance(getattr(m, "weight", None), Tensor)
        }
        infos = {n: self._infos[n] for n in weights if n in self._infos}
        cands = {
            n: awq_salience(weights[n], self.hessians[n], self.rows[n])
            for n in weights
            if n in self.hessians and n in infos and self.qmax(infos[n].kind) < qmax_of(self.params.awq_bits)
        }
        return awq_select(cands, self.params.awq_group_size, self.params.awq_groups)

    def targets(self, model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
        """Weight name -> (the module whose input X multiplies it, its input width), for every
        claimed weight: Linear modules, and the head for the output weight (tied embedding)."""
        infos = param_infos(model)
        self._infos = infos
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
            "awq": {k: v.clone() for k, v in self.awq.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hessians = {k: v.clone() for k, v in state.get("hessians", {}).items()}
        self.rows = {k: int(v) for k, v in state.get("rows", {}).items()}
        self.awq = {k: v.clone() for k, v in state.get("awq", {}).items()}
