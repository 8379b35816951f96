"""LZMA codec for the packed model (xz container), in place of zlib.

What: LZMA2 (``lzma.compress``, xz format with a CRC-64 check, so a corrupted artifact fails to
decode instead of scoring another model) at ``preset`` 0–9, optionally ``extreme``, optionally
after a delta filter of distance ``delta`` (bytes; predicts each byte from the one ``delta``
before, which can help tables of fixed-width numbers) and with the literal context bits
``lc`` / position bits ``pb`` / ``lp`` of LZMA2 set explicitly (null: the preset's).

Why: the records that used selective pruning measured their byte target with LZMA-9; on byte
codes with structure it can beat zlib by a few percent (and lost to it on the 03-18 int8 data).

Source: parameter-golf ``R/2026-03-23``, ``R/2026-03-25``, ``R/2026-03-29`` (``lzma.compress(preset
=9)``); Python's ``lzma`` module (liblzma).

Interactions: fills the exclusive ``codec`` slot (instead of the default ``zlib``). Slow at
preset 9 (about 60 s for 16 MB on one core), like brotli-11 and zstd-22; see
``bench/quant_export.py`` for the three on the same packed bytes.

Evidence: pgolf, baseline-size model with surrogate weights (``bench/quant_export.py``, CPU,
``bench/quant_export_results/2026-12-01-cpu.json``): int6 GPTQ codes 8,061,628 bytes (zlib-9
8,615,618, brotli-11 7,582,204), int8 codes 15,952,560 (larger than zlib-9's 15,900,536); with
6-bit packing (``bitpack``) it is the best after brotli (9,065,908). Not yet measured with pgolf
on a trained record-size model.
"""

from __future__ import annotations

import lzma as _lzma
from typing import Any

from pydantic import Field

from pgolf.registry import Params, Technique, hook, register


class LzmaParams(Params):
    preset: int = Field(9, ge=0, le=9, description="compression preset (9 = smallest)")
    extreme: bool = Field(False, description="the preset's slower 'extreme' variant")
    delta: int | None = Field(None, ge=1, le=256, description="delta filter distance in bytes; null = none")
    lc: int | None = Field(None, ge=0, le=4, description="LZMA2 literal context bits; null = the preset's")
    lp: int | None = Field(None, ge=0, le=4, description="LZMA2 literal position bits; null = the preset's")
    pb: int | None = Field(None, ge=0, le=4, description="LZMA2 position bits; null = the preset's")


def filters(p: LzmaParams) -> list[dict[str, Any]]:
    """The xz filter chain of these params: [delta], LZMA2."""
    lz: dict[str, Any] = {
        "id": _lzma.FILTER_LZMA2,
        "preset": p.preset | (_lzma.PRESET_EXTREME if p.extreme else 0),
    }
    for key in ("lc", "lp", "pb"):
        if getattr(p, key) is not None:
            lz[key] = getattr(p, key)
    chain = [{"id": _lzma.FILTER_DELTA, "dist": p.delta}] if p.delta else []
    return [*chain, lz]


@register("lzma")
class Lzma(Technique):
    """LZMA codec for the packed model (xz container), in place of zlib."""

    Params = LzmaParams
    params: LzmaParams

    @hook
    def compress(self, data: bytes) -> bytes:
        return _lzma.compress(
            data, format=_lzma.FORMAT_XZ, check=_lzma.CHECK_CRC64, filters=filters(self.params)
        )

    @hook
    def decompress(self, data: bytes) -> bytes:
        return _lzma.decompress(data, format=_lzma.FORMAT_XZ)
