"""LQER: store a low-rank, low-bit correction of the quantization error of the few tensors where
it is largest; the reload adds it back.

What: after quantization, for every quantized 2-D tensor in ``scope``, E = W − Ŵ (W the tensor
the quantizer was given, Ŵ its dequantized codes). Candidates are ranked by ‖E‖_F (``select:
error``) or by the error the correction removes (``select: gain``); the ``top_k`` best get the
truncated SVD E ≈ A·B, A = U_r·diag(S_r) (R×r), B = V_rᵀ (r×C), r = ``rank``, stored quantized:

* ``asym`` (the records' default): A in 2-bit codes {−2, −1, 0, 1} with one fp16 scale
  s_A = max|A|/1.5; B flattened into groups of ``group`` values, 4-bit codes in [−8, 7] with one
  fp16 scale per group s_g = max|group|/7.5 (when C·r is not a multiple of ``group``: ``sym``);
* ``sym``: A and B per row in ``factor_bits``-bit codes [−q, q], q = 2^(bits−1) − 1, scale
  max|row|/q (fp16).

Scales are rounded to fp16 (at least 2^−24) before the codes are taken. The reload computes
Ŵ + Â·B̂ in fp32 (then the tensor's dtype). A correction that would not lower ‖W − Ŵ‖_F is not
stored, so the corrected tensor is never worse than the quantizer's own output.

Why: the quantization error of a tensor is not white noise: a few directions carry much of it, and
rank 4 at 2–4 bits costs a few kilobytes per tensor.

Source: Zhang et al., "LQER: Low-Rank Quantization Error Reconstruction for LLMs"
(arXiv:2402.02446); parameter-golf PR #1797 and ``R/2026-04-27_*`` (rank 4, top 3, asym group 64;
the corrected tensors there are the int7 tied embedding and MLP-up matrices); group 32 / top 4 and
top 1 variants in later PRs; gain-based selection in PR #1908's knobs.

Sites: the ``post_quant`` chain (``post_quantize`` stores the factors under the packed state's
``extra``; ``post_dequantize`` adds them back at load).

Interactions: any quantizer (``gptq``, ``rtn``, ``int8_rowwise``); AWQ-lite columns are part of Ŵ.
``selective_pruning`` runs after it (its byte target includes the factors). The factors' codes
are small integers that ``bitpack`` stores in 2 and 4 bits.

Evidence (records, 8×H100): bundled in ``R/2026-04-27`` and later (no isolated number). Not yet
measured with pgolf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import ParamInfo, Params, Technique, Tensors, TensorScope, hook, register
from pgolf.techniques._rowquant import stored_scale


class LQERParams(Params):
    rank: int = Field(4, ge=1, le=256, description="rank r of the correction")
    top_k: int = Field(3, ge=1, le=1024, description="tensors corrected")
    select: Literal["error", "gain"] = Field(
        "error", description="rank candidates by ‖E‖ or by error removed"
    )
    asym: bool = Field(True, description="2-bit A with one scale, 4-bit grouped B (else per-row factor_bits)")
    group: int = Field(64, ge=1, le=65536, description="values per B scale (asym)")
    factor_bits: int = Field(4, ge=2, le=8, description="bits of A and B rows (sym)")
    scope: Tensors = Field(TensorScope.parse("all"), description="kinds/roles that may be corrected")


def _codes(x: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
    return torch.clamp(torch.round(x / scale), lo, hi).to(torch.int8)


def fit(e: Tensor, p: LQERParams) -> dict[str, Tensor]:
    """The stored factors of E ≈ A·B (see the module docstring)."""
    u, s, vh = torch.linalg.svd(e.float(), full_matrices=False)
    r = min(p.rank, s.numel())
    a = (u[:, :r] * s[:r]).contiguous()
    b = vh[:r, :].contiguous()
    if p.asym and b.numel() % p.group == 0:
        s_a = stored_scale(a.abs().amax() / 1.5)
        groups = b.reshape(-1, p.group)
        s_b = stored_scale(groups.abs().amax(dim=1) / 7.5)
        q_b = _codes(groups, s_b[:, None], -8, 7).reshape(b.shape)
        return {
            "form": torch.tensor(1),
            "qA": _codes(a, s_a, -2, 1),
            "sA": s_a.half(),
            "qB": q_b,
            "sB": s_b.half(),
        }
    q = 2 ** (p.factor_bits - 1) - 1
    s_a = stored_scale(a.abs().amax(dim=1) / q)
    s_b = stored_scale(b.abs().amax(dim=1) / q)
    return {"form": torch.tensor(0), "qA": _codes(a, s_a[:, None], -q, q), "sA": s_a.half(),
            "qB": _codes(b, s_b[:, None], -q, q), "sB": s_b.half()}  # fmt: skip


def correction(f: Mapping[str, Tensor]) -> Tensor:
    """Â·B̂ (fp32, R×C) of stored factors."""
    q_b = f["qB"].float()
    if int(f["form"]) == 1:
        a = f["qA"].float() * f["sA"].float()
        b = (q_b.reshape(f["sB"].numel(), -1) * f["sB"].float()[:, None]).reshape(q_b.shape)
    else:
        a = f["qA"].float() * f["sA"].float()[:, None]
        b = q_b * f["sB"].float()[:, None]
    return a @ b


@register("lqer")
class LQER(Technique):
    """LQER: store a low-rank, low-bit correction of the quantization error of the few tensors where
    it is largest; the reload adds it back."""

    Params = LQERParams
    params: LQERParams

    def __init__(self, params: LQERParams, spec: Any):
        super().__init__(params, spec)
        self.report: dict[str, tuple[float, float]] = {}  # name -> (‖E‖, ‖E − ÂB̂‖)

    @hook
    def post_quantize(
        self,
        packed: dict[str, Any],
        state: dict[str, Tensor],
        infos: dict[str, ParamInfo],
        quantized: Mapping[str, Tensor],
    ) -> dict[str, Any]:
        p = self.params
        errors: dict[str, Tensor] = {}
        for name, entry in packed["tensors"].items():
            w = state.get(name)
            info = infos.get(name)
            if entry["q"] in ("float", "raw") or w is None or w.ndim != 2 or info is None:
                continue
            if p.scope.contains(info) and name in quantized:
                errors[name] = w.detach().float().cpu() - quantized[name].float()
        norms = {n: float(e.norm()) for n, e in errors.items()}
        if p.select == "error":
            ranked = sorted((n for n in errors if norms[n] > 0), key=lambda n: (-norms[n], n))[: p.top_k]
            fits = {n: fit(errors[n], p) for n in ranked}
        else:
            every = {n: fit(e, p) for n, e in errors.items() if norms[n] > 0}
            gain = {n: norms[n] - float((errors[n] - correction(f)).norm()) for n, f in every.items()}
            fits = {n: every[n] for n in sorted(every, key=lambda n: (-gain[n], n))[: p.top_k]}
        kept: dict[str, dict[str, Tensor]] = {}
        self.report = {}
        for name, f in fits.items():
            after = float((errors[name] - correction(f)).norm())
            self.report[name] = (norms[name], after)
            if after < norms[name]:
                kept[name] = f
        if kept:
            self.log(
                "corrected "
                + ", ".join(f"{n} ({self.report[n][0]:.3g} → {self.report[n][1]:.3g})" for n in kept)
            )
        out = dict(packed)
        out["extra"] = {**packed.get("extra", {}), "lqer": kept}
        return out

    @hook
    def post_dequantize(self, state: dict[str, Tensor], packed: dict[str, Any]) -> dict[str, Tensor]:
        factors = packed.get("extra", {}).get("lqer", {})
        out = dict(state)
        for name, f in factors.items():
            t = state[name]
            out[name] = (t.float() + correction(f)).to(t.dtype)
        return out
