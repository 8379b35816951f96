"""Zstandard codec for the packed model, in place of zlib.

What: Zstandard (RFC 8878) at ``level`` 1–22 over the serialized quantized state, with an
optional window (``window_log``), long-distance matching (``long``: zstd's ``--long`` mode, which
finds repeats far back in the window) and a frame checksum (a flipped bit in the artifact fails
to decode instead of scoring a different model).
Why: on int6/int8 payloads zstd-22 is about 5 % smaller than zlib-9, bytes that buy width or
precision under the 16 MB cap, and it decompresses fast.
Source: parameter-golf ``R/2026-03-19_MLP3x…`` ("~1.5 MB smaller than zlib for 11L MLP3×") and
``R/2026-03-20_Int6…`` ("~5 % better than zlib-9 on int6"); the ``zstandard`` package.
Interactions: fills the ``codec`` slot (instead of the default ``zlib``); a byte-shuffle
transform before it helps on int8 codes stored with fp16 scales.
Evidence: pgolf, baseline-size model with surrogate weights (``bench/quant_export.py``, CPU,
``bench/quant_export_results/2026-12-01-cpu.json``): zstd-22 gives int6 GPTQ codes 8,152,567 bytes
(zlib-9 8,615,618, −5.4 %; brotli-11 7,582,204) and int8 codes 15,872,858 (zlib-9 15,900,536);
long mode gave the same bytes on the int8 codes (an earlier run of the script; level 22's window
already spans 17 MB). See ``pgolf check STACK --set techniques.zstd.level=22`` for a stack's
bytes; not yet measured with pgolf on a trained record-size model.
"""

from __future__ import annotations

import zstandard
from pydantic import Field

from pgolf.registry import Params, Technique, hook, register


class ZstdParams(Params):
    level: int = Field(22, ge=1, le=22, description="compression level (22 = ultra, smallest)")
    window_log: int | None = Field(
        None, ge=10, le=31, description="log2 of the long-distance window; null = the level's default"
    )
    long: bool = Field(False, description="long-distance matching (zstd --long)")
    checksum: bool = Field(True, description="write a frame checksum (detects a corrupted artifact)")


@register("zstd")
class Zstd(Technique):
    """Zstandard codec for the packed model, in place of zlib."""

    Params = ZstdParams
    params: ZstdParams

    @hook
    def compress(self, data: bytes) -> bytes:
        p = self.params
        extra = {"window_log": p.window_log} if p.window_log else {}
        cp = zstandard.ZstdCompressionParameters.from_level(
            p.level, write_checksum=p.checksum, enable_ldm=p.long, **extra
        )
        return zstandard.ZstdCompressor(compression_params=cp).compress(data)

    @hook
    def decompress(self, data: bytes) -> bytes:
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).decompress(data, max_output_size=1 << 34)
