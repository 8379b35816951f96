"""Byte shuffle: before the codec, regroup the serialized bytes by their offset modulo ``stride``
(all bytes at offsets 0, s, 2s, …, then 1, 1+s, …), so that the high and low bytes of fp16
scales and other multi-byte numbers each sit together.

What: encode: ``b"BSHF" + bytes([stride]) + data[0::s] + data[1::s] + … + data[s−1::s]``;
decode reads the stride from the 5-byte header and interleaves the lanes back (lane i holds
⌈(n − i)/s⌉ bytes of the n). Lossless for any input length.

Why: a codec models bytes one after another; in a stream of 16-bit numbers the low bytes are
close to random while the high bytes repeat, and interleaved they hide each other's statistics.
On int8 codes (stride-1 data) it is neutral at best: measure it (``bench/quant_export.py``).

Source: parameter-golf PR #1089, default from ``R/2026-04-01`` to ``R/2026-04-29`` (stride 2,
the same 5-byte header) with brotli-11.

Sites: the ``byte_transform`` chain (``encode_bytes``, ``decode_bytes``), between the serializer
and the codec.

Interactions: ``bitpack``'s ``floats: planes`` does the same per tensor, aligned to each
tensor's own element size; with it this transform has little left to do.

Evidence: part of the 04-01 … 04-29 records' brotli path (no isolated number). Not yet measured
with pgolf on a trained record-size model.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pgolf.registry import Params, PgolfError, Technique, hook, register

MAGIC = b"BSHF"


class ByteShuffleParams(Params):
    stride: int = Field(2, ge=2, le=16, description="bytes per group (2: fp16 / bf16 numbers)")


def shuffle(data: bytes, stride: int) -> bytes:
    arr = np.frombuffer(data, dtype=np.uint8)
    return MAGIC + bytes([stride]) + b"".join(arr[i::stride].tobytes() for i in range(stride))


def unshuffle(blob: bytes) -> bytes:
    if blob[:4] != MAGIC or len(blob) < 5:
        raise PgolfError("not byte-shuffled data (missing the BSHF header)")
    stride = blob[4]
    arr = np.frombuffer(blob, dtype=np.uint8, offset=5)
    n = arr.size
    out = np.empty(n, dtype=np.uint8)
    pos = 0
    for i in range(stride):
        lane = (n - i + stride - 1) // stride
        out[i::stride] = arr[pos : pos + lane]
        pos += lane
    return out.tobytes()


@register("byte_shuffle")
class ByteShuffle(Technique):
    """Byte shuffle: before the codec, regroup the serialized bytes by their offset modulo ``stride``
    (all bytes at offsets 0, s, 2s, …, then 1, 1+s, …), so that the high and low bytes of fp16
    scales and other multi-byte numbers each sit together."""

    Params = ByteShuffleParams
    params: ByteShuffleParams

    @hook
    def encode_bytes(self, data: bytes) -> bytes:
        return shuffle(data, self.params.stride)

    @hook
    def decode_bytes(self, data: bytes) -> bytes:
        return unshuffle(data)
