"""Counted code: the bytes of the submission script a stack exports to, and the source files a
run executes.

The challenge counts the code of a submission in its artifact: the bytes of its ``train_gpt.py``.
:func:`code_bytes` counts the script ``pgolf export`` writes for the stack (generated from the
run's own modules and the techniques the stack uses, with the resolved stack in it, minified and
wrapped: :mod:`pgolf.registry.tools.script`), so the size gate before training, the search and
``result.json`` count the file a submission holds. When no script can be generated (a plugin whose
code cannot be inlined), the count falls back to the wrapped source of every file the run executes,
and :attr:`CodeCount.note` says why.

:func:`counted_files` lists the source files a run of the stack executes, found by following
``import`` statements (at any depth, not under ``if TYPE_CHECKING:``) from the run's entry module,
from the submission script's entry module (the run generates the script to count its code) and
from each technique's file; their hashes go into the run's manifest, so ``pgolf eval`` can
refuse code that changed since the run:

- pgolf modules, with the ``__init__.py`` of every package they sit in (Python runs those first);
- each technique's file and whatever it imports from its own folder (a local plugin) or its own
  top-level package (an installed plugin), with the same rules applied to those files;
- the default-corpus builder (:mod:`pgolf.registry.tools.corpus`) only when the stack uses the
  embedded default corpus (``data.path: null``): with a ``data.path`` it builds nothing.

The legality probes and the provenance check (:data:`VERIFICATION_MODULES`) run too, but they
verify the run rather than make it, and a submission does not contain them: not counted.

Not counted: the standard library and installed third-party distributions (torch, numpy, ...), as
in the challenge, and the built-in techniques a stack does not use (the registry imports them to
list them; a submission would not contain them). The CLI, the bench and the search harness drive
:func:`run` and are not reached from it.

A plugin whose code cannot be counted is refused (:class:`CodeCountError`): one that imports a
Python file that is neither in its own folder or package, nor pgolf, nor an installed library;
one that imports compiled code of its own; or one that loads code dynamically (``exec``,
``__import__``, ``importlib.import_module``, ``runpy``, loading a file by path).
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import lzma
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.errors import PgolfError
from ..api.technique import Technique

ENTRY_MODULE = "pgolf.registry.run.pipeline"
"""The module whose :func:`run` the CLI, the tests and the search call."""
SCRIPT_ENTRY_MODULE = "pgolf.registry.run.submission"
"""The entry point of the submission script, which every run generates to count its code."""

PGOLF_PACKAGES = ("pgolf.registry", "pgolf.techniques")
DEFAULT_CORPUS_MODULE = "pgolf.registry.tools.corpus"
VERIFICATION_MODULES = ("pgolf.registry.run.legality", "pgolf.registry.run.provenance")
"""The legality probes and the data-provenance check: they verify a run after its score (and its
data before training); a submission does not run them, so they are not counted."""
PLUGIN_FOLDER = "plugins"
"""Local plugin files are counted (and kept in a run folder) under this name."""

SCRIPT_METHOD = (
    "the size of the train_gpt.py `pgolf export` writes for this stack: the run's own modules and the "
    "stack's techniques bundled into one script with the resolved stack in it, minified, and wrapped in "
    "a one-line self-extracting form (base85 of its LZMA, the form the records submitted their code in) "
    "when that is smaller; it needs only the standard library, torch, numpy, sentencepiece and the "
    "codec's package (source_bytes is the plain size of the source files the run executes)"
)
FILES_METHOD = (
    "no submission script could be generated for this stack (see note), so the count is the size of a "
    "one-line self-extracting script (base85 of the LZMA of the sources) holding every Python file the run "
    "executes: the pgolf modules reached by imports from pgolf.registry.run.pipeline, each technique's file "
    "and what it imports from its own folder or package, and the default-corpus builder when the default "
    "corpus is used (source_bytes is their plain UTF-8 size)"
)
CODE_BYTES_METHOD = SCRIPT_METHOD

_DYNAMIC_CALLS = {
    "exec": "exec()",
    "__import__": "__import__()",
    "import_module": "importlib.import_module()",
    "run_path": "runpy.run_path()",
    "run_module": "runpy.run_module()",
    "spec_from_file_location": "importlib.util.spec_from_file_location()",
    "SourceFileLoader": "importlib.machinery.SourceFileLoader",
    "load_source": "imp.load_source()",
}


class CodeCountError(PgolfError):
    """A technique runs code pgolf cannot count."""


@dataclass(frozen=True)
class CountedFile:
    """One counted source file. ``name`` is stable across installs: the module path for pgolf
    and installed plugins (``pgolf/registry/run/data.py``), ``plugins/<path in its folder>`` for a
    local plugin file and the files it imports from its folder."""

    name: str
    path: Path
    bytes: int
    sha256: str
    local_plugin: bool = False


@dataclass(frozen=True)
class CodeCount:
    bytes: int  # counted: the submission script's size (or the wrapped files', see note)
    files: tuple[str, ...]
    sha256: str  # first 16 hex digits, over every file's name and content
    method: str = CODE_BYTES_METHOD
    entries: tuple[CountedFile, ...] = ()
    source_bytes: int = 0  # the plain UTF-8 size of the files
    note: str = ""  # why no submission script was generated (bytes then count the files)


WRAPPER_HEAD = b'import lzma,base64;exec(lzma.decompress(base64.b85decode("'
WRAPPER_TAIL = b'")))\n'
LZMA_FILTERS = ({"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0},)
"""LZMA preset 9e in the legacy ``.lzma`` container (13 bytes of header where ``.xz`` takes ~60;
``lzma.decompress`` reads either), with the literal coding suited to text (pb 0)."""


def wrap(source: bytes) -> bytes:
    """A one-line script that runs ``source``: ``exec`` of the base85 of its LZMA (preset 9e),
    the form the challenge records submitted their code in."""
    blob = base64.b85encode(lzma.compress(source, format=lzma.FORMAT_ALONE, filters=list(LZMA_FILTERS)))
    return WRAPPER_HEAD + blob + WRAPPER_TAIL


def wrapped_size(source: bytes) -> int:
    """Bytes of :func:`wrap` ``(source)``."""
    return len(wrap(source))


# --------------------------------------------------------------------------------------------
# imports of one file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Import:
    names: tuple[str, ...]  # candidate module names, most specific last
    line: int


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, package: str):
        self.package = package
        self.imports: list[_Import] = []
        self.dynamic: list[tuple[str, int]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            parts = alias.name.split(".")
            self.imports.append(
                _Import(tuple(".".join(parts[: i + 1]) for i in range(len(parts))), node.lineno)
            )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".") if self.package else []
            if node.level - 1 > len(base_parts) or not self.package:
                return  # a relative import outside any package fails at import time anyway
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if not base:
            return
        parts = base.split(".")
        chain = tuple(".".join(parts[: i + 1]) for i in range(len(parts)))
        self.imports.append(_Import(chain, node.lineno))
        for alias in node.names:
            if alias.name != "*":
                self.imports.append(_Import((*chain, f"{base}.{alias.name}"), node.lineno))

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in _DYNAMIC_CALLS:
            self.dynamic.append((_DYNAMIC_CALLS[name], node.lineno))
        self.generic_visit(node)


@functools.lru_cache(maxsize=512)
def _parse(
    path: Path, mtime_ns: int, size: int, package: str
) -> tuple[tuple[_Import, ...], tuple[tuple[str, int], ...]]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as e:
        raise CodeCountError(f"{path}: cannot read the source to count it ({e})") from None
    v = _ImportVisitor(package)
    v.visit(tree)
    return tuple(v.imports), tuple(v.dynamic)


def _file_imports(path: Path, package: str) -> tuple[tuple[_Import, ...], tuple[tuple[str, int], ...]]:
    st = path.stat()
    return _parse(path, st.st_mtime_ns, st.st_size, package)


# --------------------------------------------------------------------------------------------
# where a module lives
# --------------------------------------------------------------------------------------------


def _module_file(name: str) -> tuple[Path | None, bool] | None:
    """(source file or None for built-in / namespace modules, is a package), or None when
    ``name`` is not an importable module (e.g. an attribute in ``from X import name``)."""
    mod = sys.modules.get(name)
    spec = getattr(mod, "__spec__", None) if mod is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            return None
    if spec is None:
        return None
    is_pkg = spec.submodule_search_locations is not None
    origin = spec.origin if spec.has_location else None
    return (Path(origin).resolve() if origin else None), is_pkg


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    roots = {Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(sorted(roots))


@functools.lru_cache(maxsize=1)
def _distribution_tops() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


def _is_library(name: str, path: Path) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top in _distribution_tops():
        return True
    return any(path.is_relative_to(r) for r in _library_roots())


def _package_of(name: str, is_pkg: bool) -> str:
    return name if is_pkg else name.rpartition(".")[0]


def _is_pgolf(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PGOLF_PACKAGES)


# --------------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Root:
    """Where a technique's own code lives: a local plugin's folder or an installed package."""

    folder: Path
    local: bool  # a plugin file loaded by path (not importable by name)
    technique: str


class _Walk:
    def __init__(self, default_corpus: bool):
        self.default_corpus = default_corpus
        self.files: dict[Path, CountedFile] = {}
        self.seen: set[str] = set()

    def add(self, name: str, path: Path, root: _Root | None) -> None:
        if path in self.files:
            return
        if path.suffix != ".py":
            who = f"technique {root.technique!r}" if root else name
            raise CodeCountError(
                f"{who} runs compiled code {path} that pgolf cannot count; ship it as Python source"
            )
        data = path.read_text(encoding="utf-8").encode("utf-8")
        if root is not None and root.local:
            shown = f"{PLUGIN_FOLDER}/{path.relative_to(root.folder).as_posix()}"
        else:
            shown = name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        for other in self.files.values():
            if other.name == shown:
                raise CodeCountError(
                    f"two counted files would both be named {shown!r}: {other.path} and {path}; "
                    "rename one of the plugin files"
                )
        self.files[path] = CountedFile(
            shown, path, len(data), hashlib.sha256(data).hexdigest(), bool(root and root.local)
        )

    def module(self, name: str, root: _Root | None, importer: str = "", line: int = 0) -> None:
        """Count module ``name`` (and its parent packages), then follow its imports."""
        if name in self.seen:
            return
        if (name == DEFAULT_CORPUS_MODULE and not self.default_corpus) or name in VERIFICATION_MODULES:
            return
        found = _module_file(name)
        if found is None:
            self._unresolved(name, root, importer, line)
            return
        path, is_pkg = found
        self.seen.add(name)
        parent = name.rpartition(".")[0]
        if parent:
            self.module(parent, root, importer, line)
        if path is None:
            return  # built-in, frozen or namespace package
        if _is_pgolf(name):
            owner: _Root | None = None
        elif root is not None and path.is_relative_to(root.folder):
            owner = root
        elif _is_library(name, path):
            return
        else:
            where = f"{importer}:{line}" if importer else (root.technique if root else name)
            raise CodeCountError(
                f"{where} imports {name!r} from {path}, which is neither in the plugin's own folder "
                "or package, nor pgolf, nor an installed library, so its bytes cannot be counted; "
                "move it next to the plugin file (or into the plugin's package)"
            )
        self.add(name, path, owner)
        self.follow(name, path, _package_of(name, is_pkg), owner)

    def follow(self, name: str, path: Path, package: str, root: _Root | None) -> None:
        imports, dynamic = _file_imports(path, package)
        if root is not None and dynamic:
            what, line = dynamic[0]
            raise CodeCountError(
                f"{path}:{line}: technique {root.technique!r} loads code dynamically ({what}), so pgolf "
                "cannot count the code it runs; use plain import statements"
            )
        for imp in imports:
            for candidate in imp.names:
                self.module(candidate, root, str(path), imp.line)

    def _unresolved(self, name: str, root: _Root | None, importer: str, line: int) -> None:
        """An import that does not resolve from here: a local plugin's sibling file not yet on
        ``sys.path`` is still counted; anything else never ran (an attribute, a failed optional
        import) and has nothing to count."""
        if root is None or not root.local or "." in name:
            return
        for cand in (root.folder / f"{name}.py", root.folder / name / "__init__.py"):
            if cand.is_file():
                self.seen.add(name)
                self.add(name, cand.resolve(), root)
                self.follow(name, cand.resolve(), name if cand.name == "__init__.py" else "", root)
                return

    def technique(self, cls: type[Technique]) -> None:
        name = cls.__module__
        file = cls.source_file()
        if name not in sys.modules or file is None:
            return
        file = file.resolve()
        if _is_pgolf(name):
            self.module(name, None)
            return
        package = getattr(sys.modules[name], "__package__", "") or ""
        if package:  # an installed plugin package: its own files are those of its top package
            top = getattr(sys.modules.get(package.split(".")[0]), "__file__", None)
            root = _Root(Path(top).resolve().parent if top else file.parent, False, cls.name)
        elif _is_library(name, file):  # a single-module distribution
            root = _Root(file, False, cls.name)
        else:  # a local plugin file: its own files are those of its folder
            root = _Root(file.parent, True, cls.name)
        self.module(name, root)


def counted_files(
    techniques: Iterable[Technique | type[Technique]], *, default_corpus: bool = False
) -> list[CountedFile]:
    """Every source file a run with these techniques executes (see the module docstring), in a
    stable order: pgolf's own files by name, then each technique's files in stack order.

    Raises :class:`CodeCountError` naming the technique and the file when some code cannot be
    counted."""
    walk = _Walk(default_corpus)
    walk.module(ENTRY_MODULE, None)
    walk.module(SCRIPT_ENTRY_MODULE, None)
    core = sorted(walk.files.values(), key=lambda f: f.name)
    seen = set(walk.files)
    for t in techniques:
        walk.technique(type(t) if isinstance(t, Technique) else t)
    rest = [f for p, f in walk.files.items() if p not in seen]
    return core + rest


def files_count(
    techniques: Iterable[Technique | type[Technique]], *, default_corpus: bool = False, note: str = ""
) -> CodeCount:
    """The files a run with these techniques executes (:func:`counted_files`), a hash of them, and
    as its bytes the size of one self-extracting script holding them all (:data:`FILES_METHOD`):
    the count when no submission script can be generated."""
    files = counted_files(techniques, default_corpus=default_corpus)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.sha256}\n".encode())
    source = b"\n".join(f.path.read_bytes() for f in files)
    return CodeCount(
        bytes=wrapped_size(source),
        files=tuple(f.name for f in files),
        sha256=h.hexdigest()[:16],
        method=FILES_METHOD,
        entries=tuple(files),
        source_bytes=sum(f.bytes for f in files),
        note=note,
    )


def code_bytes(rs: Any, *, script: bool = True) -> CodeCount:
    """The counted code of a run of ``rs`` (a resolved stack): the bytes of its submission script
    (see the module docstring), the files the run executes and a hash of them. ``script=False``
    skips generating the script (its bytes then count the files, :func:`files_count`), for callers
    that only compare the files with a run's manifest."""
    count = files_count(
        [r.cls for r in rs.techniques],
        default_corpus=rs.stack.data.path is None,
        note="not generated (the files were counted)",
    )
    if not script:
        return count
    from ..tools.bundle import BundleError  # the generator is a tool; the run imports it here only
    from ..tools.script import build_script

    try:
        return dataclasses.replace(count, bytes=build_script(rs).bytes, method=SCRIPT_METHOD, note="")
    except BundleError as e:
        return dataclasses.replace(count, note=str(e))
