"""Float passthrough by kind: keep the tensors of the chosen kinds or roles (e.g. the tied
embedding) in a float format instead of quantizing them.

What: every tensor in ``scope`` (any shape) is stored as float in ``dtype`` (fp16, bf16 or fp32)
— or in fp32 where a value is not representable in ``dtype`` (|w| > 65,504 would become inf in
fp16: such a tensor is kept exact instead). Dequantized: the stored values, cast back to the
tensor's dtype. ``error_bound``: the relative error of that cast, computed exactly.

Why: the tied embedding is the tensor quantization hurts most (it is also the output head); fp16
for it closed the int8 gap from 0.007 to 0.0005 BPB for about 0.5 MB. Small tensors and control
tensors are already float passthrough by the framework (``export.passthrough_max_numel``,
``export.passthrough_dtype``); this technique chooses by kind instead of by size.

Source: parameter-golf ``R/2026-03-18_FP16Embed…``, ``R/2026-03-19_Int6_WiderMLP_FP16Embed…``;
last-layer K in fp16 in ``R/2026-03-20_10L…``.

Sites: the per-tensor ``quantizer`` slot (``claims``, ``quantize``, ``dequantize``,
``error_bound``).

Interactions: claims tensors by ``scope`` like the other quantizers: scopes must not overlap
(``gptq``'s default scope, the block matrices, does not include the embedding).

Evidence (records, 8×H100): fp16 embedding: quantization gap 0.007 → 0.0005 BPB
(``R/2026-03-18``). Not yet measured with pgolf.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import ParamInfo, Params, Role, Technique, Tensors, TensorScope, hook, register
from pgolf.registry.run.export import float_cast, relative_rms_error


class PassthroughParams(Params):
    scope: Tensors = Field(TensorScope.parse("embeddings"), description="kinds/roles kept in float")
    dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16", description="float format (fp32 where values do not fit)"
    )


@register("passthrough")
class Passthrough(Technique):
    """Float passthrough by kind: keep the tensors of the chosen kinds or roles (e.g. the tied
    embedding) in a float format instead of quantizing them."""

    Params = PassthroughParams
    params: PassthroughParams

    @hook
    def claims(self, info: ParamInfo) -> bool:
        return info.role != Role.ADAPTER and self.params.scope.contains(info)

    @hook
    def quantize(self, tensor: Tensor) -> dict[str, Tensor]:
        return {"t": float_cast(tensor.detach().cpu(), self.params.dtype)}

    @hook
    def dequantize(self, data: dict[str, Tensor]) -> Tensor:
        return data["t"].float()

    @hook
    def error_bound(self, tensor: Tensor) -> float:
        w = tensor.detach().cpu()
        return relative_rms_error(float_cast(w, self.params.dtype).to(torch.float64), w)
