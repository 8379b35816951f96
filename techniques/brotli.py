"""Brotli codec for the packed model, in place of zlib.

What: Brotli (RFC 7932) at ``quality`` 0–11 with a 2^``lgwin``-byte window over the
``torch.save`` bytes of the quantized state.
Why: on int8/int6 payloads Brotli-11 is a few percent smaller than zlib-9, bytes that buy
width or precision under the 16 MB cap; decompression stays fast.
Source: parameter-golf ``R/2026-03-31_ParallelResiduals_MiniDepthRecurrence`` and later
records (often with a byte shuffle: ``byte_shuffle``).
Interactions: fills the exclusive ``codec`` slot (instead of the default ``zlib``);
quality 11 is slow to compress (seconds per MB), which matters for the search's size checks.
Evidence: the records report −2 … −5 % model bytes vs zlib-9. pgolf, baseline-size model with
surrogate weights (``bench/quant_export.py``, CPU,
``bench/quant_export_results/2026-12-01-cpu.json``): the smallest of zlib-9 / zstd-22 / lzma-9 /
brotli-11 on the same bytes in every case measured: int8 codes 15,790,755 bytes (zlib-9
15,900,536, −0.7 %), int6 GPTQ codes 7,582,204 (zlib-9 8,615,618, −12.0 %; lzma-9 8,061,628), at
about 110 s per 17 MB on one loaded core. Measure a stack with ``pgolf check STACK --set
techniques.brotli.quality=11``.
"""

from __future__ import annotations

import brotli as _brotli
from pydantic import Field

from pgolf.registry import Params, Technique, hook, register


class BrotliParams(Params):
    quality: int = Field(11, ge=0, le=11, description="0 (fast) … 11 (smallest)")
    lgwin: int = Field(24, ge=10, le=24, description="log2 of the window size")


@register("brotli")
class Brotli(Technique):
    """Brotli codec for the packed model, in place of zlib."""

    Params = BrotliParams
    params: BrotliParams

    @hook
    def compress(self, data: bytes) -> bytes:
        return bytes(_brotli.compress(data, quality=self.params.quality, lgwin=self.params.lgwin))

    @hook
    def decompress(self, data: bytes) -> bytes:
        return bytes(_brotli.decompress(data))
