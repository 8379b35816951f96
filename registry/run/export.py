"""Export: float-state chain → quantize per tensor → post-quantization chain → serialize →
byte-transform chain → codec → artifact file; and the way back.

The framework owns the tensor loop, passthrough and the format; techniques fill the export sites
(:mod:`pgolf.registry.api.sites`):

* ``float_state`` chain: the float state before quantization (magnitude pruning), each step on
  the previous step's output;
* ``quantizer`` slot per tensor: a technique claims tensors by role/kind (its ``scope``); the
  default ``int8_rowwise`` takes every large tensor nobody claims. Control tensors (role
  ``scalar``) are offered only to quantizers that declare ``quantizes_control``
  (``passthrough_int8``), never to a scope such as ``all`` (:func:`quantizer_of`). Tensors no
  quantizer takes are float passthrough: non-float tensors as they are, control tensors in fp32,
  small tensors (≤ ``export.passthrough_max_numel`` elements) in ``export.passthrough_dtype``, or
  fp32 where a value would not be representable there;
* ``post_quant`` chain on the packed state (LQER, ±1 pruning), undone by ``post_dequantize``;
  each step also gets the quantizers' dequantized output and ``measure`` (the artifact bytes of a
  packed state, for steps that aim at a byte target);
* ``serializer`` slot (default ``torch.save``), ``byte_transform`` chain, ``codec`` slot (default
  ``zlib``).

After every write the artifact is read back from disk and checked: every tensor must equal what
the quantizers and the post-quantization chain produced in memory, bit for bit, and be finite;
each quantizer's output must be within the error it states (its ``error_bound`` hook) of the
tensor it was given (:class:`ExportMismatch` otherwise). The score is always taken after
:func:`load_artifact` has read the file back from disk, and the reported model bytes are the
file's size on disk. (The counted code bytes are :mod:`.code`'s.)
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..api.config import ExportConfig
from ..api.errors import PgolfError, RunFailed
from ..api.roles import Kind, ParamInfo, Role, param_infos
from ..api.sites import DEFAULT_FILLERS, Dispatcher, conflict
from ..api.technique import Technique

ARTIFACT_NAME = "model.ptz"
FORMAT = "pgolf-artifact/2"

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PASSTHROUGH_ERROR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 0.0}
"""Largest relative RMS error of a float passthrough tensor after its cast."""


class ExportMismatch(RunFailed):
    """The artifact read back from disk does not give back what was written: a failed run (its
    folder is kept), not a result."""


def export_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, ParamInfo]]:
    """The tensors an artifact holds (CPU, contiguous; evaluation-time adapters left out) and
    their labels."""
    infos = param_infos(model)
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if k not in infos or infos[k].role != Role.ADAPTER
    }
    return state, {k: i for k, i in infos.items() if k in state}


def default_quantizer(sites: Dispatcher) -> Technique | None:
    name = DEFAULT_FILLERS["quantizer"]
    return next((t for t in sites.techniques if t.name == name), None)


def quantizer_of(info: ParamInfo, sites: Dispatcher, cfg: ExportConfig) -> Technique | None:
    """The quantizer that stores a float tensor, or None for float passthrough: the export's rule,
    which ``pgolf check`` reports. A control tensor (role ``scalar``) is offered only to quantizers
    that set ``quantizes_control`` (a scope such as ``all`` never reaches it) and is fp32 unless one
    claims it; any other tensor goes to the quantizer whose scope claims it, else to the default
    ``int8_rowwise`` when it has more than ``export.passthrough_max_numel`` elements. Two claiming
    one tensor is a :class:`SiteConflict`."""
    default = default_quantizer(sites)
    control = info.role == Role.SCALAR
    got = [
        t
        for t in sites.implementers("claims")
        if t is not default and (t.quantizes_control or not control) and t.call("claims", info=info)
    ]
    if len(got) > 1:
        raise conflict("quantizer", [t.name for t in got], f"tensor {info.name} (kind {info.kind.value})")
    if got:
        return got[0]
    return None if control or info.numel <= cfg.passthrough_max_numel else default


def float_cast(t: Tensor, dtype: str) -> Tensor:
    """``t`` in the float format ``dtype`` (fp16, bf16 or fp32), or in fp32 where a value would not
    be representable there (|w| > 65,504 in fp16 becomes inf: kept exact instead)."""
    cast = t.to(_DTYPES[dtype])
    if not bool(torch.isfinite(cast).all()):
        cast = t.float()
    return cast


def _float_entry(name: str, t: Tensor, info: ParamInfo | None, cfg: ExportConfig) -> dict[str, Any]:
    if not t.is_floating_point():
        return {"q": "raw", "data": {"t": t}}
    if info is not None and info.role == Role.SCALAR:
        return {"q": "float", "data": {"t": t.float()}}
    return {"q": "float", "data": {"t": float_cast(t, cfg.passthrough_dtype)}}


def float_chain(
    state: Mapping[str, Tensor], infos: Mapping[str, ParamInfo], sites: Dispatcher
) -> dict[str, Tensor]:
    """The ``float_state`` chain (pruning) applied to the export state: what the quantizers get."""
    fstate = dict(state)
    for t in sites.implementers("float_state"):  # each step gets the previous step's state
        fstate = dict(t.call("float_state", state=fstate, infos=dict(infos)))
    return fstate


def quantize_tensors(
    fstate: Mapping[str, Tensor], infos: Mapping[str, ParamInfo], sites: Dispatcher, cfg: ExportConfig
) -> dict[str, Any]:
    """The packed state before the post-quantization chain: one entry per tensor, quantized by
    the quantizer that claims it, or float passthrough."""
    tensors: dict[str, Any] = {}
    for name, t in fstate.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RunFailed(
                f"tensor {name} holds NaN or inf values (non-finite weights); refusing to export it"
            )
        info = infos.get(name)
        q = quantizer_of(info, sites, cfg) if info is not None and t.is_floating_point() else None
        if q is None:
            entry = _float_entry(name, t, info, cfg)
        else:
            entry = {"q": q.name, "data": dict(q.call("quantize", name=name, tensor=t, info=info))}
        entry["dtype"] = str(t.dtype).removeprefix("torch.")
        entry["shape"] = list(t.shape)
        if info is not None:
            entry["kind"] = info.kind.value
        tensors[name] = entry
    return {"format": FORMAT, "tensors": tensors, "extra": {}}


Measure = Callable[[Mapping[str, Any]], int]
"""Bytes the artifact of a packed state would take (serializer, byte transforms and codec)."""


def post_quantize(
    packed: dict[str, Any],
    fstate: Mapping[str, Tensor],
    infos: Mapping[str, ParamInfo],
    sites: Dispatcher,
    quantized: Mapping[str, Tensor],
) -> dict[str, Any]:
    """The ``post_quant`` chain in order. Each step gets the packed state, the float state the
    quantizers were given, the dequantized quantizer output (before any step) and ``measure``."""

    def measure(p: Mapping[str, Any]) -> int:
        return len(encode(serialize(p, sites), sites))

    for step in sites.implementers("post_quantize"):
        packed = step.call(
            "post_quantize",
            packed=packed,
            state=dict(fstate),
            infos=dict(infos),
            quantized=quantized,
            measure=measure,
        )
    return packed


def quantize_state(
    state: Mapping[str, Tensor], infos: Mapping[str, ParamInfo], sites: Dispatcher, cfg: ExportConfig
) -> dict[str, Any]:
    """The packed state: the float-state chain, then one entry per tensor (quantized by the
    quantizer that claims it, or float passthrough), then the post-quantization chain."""
    return _quantize(state, infos, sites, cfg)[0]


def _quantize(
    state: Mapping[str, Tensor], infos: Mapping[str, ParamInfo], sites: Dispatcher, cfg: ExportConfig
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """(packed state, float state given to the quantizers, their dequantized output)."""
    fstate = float_chain(state, infos, sites)
    packed = quantize_tensors(fstate, infos, sites, cfg)
    quantized = dequantize_entries(packed, infos, sites)
    if sites.implementers("post_quantize"):
        packed = post_quantize(packed, fstate, infos, sites, quantized)
    return packed, fstate, quantized


def dequantize_entries(
    packed: Mapping[str, Any], infos: Mapping[str, ParamInfo], sites: Dispatcher
) -> dict[str, Tensor]:
    """Each entry dequantized by its quantizer (each tensor in its recorded dtype), before the
    post-quantization chain is undone."""
    if packed.get("format") != FORMAT:
        raise PgolfError(f"not a {FORMAT} artifact (format={packed.get('format')!r})")
    by_name = {t.name: t for t in sites.techniques}
    state: dict[str, Tensor] = {}
    for name, entry in packed["tensors"].items():
        dtype = getattr(torch, entry["dtype"])
        if entry["q"] in ("raw", "float"):
            state[name] = entry["data"]["t"].to(dtype)
            continue
        q = by_name.get(entry["q"])
        if q is None:
            raise PgolfError(
                f"tensor {name} was stored by quantizer {entry['q']!r}, which this stack does not use"
            )
        info = infos.get(name) or ParamInfo(name, Role.MATRIX, Kind.OTHER, None, tuple(entry["shape"]))
        state[name] = q.call("dequantize", name=name, data=entry["data"], info=info).to(dtype)
    return state


def dequantize_state(
    packed: Mapping[str, Any], infos: Mapping[str, ParamInfo], sites: Dispatcher
) -> dict[str, Tensor]:
    """The float state an artifact holds (each tensor in its recorded dtype)."""
    state = dequantize_entries(packed, infos, sites)
    for step in reversed(sites.implementers("post_dequantize")):
        state = step.call("post_dequantize", state=state, packed=packed)
    return state


def serialize(packed: Mapping[str, Any], sites: Dispatcher) -> bytes:
    filler = sites.filler("serializer")
    if filler is not None:
        return bytes(filler.call("serialize", packed=packed))
    buf = io.BytesIO()
    torch.save(dict(packed), buf)
    return buf.getvalue()


def deserialize(data: bytes, sites: Dispatcher) -> dict[str, Any]:
    filler = sites.filler("serializer")
    if filler is not None:
        return dict(filler.call("deserialize", data=data))
    return dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def encode(raw: bytes, sites: Dispatcher) -> bytes:
    """Byte transforms in order, then the codec."""
    for t in sites.implementers("encode_bytes"):
        raw = bytes(t.call("encode_bytes", data=raw))
    codec = sites.filler("codec")
    assert codec is not None, "resolve_techniques adds the default codec"
    return bytes(codec.call("compress", data=raw))


def decode(blob: bytes, sites: Dispatcher) -> bytes:
    codec = sites.filler("codec")
    assert codec is not None, "resolve_techniques adds the default codec"
    raw = bytes(codec.call("decompress", data=blob))
    for t in reversed(sites.implementers("decode_bytes")):
        raw = bytes(t.call("decode_bytes", data=raw))
    return raw


@dataclass
class Export:
    """An export held in memory: the bytes the file will hold and what produced them."""

    blob: bytes
    packed: dict[str, Any]
    state: dict[str, Tensor]  # the model's export state
    infos: dict[str, ParamInfo]
    given: dict[str, Tensor] = field(default_factory=dict)  # after the float-state chain
    quantized: dict[str, Tensor] = field(default_factory=dict)  # the quantizers' output, dequantized


def export_model(model: nn.Module, sites: Dispatcher, cfg: ExportConfig) -> Export:
    """Quantize, pack and compress ``model``: the exact bytes the artifact file will hold."""
    state, infos = export_state(model)
    packed, given, quantized = _quantize(state, infos, sites, cfg)
    return Export(encode(serialize(packed, sites), sites), packed, state, infos, given, quantized)


def export_bytes(model: nn.Module, sites: Dispatcher, cfg: ExportConfig) -> bytes:
    return export_model(model, sites, cfg).blob


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_artifact(path: Path, model: nn.Module, sites: Dispatcher, cfg: ExportConfig) -> int:
    """Write the compressed model to ``path``, read it back and verify it (see
    :func:`verify_export`); returns its size on disk in bytes."""
    ex = export_model(model, sites, cfg)
    atomic_write(path, ex.blob)
    verify_export(path, ex, sites)
    return path.stat().st_size


def verify_export(path: Path, ex: Export, sites: Dispatcher) -> None:
    """Read ``path`` back and compare with the export in memory: each dequantized tensor must
    equal what the quantizers and the post-quantization chain produced, bit for bit, and be
    finite; and each quantizer's own output must lie within its stated relative RMS error of the
    tensor it was given (after the float-state chain; float passthrough: the cast's error).
    Post-quantization steps (LQER, ±1 pruning) are held to the exact round trip."""
    expected = dequantize_state(ex.packed, ex.infos, sites)
    got = load_artifact(path, sites, ex.infos)
    by_name = {t.name: t for t in sites.techniques}
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape or not torch.equal(have, want):
            raise ExportMismatch(
                f"the artifact {str(path)!r} does not give back tensor {name} as written "
                "(serializer, byte transform or codec changed it)"
            )
        if have.is_floating_point() and not bool(torch.isfinite(have).all()):
            raise ExportMismatch(f"tensor {name} holds NaN or inf after the export round trip")
        orig = ex.given.get(name, ex.state.get(name))
        if orig is None or not orig.is_floating_point():
            continue
        entry = ex.packed["tensors"][name]
        if entry["q"] == "float":
            bound = PASSTHROUGH_ERROR[entry["data"]["t"].dtype] * 1.01 + 1e-12
        else:
            q = by_name[entry["q"]]
            if "error_bound" not in q.hooks:  # no stated error: equality and finiteness only
                continue
            bound = float(q.call("error_bound", info=ex.infos[name], tensor=orig)) * 1.001 + 1e-9
        err = relative_rms_error(ex.quantized.get(name, have), orig)
        if err > bound:
            how = "float passthrough" if entry["q"] == "float" else f"quantizer {entry['q']!r}"
            raise ExportMismatch(
                f"tensor {name} is stored with relative RMS error {err:.3g}, above the {bound:.3g} "
                f"its {how} allows"
            )


def bit_width(lo: int, hi: int) -> int:
    """Bits that hold every integer of [lo, hi] as an offset from lo (at least 1)."""
    return max(1, math.ceil(math.log2(hi - lo + 1)))


def stored_bits(data: Any) -> int:
    """Bits the tensors of a stored entry need before any codec: integer tensors at the width of
    their value range, float tensors at their element width (nested dicts and lists summed)."""
    if isinstance(data, Tensor):
        if not data.numel():
            return 0
        if data.is_floating_point():
            return data.numel() * data.element_size() * 8
        return data.numel() * bit_width(int(data.min()), int(data.max()))
    if isinstance(data, Mapping):
        return sum(stored_bits(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return sum(stored_bits(v) for v in data)
    return 0


def relative_rms_error(approx: Tensor, exact: Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖ (0 for an all-zero tensor reproduced exactly)."""
    a, e = approx.double(), exact.double()
    denom = float(e.norm())
    num = float((a - e).norm())
    return num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))


def load_artifact(
    path: Path, sites: Dispatcher, infos: Mapping[str, ParamInfo] | None = None
) -> dict[str, Tensor]:
    """Read an artifact from disk back into a float state dict."""
    if not path.is_file():
        raise PgolfError(f"artifact {str(path)!r} does not exist")
    blob = path.read_bytes()
    try:
        packed = deserialize(decode(blob, sites), sites)
    except Exception as e:
        raise PgolfError(
            f"artifact {str(path)!r} could not be decoded with this stack's codec and serializer: {e}"
        ) from None
    return dequantize_state(packed, infos or {}, sites)


def load_into(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a dequantized state dict, casting each tensor to the model's dtype (evaluation-time
    adapters keep their fresh initialisation)."""
    own = model.state_dict()
    adapters = {n for n, i in param_infos(model).items() if i.role == Role.ADAPTER}
    missing = sorted(set(own) - set(state) - adapters)
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise PgolfError(
            "the artifact does not match this stack's model: "
            + (f"missing {missing[:5]} " if missing else "")
            + (f"unexpected {extra[:5]}" if extra else "")
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise PgolfError(
            "the artifact does not match this stack's model shape: "
            + "; ".join(f"{k} is {a} in the artifact but {b} in the model" for k, a, b in wrong[:3])
            + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            + " (was the model's shape changed in the stack after the run?)"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
