"""Export: quantize → pack (torch.save) → compress → artifact file; and the way back.

The quantizer and the codec are exclusive slots filled by techniques (defaults: the
baseline's ``int8_rowwise`` and ``zlib``). The score is always taken after
:func:`load_artifact` has read the file back from disk, and the reported model bytes are the
file's size on disk. (The counted code bytes are :mod:`.code`'s.)
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..api.errors import PgolfError
from ..api.roles import role_table
from ..api.technique import Technique

ARTIFACT_NAME = "model.ptz"


def slot_filler(techniques: Sequence[Technique], hook_name: str) -> Technique:
    for t in techniques:
        if hook_name in t.hooks:
            return t
    raise PgolfError(f"no technique fills the {hook_name!r} hook")  # resolve_techniques adds defaults


def pack(model: nn.Module, techniques: Sequence[Technique]) -> bytes:
    """Quantize the model's state with the stack's quantizer and serialise it (uncompressed)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    packed = slot_filler(techniques, "quantize").call("quantize", state=state, roles=role_table(model))
    buf = io.BytesIO()
    torch.save(packed, buf)
    return buf.getvalue()


def compress(raw: bytes, techniques: Sequence[Technique]) -> bytes:
    return bytes(slot_filler(techniques, "compress").call("compress", data=raw))


def export_bytes(model: nn.Module, techniques: Sequence[Technique]) -> bytes:
    """The exact bytes the artifact file will hold."""
    return compress(pack(model, techniques), techniques)


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


def write_artifact(path: Path, model: nn.Module, techniques: Sequence[Technique]) -> int:
    """Write the compressed model to ``path``; returns its size on disk in bytes."""
    atomic_write(path, export_bytes(model, techniques))
    return path.stat().st_size


def load_artifact(path: Path, techniques: Sequence[Technique]) -> dict[str, Tensor]:
    """Read an artifact from disk back into a float state dict."""
    if not path.is_file():
        raise PgolfError(f"artifact {str(path)!r} does not exist")
    blob = path.read_bytes()
    try:
        raw = slot_filler(techniques, "decompress").call("decompress", data=blob)
        packed = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PgolfError(
            f"artifact {str(path)!r} could not be decoded with this stack's codec: {e}"
        ) from None
    state = slot_filler(techniques, "dequantize").call("dequantize", packed=packed)
    return dict(state)


def load_into(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a dequantized state dict, casting each tensor to the model's dtype."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
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
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
