"""Int8 for the passthrough tensors: control tensors per tensor (one fp32 scale), small matrices per
row (fp16 scales), instead of keeping them as floats.

What: the tensors it claims are those of at most ``max_numel`` elements that are either control
tensors (role ``scalar``: ``attn_scale``, ``mlp_scale``, ``resid_mix``, the U-Net ``skip_weights``,
``gated_skips``' gates and scales, SmearGate's weights, …; when ``control``) or of a kind or role in
``scope`` (default ``[other, gate]``: BigramHash's and the value embeddings' projections, kind
``other``; ``gated_attention``'s per-head gate weights, kind ``gate``).

* Control tensors, and claimed tensors that are not 2-D: one scale for the whole tensor,
  s = max|w|/127 kept in fp32, q = clamp(round(w/s), −127, 127) in int8 (``int8_rowwise``'s
  per-tensor rule at the 100th percentile, :func:`~pgolf.techniques.int8_rowwise.quantize_whole`).
* Other 2-D tensors: per row, s_r = max|W_r|/127 rounded to the fp16 that is stored (at least
  2^−24), q = clamp(round(w/s_r), −127, 127): the row-wise grid ``rtn`` uses at 8 bits with
  ``clip: absmax`` (``_rowquant``). No 1/127 scale floor: ``int8_rowwise``'s floor would store a
  row whose values are all below 1 (a zero-initialised gate, a projection of width 32) on a fixed
  step of 1/127, far coarser than its values.

Ŵ = q·s. Every element is off by at most half its step, which ``error_bound`` states exactly
(relative RMS ≤ √n·s/2 / ‖w‖ per tensor; at most 0.5/127 ≈ 0.4 % of the largest value of its row
or tensor per element).

Why: the records keep these tensors as fp16/fp32 passthrough; trained values have random low bits
that no codec can shrink, so 2-4 bytes per value become one (about 40 KB of the compressed
artifact in the 11 × 512 SP8192 lineage, by the record's count). Control tensors have a narrow
dynamic range, so 8 bits with one scale lose little.

Source: parameter-golf PR #1716 (record 1.07882, 2026-04-18; SP8192 lineage of the 04-09
record), "Path A v3 aggressive passthrough quantization": control tensors (``attn_scale``,
``mlp_scale``, ``resid_mix``, ``skip_gates``, ``skip_weights``) per-tensor int8 with one fp32
scale; small 2-D matrices excluded from GPTQ by its ``numel() <= 65536`` threshold (``bigram.proj``
512 × 32, ``attn_gate_proj``, ``smear_gate.weight``) per-row int8 with fp16 scales. Quantized
round-trip bpb unchanged to the 4th decimal (1.0968 both); the bytes it freed made the int8 token
embedding fit (about 65 KB over without it). The attention gates' int8 per-row path: ``R/2026-04-19``+
(−15 … 40 KB). In pgolf SmearGate's weights and the U-Net skip weights are control tensors (role
``scalar``), so the record's three matrices are claimed through ``control`` and ``scope``.

Sites: the per-tensor ``quantizer`` slot (``claims``, ``quantize``, ``dequantize``,
``error_bound``); it sets ``quantizes_control``, the framework's opt-in for control tensors.

Interactions: control tensors are offered only to quantizers that set ``quantizes_control`` (this
one), so ``rtn``/``gptq``/``int8_rowwise`` with scope ``all`` never take them, and without this
technique they stay fp32 as before. Any other tensor claimed by two quantizers is a
``SiteConflict``: the record style (``gptq: {scope: [matrices, embed]}``) and every default scope
leave ``other`` and ``gate`` free, but ``rtn``/``gptq`` with scope ``all`` claim the small
``other``/``gate`` matrices too (give them ``[matrices, embed]`` or this one a narrower ``scope``).
``max_numel`` (65,536, the records' GPTQ threshold) keeps it off the tensors the main quantizer
should take; it claims small tensors whatever ``export.passthrough_max_numel`` is. ``qat`` /
``late_qat`` fake-quantize Linear kinds only (block matrices by default): none of these tensors
trains through fake quantization, and at int8 absmax none needs to. ``selective_pruning`` (scope
``all``) counts the small matrices' ±1 codes as candidates — their steps are small, so they go
first — and ``lqer`` (scope ``all``) may correct a 2-D one; give either ``[matrices, embed]`` to
leave them alone. The size estimate draws control tensors near their initial values and the
small matrices N(0, 1), quantized by this technique as a run would.

Evidence (pgolf, CPU, ``python bench/passthrough_int8.py bytes`` and ``… round-trip``):

* Bytes, ``stacks/pr1716.yaml`` (11 × 512, SP8192; byte shuffle + brotli-11) with the size
  estimate's stand-in weights: the 49 control tensors (30,822 values) take 99,330 → 25,580 bytes
  packed and compressed as the stack does, ``bigram_hash``'s 512 × 32 projection and the 11
  attention output gates (8 × 12) 31,117 → 19,989: −86,378 bytes in all; the submission script
  grows by 222 bytes (32,675 → 32,897). With the stack's earlier lzma-9 codec (before its gates):
  −91,272 bytes, and the whole artifact (``rtn`` in ``gptq``'s place: same scope, bits and k) 17,387,008 →
  17,259,724 (−127,284), but lzma-9 on 17 MB moves by tens of KB with the tensors' layout alone
  (claiming the 14 control tensors of fewer than 32 values, 102 values in all, moved it by 25 KB),
  so the tensors-alone figure is the one to trust.
* Round trip, the quickstart model (4 × 128, 300 CPU steps) with BigramHash 1024 × 32, SmearGate,
  gated skips, gated attention, GPTQ int6 / int8 embedding, lzma-9: one set of trained weights
  exported each way and scored from the artifact read back: val_bpb 1.779458 → 1.779711 (+0.00025;
  control tensors alone +0.00024, the small matrices alone +0.00002); model bytes 356,892 →
  346,464 (−10,428; code +243). Largest relative RMS error of an int8 tensor 0.79 % (an
  ``mlp_scale`` whose largest value is 3.4 × its RMS); small matrices ≤ 0.54 %. One control tensor
  at a time the change is of either sign (−0.00008 … +0.00014); storing the 2-D control tensors
  (``resid_mix``, skip gates and scales) per row instead measured −0.00003 instead of +0.00016 —
  not offered, as it is not the record's rule and single tensors move val_bpb as much.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from pgolf.registry import ParamInfo, Params, Role, Technique, Tensors, TensorScope, hook, register
from pgolf.techniques._rowquant import absmax_scales, pack_codes, round_to_nearest, rtn_error_bound
from pgolf.techniques.int8_rowwise import dequantize, quantize_whole, whole_scale

QMAX = 127


class PassthroughInt8Params(Params):
    control: bool = Field(True, description="claim control tensors (role scalar): int8, one fp32 scale")
    scope: Tensors = Field(
        TensorScope.parse(["other", "gate"]),
        description="kinds/roles of the other small tensors it claims (2-D: int8 per row, fp16 scales)",
    )
    max_numel: int = Field(
        65_536, ge=1, description="claims only tensors of at most this many elements (the GPTQ threshold)"
    )


def is_per_row(info: ParamInfo) -> bool:
    """Whether a claimed tensor is stored per row (a 2-D tensor that is not a control tensor)."""
    return len(info.shape) == 2 and info.role != Role.SCALAR


def quantize_per_row(w: Tensor) -> dict[str, Tensor]:
    """Per-row int8 of w (R,C): s_r = max|W_r|/127 as stored (fp16), codes round(w/s_r)."""
    w32 = w.detach().float().cpu()
    scale = absmax_scales(w32, QMAX)
    return pack_codes(round_to_nearest(w32, scale, QMAX), scale)


def quantize_per_tensor(w: Tensor) -> dict[str, Tensor]:
    """Int8 of a whole tensor of any shape with one fp32 scale s = max|w|/127."""
    q, scale = quantize_whole(w.detach().float().cpu(), 100.0)
    return {"q": q, "scale": scale.float()}


def error_bound(w: Tensor, per_row: bool) -> float:
    """The exact worst case of ‖Ŵ − W‖/‖W‖: half a step per element (absmax scales never clip)."""
    w32 = w.detach().float().cpu()
    norm = float(w32.double().norm())
    if norm == 0:
        return 0.0
    if per_row:
        return rtn_error_bound(w32, absmax_scales(w32, QMAX), QMAX) / norm
    _, scale = whole_scale(w32, 100.0)
    return rtn_error_bound(w32.reshape(1, -1), scale.reshape(1), QMAX) / norm


@register("passthrough_int8")
class PassthroughInt8(Technique):
    """Int8 for the passthrough tensors: control tensors per tensor (one fp32 scale), small matrices
    per row (fp16 scales), instead of keeping them as floats."""

    Params = PassthroughInt8Params
    params: PassthroughInt8Params
    quantizes_control = True

    @hook
    def claims(self, info: ParamInfo) -> bool:
        p = self.params
        if info.role == Role.ADAPTER or info.numel > p.max_numel:
            return False
        return p.control if info.role == Role.SCALAR else p.scope.contains(info)

    @hook
    def quantize(self, tensor: Tensor, info: ParamInfo) -> dict[str, Tensor]:
        return quantize_per_row(tensor) if is_per_row(info) else quantize_per_tensor(tensor)

    @hook
    def dequantize(self, data: dict[str, Tensor]) -> Tensor:
        return dequantize(data["q"], data["scale"])

    @hook
    def error_bound(self, info: ParamInfo, tensor: Tensor) -> float:
        return error_bound(tensor, is_per_row(info))
