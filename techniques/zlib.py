"""zlib codec: the challenge baseline's compressor for the packed model (level 9).

What: DEFLATE (``zlib.compress``) over the ``torch.save`` bytes of the quantized state.
Why: the baseline's choice; fast and always available. Source: openai/parameter-golf
``train_gpt.py``. Interactions: fills the exclusive ``codec`` slot (the default); brotli and
zstd are the usual replacements (−2 … −5 % bytes on int6/int8 payloads in the records).
Evidence: baseline model file 15,815,847 bytes at level 9 (``R/2026-03-17_NaiveBaseline``).
"""

from __future__ import annotations

import zlib as _zlib

from pydantic import Field

from pgolf.registry import Params, Technique, hook, register


class ZlibParams(Params):
    level: int = Field(9, ge=0, le=9, description="zlib compression level")


@register("zlib")
class Zlib(Technique):
    """zlib codec: the challenge baseline's compressor for the packed model (level 9)."""

    Params = ZlibParams
    params: ZlibParams

    @hook
    def compress(self, data: bytes) -> bytes:
        return _zlib.compress(data, level=self.params.level)

    @hook
    def decompress(self, data: bytes) -> bytes:
        return _zlib.decompress(data)
