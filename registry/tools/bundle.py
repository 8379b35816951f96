"""One self-contained script from the run's own modules: the code a submission counts.

:func:`bundle` takes the source files the run executes (pgolf's modules and the files of the
techniques a stack uses, as :func:`pgolf.registry.run.code.counted_files` finds them) and turns them
into one module, without a second implementation:

* Starting from the script's entry point (:func:`pgolf.registry.run.submission.main`) and the
  definitions the stack's data refer to (its technique classes, the classes of its parameter values,
  the model spec), it keeps every top-level definition reachable through names, and every method or
  class attribute whose name the kept code uses — as an attribute, as a string (a hook name), or
  because it overrides an attribute of a library base class (``forward``, ``step``, ...).
* Names are resolved as Python resolves them (function, class and comprehension scopes, ``import``
  and ``from … import`` chains, re-exports, ``module.attr``); a definition keeps its name unless two
  modules define the same one. The kept statements are emitted in the order Python ran them when it
  imported the modules, so everything a statement uses at import time is defined before it.
* Docstrings, annotations, ``typing.cast``, ``if TYPE_CHECKING:`` blocks and the registry's
  ``@register`` and ``@hook`` decorators are left out (the script sets each technique's name and
  hooks itself); a pydantic model (a technique's parameters, a stack section) becomes a plain
  ``SimpleNamespace`` class holding its non-validator members, or ``SimpleNamespace`` itself when
  none is used.

The script may import only the standard library and :data:`SCRIPT_LIBRARIES` (any other import must
sit in a ``try`` that catches ``ImportError``). Code that cannot be inlined — such an import, ``from
x import *``, a pgolf or plugin module used as a value, ``__file__`` or ``globals()`` outside the entry
point, an own import inside a module-level ``if``/``try``, a name Python would not find — is a
:class:`BundleError` naming the file and line, raised only when the code is actually needed.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import enum
import importlib
import math
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api.errors import PgolfError
from ..run.code import _is_pgolf, _module_file
from ._astblocks import BlockTransformer

ENTRY_MODULE = "pgolf.registry.run.submission"
ENTRY_FUNCTION = "main"
SCRIPT_LIBRARIES = frozenset({"torch", "numpy", "sentencepiece", "brotli", "zstandard"})
"""Third-party packages an exported script may import (besides the standard library)."""
TECHNIQUE_MODULE = "pgolf.registry.api.technique"
DROPPED_DECORATORS = frozenset({(TECHNIQUE_MODULE, "register"), (TECHNIQUE_MODULE, "hook")})
NAMESPACE = ("types", "SimpleNamespace")
_IMPORT_ERRORS = frozenset({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})
DATA_TABLES: dict[tuple[str, str], tuple[str, ...]] = {
    ("pgolf.registry.api.sites", "SITES"): ("plan", "default", "doc", "args"),
}
"""Module-level tables the script holds as their value, with these fields blank, rather than as
the code that builds them: the run never reads them (``pgolf techniques`` and the registry do)."""
PLAIN_EXCEPTIONS = frozenset({BaseException, Exception, ValueError, RuntimeError, TypeError, AssertionError,
                              NotImplementedError, KeyError, IndexError, LookupError, ArithmeticError,
                              ZeroDivisionError, OverflowError})  # fmt: skip
"""Built-in exceptions whose constructor takes any arguments as they are: in the script, raising
one (or a subclass that keeps that constructor and ``__str__``) passes the values of its message
rather than its text."""
_VALIDATORS = ("model_validator", "field_validator", "validator", "root_validator", "field_serializer",
               "model_serializer", "computed_field")  # fmt: skip


class BundleError(PgolfError):
    """Code that cannot be inlined into a single script."""


# --------------------------------------------------------------------------------------------
# scopes
# --------------------------------------------------------------------------------------------


def _targets(node: ast.AST) -> Iterator[str]:
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id


class _Binder(ast.NodeVisitor):
    """Names bound directly in one scope (a function, lambda or class body, or a module)."""

    def __init__(self) -> None:
        self.bound: set[str] = set()
        self.declared_global: set[str] = set()

    def scan(self, body: Iterable[ast.AST]) -> _Binder:
        for node in body:
            self.visit(node)
        return self

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.bound.add(node.id)

    def _def(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.bound.add(node.name)
        for d in node.decorator_list:
            self.visit(d)
        if isinstance(node, ast.ClassDef):
            for b in (*node.bases, *node.keywords):
                self.visit(b)
        else:
            _visit_defaults(self, node.args)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _def

    def visit_Lambda(self, node: ast.Lambda) -> None:
        _visit_defaults(self, node.args)

    def _comprehension(self, node: Any) -> None:
        self.visit(node.generators[0].iter)
        for sub in ast.walk(node):  # `:=` in a comprehension binds in the enclosing scope
            if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                self.bound.add(sub.target.id)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.bound.add(a.asname or a.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.bound.add(a.asname or a.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.bound.add(node.name)
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.declared_global.update(node.names)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self.bound.add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.bound.add(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self.bound.add(node.rest)
        self.generic_visit(node)


def _visit_defaults(v: ast.NodeVisitor, args: ast.arguments) -> None:
    for d in (*args.defaults, *(k for k in args.kw_defaults if k is not None)):
        v.visit(d)


def _function_scope(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> _Scope:
    b = _Binder()
    a = node.args
    for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
        if arg is not None:
            b.bound.add(arg.arg)
    b.scan([node.body] if isinstance(node, ast.Lambda) else node.body)
    return _Scope("function", b.bound - b.declared_global, b.declared_global)


@dataclass
class _Scope:
    kind: str  # function | class | comprehension
    bound: set[str]
    declared_global: set[str] = field(default_factory=set)


class _Scoped(ast.NodeTransformer):
    """Walks (and may rewrite) a top-level statement knowing, for each ``Name``, whether it is a
    module global: :meth:`global_name` is called for each one (``chain``: the attributes that follow
    it, ``data.find_shards`` → ``("find_shards",)``) and returns the replacement expression."""

    def __init__(self) -> None:
        self.stack: list[_Scope] = []

    def global_name(self, node: ast.Name, chain: tuple[str, ...]) -> tuple[ast.expr, int]:
        return node, 0  # (replacement, attributes of ``chain`` it consumed)

    def word(self, word: str) -> None:
        pass

    def is_global(self, name: str) -> bool:
        for depth, scope in enumerate(reversed(self.stack)):
            if name in scope.declared_global:
                return True
            if scope.kind == "class":
                if depth == 0 and name in scope.bound:
                    return False
                continue
            if name in scope.bound:
                return False
        return True

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for fname, value in ast.iter_fields(node):
            if isinstance(value, list):
                new: list[Any] = []
                for v in value:
                    if not isinstance(v, ast.AST):  # e.g. the None key of `**x` in a dict
                        new.append(v)
                        continue
                    r = self.visit(v)
                    if r is None:
                        continue
                    new.extend(r if isinstance(r, list) else [r])
                if not new and value and isinstance(value[0], ast.stmt):
                    new = [ast.Pass()]
                setattr(node, fname, new)
            elif isinstance(value, ast.AST):
                setattr(node, fname, self.visit(value))
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if self.is_global(node.id):
            return self.global_name(node, ())[0]
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.word(node.attr)
        chain: list[str] = []
        e: ast.expr = node
        while isinstance(e, ast.Attribute):
            chain.insert(0, e.attr)
            e = e.value
        if isinstance(e, ast.Name) and self.is_global(e.id):
            for a in chain[:-1]:
                self.word(a)
            new, used = self.global_name(e, tuple(chain))
            if new is e and not used:  # nothing to replace (collecting): leave the node as it is
                return node
            out: ast.expr = new
            for a in chain[used:]:
                out = ast.Attribute(value=out, attr=a, ctx=ast.Load())
            out.ctx = node.ctx  # type: ignore[attr-defined]
            return ast.copy_location(out, node)
        node.value = self.visit(node.value)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and node.value.isidentifier():
            self.word(node.value)
        return node

    def visit_Global(self, node: ast.Global) -> ast.AST:
        node.names = [self.global_name(ast.Name(id=n, ctx=ast.Store()), ())[0].id for n in node.names]  # type: ignore[attr-defined]
        return node

    def _defaults(self, args: ast.arguments) -> None:
        args.defaults = [self.visit(d) for d in args.defaults]
        args.kw_defaults = [self.visit(d) if d is not None else None for d in args.kw_defaults]

    def decorators(self, node: Any) -> None:
        node.decorator_list = [self.visit(d) for d in node.decorator_list]

    def visit_FunctionDef(self, node: Any) -> ast.AST:
        self.decorators(node)
        self._defaults(node.args)
        self.stack.append(_function_scope(node))
        node.body = self._stmts(node.body)
        self.stack.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        self._defaults(node.args)
        self.stack.append(_function_scope(node))
        node.body = self.visit(node.body)
        self.stack.pop()
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        self.decorators(node)
        node.bases = [self.visit(x) for x in node.bases]
        node.keywords = [self.visit(x) for x in node.keywords]
        self.enter_class(node)
        node.body = self._stmts(node.body)
        self.stack.pop()
        return node

    def enter_class(self, node: ast.ClassDef) -> None:
        b = _Binder().scan(node.body)
        self.stack.append(_Scope("class", b.bound, b.declared_global))

    def _stmts(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in body:
            r = self.visit(s)
            if r is not None:
                out.extend(r if isinstance(r, list) else [r])
        return out or [ast.Pass()]

    def _comprehension(self, node: Any) -> ast.AST:
        gens = node.generators
        gens[0].iter = self.visit(gens[0].iter)
        self.stack.append(_Scope("comprehension", {n for g in gens for n in _targets(g.target)}))
        for i, g in enumerate(gens):
            if i:
                g.iter = self.visit(g.iter)
            g.target = self.visit(g.target)
            g.ifs = [self.visit(c) for c in g.ifs]
        for part in ("elt", "key", "value"):
            if hasattr(node, part):
                setattr(node, part, self.visit(getattr(node, part)))
        self.stack.pop()
        return node

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


# --------------------------------------------------------------------------------------------
# source transforms before analysis (syntactic; behaviour kept)
# --------------------------------------------------------------------------------------------


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _mentions(node: ast.AST, *names: str) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id in names) or (isinstance(n, ast.Attribute) and n.attr in names)
        for n in ast.walk(node)
    )


def _decorated_dataclass(node: ast.ClassDef) -> bool:
    return any(_mentions(d, "dataclass") for d in node.decorator_list)


class _Stripper(BlockTransformer):
    """Docstrings, annotations, ``if TYPE_CHECKING:`` and ``from __future__`` go. A dataclass's
    fields keep an annotation (``int``: its type is never read); a ``ClassVar`` is an attribute."""

    def __init__(self) -> None:
        self.fields: list[bool] = []  # per enclosing class body: do annotations make fields?

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in stmts:
            if _is_docstring(stmt) or (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
                continue
            if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
                out.extend(self.block(stmt.orelse) if stmt.orelse else [])
                continue
            r = self.visit(stmt)
            if r is not None:
                out.extend(r if isinstance(r, list) else [r])
        return out

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: Any) -> ast.AST:
        node.returns = None
        self.fields.append(False)
        self.generic_visit(node)
        self.fields.pop()
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        typed = any(_mentions(b, "NamedTuple", "TypedDict") for b in node.bases)
        self.fields.append(_decorated_dataclass(node) or typed)
        self.generic_visit(node)
        self.fields.pop()
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if self.fields and self.fields[-1] and not _mentions(node.annotation, "ClassVar"):
            if not _mentions(node.annotation, "InitVar"):
                node.annotation = ast.Name(id="int", ctx=ast.Load())
            if node.value is not None:
                node.value = self.visit(node.value)
            return node
        if node.value is None:
            return None
        return ast.copy_location(ast.Assign(targets=[node.target], value=self.visit(node.value)), node)


# --------------------------------------------------------------------------------------------
# modules and their top-level bindings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lib:
    """A library import: ``import module [as alias]`` or ``from module import name [as alias]``."""

    module: str
    name: str | None  # None: `import module`
    alias: str  # the name it binds

    @property
    def plain(self) -> bool:
        """``import a.b``: binds ``a`` and loads ``a.b``."""
        return self.name is None and self.alias == self.module.split(".")[0] and "." in self.module

    @property
    def target(self) -> tuple[str, str | None]:
        """What the bound name refers to (two imports binding the same object share a name)."""
        if self.name is None:
            return (self.alias if self.plain else self.module), None
        return self.module, self.name

    def statement(self, alias: str) -> str:
        if self.name is None:
            if self.plain or alias == self.module:
                if alias != self.alias:
                    raise BundleError(f"`import {self.module}` would need another name ({alias})")
                return f"import {self.module}"
            return f"import {self.module} as {alias}"
        return f"from {self.module} import {self.name}" + (f" as {alias}" if alias != self.name else "")


@dataclass(frozen=True)
class _Own:
    """``from <own module> import name``; ``name`` None: the binding is the module itself."""

    module: str
    name: str | None


@dataclass
class _Problem:
    """A construct that cannot be inlined; an error only if the code is needed."""

    message: str


@dataclass
class _Part:
    """A kept unit: a top-level statement, the header of a class, or one class-body member."""

    node: ast.AST
    names: tuple[str, ...] = ()
    refs: set[tuple[str, tuple[str, ...]]] = field(default_factory=set)
    words: set[str] = field(default_factory=set)
    always: bool = False


@dataclass
class _Stmt:
    module: str
    index: int
    node: ast.stmt
    binds: tuple[str, ...]
    analysed: bool = False
    head: _Part | None = None  # the statement, or a class's decorators
    bases: _Part | None = None  # a class's bases and keywords
    members: list[_Part] = field(default_factory=list)
    kept_members: set[int] = field(default_factory=set)
    is_dataclass: bool = False
    is_enum: bool = False
    library_attrs: frozenset[str] = frozenset()
    pydantic: frozenset[str] | None = None  # a pydantic model: its field names
    empty: bool = False  # a pydantic model with nothing left: SimpleNamespace itself
    data: list[str | Ref] | None = None  # a data table: its value as source


Binding = _Stmt | _Lib | _Own | _Problem


class _Module:
    def __init__(self, name: str, path: Path, package: str):
        self.name, self.path, self.package = name, path, package
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (OSError, SyntaxError, ValueError) as e:
            raise BundleError(f"{path}: cannot read the source to bundle it ({e})") from None
        self.tree = ast.fix_missing_locations(_Stripper().visit(tree))
        self.stmts: list[_Stmt] = []
        self.bindings: dict[str, Binding] = {}
        self.local_aliases: dict[str, _Own] = {}  # own imports inside functions (made global)
        self.local_problems: dict[int, str] = {}  # top-level statement -> an import it cannot use

    def where(self, node: ast.AST) -> str:
        return f"{self.path}:{getattr(node, 'lineno', '?')}"


# --------------------------------------------------------------------------------------------
# values as source
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A definition the stack data refer to: a module and a top-level name in it."""

    module: str
    name: str


NAMESPACE_REF = Ref("types", "SimpleNamespace")  # the bundle always imports it


class Writer:
    """Python source for a value, with references to bundled definitions left as :class:`Ref`."""

    def __init__(self, blank: Iterable[str] = (), names: Iterable[str] | None = None) -> None:
        self.parts: list[str | Ref] = []
        self.refs: dict[Ref, None] = {}
        self.blank = frozenset(blank)  # dataclass fields written as '' (never read)
        self.names = None if names is None else frozenset(names)  # namespace fields the code reads

    def ref(self, obj: Any) -> None:
        if obj is types.SimpleNamespace:
            self.parts.append(NAMESPACE_REF)
            return
        module, name = obj.__module__, obj.__qualname__
        if "." in name or "<" in name:
            raise BundleError(
                f"{module}.{name} is not defined at the top of its module; it cannot be inlined"
            )
        r = Ref(module, name)
        self.refs[r] = None
        self.parts.append(r)

    def call(self, obj: Any, args: Sequence[Any], kwargs: Iterable[tuple[str, Any]]) -> None:
        self.ref(obj)
        self.parts.append("(")
        first = True
        for a in args:
            self.parts.append("" if first else ",")
            self.value(a)
            first = False
        for k, v in kwargs:
            self.parts.append(("" if first else ",") + f"{k}=")
            self.value(v)
            first = False
        self.parts.append(")")

    def value(self, v: Any) -> None:
        if v is None or (isinstance(v, (bool, int, str)) and not isinstance(v, enum.Enum)):
            self.parts.append(repr(v))
        elif isinstance(v, float):
            self.parts.append(repr(v) if math.isfinite(v) else f"float('{v}')")
        elif isinstance(v, enum.Enum):
            self.ref(type(v))
            self.parts.append(f".{v.name}")
        elif isinstance(v, (tuple, list)):
            self.parts.append("(" if isinstance(v, tuple) else "[")
            for i, x in enumerate(v):
                self.parts.append("," if i else "")
                self.value(x)
            self.parts.append(
                ("," if isinstance(v, tuple) and len(v) == 1 else "") + (")" if isinstance(v, tuple) else "]")
            )
        elif isinstance(v, dict):
            self.parts.append("{")
            for i, (k, x) in enumerate(v.items()):
                self.parts.append("," if i else "")
                self.value(k)
                self.parts.append(":")
                self.value(x)
            self.parts.append("}")
        elif isinstance(v, type):
            self.ref(v)
        elif isinstance(v, types.SimpleNamespace):
            self.call(types.SimpleNamespace, (), self._read(vars(v).items()))
        elif _is_model(v):
            self.call(type(v), (), self._read((k, getattr(v, k)) for k in type(v).model_fields))
        elif dataclasses.is_dataclass(v):
            fs = [f for f in dataclasses.fields(v) if f.init]
            get = lambda f: "" if f.name in self.blank else getattr(v, f.name)  # noqa: E731
            args = [get(f) for f in fs if not f.kw_only]
            while (
                args
                and fs[len(args) - 1].default is not dataclasses.MISSING
                and args[-1] == fs[len(args) - 1].default
            ):
                args.pop()  # trailing defaults
            self.call(type(v), args, [(f.name, get(f)) for f in fs if f.kw_only])
        else:
            raise BundleError(
                f"a stack value of type {type(v).__module__}.{type(v).__qualname__} ({v!r}) cannot be written "
                "into a script; technique parameters must be plain values, enums or dataclasses"
            )

    def _read(self, items: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """A namespace's fields, without those the code never names (with ``names`` given)."""
        return [(k, x) for k, x in items if self.names is None or k in self.names]


def _is_model(v: Any) -> bool:
    return any(c.__name__ == "BaseModel" and c.__module__.startswith("pydantic") for c in type(v).__mro__)


# --------------------------------------------------------------------------------------------
# the bundler
# --------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """Bundled code, plain Python before minification, and the names it gives the definitions
    the stack data refer to."""

    source: str
    names: dict[Ref, str]
    namespace: str  # the bundle's name for types.SimpleNamespace
    libraries: tuple[str, ...]  # third-party packages it imports
    words: frozenset[str]  # attribute names and identifier strings the kept code uses


def bundle(own_files: Iterable[Path], roots: Iterable[Ref], order_roots: Sequence[str]) -> Bundle:
    """Bundle the definitions ``roots`` need (the entry point included) from pgolf's modules and
    ``own_files`` (the plugins' files), emitted in the order Python initialises ``order_roots``."""
    b = _Bundler({Path(p).resolve() for p in own_files})
    roots = [Ref(ENTRY_MODULE, ENTRY_FUNCTION), *roots]
    b.keep(roots)
    return b.emit(roots, [ENTRY_MODULE, *order_roots])


class _Bundler:
    def __init__(self, own_files: set[Path]):
        self.own_files = own_files
        self.modules: dict[str, _Module] = {}
        self.kept: dict[tuple[str, int], _Stmt] = {}
        self.words: set[str] = set()
        self.libs: dict[_Lib, None] = {}
        self.why: dict[tuple[str, int], str] = {}  # first user of each kept statement (diagnostics)
        self._own: dict[str, bool] = {}

    # -- modules -------------------------------------------------------------------------------
    def is_own(self, name: str) -> bool:
        if name in self.modules:
            return True
        if name not in self._own:
            found = _module_file(name)
            self._own[name] = (
                found is not None and found[0] is not None and (_is_pgolf(name) or found[0] in self.own_files)
            )
        return self._own[name]

    def module(self, name: str) -> _Module:
        if name in self.modules:
            return self.modules[name]
        found = _module_file(name)
        if found is None or found[0] is None:
            raise BundleError(f"module {name!r} has no source file to bundle")
        path, is_pkg = found[0], found[1]
        if path.suffix != ".py":
            raise BundleError(f"{name} is compiled code ({path}); only Python source can be inlined")
        mod = _Module(name, path, name if is_pkg else name.rpartition(".")[0])
        self.modules[name] = mod
        self._local_imports(mod)
        self._index(mod)
        return mod

    def absolute(self, mod: _Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = mod.package.split(".") if mod.package else []
        base = parts[: max(0, len(parts) - (node.level - 1))]
        return ".".join(base + ([node.module] if node.module else []))

    def _import_bindings(
        self, mod: _Module, node: ast.Import | ast.ImportFrom
    ) -> Iterator[tuple[str, Binding]]:
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if self.is_own(a.name):
                    yield (a.asname, _Own(a.name, None)) if a.asname else (top, _Own(top, None))
                else:
                    yield (a.asname or top), _Lib(a.name, None, a.asname or top)
            return
        base = self.absolute(mod, node)
        for a in node.names:
            alias = a.asname or a.name
            if a.name == "*":
                yield (
                    "*",
                    _Problem(
                        f"{mod.where(node)}: `from {base} import *` cannot be inlined; name the imports"
                    ),
                )
            elif self.is_own(base):
                yield alias, _Own(base, a.name)
            else:
                yield alias, _Lib(base, a.name, alias)

    def _local_imports(self, mod: _Module) -> None:
        """Imports inside functions: an own module's names become module-level aliases (the
        import statement goes); a library must be allowed, or its import guarded by
        ``try/except ImportError``."""
        bundler = self

        class V(ast.NodeTransformer):
            def __init__(self) -> None:
                self.depth = 0
                self.guarded = 0
                self.index = 0

            def problem(self, message: str) -> None:
                mod.local_problems.setdefault(self.index, message)

            def visit_FunctionDef(self, node: Any) -> Any:
                self.depth += 1
                saved, self.guarded = self.guarded, 0
                self.generic_visit(node)
                if not node.body:
                    node.body = [ast.Pass()]
                self.guarded = saved
                self.depth -= 1
                return node

            visit_AsyncFunctionDef = visit_FunctionDef

            def visit_Try(self, node: ast.Try) -> Any:
                catches = any(_catches_import_error(h) for h in node.handlers)
                self.guarded += catches
                node.body = [r for s in node.body if (r := self.visit(s)) is not None] or [ast.Pass()]
                self.guarded -= catches
                node.handlers = [self.visit(h) for h in node.handlers]
                node.orelse = [r for s in node.orelse if (r := self.visit(s)) is not None]
                node.finalbody = [r for s in node.finalbody if (r := self.visit(s)) is not None]
                return node

            def _import(self, node: ast.Import | ast.ImportFrom) -> Any:
                if not self.depth:
                    return node
                rest = []
                for a, (alias, b) in zip(node.names, bundler._import_bindings(mod, node)):
                    if isinstance(b, _Own):
                        prev = mod.bindings.get(alias) or mod.local_aliases.get(alias)
                        if prev is not None and prev != b:
                            self.problem(f"{mod.where(node)}: the import of {alias!r} inside a function "
                                         "shadows another name of the module; rename it")  # fmt: skip
                        if b.name is None:
                            self.problem(
                                f"{mod.where(node)}: use `from {b.module} import ...` inside a function"
                            )
                        mod.local_aliases[alias] = b
                        continue
                    if isinstance(b, _Problem):
                        self.problem(b.message)
                    elif not self.guarded and not _allowed_library(b.module):
                        self.problem(_library_message(mod.where(node), b.module))
                    rest.append(a)
                if not rest:
                    return None
                node.names = rest
                return node

            visit_Import = visit_ImportFrom = _import

        for i, top in enumerate(mod.tree.body):
            v = V()
            v.index = i
            v.visit(top)
        ast.fix_missing_locations(mod.tree)

    def _index(self, mod: _Module) -> None:
        for i, node in enumerate(mod.tree.body):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias, b in self._import_bindings(mod, node):
                    mod.bindings[alias] = b
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                binds: tuple[str, ...] = (node.name,)
            elif isinstance(node, ast.Assign) and all(
                isinstance(t, (ast.Name, ast.Tuple, ast.List)) for t in node.targets
            ):
                binds = tuple(n for t in node.targets for n in _targets(t))
            else:
                binds = tuple(sorted(_Binder().scan([node]).bound))
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        for alias, binding in self._import_bindings(mod, sub):
                            if isinstance(binding, _Own):
                                mod.bindings[alias] = _Problem(
                                    f"{mod.where(sub)}: a pgolf or plugin import inside a module-level "
                                    "`if`/`try` cannot be inlined; import it at the top of the module"
                                )
            if binds == ("__all__",):
                continue
            stmt = _Stmt(mod.name, i, node, binds)
            mod.stmts.append(stmt)
            for bound in binds:
                if not isinstance(mod.bindings.get(bound), _Problem):
                    mod.bindings[bound] = stmt

    # -- analysis ------------------------------------------------------------------------------
    def _analyse(self, stmt: _Stmt) -> None:
        if stmt.analysed:
            return
        stmt.analysed = True
        mod = self.modules[stmt.module]
        bundler = self

        def collect(part: _Part, node: ast.AST, scope: _Scope | None = None) -> None:
            class C(_Scoped):
                def global_name(self, n: ast.Name, chain: tuple[str, ...]) -> tuple[ast.expr, int]:
                    if isinstance(n.ctx, ast.Load) or chain or self.stack:
                        part.refs.add((n.id, chain))
                    return n, 0

                def word(self, w: str) -> None:
                    part.words.add(w)

                def decorators(self, node: Any) -> None:
                    node.decorator_list = [
                        d for d in node.decorator_list if not bundler._dropped(mod, d, self)
                    ]
                    super().decorators(node)

            c = C()
            if scope is not None:
                c.stack.append(scope)
            c.visit(node)  # leaves the tree as it is (global_name returns each node unchanged)

        node = stmt.node
        blank = DATA_TABLES.get((stmt.module, stmt.binds[0])) if len(stmt.binds) == 1 else None
        if blank is not None and isinstance(node, ast.Assign):
            w = Writer(blank)
            w.value(getattr(sys.modules[stmt.module], stmt.binds[0]))
            stmt.data, stmt.head = w.parts, _Part(node, stmt.binds)
            stmt.head.refs = {(f"\0{r.module}", (r.name,)) for r in w.refs if r != NAMESPACE_REF}
            return
        if isinstance(node, ast.ClassDef):
            stmt.head, stmt.bases = _Part(node), _Part(node)
            for d in node.decorator_list:
                if not self._dropped(mod, d, _Scoped()):
                    collect(stmt.head, d)
            for base in (*node.bases, *node.keywords):
                collect(stmt.bases, base)
            stmt.is_dataclass = _decorated_dataclass(node)
            cb = _Binder().scan(node.body)
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names: tuple[str, ...] = (member.name,)
                elif isinstance(member, ast.Assign):
                    names = tuple(n for t in member.targets for n in _targets(t))
                elif isinstance(member, ast.AnnAssign) and isinstance(member.target, ast.Name):
                    names = (member.target.id,)
                else:
                    names = ()
                m = _Part(member, names)
                m.always = not names or any(n.startswith("__") and n.endswith("__") for n in names)
                m.always |= stmt.is_dataclass and isinstance(member, ast.AnnAssign)
                collect(m, member, _Scope("class", cb.bound, cb.declared_global))
                stmt.members.append(m)
            self._class_facts(mod, stmt)
        else:
            stmt.head = _Part(node, stmt.binds)
            collect(stmt.head, node)

    def _dropped(self, mod: _Module, d: ast.expr, walker: _Scoped) -> bool:
        """Whether decorator ``d`` is one of the registry's (left out of the script)."""
        f = d.func if isinstance(d, ast.Call) else d
        if not (isinstance(f, ast.Name) and walker.is_global(f.id)):
            return False
        kind, t, _, final = self.resolve_used(mod.name, f.id, mod.where(d), ())
        return kind == "stmt" and (t.module, final) in DROPPED_DECORATORS

    def _plain_exception(self, mod: _Module, func: ast.expr, walker: _Scoped) -> bool:
        """Whether ``func`` names an exception class that takes its arguments as they are
        (:data:`PLAIN_EXCEPTIONS`, or own subclasses of one that keep its constructor)."""
        e: ast.expr = func
        while isinstance(e, ast.Attribute):
            e = e.value
        if not (isinstance(e, ast.Name) and walker.is_global(e.id)):
            return False
        cls = self._runtime_value(mod, func)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return False
        for c in cls.__mro__[:-1]:  # up to object
            if self._own_class(c):
                if {"__init__", "__new__", "__str__", "__repr__"} & set(vars(c)):
                    return False
            elif c not in PLAIN_EXCEPTIONS:
                return False
        return True

    def _class_facts(self, mod: _Module, stmt: _Stmt) -> None:
        """Whether the class is an Enum or a pydantic model, and the attribute names its library
        bases define (a method overriding one may be called by the library: ``forward``, ...)."""
        node = stmt.node
        assert isinstance(node, ast.ClassDef)
        live = getattr(sys.modules.get(mod.name), node.name, None)
        if isinstance(live, type) and _is_pydantic(live):
            stmt.pydantic = frozenset(getattr(live, "model_fields", {}))
            return
        bases = [live] if isinstance(live, type) else [self._runtime_value(mod, b) for b in node.bases]
        attrs: set[str] = set()
        for obj in bases:
            if not isinstance(obj, type):
                continue
            stmt.is_enum |= issubclass(obj, enum.Enum)
            mro = obj.__mro__
            for c in mro[1:] if obj is live else mro:
                if not self._own_class(c):
                    attrs |= set(vars(c))
        stmt.library_attrs = frozenset(attrs)

    def _own_class(self, c: type) -> bool:
        if _is_pgolf(c.__module__):
            return True
        f = getattr(sys.modules.get(c.__module__), "__file__", None)
        return isinstance(f, str) and Path(f).resolve() in self.own_files

    def _runtime_value(self, mod: _Module, expr: ast.expr) -> Any:
        """The object a base-class expression names (pgolf and its plugins are imported here)."""
        chain: list[str] = []
        e = expr
        while isinstance(e, ast.Attribute):
            chain.insert(0, e.attr)
            e = e.value
        if not isinstance(e, ast.Name):
            return None
        kind, target, used, final = self.resolve_used(mod.name, e.id, mod.where(expr), tuple(chain))
        if kind == "builtin":
            obj: Any = getattr(builtins, e.id, None)
        elif kind == "lib":
            m = importlib.import_module(target.module)
            obj = (
                sys.modules.get(target.alias)
                if target.plain
                else m
                if target.name is None
                else getattr(m, target.name, None)
            )
        else:
            obj = getattr(sys.modules.get(target.module), final, None)
        for a in chain[used:]:
            obj = getattr(obj, a, None)
        return obj

    # -- resolution ------------------------------------------------------------------------------
    def resolve(self, modname: str, name: str, where: str, chain: tuple[str, ...] = ()) -> tuple[str, Any]:
        """What ``name`` (followed by ``chain``) means at the top of ``modname``: ("stmt",
        _Stmt), ("lib", _Lib) or ("builtin", None), with the attributes of own modules in
        ``chain`` consumed; see :meth:`resolve_used`."""
        kind, target, _, _ = self.resolve_used(modname, name, where, chain)
        return kind, target

    def resolve_used(
        self, modname: str, name: str, where: str, chain: tuple[str, ...]
    ) -> tuple[str, Any, int, str]:
        """(kind, target, attributes of ``chain`` consumed, the name as its module binds it)."""
        used = 0
        seen: set[tuple[str, str]] = set()
        while True:
            if (modname, name) in seen:
                raise BundleError(f"{where}: an import cycle while resolving {name!r}")
            seen.add((modname, name))
            mod = self.module(modname)
            b = mod.bindings.get(name) or mod.local_aliases.get(name)
            if b is None:
                if self.is_own(f"{modname}.{name}"):
                    b = _Own(f"{modname}.{name}", None)
                elif hasattr(builtins, name) or name in ("__name__", "__file__"):
                    return "builtin", None, used, name
                else:
                    raise BundleError(
                        f"{where}: {name!r} is not defined in {mod.path}, so it cannot be inlined"
                    )
            if isinstance(b, _Problem):
                raise BundleError(b.message)
            if isinstance(b, _Stmt):
                return "stmt", b, used, name
            if isinstance(b, _Lib):
                return "lib", b, used, name
            if b.name is not None:
                modname, name = b.module, b.name
                continue
            if used < len(chain):  # a module: its attribute
                modname, name = b.module, chain[used]
                self.module(modname)
                used += 1
                seen.clear()
                continue
            raise BundleError(f"{where}: the module {b.module} is used as a value; it cannot be inlined")

    # -- shaking -----------------------------------------------------------------------------
    def keep(self, roots: Iterable[Ref]) -> None:
        todo: list[tuple[_Stmt, _Part]] = []

        def need(modname: str, name: str, chain: tuple[str, ...], where: str) -> None:
            kind, target = self.resolve(modname, name, where, chain)
            if kind == "lib":
                if not _allowed_library(target.module):
                    raise BundleError(_library_message(where, target.module))
                self.libs.setdefault(target, None)
            elif kind == "stmt" and (target.module, target.index) not in self.kept:
                self.kept[(target.module, target.index)] = target
                self.why[(target.module, target.index)] = where
                self._analyse(target)
                problem = self.modules[target.module].local_problems.get(target.index)
                if problem is not None:
                    raise BundleError(problem)
                assert target.head is not None
                todo.append((target, target.head))
                if target.bases is not None and target.pydantic is None:
                    todo.append((target, target.bases))

        for r in roots:
            need(r.module, r.name, (), f"{r.module}.{r.name}")
        while True:
            while todo:
                stmt, part = todo.pop()
                mod = self.modules[stmt.module]
                for ref, chain in sorted(part.refs):
                    if ref.startswith("\0"):  # a data table's reference: (module, name)
                        need(ref[1:], chain[0], (), mod.where(part.node))
                        continue
                    if ref == "__file__" and mod.name != ENTRY_MODULE:
                        raise BundleError(
                            f"{mod.where(part.node)}: uses __file__, which is the script itself once inlined"
                        )
                    if ref == "globals":
                        raise BundleError(f"{mod.where(part.node)}: uses globals(), which cannot be inlined")
                    need(mod.name, ref, chain, mod.where(part.node))
                self.words |= part.words
            grown = False
            for stmt in list(self.kept.values()):
                for i, m in enumerate(stmt.members):
                    if i not in stmt.kept_members and self._member_needed(stmt, m):
                        stmt.kept_members.add(i)
                        todo.append((stmt, m))
                        grown = True
            if not grown:
                return

    def _member_needed(self, stmt: _Stmt, m: _Part) -> bool:
        if stmt.pydantic is not None:
            if set(m.names) & (stmt.pydantic | {"model_config"}):
                return False
            if isinstance(m.node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                _mentions(d, *_VALIDATORS) for d in m.node.decorator_list
            ):
                return False
        if m.always or stmt.is_enum:
            return True
        return any(n in self.words or n in stmt.library_attrs for n in m.names)

    # -- emission ----------------------------------------------------------------------------
    def emit(self, wanted: Iterable[Ref], order_roots: Sequence[str]) -> Bundle:
        order = self._init_order(order_roots)
        rank = {m: i for i, m in enumerate(order)}
        kept = sorted(self.kept.values(), key=lambda s: (rank[s.module], s.index))
        ns_lib = _Lib(NAMESPACE[0], NAMESPACE[1], NAMESPACE[1])
        self.libs.setdefault(ns_lib, None)
        for s in kept:
            s.empty = s.pydantic is not None and not s.kept_members
        taken = set(dir(builtins)) | {"__name__", "__file__"}
        for mod in self.modules.values():
            for n in ast.walk(mod.tree):
                if isinstance(n, ast.Name):
                    taken.add(n.id)
                elif isinstance(n, ast.arg):
                    taken.add(n.arg)
        owner: dict[str, Any] = {}

        def claim(want: str, what: Any) -> str:
            if owner.get(want) == what or (want not in owner and not hasattr(builtins, want)):
                owner[want] = what
                return want
            k = 2
            while owner.get(f"{want}_{k}", what) != what or (
                f"{want}_{k}" not in owner and f"{want}_{k}" in taken
            ):
                k += 1
            owner[f"{want}_{k}"] = what
            return f"{want}_{k}"

        lib_name = {lib.target: "" for lib in self.libs}
        for lib in self.libs:
            if not lib_name[lib.target]:
                lib_name[lib.target] = claim(lib.alias, ("lib", lib.target))
        ns = lib_name[ns_lib.target]
        stmt_name: dict[tuple[str, int, str], str] = {}
        for s in kept:
            for b in s.binds:
                stmt_name[(s.module, s.index, b)] = ns if s.empty else claim(b, (s.module, s.index, b))

        def name_of(modname: str, name: str, chain: tuple[str, ...], where: str) -> tuple[str, int]:
            kind, target, used, final = self.resolve_used(modname, name, where, chain)
            if kind == "stmt":
                return stmt_name[(target.module, target.index, final)], used
            if kind == "lib":
                return lib_name[target.target], used
            return name, used

        parts = [lib.statement(lib_name[lib.target]) for lib in self.libs]
        for s in kept:
            if s.data is not None:
                where = self.modules[s.module].where(s.node)
                value = "".join(
                    p
                    if isinstance(p, str)
                    else ns
                    if p == NAMESPACE_REF
                    else name_of(p.module, p.name, (), where)[0]
                    for p in s.data
                )
                parts.append(f"{stmt_name[(s.module, s.index, s.binds[0])]}={value}")
            elif not s.empty:
                parts.append(ast.unparse(self._rewrite(s, name_of, stmt_name, ns)))
        names = {ref: name_of(ref.module, ref.name, (), f"{ref.module}.{ref.name}")[0] for ref in wanted}
        libraries = tuple(sorted({lib.module.split(".")[0] for lib in self.libs} & SCRIPT_LIBRARIES))
        return Bundle("\n".join(parts) + "\n", names, ns, libraries, frozenset(self.words))

    def _rewrite(
        self, s: _Stmt, name_of: Callable[..., tuple[str, int]], stmt_name: dict[Any, str], ns: str
    ) -> ast.stmt:
        mod = self.modules[s.module]
        bundler = self
        node = copy.deepcopy(s.node)
        if isinstance(node, ast.ClassDef):
            node.body = [m for i, m in enumerate(node.body) if i in s.kept_members] or [ast.Pass()]
            if s.pydantic is not None:
                node.bases, node.keywords = [ast.Name(id=ns, ctx=ast.Load())], []

        class R(_Scoped):
            def global_name(self, n: ast.Name, chain: tuple[str, ...]) -> tuple[ast.expr, int]:
                if isinstance(n.ctx, ast.Store) and not self.stack:
                    new, used = stmt_name[(s.module, s.index, n.id)], 0
                else:
                    new, used = name_of(mod.name, n.id, chain, mod.where(n))
                return ast.copy_location(ast.Name(id=new, ctx=n.ctx), n), used

            def decorators(self, d_node: Any) -> None:
                d_node.decorator_list = [self.visit(d) for d in d_node.decorator_list
                                         if not bundler._dropped(mod, d, self)]  # fmt: skip

            def visit_Call(self, call: ast.Call) -> ast.AST:
                f = call.func
                if (
                    isinstance(f, ast.Name)
                    and self.is_global(f.id)
                    and len(call.args) == 2
                    and not call.keywords
                ):
                    kind, t = bundler.resolve(mod.name, f.id, mod.where(call))
                    if kind == "lib" and (t.module, t.name) == ("typing", "cast"):
                        return self.visit(call.args[1])  # typing.cast(T, x) is x
                if bundler._plain_exception(mod, f, self):  # an error: its values, not its text
                    call.args = [v for a in call.args for v in _message_values(a)]
                return self.generic_visit(call)

        r = R()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            node.name = stmt_name[(s.module, s.index, node.name)]
            if isinstance(node, ast.ClassDef) and s.pydantic is not None:
                r.decorators(node)
                r.enter_class(node)
                node.body = r._stmts(node.body)
                r.stack.pop()
                return ast.fix_missing_locations(node)
        return ast.fix_missing_locations(r.visit(node))

    def _init_order(self, roots: Sequence[str]) -> list[str]:
        """Module names in the order Python initialises them when it imports ``roots`` in turn
        (parent packages first; a module's imports when its statements reach them)."""
        order: list[str] = []
        started: set[str] = set()

        def init(name: str) -> None:
            if name in started or not self.is_own(name):
                return
            started.add(name)
            parent = name.rpartition(".")[0]
            if parent:
                init(parent)
            mod = self.module(name)
            for node in mod.tree.body:
                for sub in _top_level_imports(node):
                    for target in self._import_targets(mod, sub):
                        init(target)
            order.append(name)

        for r in roots:
            init(r)
        for name in list(self.modules):  # reached only through imports inside functions: later
            init(name)
        return order

    def _import_targets(self, mod: _Module, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
            return
        base = self.absolute(mod, node)
        yield base
        for a in node.names:
            if self.is_own(f"{base}.{a.name}"):
                yield f"{base}.{a.name}"


def _message_values(expr: ast.expr) -> list[ast.expr]:
    """The values an error message shows, without its text: ``f"bad {x} in {y}"`` → x, y."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return []
    if isinstance(expr, ast.JoinedStr):
        return [v.value for v in expr.values if isinstance(v, ast.FormattedValue)]
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        return _message_values(expr.left) + _message_values(expr.right)
    return [expr]


def _is_pydantic(cls: type) -> bool:
    return any(c.__name__ == "BaseModel" and c.__module__.startswith("pydantic") for c in cls.__mro__)


def _catches_import_error(h: ast.ExceptHandler) -> bool:
    if h.type is None:
        return True
    names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
    return any(isinstance(n, ast.Name) and n.id in _IMPORT_ERRORS for n in names)


def _top_level_imports(node: ast.stmt) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module-level statement runs when the module is imported."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                yield sub


def _allowed_library(module: str) -> bool:
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or top in SCRIPT_LIBRARIES


def _library_message(where: str, module: str) -> str:
    return (
        f"{where}: imports {module!r}, which a submission script cannot rely on (it may import the "
        f"standard library and {', '.join(sorted(SCRIPT_LIBRARIES))}; an optional import goes in "
        "try/except ImportError)"
    )
