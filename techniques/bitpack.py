"""Bit packing serializer: integer codes stored in as many bits as their range needs (int5 / int6 /
int7 codes in 5 / 6 / 7 bits instead of an int8 container), in a compact self-describing format
that replaces ``torch.save``.

What: the packed state (nested dicts and lists of tensors, strings and numbers) becomes
``b"PGPK"``, a version byte, a 4-byte little-endian header length, a JSON header (the tree with
every tensor replaced by its index; per tensor its dtype, shape, layout, bit width and offset) and
the tensors' payloads one after another. An integer tensor with values in [lo, hi] is stored as
v − lo in b = ⌈log2(hi − lo + 1)⌉ bits (at least 1) when b is below its element width:

* ``codes: packed`` — the b bits of each value after one another (least significant first),
  8 values in b bytes;
* ``codes: planes`` — bit-plane split: all values' bit 0, then all bit 1, … (each plane padded
  to a whole byte), so a codec sees the nearly constant high planes apart from the noisy low ones;
* ``codes: bytes`` — no packing: each value in its own element bytes (the codec does the work).

Float tensors are stored bit for bit, as they are (``floats: bytes``) or split into byte planes
(``floats: planes``: all elements' first byte, then their second, …). Non-tensor leaves go into
the JSON header (Python floats round-trip exactly through ``repr``). Deserializing gives back
the same tree with equal tensors (dtype, shape, values), so every reload is bit-exact.

Why: ``torch.save`` writes int6 codes one per byte in a zip container with pickled metadata;
raw 6-bit packing is 25 % smaller before any codec, and bit planes or byte planes can let a codec
find structure it misses in interleaved bytes. Which layout wins depends on the codec: entropy
coders (brotli, zstd, lzma) already squeeze byte-aligned codes close to their entropy, and packing
hides the symbol boundaries from them — measure (``bench/quant_export.py``).

Source: the int5/int6 records' "int6 in an int8 container" (``R/2026-03-19_MixedQuant…``,
``R/2026-03-20_Int6…``) and ``R/2026-03-19_TopHeavyFFN_PackedInt6…`` (packed int6); bit-plane
splitting is the usual trick for entropy coders of small integers (e.g. Blosc's bitshuffle).

Sites: the ``serializer`` slot (``serialize``, ``deserialize``).

Interactions: works on any quantizer's stored tensors (int8 codes with a smaller range pack,
anything else is stored as is). ``byte_shuffle`` (a byte transform) and ``floats: planes`` do
similar things at different granularity. The artifact's bytes are what the codec makes of these.

Evidence: pgolf, baseline-size model with surrogate weights (``bench/quant_export.py``, CPU,
``bench/quant_export_results/2026-12-01-cpu.json``), against ``torch.save``'s int8 containers on
the same codes: int5 GPTQ codes come out smaller with every codec (brotli-11 5,444,500 vs
5,527,550 bytes, −1.5 %; lzma-9 5,543,024 vs 5,892,612; zlib-9 6,018,969 vs 6,377,695); int6 GPTQ
codes larger with every codec although the serialized state is 36 % smaller (brotli-11 8,868,113
vs 7,582,204, zstd-22 9,833,486 vs 8,152,567, zlib-9 10,003,768 vs 8,615,618); int8 codes neutral
(brotli-11 15,784,584 vs 15,790,755). Measure before using it. Not yet measured with pgolf on a
trained record-size model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import Params, PgolfError, Technique, hook, register
from pgolf.registry.run.export import bit_width

MAGIC = b"PGPK"
VERSION = 1
CHUNK = 1 << 18  # values packed per step (a multiple of 8: whole bytes per chunk)
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}  # fmt: skip
_INTS = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}


class BitpackParams(Params):
    codes: Literal["packed", "planes", "bytes"] = Field(
        "packed", description="integer tensors: b-bit packed, bit planes, or one element each"
    )
    floats: Literal["bytes", "planes"] = Field(
        "bytes", description="float tensors: as they are, or split into byte planes"
    )


def pack_bits(v: np.ndarray, bits: int, planes: bool) -> bytes:
    """Non-negative integers v (< 2^bits) in ``bits`` bits each: value after value (least
    significant bit first) or plane after plane (each plane padded to a byte)."""
    v = v.astype(np.uint32, copy=False)
    if planes:
        return b"".join(
            np.packbits(((v >> k) & 1).astype(np.uint8), bitorder="little").tobytes() for k in range(bits)
        )
    shifts = np.arange(bits, dtype=np.uint32)
    out = [
        np.packbits(((v[i : i + CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1), bitorder="little")
        for i in range(0, v.size, CHUNK)
    ]
    return b"".join(o.tobytes() for o in out)


def unpack_bits(buf: bytes, n: int, bits: int, planes: bool) -> np.ndarray:
    """The inverse of :func:`pack_bits`: n values (int64)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    out = np.zeros(n, dtype=np.int64)
    if planes:
        per = (n + 7) // 8
        for k in range(bits):
            plane = np.unpackbits(raw[k * per : (k + 1) * per], count=n, bitorder="little")
            out |= plane.astype(np.int64) << k
        return out
    weights = (1 << np.arange(bits, dtype=np.int64))[None, :]
    step = CHUNK * bits // 8  # bytes of CHUNK values
    for i in range(0, n, CHUNK):
        m = min(CHUNK, n - i)
        part = raw[(i // CHUNK) * step : (i // CHUNK) * step + (m * bits + 7) // 8]
        flat = np.unpackbits(part, count=m * bits, bitorder="little").reshape(m, bits)
        out[i : i + m] = (flat.astype(np.int64) * weights).sum(axis=1)
    return out


def _tensor_bytes(t: Tensor) -> np.ndarray:
    """The elements' bytes (uint8, (numel·itemsize,)) of a CPU tensor, bit for bit."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy()


class Encoder:
    def __init__(self, p: BitpackParams):
        self.p = p
        self.tensors: list[dict[str, Any]] = []
        self.chunks: list[bytes] = []
        self.offset = 0

    def node(self, x: Any) -> Any:
        if isinstance(x, Tensor):
            return {"x": self.tensor(x)}
        if isinstance(x, Mapping):
            if not all(isinstance(k, str) for k in x):
                raise PgolfError("bitpack: packed state keys must be strings")
            return {"d": {k: self.node(v) for k, v in x.items()}}
        if isinstance(x, (list, tuple)):
            return {"l" if isinstance(x, list) else "t": [self.node(v) for v in x]}
        if x is None or isinstance(x, (str, bool, int, float)):
            return {"v": x}
        raise PgolfError(f"bitpack: cannot store a {type(x).__name__} in the packed state")

    def tensor(self, t: Tensor) -> int:
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise PgolfError(f"bitpack: tensors of dtype {name} are not supported")
        meta: dict[str, Any] = {"dtype": name, "shape": list(t.shape), "layout": "raw"}
        n = t.numel()
        if t.dtype in _INTS and n and self.p.codes != "bytes":
            lo, hi = int(t.min()), int(t.max())
            bits = bit_width(lo, hi)
            if bits < t.element_size() * 8:
                v = t.detach().to("cpu").reshape(-1).to(torch.int64).numpy() - lo
                data = pack_bits(v, bits, self.p.codes == "planes")
                meta.update(layout=self.p.codes, bits=bits, lo=lo)
                return self._add(meta, data)
        raw = _tensor_bytes(t)
        if t.is_floating_point() and self.p.floats == "planes" and t.element_size() > 1 and n:
            meta["layout"] = "byteplanes"
            return self._add(meta, raw.reshape(n, t.element_size()).T.tobytes())
        return self._add(meta, raw.tobytes())

    def _add(self, meta: dict[str, Any], data: bytes) -> int:
        meta.update(offset=self.offset, nbytes=len(data))
        self.offset += len(data)
        self.chunks.append(data)
        self.tensors.append(meta)
        return len(self.tensors) - 1


def serialize(packed: Mapping[str, Any], p: BitpackParams) -> bytes:
    enc = Encoder(p)
    tree = enc.node(dict(packed))
    header = json.dumps({"tree": tree, "tensors": enc.tensors}, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"".join(enc.chunks)


def _decode_tensor(meta: Mapping[str, Any], payload: memoryview) -> Tensor:
    dtype = _DTYPES[meta["dtype"]]
    shape = tuple(meta["shape"])
    n = math.prod(shape)
    buf = bytes(payload[meta["offset"] : meta["offset"] + meta["nbytes"]])
    layout = meta["layout"]
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    if layout in ("packed", "planes"):
        v = unpack_bits(buf, n, int(meta["bits"]), layout == "planes") + int(meta["lo"])
        return torch.from_numpy(v).to(dtype).reshape(shape)
    size = torch.empty((), dtype=dtype).element_size()
    arr = np.frombuffer(buf, dtype=np.uint8)
    if layout == "byteplanes":
        arr = arr.reshape(size, n).T
    raw = torch.from_numpy(arr.copy()).reshape(-1)
    if dtype == torch.bool:
        return raw.to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape).clone()


def deserialize(data: bytes) -> dict[str, Any]:
    if data[:4] != MAGIC:
        raise PgolfError("not a bitpack artifact (missing the PGPK header)")
    if data[4] != VERSION:
        raise PgolfError(f"bitpack format version {data[4]} is not supported (this pgolf reads {VERSION})")
    (hlen,) = struct.unpack("<I", data[5:9])
    header = json.loads(data[9 : 9 + hlen].decode())
    payload = memoryview(data)[9 + hlen :]
    tensors = [_decode_tensor(m, payload) for m in header["tensors"]]

    def build(node: Mapping[str, Any]) -> Any:
        if "x" in node:
            return tensors[node["x"]]
        if "d" in node:
            return {k: build(v) for k, v in node["d"].items()}
        if "l" in node:
            return [build(v) for v in node["l"]]
        if "t" in node:
            return tuple(build(v) for v in node["t"])
        return node["v"]

    return dict(build(header["tree"]))


@register("bitpack")
class Bitpack(Technique):
    """Bit packing serializer: integer codes stored in as many bits as their range needs (int5 / int6 /
    int7 codes in 5 / 6 / 7 bits instead of an int8 container), in a compact self-describing format
    that replaces ``torch.save``."""

    Params = BitpackParams
    params: BitpackParams

    @hook
    def serialize(self, packed: dict[str, Any]) -> bytes:
        return serialize(packed, self.params)

    @hook
    def deserialize(self, data: bytes) -> dict[str, Any]:
        return deserialize(data)
