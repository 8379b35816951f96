"""The bundled script specialised to its stack: the code no run of that stack can reach goes.

:func:`specialize` rewrites the bundle (:mod:`.bundle`, one module of plain Python) before it is
minified, knowing which hooks the stack's techniques implement. It only removes or simplifies
code whose outcome is fixed by the stack, so the script computes what the run computed:

* a dispatch to a hook no technique of the stack implements has a known result:
  ``sites.chain("h", ...)`` and ``sites.implementers("h")`` are ``[]``, ``sites.event("h", ...)``
  does nothing, ``sites.slot("h", default, ...)`` is the default (``lambda: x`` gives ``x``),
  ``sites.filler("site")`` is ``None``. Rewritten only when the hook is named by a literal and the
  receiver and arguments are side-effect free (names, attributes, literals, lambdas, ...);
* a top-level function's parameter that every call in the script leaves at its default, or passes
  as the same literal, becomes that constant (the parameter goes);
* a local assigned once to a literal (``None``, ``False``, ``0``, ``()``, or ``[]`` read only as a
  condition or loop source) becomes that literal;
* conditions on literals are folded (``if []:``, ``x if None else y``, ``not ()``, ``None or x``,
  ``for t in []:``, comprehensions over ``[]``), and statements after ``return``/``raise`` go;
* top-level definitions nothing refers to any more go, and so do the entries of the site table
  (``SITES``) whose site and hooks the remaining code never names.

What is left is the bundle's code, statement for statement; the readable copy of an export shows
it after this pass.
"""

from __future__ import annotations

import ast
import copy
import functools
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ._astblocks import BlockTransformer

DISPATCH = frozenset({"chain", "event", "implementers", "slot"})
"""Dispatcher methods whose first argument is a hook name."""
_PURE_CALLS = frozenset({"list", "tuple", "len", "int", "float", "str", "dict", "set", "range", "bool"})
_EMPTY_OK_CALLS = frozenset(
    {"sum", "list", "tuple", "set", "any", "all", "sorted", "len", "dict", "max", "min"}
)
_ITERATORS = frozenset({"reversed", "enumerate", "iter", "zip", "list", "tuple", "sorted", "set"})
_MAX_ROUNDS = 20


def specialize(
    source: str,
    *,
    implemented: Iterable[str],
    hook_sites: Mapping[str, str],
    site_hooks: Mapping[str, tuple[str, ...]],
    keep: Iterable[str],
    sites_table: str | None = None,
) -> str:
    """``source`` (a bundled script) with the code its stack cannot reach removed.

    ``implemented``: the hooks the stack's techniques implement; ``hook_sites``: every hook's site;
    ``site_hooks``: every site's hooks, the required one first; ``keep``: top-level names used from
    outside the code (the stack data, the entry point); ``sites_table``: the bundle's name for the
    site table, whose unused entries go."""
    tree = ast.parse(source)
    done = frozenset(implemented)
    keep = frozenset(keep)
    _PURE_CLASSES.clear()
    _PURE_CLASSES.update(_simple_classes(tree))
    _Hooks(done, hook_sites, site_hooks).visit(tree)
    for _ in range(_MAX_ROUNDS):
        before = _size(tree)
        _defaults(tree)  # before folding: a parameter it turns into a literal folds in this round
        _fold(tree)
        _drop_unused(tree, keep)
        _drop_methods(tree, sites_table)
        if _size(tree) == before:  # every pass removes nodes when it changes anything
            break
    if sites_table is not None:
        _prune_sites(tree, sites_table, hook_sites)
        _drop_unused(tree, keep)
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


# --------------------------------------------------------------------------------------------
# what may be dropped unevaluated
# --------------------------------------------------------------------------------------------


def _pure(e: ast.AST | None) -> bool:
    """Evaluating ``e`` has no side effect pgolf's code relies on (a read, a literal, a lambda)."""
    if e is None or isinstance(e, (ast.Constant, ast.Name)):
        return True
    if isinstance(e, ast.Attribute):
        return _pure(e.value)
    if isinstance(e, ast.Lambda):
        return all(_pure(d) for d in (*e.args.defaults, *e.args.kw_defaults))
    if isinstance(e, (ast.Tuple, ast.List, ast.Set)):
        return all(_pure(x) for x in e.elts)
    if isinstance(e, ast.Dict):
        return all(_pure(x) for x in (*e.keys, *e.values))
    if isinstance(e, ast.Subscript):
        return _pure(e.value) and _pure(e.slice)
    if isinstance(e, ast.Starred):
        return _pure(e.value)
    if isinstance(e, ast.JoinedStr):
        return all(_pure(v.value) if isinstance(v, ast.FormattedValue) else True for v in e.values)
    if isinstance(e, (ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp)):
        return all(_pure(c) for c in ast.iter_child_nodes(e) if isinstance(c, ast.expr))
    if isinstance(e, ast.Call):
        return (
            isinstance(e.func, ast.Name)
            and (e.func.id in _PURE_CALLS or e.func.id in _PURE_CLASSES)
            and all(_pure(a) for a in e.args)
            and all(_pure(k.value) for k in e.keywords)
        )
    return False


_PURE_CLASSES: set[str] = set()
"""Classes of the module being specialised whose construction only stores values
(:func:`_simple_classes`); set by :func:`specialize`."""


def _simple_classes(tree: ast.Module) -> set[str]:
    """Plain classes whose ``__init__`` (if any) only assigns plain values to attributes of self."""
    out: set[str] = set()
    for name, c in _plain_classes(tree).items():
        if c.bases:
            continue
        init = next((m for m in c.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"), None)
        if init is None or all(
            isinstance(st, ast.Pass)
            or (
                isinstance(st, ast.Assign)
                and all(
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == init.args.args[0].arg
                    for t in st.targets
                )
                and _pure(st.value)
            )
            for st in init.body
        ):
            out.add(name)
    return out


def _literal(e: ast.AST) -> tuple[bool, Any]:
    """(known, truth value) of an expression whose truth is fixed by its form."""
    if isinstance(e, ast.Constant):
        return True, bool(e.value)
    if isinstance(e, (ast.List, ast.Tuple, ast.Set)) and not e.elts:
        return True, False
    if isinstance(e, ast.Dict) and not e.keys:
        return True, False
    if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not):
        known, v = _literal(e.operand)
        return known, not v
    if isinstance(e, ast.Compare) and len(e.ops) == 1 and isinstance(e.ops[0], (ast.Is, ast.IsNot)):
        left, right = e.left, e.comparators[0]
        if isinstance(left, ast.Constant) and isinstance(right, ast.Constant) and right.value is None:
            same = left.value is None
            return True, same if isinstance(e.ops[0], ast.Is) else not same
    if isinstance(e, ast.BoolOp):
        values = [_literal(v) for v in e.values]
        if all(k for k, _ in values):
            return True, all(v for _, v in values) if isinstance(e.op, ast.And) else any(v for _, v in values)
        first = values[0]
        if first[0] and (first[1] is False) == isinstance(e.op, ast.And):
            return True, first[1]  # `False and ...`, `True or ...`: decided by the first operand
    return False, None


def _is_nullcontext(e: ast.AST) -> bool:
    """``contextlib.nullcontext()``: a ``with`` item that does nothing and binds ``None``."""
    if not (isinstance(e, ast.Call) and not e.args and not e.keywords):
        return False
    f = e.func
    return (isinstance(f, ast.Name) and f.id == "nullcontext") or (
        isinstance(f, ast.Attribute)
        and f.attr == "nullcontext"
        and isinstance(f.value, ast.Name)
        and f.value.id == "contextlib"
    )


def _is_empty(e: ast.AST) -> bool:
    return isinstance(e, (ast.List, ast.Tuple)) and not e.elts


# --------------------------------------------------------------------------------------------
# hooks no technique implements
# --------------------------------------------------------------------------------------------


class _Hooks(ast.NodeTransformer):
    def __init__(self, implemented: frozenset[str], hook_sites: Mapping[str, str],
                 site_hooks: Mapping[str, tuple[str, ...]]) -> None:  # fmt: skip
        self.implemented, self.hook_sites, self.site_hooks = implemented, hook_sites, site_hooks

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        f = node.func
        if not (isinstance(f, ast.Attribute) and node.args and isinstance(node.args[0], ast.Constant)):
            return node
        name = node.args[0].value
        if not isinstance(name, str) or not _pure(f.value):
            return node
        if f.attr == "filler" and name in self.site_hooks and len(node.args) == 1 and not node.keywords:
            if self.site_hooks[name][0] not in self.implemented:
                return ast.copy_location(ast.Constant(None), node)
            return node
        if f.attr not in DISPATCH or name not in self.hook_sites or name in self.implemented:
            return node
        if f.attr == "slot":
            default = node.args[1] if len(node.args) > 1 else None
            rest = [*node.args[2:], *(k.value for k in node.keywords if k.arg != "default")]
            default = next((k.value for k in node.keywords if k.arg == "default"), default)
            if (
                default is None
                or not all(_pure(a) for a in rest)
                or any(k.arg is None for k in node.keywords)
            ):
                return node
            if isinstance(default, ast.Constant) and default.value is None:
                new: ast.expr = ast.Constant(None)
            elif isinstance(default, ast.Lambda) and not _has_params(default.args):
                new = default.body
            else:
                new = ast.Call(func=default, args=[], keywords=[])
            return ast.copy_location(new, node)
        if not all(_pure(a) for a in node.args[1:]) or not all(_pure(k.value) for k in node.keywords):
            return node
        if f.attr == "event":
            return ast.copy_location(ast.Constant(None), node)
        return ast.copy_location(ast.List(elts=[], ctx=ast.Load()), node)


def _has_params(a: ast.arguments) -> bool:
    return bool(a.posonlyargs or a.args or a.vararg or a.kwonlyargs or a.kwarg)


# --------------------------------------------------------------------------------------------
# folding
# --------------------------------------------------------------------------------------------


class _Folder(BlockTransformer):
    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for s in stmts:
            r = self.visit(s)
            for x in r if isinstance(r, list) else [r] if r is not None else []:
                out.append(x)
                if isinstance(x, (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                    return out  # the rest of the block never runs
        return out

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        self.generic_visit(node)
        return None if isinstance(node.value, ast.Constant) else node

    def visit_If(self, node: ast.If) -> Any:
        self.generic_visit(node)
        known, truth = _literal(node.test)
        if known:
            chosen = node.body if truth else node.orelse
            return [s for s in chosen if not isinstance(s, ast.Pass)] or None
        if all(isinstance(s, ast.Pass) for s in node.body) and not node.orelse and _pure(node.test):
            return None
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        known, truth = _literal(node.test)
        return (node.body if truth else node.orelse) if known else node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        # `None or x` is x, `[] or x` is x; `True and x` is x (as a value, not only as a truth)
        values = list(node.values)
        while len(values) > 1:
            known, truth = _literal(values[0])
            if not known or not isinstance(values[0], (ast.Constant, ast.List, ast.Tuple)):
                break
            if truth == isinstance(node.op, ast.And):
                values.pop(0)
            else:
                return values[0]
        if len(values) == 1:
            return values[0]
        node.values = values
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            known, truth = _literal(node.operand)
            if known:
                return ast.copy_location(ast.Constant(not truth), node)
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        known, truth = _literal(node)
        if known and isinstance(node.left, ast.Constant):
            return ast.copy_location(ast.Constant(truth), node)
        return node

    def visit_With(self, node: ast.With) -> Any:
        self.generic_visit(node)
        items: list[ast.withitem] = []
        bound: list[ast.stmt] = []
        for it in node.items:
            if not _is_nullcontext(it.context_expr):
                items.append(it)
            elif isinstance(it.optional_vars, ast.Name):  # `as x`: x is None
                target = ast.Name(id=it.optional_vars.id, ctx=ast.Store())
                bound.append(ast.copy_location(ast.Assign(targets=[target], value=ast.Constant(None)), node))
            elif it.optional_vars is not None:
                items.append(it)
        if not items:
            return [*bound, *node.body]
        node.items = items
        return [*bound, node]

    def visit_For(self, node: ast.For) -> Any:
        self.generic_visit(node)
        it = node.iter
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in _ITERATORS and len(it.args) == 1 and not it.keywords:  # fmt: skip
            it = it.args[0]
        if _is_empty(it):
            return [s for s in node.orelse if not isinstance(s, ast.Pass)] or None
        return node

    def visit_While(self, node: ast.While) -> Any:
        self.generic_visit(node)
        known, truth = _literal(node.test)
        if known and not truth:
            return [s for s in node.orelse if not isinstance(s, ast.Pass)] or None
        return node

    def visit_ListComp(self, node: ast.ListComp) -> ast.AST:
        self.generic_visit(node)
        if any(_is_empty(g.iter) for g in node.generators):
            return ast.copy_location(ast.List(elts=[], ctx=ast.Load()), node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in _EMPTY_OK_CALLS and len(node.args) == 1:
            arg = node.args[0]
            if isinstance(arg, ast.GeneratorExp) and any(_is_empty(g.iter) for g in arg.generators):
                node.args = [ast.copy_location(ast.Tuple(elts=[], ctx=ast.Load()), arg)]
        return node


def _fold(tree: ast.Module) -> None:
    _Folder().visit(tree)
    owners = _Owners()
    owners.visit(tree)
    for fn in owners.found:
        _local_constants(fn)
    _Folder().visit(tree)


def _size(tree: ast.AST) -> int:
    return sum(1 for _ in ast.walk(tree))


class _Owners(ast.NodeVisitor):
    """The functions that assign a literal to a plain name somewhere (candidates for
    :func:`_local_constants`; the others are not looked at again)."""

    def __init__(self) -> None:
        self.stack: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        self.found: dict[ast.FunctionDef | ast.AsyncFunctionDef, None] = {}

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(node)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        if (
            self.stack
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and (_immutable(node.value) or _is_empty(node.value) or _pure(node.value))
        ):
            self.found[self.stack[-1]] = None
        self.generic_visit(node)


# --------------------------------------------------------------------------------------------
# locals assigned once to a literal
# --------------------------------------------------------------------------------------------


def _immutable(e: ast.AST) -> bool:
    return (isinstance(e, ast.Constant) and not isinstance(e.value, bytes)) or (
        isinstance(e, ast.Tuple) and not e.elts
    )


def _scope_nodes(fn: ast.AST) -> Iterable[ast.AST]:
    """The nodes of ``fn``'s own scope (nested functions, lambdas, classes and comprehensions
    left out, but their defaults and decorators kept)."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            stack.append(n.generators[0].iter)
            continue
        stack.extend(ast.iter_child_nodes(n))


def _names_in_nested(fn: ast.AST) -> set[str]:
    """Every name a nested scope of ``fn`` mentions (a closure may read or rebind it)."""
    out: set[str] = set()
    for n in _scope_nodes(fn):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
                          ast.SetComp, ast.DictComp, ast.GeneratorExp)):  # fmt: skip
            out |= {x.id for x in ast.walk(n) if isinstance(x, ast.Name)}
    return out


def _local_constants(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    params = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
    params |= {a.arg for a in (fn.args.vararg, fn.args.kwarg) if a is not None}
    stores: dict[str, list[ast.AST]] = {}
    declared: set[str] = set()
    parents: dict[ast.AST, ast.AST] = {}
    own = list(_scope_nodes(fn))
    for n in own:
        for c in ast.iter_child_nodes(n):
            parents[c] = n
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            stores.setdefault(n.id, []).append(n)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            declared.update(n.names)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                stores.setdefault(a.asname or a.name.split(".")[0], []).append(n)
        elif (
            isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler)) and n.name
        ):
            stores.setdefault(n.name, []).append(n)
    for c in ast.iter_child_nodes(fn):
        parents[c] = fn
    nested = _names_in_nested(fn)
    for name, where in stores.items():
        if len(where) != 1 or name in declared or name in nested:
            continue
        if name in params:  # `p = p or default` that nothing reads afterwards goes
            assign = parents.get(where[0])
            if isinstance(assign, ast.Assign) and len(assign.targets) == 1 and _pure(assign.value):
                inside = {id(x) for x in ast.walk(assign.value)}
                reads = [
                    n for n in own if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
                ]
                block = _block_of(assign, parents)
                if block is not None and all(id(r) in inside for r in reads):
                    block.remove(assign)
                    if not block:
                        block.append(ast.Pass())
            continue
        target = where[0]
        assign = parents.get(target)
        if not (isinstance(assign, ast.Assign) and len(assign.targets) == 1 and assign.targets[0] is target):
            continue
        block = _block_of(assign, parents)
        if block is None:
            continue
        value = assign.value
        loads = [n for n in own if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)]
        if not loads and _pure(value):  # never read: the assignment goes
            block.remove(assign)
            if not block:
                block.append(ast.Pass())
            continue
        # every read in a statement after the assignment in its own block: it has run by then
        later = {id(x) for stmt in block[block.index(assign) + 1 :] for x in ast.walk(stmt)}
        if any(id(load) not in later for load in loads):
            continue
        if _immutable(value):
            pass
        elif _is_empty(value) and isinstance(value, ast.List):
            if not all(_read_as_truth_or_source(load, parents) for load in loads):
                continue
        else:
            continue
        for load in loads:
            _replace(parents[load], load, copy.deepcopy(value))
        block.remove(assign)
        if not block:
            block.append(ast.Pass())


def _block_of(stmt: ast.stmt, parents: Mapping[ast.AST, ast.AST]) -> list[ast.stmt] | None:
    """The statement list that holds ``stmt``."""
    parent = parents.get(stmt)
    for _, value in ast.iter_fields(parent) if parent is not None else ():
        if isinstance(value, list) and any(v is stmt for v in value):
            return value
    return None


def _read_as_truth_or_source(load: ast.AST, parents: Mapping[ast.AST, ast.AST]) -> bool:
    p = parents.get(load)
    if isinstance(p, (ast.If, ast.While, ast.IfExp)) and p.test is load:
        return True
    if isinstance(p, ast.UnaryOp) and isinstance(p.op, ast.Not):
        return True
    if isinstance(p, ast.BoolOp):
        return _read_as_truth_or_source(p, parents)
    if isinstance(p, ast.For) and p.iter is load:
        return True
    return isinstance(p, ast.comprehension) and p.iter is load


def _replace(parent: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for name, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, name, new)
            return
        if isinstance(value, list):
            for i, v in enumerate(value):
                if v is old:
                    value[i] = new
                    return


# --------------------------------------------------------------------------------------------
# parameters every call leaves at one value
# --------------------------------------------------------------------------------------------


def _defaults(tree: ast.Module) -> None:
    funcs = {
        n.name: n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and not n.decorator_list and not n.args.vararg and not n.args.kwarg
    }
    calls: dict[str, list[ast.Call]] = {name: [] for name in funcs}
    callee_names: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in calls:
            calls[n.func.id].append(n)
            callee_names.add(id(n.func))
    top = {id(n) for n in funcs.values()}
    for n in ast.walk(tree):  # a function used as a value, or a name bound again, is left as it is
        if (
            isinstance(n, ast.Name)
            and n.id in calls
            and (id(n) not in callee_names or isinstance(n.ctx, ast.Store))
        ):
            calls.pop(n.id)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            for name in n.names:
                calls.pop(name, None)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and id(n) not in top:
            calls.pop(n.name, None)
        elif isinstance(n, ast.arg):
            calls.pop(n.arg, None)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            for a in n.names:
                calls.pop(a.asname or a.name.split(".")[0], None)
    for name, sites in calls.items():
        if sites:
            _fix_params(funcs[name], sites)
            _drop_unused_params(funcs[name], sites, 0)
    _method_defaults(tree)


@functools.cache
def _library_method_names() -> frozenset[str]:
    """Method names of the library types the bundled code calls methods on (tensors, modules,
    optimizers, arrays, containers, strings, paths, threads, queues)."""
    import pathlib
    import queue
    import threading

    import numpy as np
    import torch

    types_ = (torch.Tensor, torch.nn.Module, torch.optim.Optimizer, np.ndarray, dict, list, set, tuple, str,
              bytes, bytearray, pathlib.Path, threading.Thread, queue.Queue, object)  # fmt: skip
    return frozenset(n for t in types_ for n in dir(t))


def _method_defaults(tree: ast.Module) -> None:
    """:func:`_defaults` for methods: a method whose name only one class of the module defines
    (a plain class, :func:`_plain_classes`), always called by that name (never used as a value,
    never named by a string), called with the same literal for a parameter."""
    plain = _plain_classes(tree)
    defs: dict[str, list[ast.AST | None]] = {}
    for c in tree.body:
        if not isinstance(c, ast.ClassDef):
            continue
        for m in c.body:
            if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defs.setdefault(m.name, []).append(m if c.name in plain else None)
            else:
                for t in (
                    m.targets
                    if isinstance(m, ast.Assign)
                    else [m.target]
                    if isinstance(m, ast.AnnAssign)
                    else []
                ):
                    if isinstance(t, ast.Name):
                        defs.setdefault(t.id, []).append(None)
    methods: dict[str, ast.FunctionDef] = {}
    for name, found in defs.items():
        only = found[0]
        if (
            len(found) == 1
            and isinstance(only, ast.FunctionDef)
            and not name.startswith("__")
            and not only.decorator_list
            and not only.args.vararg
            and not only.args.kwarg
            and only.args.args
        ):
            methods[name] = only
    calls: dict[str, list[ast.Call]] = {name: [] for name in methods}
    funcs: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in calls:
            calls[n.func.attr].append(n)
            funcs.add(id(n.func))
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in calls and id(n) not in funcs:
            calls.pop(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in calls:
            calls.pop(n.value)
        elif isinstance(n, ast.keyword) and n.arg in calls:
            calls.pop(n.arg)
        elif isinstance(n, ast.Name) and n.id in calls:
            calls.pop(n.id)
    ours = _typed_calls(tree, plain)
    library = _library_method_names()
    for name, sites in calls.items():
        # `x.name(...)` with a name library objects have too may be their call: only when every
        # call is known to be on an instance of the class (self, or a local made by the class)
        if sites and (name not in library or all(id(c) in ours for c in sites)):
            _fix_params(methods[name], sites, offset=1)
            _drop_unused_params(methods[name], sites, 1)


def _typed_calls(tree: ast.Module, plain: Mapping[str, ast.ClassDef]) -> set[int]:
    """Calls ``x.m(...)`` known to call method ``m`` of a plain class: ``x`` is ``self`` in a
    method of a class that has ``m``, or a local assigned once, from a call of such a class."""
    has: dict[str, set[str]] = {}

    def members(cls: str, depth: int = 0) -> set[str]:
        if cls not in has:
            c = plain[cls]
            own = {m.name for m in c.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
            for b in c.bases:
                if isinstance(b, ast.Name) and b.id in plain and depth < 50:
                    own |= members(b.id, depth + 1)
            has[cls] = own
        return has[cls]

    out: set[int] = set()

    def scan(fn: ast.FunctionDef | ast.AsyncFunctionDef, cls: str | None) -> None:
        own = list(_scope_nodes(fn))
        types: dict[str, str] = {}
        stores: Counter[str] = Counter()
        for n in own:
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                stores[n.id] += 1
            elif isinstance(n, ast.arg):
                stores[n.arg] += 1
        for n in own:
            if (
                isinstance(n, ast.Assign)
                and len(n.targets) == 1
                and isinstance(n.targets[0], ast.Name)
                and isinstance(n.value, ast.Call)
                and isinstance(n.value.func, ast.Name)
                and n.value.func.id in plain
                and stores[n.targets[0].id] == 1
            ):
                types[n.targets[0].id] = n.value.func.id
        args = fn.args.posonlyargs + fn.args.args
        if cls is not None and args and stores[args[0].arg] == 1:
            types[args[0].arg] = cls
        for n in own:
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and isinstance(n.func.value, ast.Name)
            ):
                t = types.get(n.func.value.id)
                if t is not None and n.func.attr in members(t):
                    out.add(id(n))

    def visit(node: ast.AST, cls: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child.name if child.name in plain and node is tree else None)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                scan(child, cls if isinstance(node, ast.ClassDef) else None)
                visit(child, None)
            else:
                visit(child, cls if isinstance(node, ast.ClassDef) else None)

    visit(tree, None)
    return out


def _fix_params(fn: ast.FunctionDef, calls: list[ast.Call], offset: int = 0) -> None:
    """Substitute the parameters of ``fn`` that every one of ``calls`` leaves at one literal
    (``offset``: positional parameters the calls do not pass, ``self`` of a method)."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    pos_defaults = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults) :]], a.defaults))
    kw_defaults = {p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None}
    if any(
        any(isinstance(x, ast.Starred) for x in c.args) or any(k.arg is None for k in c.keywords)
        for c in calls
    ):
        return
    stored = {
        n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))
    }
    for index, p in enumerate([*positional, *a.kwonlyargs]):
        default = pos_defaults.get(p.arg, kw_defaults.get(p.arg))
        if p.arg in stored or index < offset:
            continue
        at = index - offset  # its position in a call
        values: list[ast.expr] = []
        for c in calls:
            given = next((k.value for k in c.keywords if k.arg == p.arg), None)
            if given is None and index < len(positional) and at < len(c.args):
                given = c.args[at]
            given = given if given is not None else default
            if given is None:
                break
            values.append(given)
        else:
            if not values or not all(_immutable(v) for v in values):
                continue
            if len({ast.dump(v) for v in values}) != 1:
                continue
            if index < len(positional) and any(at < len(c.args) for c in calls):
                # passed by position somewhere: it stays (removing it would shift the others)
                _substitute(fn, p.arg, values[0])
                continue
            _substitute(fn, p.arg, values[0])
            _remove_param(fn, p.arg)
            for c in calls:
                c.keywords = [k for k in c.keywords if k.arg != p.arg]
            return  # one at a time: the positions changed


def _drop_unused_params(fn: ast.FunctionDef, calls: list[ast.Call], offset: int) -> None:
    """Parameters ``fn`` never reads (nor assigns) go, with the keyword arguments that pass them;
    one passed by position somewhere stays."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
    for index, p in enumerate([*positional, *a.kwonlyargs]):
        if index < offset or p.arg in names:
            continue
        at = index - offset
        if index < len(positional) and any(at < len(c.args) for c in calls):
            continue
        if not all(_pure(k.value) for c in calls for k in c.keywords if k.arg == p.arg):
            continue
        if index < len(positional) and index < len(positional) - len(a.defaults):
            continue  # required and positional: a call must pass it
        _remove_param(fn, p.arg)
        for c in calls:
            c.keywords = [k for k in c.keywords if k.arg != p.arg]
        return  # one at a time


def _substitute(fn: ast.FunctionDef, name: str, value: ast.expr) -> None:
    shadowed = _shadowing_scopes(fn, name)
    parents = {c: n for n in ast.walk(fn) for c in ast.iter_child_nodes(n)}
    for n in list(ast.walk(fn)):
        if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load):
            p = parents.get(n)
            inner = p
            hidden = False
            while inner is not None and inner is not fn:
                if inner in shadowed:
                    hidden = True
                    break
                inner = parents.get(inner)
            if not hidden and p is not None:
                _replace(p, n, copy.deepcopy(value))


def _shadowing_scopes(fn: ast.FunctionDef, name: str) -> set[ast.AST]:
    out: set[ast.AST] = set()
    for n in ast.walk(fn):
        if n is fn:
            continue
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = n.args
            names = {x.arg for x in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
            names |= {x.arg for x in (args.vararg, args.kwarg) if x is not None}
            body = n.body if isinstance(n.body, list) else [n.body]
            stores = {
                x.id
                for b in body
                for x in ast.walk(b)
                if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Store)
            }
            if name in names or name in stores:
                out.add(n)
        elif isinstance(n, ast.ClassDef):
            out.add(n)  # a class body has its own names; leave it as it is
        elif isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            targets = {x.id for g in n.generators for x in ast.walk(g.target) if isinstance(x, ast.Name)}
            if name in targets:
                out.add(n)
    return out


def _remove_param(fn: ast.FunctionDef, name: str) -> None:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    n_plain = len(positional) - len(a.defaults)
    for lst in (a.posonlyargs, a.args):
        for i, p in enumerate(lst):
            if p.arg == name:
                index = positional.index(p)
                lst.pop(i)
                if index >= n_plain:
                    a.defaults.pop(index - n_plain)
                return
    for i, p in enumerate(a.kwonlyargs):
        if p.arg == name:
            a.kwonlyargs.pop(i)
            a.kw_defaults.pop(i)
            return


# --------------------------------------------------------------------------------------------
# unused definitions and site-table entries
# --------------------------------------------------------------------------------------------


def _defined(n: ast.stmt) -> str | None:
    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return n.name
    if (
        isinstance(n, ast.Assign)
        and len(n.targets) == 1
        and isinstance(n.targets[0], ast.Name)
        and _pure(n.value)
    ):
        return n.targets[0].id
    return None


def _mentioned(n: ast.stmt) -> set[str]:
    out: set[str] = set()
    for x in ast.walk(n):
        if isinstance(x, ast.Name):
            out.add(x.id)
        elif isinstance(x, (ast.Global, ast.Nonlocal)):
            out.update(x.names)
    return out


def _drop_unused(tree: ast.Module, keep: frozenset[str]) -> None:
    """Top-level definitions no other statement mentions go (until none is left to drop)."""
    while True:
        mentions = [(n, _mentioned(n)) for n in tree.body]
        count: Counter[str] = Counter()
        for _, m in mentions:
            count.update(m)
        gone = {
            id(n) for n, m in mentions
            if (name := _defined(n)) is not None and name not in keep and count[name] == (1 if name in m else 0)
        }  # fmt: skip
        if not gone:
            return
        tree.body = [n for n in tree.body if id(n) not in gone] or [ast.Pass()]


def _plain_classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    """Top-level classes without decorators, keywords or bases other than such classes: no
    library code calls their methods by a protocol name."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    plain: dict[str, ast.ClassDef] = {}

    def is_plain(c: ast.ClassDef, depth: int = 0) -> bool:
        if c.decorator_list or c.keywords or depth > 50:
            return False
        return all(
            isinstance(b, ast.Name) and b.id in classes and is_plain(classes[b.id], depth + 1)
            for b in c.bases
        )

    for name, c in classes.items():
        if is_plain(c):
            plain[name] = c
    return plain


def _drop_methods(tree: ast.Module, sites_table: str | None) -> None:
    """Methods of plain classes whose name the code never mentions (as an attribute, a keyword,
    a name or a string outside the site table) go; dunder methods stay."""
    mentioned: set[str] = set()
    for n in tree.body:
        if sites_table is not None and _is_table(n, sites_table):
            continue
        for x in ast.walk(n):
            if isinstance(x, ast.Attribute):
                mentioned.add(x.attr)
            elif isinstance(x, ast.Name):
                mentioned.add(x.id)
            elif isinstance(x, ast.keyword) and x.arg:
                mentioned.add(x.arg)
            elif isinstance(x, ast.Constant) and isinstance(x.value, str):
                mentioned.add(x.value)
    for c in _plain_classes(tree).values():
        body = [
            m for m in c.body
            if not (isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("__")
                    and m.name not in mentioned)
        ]  # fmt: skip
        c.body = body or [ast.Pass()]


def _prune_sites(tree: ast.Module, table: str, hook_sites: Mapping[str, str]) -> None:
    """Entries of the site table whose site and hooks no string in the code names go."""
    strings = {
        x.value for n in tree.body for x in ast.walk(n)
        if isinstance(x, ast.Constant) and isinstance(x.value, str) and not _is_table(n, table)
    }  # fmt: skip
    for n in tree.body:
        if _is_table(n, table) and isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict):
            d = n.value
            kept = [
                (k, v) for k, v in zip(d.keys, d.values)
                if not isinstance(k, ast.Constant) or k.value in strings
                or any(h in strings for h, s in hook_sites.items() if s == k.value)
            ]  # fmt: skip
            d.keys = [k for k, _ in kept]
            d.values = [v for _, v in kept]


def _is_table(n: ast.stmt, table: str) -> bool:
    return isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == table for t in n.targets)
