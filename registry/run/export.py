"""Export: float-state chain → quantize per tensor → post-quantization chain → serialize →
byte-transform chain → codec → artifact file; and the way back.

The framework owns the tensor loop, passthrough and the format; techniques fill the export sites
(:mod:`pgolf.registry.api.sites`):

* ``float_state`` chain: the float state before quantization (pruning);
* ``quantizer`` slot per tensor: a technique claims tensors by role/kind (its ``scope``); the
  default ``int8_rowwise`` takes every large tensor nobody claims. Tensors no quantizer takes are
  float passthrough: non-float tensors as they are, control tensors (role ``scalar``) in fp32,
  small tensors (≤ ``export.passthrough_max_numel`` elements) in ``export.passthrough_dtype``, or
  fp32 where a value would not be representable there;
* ``post_quant`` chain on the packed state (±1 pruning, LQER), undone by ``post_dequantize``;
* ``serializer`` slot (default ``torch.save``), ``byte_transform`` chain, ``codec`` slot (default
  ``zlib``).

After every write the artifact is read back from disk and checked: every tensor must equal what
the quantizers produced in memory, be finite, and be within the error the quantizer states for it
(its ``error_bound`` hook) of the float weights (:class:`ExportMismatch` otherwise). The score is always taken after
:func:`load_artifact` has read the file back from disk, and the reported model bytes are the
file's size on disk. (The counted code bytes are :mod:`.code`'s.)
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..api.config import ExportConfig
from ..api.errors import PgolfError, RunFailed
from ..api.roles import Kind, ParamInfo, Role, param_infos
from ..api.sites import DEFAULT_FILLERS, Dispatcher
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


def _float_entry(name: str, t: Tensor, info: ParamInfo | None, cfg: ExportConfig) -> dict[str, Any]:
    if not t.is_floating_point():
        return {"q": "raw", "data": {"t": t}}
    if info is not None and info.role == Role.SCALAR:
        return {"q": "float", "data": {"t": t.float()}}
    want = _DTYPES[cfg.passthrough_dtype]
    cast = t.to(want)
    if not bool(torch.isfinite(cast).all()):  # e.g. |w| > 65,504 in fp16: keep it exact instead
        cast = t.float()
    return {"q": "float", "data": {"t": cast}}


def quantize_state(
    state: Mapping[str, Tensor], infos: Mapping[str, ParamInfo], sites: Dispatcher, cfg: ExportConfig
) -> dict[str, Any]:
    """The packed state: the float-state chain, then one entry per tensor (quantized by the
    quantizer that claims it, or float passthrough), then the post-quantization chain."""
    fstate = dict(state)
    for fn in sites.chain("float_state", state=fstate, infos=dict(infos)):
        fstate = fn
    default = default_quantizer(sites)
    tensors: dict[str, Any] = {}
    for name, t in fstate.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RunFailed(
                f"tensor {name} holds NaN or inf values (non-finite weights); refusing to export it"
            )
        info = infos.get(name)
        q = sites.claimant(info, default) if info is not None and t.is_floating_point() else None
        small = t.numel() <= cfg.passthrough_max_numel
        if q is None or info is None or info.role == Role.SCALAR or (q is default and small):
            entry = _float_entry(name, t, info, cfg)
        else:
            entry = {"q": q.name, "data": dict(q.call("quantize", name=name, tensor=t, info=info))}
        entry["dtype"] = str(t.dtype).removeprefix("torch.")
        entry["shape"] = list(t.shape)
        tensors[name] = entry
    packed: dict[str, Any] = {"format": FORMAT, "tensors": tensors, "extra": {}}
    for step in sites.implementers("post_quantize"):
        packed = step.call("post_quantize", packed=packed, state=fstate, infos=dict(infos))
    return packed


def dequantize_state(
    packed: Mapping[str, Any], infos: Mapping[str, ParamInfo], sites: Dispatcher
) -> dict[str, Tensor]:
    """The float state an artifact holds (each tensor in its recorded dtype)."""
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
    state: dict[str, Tensor]
    infos: dict[str, ParamInfo]


def export_model(model: nn.Module, sites: Dispatcher, cfg: ExportConfig) -> Export:
    """Quantize, pack and compress ``model``: the exact bytes the artifact file will hold."""
    state, infos = export_state(model)
    packed = quantize_state(state, infos, sites, cfg)
    return Export(encode(serialize(packed, sites), sites), packed, state, infos)


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
    equal the quantizers' own output, be finite, and lie within the quantizer's stated relative
    RMS error of the float weights (float passthrough: the cast's error)."""
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
        orig = ex.state.get(name)
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
        err = relative_rms_error(have, orig)
        if err > bound:
            how = "float passthrough" if entry["q"] == "float" else f"quantizer {entry['q']!r}"
            raise ExportMismatch(
                f"tensor {name} comes back from the artifact with relative RMS error {err:.3g}, above "
                f"the {bound:.3g} its {how} allows"
            )


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
