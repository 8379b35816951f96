"""The zlib and brotli codecs: lossless, and brotli smaller on a real packed model."""

from __future__ import annotations

import torch

from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.export import pack
from pgolf.registry.run.pipeline import build, surrogate_weights_
from pgolf.techniques.brotli import Brotli, BrotliParams
from pgolf.techniques.zlib import Zlib, ZlibParams


def packed_model() -> bytes:
    rs = stack_from_dict({"model": {"num_layers": 2, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2}})
    techs = [r.instantiate(rs.spec) for r in rs.techniques]
    model = build(rs, techs, torch.device("cpu"))
    surrogate_weights_(model, 0)
    return pack(model, techs)


def test_codecs_are_lossless_and_brotli_beats_zlib() -> None:
    raw = packed_model()
    z = Zlib(ZlibParams(level=9), None)  # type: ignore[arg-type]
    b = Brotli(BrotliParams(quality=11), None)  # type: ignore[arg-type]
    zc, bc = z.compress(raw), b.compress(raw)
    assert z.decompress(zc) == raw and b.decompress(bc) == raw
    assert len(bc) < len(zc) < len(raw)
