"""The zlib, brotli and zstd codecs: lossless, and brotli / zstd smaller on a real packed model."""

from __future__ import annotations

import pytest
import torch

from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.export import export_model, serialize
from pgolf.registry.run.pipeline import build, surrogate_weights_
from pgolf.techniques.brotli import Brotli, BrotliParams
from pgolf.techniques.zlib import Zlib, ZlibParams
from pgolf.techniques.zstd import Zstd, ZstdParams


def packed_model() -> bytes:
    rs = stack_from_dict({"model": {"num_layers": 2, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2}})
    b = build(rs, torch.device("cpu"))
    surrogate_weights_(b.model, 0)
    return serialize(export_model(b.model, b.sites, rs.stack.export).packed, b.sites)


def test_codecs_are_lossless_and_brotli_beats_zlib() -> None:
    raw = packed_model()
    z = Zlib(ZlibParams(level=9), None)  # type: ignore[arg-type]
    b = Brotli(BrotliParams(quality=11), None)  # type: ignore[arg-type]
    zc, bc = z.compress(raw), b.compress(raw)
    assert z.decompress(zc) == raw and b.decompress(bc) == raw
    assert len(bc) < len(zc) < len(raw)


def test_zstd_is_lossless_smaller_than_zlib_and_detects_a_flipped_bit() -> None:
    raw = packed_model()
    z = Zlib(ZlibParams(level=9), None)  # type: ignore[arg-type]
    s = Zstd(ZstdParams(level=22), None)  # type: ignore[arg-type]
    sc = s.compress(raw)
    assert s.decompress(sc) == raw and len(sc) < len(z.compress(raw))
    flipped = bytearray(sc)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(Exception):  # noqa: B017 - zstandard raises its own ZstdError
        s.decompress(bytes(flipped))
