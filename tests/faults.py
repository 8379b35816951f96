"""Simulated file-system faults: a read-only folder and a full disk.

The suite may run as root, where ``chmod`` cannot make a folder read-only, and no test can fill a
real disk; these patch the file functions Python's I/O goes through (``io.open`` — which
``open``, ``Path.open`` and ``os.fdopen`` use —, ``os.open``, ``os.mkdir``, ``os.rename`` and
``os.replace``) so that only paths under one folder fail, exactly as the kernel reports it.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path
from typing import Any

import pytest

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _path_of(file: Any) -> Path | None:
    try:
        if isinstance(file, int):
            return Path(os.readlink(f"/proc/self/fd/{file}"))
        return Path(os.path.abspath(os.fsdecode(file)))
    except (OSError, TypeError, ValueError):
        return None


def _under(file: Any, root: Path) -> bool:
    p = _path_of(file)
    return p is not None and (p == root or root in p.parents)


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path, code: int = errno.EROFS) -> None:
    """Creating, writing or renaming anything under ``root`` fails with ``code``."""
    root = Path(os.path.abspath(root))
    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir
    real_rename, real_replace = os.rename, os.replace

    def fail(path: Any) -> None:
        raise OSError(code, os.strerror(code), str(_path_of(path) or path))

    def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if _writes(mode) and _under(file, root):
            fail(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & _WRITE_FLAGS and _under(path, root):
            fail(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path: Any, *a: Any, **k: Any) -> None:
        if _under(path, root):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
            fail(path)
        real_mkdir(path, *a, **k)

    def fake_move(real: Any) -> Any:
        def move(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if _under(src, root) or _under(dst, root):
                fail(dst)
            real(src, dst, *a, **k)

        return move

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "rename", fake_move(real_rename))
    monkeypatch.setattr(os, "replace", fake_move(real_replace))


class _FullFile:
    """A file whose writes fail with ENOSPC once the shared budget of free bytes is spent."""

    def __init__(self, f: Any, name: str, free: list[int]):
        self._f, self._name, self._free = f, name, free

    def write(self, data: Any) -> int:
        n = len(data)
        if n > self._free[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)
        self._free[0] -= n
        return int(self._f.write(data))

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def full_disk(monkeypatch: pytest.MonkeyPatch, root: Path, free: int = 0) -> None:
    """Writes into files under ``root`` fail with ENOSPC after ``free`` bytes in all."""
    root = Path(os.path.abspath(root))
    real_open = io.open
    budget = [free]

    def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_open(file, mode, *a, **k)
        if _writes(mode) and _under(file, root):
            return _FullFile(f, str(_path_of(file)), budget)
        return f

    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(builtins, "open", fake_open)
