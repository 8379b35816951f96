"""What a run folder records, and the checks that it still is what it says it is.

A finished run folder holds ``stack.yaml`` (the resolved stack), ``model.ptz`` (the artifact),
``plugins/`` (copies of the local plugin files the run counted, which ``stack.yaml`` names by
relative path), ``manifest.json`` and ``result.json`` (written last: its presence means success).

``manifest.json`` records the SHA-256 of the artifact, the resolved stack (without plugin paths:
the plugins' code is recorded with the other code), every counted code file (:mod:`.code`), the
tokenizer and every validation shard. :func:`verify_run_folder` and :func:`verify_data` compare a
folder against it and name whatever changed.

Results are written as strict JSON: a non-finite number is never written (:func:`dumps_json`), and
a run whose score is not finite or has nothing to score is a failed run (:func:`check_result`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..api.config import ResolvedStack
from ..api.errors import PgolfError, RunFailed, os_error_text
from .code import CodeCount
from .dataset import file_sha256
from .export import ARTIFACT_NAME, atomic_write

STACK_FILE = "stack.yaml"
RESULT_FILE = "result.json"
MANIFEST_FILE = "manifest.json"
ERROR_FILE = "error.txt"
MANIFEST_FORMAT = "pgolf-run"
MANIFEST_VERSION = 1

REQUIRED_POSITIVE = ("val_tokens", "val_bytes", "model_bytes", "artifact_bytes")
"""Result fields that must be positive: zero means nothing was scored or nothing was written."""


class RunFolderMismatch(PgolfError):
    """A run folder no longer matches what its run recorded."""


# --------------------------------------------------------------------------------------------
# strict JSON and valid results
# --------------------------------------------------------------------------------------------


def non_finite_fields(obj: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """``(key path, value)`` of every NaN or infinite float inside ``obj`` (mappings, lists)."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            yield path or "<value>", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from non_finite_fields(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from non_finite_fields(v, f"{path}[{i}]")


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (for measurements such as a
    benchmark's, where a missing figure is not a failed run)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """Strict JSON (``NaN`` and ``Infinity`` are not JSON): raises :class:`PgolfError` naming
    the first non-finite field instead of writing it."""
    bad = next(non_finite_fields(obj), None)
    if bad is not None:
        raise PgolfError(f"refusing to write a non-finite number as a result: {bad[0]} is {bad[1]}")
    return json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON, atomically."""
    atomic_write(path, dumps_json(obj).encode())


def check_result(result: Mapping[str, Any]) -> None:
    """Raise :class:`RunFailed` unless every number of ``result`` is finite and it scored
    something (``val_tokens``, ``val_bytes``, ``model_bytes`` and ``artifact_bytes`` positive)."""
    problems = [f"{k} is {v}" for k, v in non_finite_fields(result)]
    for key in REQUIRED_POSITIVE:
        v = result.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and v <= 0:
            problems.append(f"{key} is {v}")
    if problems:
        raise RunFailed(
            "no valid result: " + ", ".join(problems) + " (a score is reported only when the "
            "reloaded artifact gives finite numbers over a non-empty validation split)"
        )


def keep_failed(staging: Path, out: Path, error: BaseException) -> Path | None:
    """Move a failed run's folder ``staging`` to ``OUT.failed`` (replacing an older one) with the
    reason in ``error.txt``; returns the new folder, or None if it could not be moved."""
    failed = out.parent / f"{out.name}.failed"
    try:
        if failed.exists():
            shutil.rmtree(failed)
        staging.rename(failed)
    except OSError:
        return None
    with contextlib.suppress(OSError):  # e.g. the disk is full: the folder itself is still kept
        (failed / ERROR_FILE).write_text(f"{type(error).__name__}: {error}\n", encoding="utf-8")
    return failed


# --------------------------------------------------------------------------------------------
# the resolved stack and plugin copies
# --------------------------------------------------------------------------------------------


def _stack_record(rs: ResolvedStack) -> dict[str, Any]:
    """The resolved stack as recorded: plugin paths left out (their code is checked by hash)."""
    d = rs.to_dict()
    d.pop("plugins", None)
    return d


def stack_fingerprint(rs: ResolvedStack) -> str:
    return hashlib.sha256(json.dumps(_stack_record(rs), sort_keys=True).encode()).hexdigest()


def write_stack(out_dir: Path, rs: ResolvedStack, code: CodeCount) -> None:
    """Write ``stack.yaml`` and copy the local plugin files (and the files they import from their
    folder) into ``out_dir/plugins/``; ``stack.yaml`` names the copies by relative path, so the
    folder re-scores with the code that ran even if the originals change or move."""
    local = {f.path: f for f in code.entries if f.local_plugin}
    for f in local.values():
        atomic_write(out_dir / f.name, f.path.read_bytes())
    d = rs.to_dict()
    plugins = []
    for p in d.get("plugins") or []:
        entry = local.get(Path(p).resolve())
        plugins.append(entry.name if entry is not None else p)
    d["plugins"] = plugins
    text = yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=100)
    atomic_write(out_dir / STACK_FILE, text.encode())


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------


def data_record(tokenizer: Path, val: Sequence[Path]) -> dict[str, Any]:
    """The scoring data as recorded: the tokenizer's and every validation shard's SHA-256."""
    return {
        "tokenizer": {"file": str(tokenizer), "sha256": file_sha256(tokenizer)},
        "val": {Path(p).name: file_sha256(Path(p)) for p in val},
    }


def manifest(
    rs: ResolvedStack, code: CodeCount, artifact: Path, tokenizer: Path, val: Sequence[Path]
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "artifact": {
            "file": artifact.name,
            "bytes": artifact.stat().st_size,
            "sha256": file_sha256(artifact),
        },
        "stack": {"file": STACK_FILE, "sha256": stack_fingerprint(rs), "resolved": _stack_record(rs)},
        "code": {
            "bytes": code.bytes,
            "sha256": code.sha256,
            "files": {f.name: f.sha256 for f in code.entries},
        },
        "data": data_record(tokenizer, val),
    }


def write_manifest(
    out_dir: Path, rs: ResolvedStack, code: CodeCount, artifact: Path, tokenizer: Path, val: Sequence[Path]
) -> None:
    """Write ``manifest.json`` (``tokenizer`` and ``val``: the data the run is scored on)."""
    write_json(out_dir / MANIFEST_FILE, manifest(rs, code, artifact, tokenizer, val))


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None for a folder written before pgolf kept one."""
    path = run_dir / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
        for key in ("artifact", "stack", "code"):
            if not isinstance(m.get(key), dict):
                raise ValueError(f"no {key!r} section")
        return m
    except (OSError, UnicodeDecodeError, ValueError) as e:
        msg = os_error_text(e) if isinstance(e, OSError) else str(e)
        raise RunFolderMismatch(f"{path}: unreadable run manifest ({msg})") from None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def stack_changes(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``['model.model_dim: 64 → 128', 'techniques.xsa: added', ...]``."""
    a, b = _flatten(recorded), _flatten(now)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            changes.append(f"{key}: removed (was {a[key]!r})")
        elif key not in a:
            changes.append(f"{key}: added ({b[key]!r})")
        elif a[key] != b[key]:
            changes.append(f"{key}: {a[key]!r} → {b[key]!r}")
    return changes


def verify_data(run_dir: Path, tokenizer: Path, val: Sequence[Path]) -> None:
    """Refuse to re-score on a tokenizer or validation shards other than the run's (by SHA-256)."""
    m = read_manifest(run_dir)
    rec = m.get("data") if m is not None else None
    if not isinstance(rec, Mapping):
        return  # a folder written before the data were recorded
    now = data_record(tokenizer, val)
    changes = []
    if (rec.get("tokenizer") or {}).get("sha256") != now["tokenizer"]["sha256"]:
        changes.append(f"tokenizer {tokenizer} (was {(rec.get('tokenizer') or {}).get('file')})")
    was = rec.get("val") or {}
    changes += [
        f"{name} changed" for name in sorted(was.keys() & now["val"].keys()) if was[name] != now["val"][name]
    ]
    changes += [f"{name} added" for name in sorted(now["val"].keys() - was.keys())]
    changes += [f"{name} removed" for name in sorted(was.keys() - now["val"].keys())]
    if changes:
        raise RunFolderMismatch(
            f"{run_dir}: the scoring data differ from the run's ({'; '.join(changes)}), so the score "
            "would not be this run's; restore the data the run used"
        )


def verify_run_folder(
    run_dir: Path, rs: ResolvedStack, code: CodeCount, *, allow_code_change: bool = False
) -> list[str]:
    """Check ``run_dir`` against its manifest. Raises :class:`RunFolderMismatch` naming what
    changed (the stack first, then the artifact, then code files); returns notes to show (code
    changes accepted with ``allow_code_change``, or a folder without a manifest)."""
    m = read_manifest(run_dir)
    if m is None:
        return [
            f"{run_dir} has no {MANIFEST_FILE} (written by an older pgolf): the artifact, stack and "
            "code cannot be checked against what was trained"
        ]
    recorded = m["stack"].get("resolved")
    if m["stack"].get("sha256") != stack_fingerprint(rs):
        changes = stack_changes(recorded, _stack_record(rs)) if isinstance(recorded, Mapping) else []
        raise RunFolderMismatch(
            f"{run_dir / STACK_FILE} no longer matches the stack this run trained"
            + (": " + "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
               if changes else "")
            + ". Restore it (the trained stack is in manifest.json and run.log), or run the new stack"
        )  # fmt: skip
    art = m["artifact"]
    path = run_dir / str(art.get("file", ARTIFACT_NAME))
    if not path.is_file():
        raise RunFolderMismatch(f"{path}: the run's artifact is missing")
    digest = file_sha256(path)
    if digest != art.get("sha256"):
        raise RunFolderMismatch(
            f"{path} changed since the run: sha256 {digest[:16]}… (now, {path.stat().st_size:,} bytes) "
            f"vs {str(art.get('sha256'))[:16]}… recorded ({art.get('bytes', '?'):,} bytes); "
            "a changed artifact would be scored silently, so it is refused"
        )
    files = m["code"].get("files") or {}
    now = {f.name: f.sha256 for f in code.entries}
    changed = sorted(k for k in files.keys() & now.keys() if files[k] != now[k])
    added = sorted(now.keys() - files.keys())
    removed = sorted(files.keys() - now.keys())
    parts = (
        ([f"changed: {', '.join(changed)}"] if changed else [])
        + ([f"not counted at the run: {', '.join(added)}"] if added else [])
        + ([f"no longer counted: {', '.join(removed)}"] if removed else [])
    )
    if not parts:
        return []
    text = "the code differs from the code this run executed (" + "; ".join(parts) + ")"
    if allow_code_change:
        return [text + "; re-scoring with the current code as asked (--allow-code-change)"]
    raise RunFolderMismatch(
        f"{run_dir}: {text}. The score may differ; re-run the stack, or pass --allow-code-change to "
        "re-score with the current code"
    )
