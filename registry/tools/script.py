"""The submission script of a stack: the bundled run (:mod:`.bundle`), minified, with the resolved
stack written in as data, wrapped in a self-extracting form when that is smaller.

:func:`build_script` is what ``pgolf export`` writes as ``train_gpt.py`` and what every run counts as
its code bytes (:func:`pgolf.registry.run.code.code_bytes`), so the size gate before training, the
search and ``result.json`` all count the file a submission would hold.

The script is three parts:

* the bundled code, specialised to the stack (:mod:`.specialize`: the code no run of the stack
  can reach goes, e.g. every dispatch to a hook none of its techniques implements), then minified by
  ``python-minifier`` (docstrings and annotations dropped, locals and module-level names renamed,
  but not those the stack data use);
* ``if __name__ == "__main__": main(<stack>, <techniques>)`` — the resolved stack as literals:
  the training, optimizer, export and evaluation settings (the data folder is the challenge's
  layout, so ``data`` keeps only ``train_shards``; ``device``, ``compile``, ``autocast`` and
  ``attention`` are ``auto`` so the script uses the GPUs it finds), the model spec, and each
  technique with its class, its validated parameters and its hooks;
* when smaller, all of it inside ``import lzma,base64;exec(lzma.decompress(base64.b85decode("…")))``
  (LZMA preset 9e), the form the challenge records submitted their code in.

The bundled code depends on the source files and the technique classes only: it is cached in this
process and on disk under ``~/.cache/pgolf/scripts``, keyed on the content of every pgolf and
plugin source file, the definitions the stack data name, and the versions of the bundler and of
python-minifier, so a stack costs writing its data and one LZMA pass (~0.1 s).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.config import ResolvedStack
from ..api.sites import HOOKS, SITES
from ..api.technique import Technique
from ..run.code import counted_files, wrap
from .bundle import NAMESPACE_REF, Ref, Writer, bundle
from .specialize import specialize

SCRIPT_VERSION = "3"
"""Bump when the bundler or the script's layout changes: the disk cache is keyed on it."""
RUNTIME_KEYS = ("device", "compile", "autocast", "attention")
"""``train`` keys the script leaves at ``auto``: it runs on the machine it finds."""
CACHE_DIR = Path("~/.cache/pgolf/scripts")
_MINIFY = {
    "remove_literal_statements": True,
    "rename_globals": True,  # but not the names the stack data use (preserve_globals)
    "rename_locals": True,
    "hoist_literals": False,  # measured: hoisting makes the LZMA of the script larger
    "remove_asserts": False,
    "remove_debug": False,
    "prefer_single_line": True,  # measured: a few bytes smaller after LZMA
}
_MEMORY: dict[str, CodePart] = {}


@dataclass(frozen=True)
class CodePart:
    """The minified bundle and the names the stack data use for its definitions."""

    code: str
    names: dict[str, str]  # "module:name" -> name in the bundle
    namespace: str
    libraries: tuple[str, ...]
    plain_bytes: int  # the bundle before minification
    words: tuple[str, ...]  # attribute names the code uses: stack fields it never names are left out
    readable: str = ""  # the specialised bundle before minification


@dataclass(frozen=True)
class Script:
    """A generated submission script."""

    text: bytes  # the file: wrapped when that is smaller
    wrapped: bool
    source: str  # the unwrapped, minified script
    readable: str  # the same code before minification (documentation; never run)
    libraries: tuple[str, ...]  # third-party packages it imports
    key: str  # the cache key of its code part

    @property
    def bytes(self) -> int:
        return len(self.text)


# --------------------------------------------------------------------------------------------
# the stack as data
# --------------------------------------------------------------------------------------------


def script_stack(rs: ResolvedStack) -> tuple[Any, list[tuple[type, str, dict[str, tuple[str, ...]]]]]:
    """What the script's ``main`` receives: the resolved stack (its sections, the model spec and
    the techniques with their parameters) and each technique class with its name and hooks."""
    s = rs.stack
    train = s.train.model_copy(update=dict.fromkeys(RUNTIME_KEYS, "auto"))
    stack = types.SimpleNamespace(
        name=s.name, seed=s.seed, model=s.model, data=types.SimpleNamespace(train_shards=s.data.train_shards),
        train=train, optim=s.optim, export=s.export, eval=s.eval,
    )  # fmt: skip
    # a slot default added by pgolf and one the stack names run alike; stack.yaml names them all
    techniques = [dataclasses.replace(r, implicit=False) for r in rs.techniques]
    resolved = types.SimpleNamespace(stack=stack, spec=rs.spec, techniques=techniques)
    classes: dict[type[Technique], None] = {r.cls: None for r in rs.techniques}
    return resolved, [(c, c.name, dict(c.hooks)) for c in classes]


# --------------------------------------------------------------------------------------------
# the code part, cached
# --------------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _source_files(own: Iterable[Path]) -> list[Path]:
    """Every pgolf source file (the bundle may reach any) and the plugins' own files."""
    import pgolf.registry
    import pgolf.techniques

    roots = [Path(pgolf.registry.__file__).parent, Path(pgolf.techniques.__file__).parent]
    files = {p.resolve() for r in roots for p in r.rglob("*.py")}
    files |= {Path(p).resolve() for p in own}
    return sorted(files)


def _key(files: Sequence[Path], refs: Iterable[Ref]) -> str:
    h = hashlib.sha256(f"{SCRIPT_VERSION}\0{_version('python-minifier')}\0".encode())
    for p in files:
        h.update(f"{p}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    for r in sorted(refs, key=lambda r: (r.module, r.name)):
        h.update(f"{r.module}:{r.name}\0".encode())
    return h.hexdigest()[:32]


def _cache_file(key: str) -> Path:
    return CACHE_DIR.expanduser() / f"{key}.json"


def _load(key: str) -> CodePart | None:
    if key in _MEMORY:
        return _MEMORY[key]
    try:
        d = json.loads(_cache_file(key).read_text(encoding="utf-8"))
        part = CodePart(
            d["code"], d["names"], d["namespace"], tuple(d["libraries"]), int(d["plain_bytes"]), tuple(d["words"]),
            str(d["readable"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _MEMORY[key] = part
    return part


def _store(key: str, part: CodePart) -> None:
    _MEMORY[key] = part
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(part), f)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache only: the next process bundles again


def _identifiers(source: str) -> set[str]:
    """Names, attribute names and strings in ``source``."""
    out: set[str] = set()
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.add(n.value)
        elif isinstance(n, ast.keyword) and n.arg:
            out.add(n.arg)
    return out


_EVERY_OPERATOR = (
    "del a\na = (b + c - d * e @ f / g % h ** i << j >> k | l ^ m & n // o, ~p, not q, +r, -s, t == u != v < w"
    " <= x > y >= z is A is not B in C not in D, E and F or G)\n"
)


@functools.cache
def _ast_singletons() -> tuple[ast.AST, ...]:
    """The contexts and operators ``ast.parse`` shares between every tree it returns (one
    ``Load()``, one ``Add()``, ... per process)."""
    kinds = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
    found = {id(n): n for n in ast.walk(ast.parse(_EVERY_OPERATOR)) if isinstance(n, kinds)}
    return tuple(found.values())


def minify(source: str, keep: Iterable[str] = ()) -> str:
    """``source`` minified with python-minifier; module-level names are renamed except ``keep``.

    python-minifier annotates every node of the tree it parses with its parent and namespace,
    the process-wide ``Load()``/``Add()``/... singletons of :func:`ast.parse` included, so every
    later tree would reach the minified one through them (a deep copy of one statement of the
    next bundle copied the whole previous script: 5 s per stack became 80-130 s): the singletons
    are cleared again afterwards."""
    import python_minifier

    try:
        return str(python_minifier.minify(source, preserve_globals=sorted(keep), **_MINIFY))  # type: ignore[arg-type]
    finally:
        for node in _ast_singletons():
            node.__dict__.clear()


def _code_part(rs: ResolvedStack, refs: Sequence[Ref]) -> tuple[CodePart, str]:
    classes = [r.cls for r in rs.techniques]
    own = [f.path for f in counted_files(classes) if not f.name.startswith("pgolf/")]
    key = _key(_source_files(own), refs)
    part = _load(key)
    if part is None:
        order = list(dict.fromkeys(c.__module__ for c in classes))
        b = bundle(own, refs, order)
        keep = [*b.names.values(), b.namespace]
        plain = specialize(
            b.source,
            implemented={h for c in classes for h in c.hooks},
            hook_sites={name: h.site for name, h in HOOKS.items()},
            site_hooks={name: s.required for name, s in SITES.items()},
            keep=keep,
            sites_table="SITES",
        )
        code = minify(plain, keep=keep)
        names = {f"{r.module}:{r.name}": n for r, n in b.names.items()}
        words = b.words & _identifiers(plain)  # a stack field the specialised code never names is left out
        part = CodePart(
            code, names, b.namespace, b.libraries, len(b.source.encode()), tuple(sorted(words)), plain
        )
        _store(key, part)
    return part, key


# --------------------------------------------------------------------------------------------
# the script
# --------------------------------------------------------------------------------------------


def build_script(rs: ResolvedStack, *, readable: bool = False) -> Script:
    """The submission script of ``rs``. ``readable``: also keep the code before minification (the
    specialised bundle). Raises :class:`BundleError` when some code cannot be inlined."""
    resolved, techniques = script_stack(rs)

    def tail(names: Iterable[str] | None) -> Writer:
        w = Writer(names=names)
        w.parts.append('if __name__=="__main__":main(')
        w.value(resolved)
        w.parts.append(",")
        w.value(techniques)
        w.parts.append(")\n")
        return w

    refs = list(tail(None).refs)  # every definition the data may name: the code part's key
    part, key = _code_part(rs, refs)
    w = tail(part.words)
    data = "".join(
        p
        if isinstance(p, str)
        else part.namespace
        if p == NAMESPACE_REF
        else part.names[f"{p.module}:{p.name}"]
        for p in w.parts
    )
    source = part.code.rstrip("\n") + "\n" + data
    try:
        compile(source, "train_gpt.py", "exec")
    except SyntaxError as e:  # a bundler bug, never the user's
        raise AssertionError(f"the generated script does not compile: {e}") from e
    raw = source.encode()
    wrapped = wrap(raw)
    use_wrapped = len(wrapped) < len(raw)
    readable_text = part.readable.rstrip("\n") + "\n" + data if readable else ""
    return Script(wrapped if use_wrapped else raw, use_wrapped, source, readable_text, part.libraries, key)


def script_bytes(rs: ResolvedStack) -> int:
    """Bytes of the submission script of ``rs`` (see :func:`build_script`)."""
    return build_script(rs).bytes
