"""Techniques and their registry.

A technique is a class that subclasses :class:`Technique`, declares a pydantic ``Params``
model, marks its hook implementations with :func:`hook`, and is registered with
:func:`register`::

    @register("xsa")
    class XSA(Technique):
        '''One-line summary. ...'''
        Params = XSAParams

        @hook
        def attn_out(self, layer):
            return XSAModule() if layer in self.layers else None

Sources of techniques, all feeding one :data:`REGISTRY`:

* the built-in modules of ``pgolf.techniques`` (imported on first use);
* the entry-point group ``pgolf.techniques`` of installed packages;
* local ``.py`` files named in a stack's ``plugins:`` list.

A duplicate name is an error unless ``override=True``; an unknown name lists close matches; a
plugin that fails to import is recorded and reported only when a stack asks for it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import PgolfError, did_you_mean
from .sites import DEFAULT_FILLERS, HOOKS, SITES, SLOT

ENTRY_POINT_GROUP = "pgolf.techniques"
_HOOK_ATTR = "__pgolf_hook__"
BUILTIN_PACKAGE = "pgolf.techniques"

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T", bound="type[Technique]")


class Params(BaseModel):
    """Base class of a technique's parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


@dataclass(frozen=True)
class ModelSpec:
    """Read-only facts about the base model that techniques may use."""

    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_hidden: int
    train_seq_len: int
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    embed_init_std: float = 1.0
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def hook(fn: F) -> F:
    """Mark a technique method as the implementation of the hook with the same name."""
    setattr(fn, _HOOK_ATTR, fn.__name__)
    return fn


LEGALITY_TAGS: dict[str, str] = {
    "score_first": "evaluation-time: every token is scored before any update that depends on it "
    "(legal test-time training, caches built from already-scored tokens)",
    "needs_review": "evaluation-time behaviour whose legality is not settled (e.g. SLOT, logit-bias "
    "fitting); results that use it are flagged as not legal",
    "illegal": "known to break the challenge's rules (e.g. training on validation tokens before scoring "
    "them); kept so the legality probes can be shown to catch it; a run that uses it is never legal",
}
"""Tags a technique may carry in ``legality`` (challenge rules: README FAQ and Issue #1017)."""

ParamsBase = Params  # the name ``Params`` is shadowed inside Technique by its class attribute


class Technique:
    """Base class of every technique.

    Class attributes a technique may set:

    ``Params``       pydantic model (subclass of :class:`Params`) of its parameters.
    ``requires``     names of techniques that must also be in the stack.
    ``conflicts``    names of techniques that may not be in the same stack.
    ``before``/``after``  ordering constraints among techniques present in the stack.
    ``legality``     tags for evaluation-time behaviour, from :data:`LEGALITY_TAGS`.
    ``gain_at_end``  True when its benefit only shows at the end of training (EMA, QAT, ...):
                     a search scheduler must not stop such a trial before its last report.
    ``size_estimate_note``  a sentence ``pgolf check`` adds to the size estimate when the
                     technique takes part in the export, saying how far and which way the
                     estimate is known to miss for it (e.g. a quantizer whose bytes depend on
                     the trained weights' scale).
    ``size_estimate_high``  with a note: the largest relative over-estimate the note states
                     (0.25: the estimate may be up to 25 % above the real artifact); the
                     generated size tests hold every quantizer × codec to it.
    ``size_cap()``   the model bytes its export step guarantees not to exceed, whatever the
                     trained codes (selective pruning's ``target_bytes``), or None: the size
                     estimate's allowance for calibration-dependent codes stops there;
                     ``size_cap_note(capped)`` says what the step did to the stand-ins.
    ``quantizes_control``  a quantizer that may store control tensors (role ``scalar``): only such
                     a quantizer is asked whether it claims one; every other quantizer, whatever
                     its scope (``all`` included), never sees them, and an unclaimed one stays fp32.
    ``contract_params``  params the generated contract and end-to-end tests use, for
                     techniques whose defaults (sized for the records' 11 × 512 models) do not
                     fit 2–4-layer test models (e.g. a loop over layers 3–5); defaults are still
                     validated.

    A technique fills sites by implementing hooks (see :mod:`pgolf.registry.api.sites`); one
    instance is made per build (training model, size estimate, reloaded artifact), so state
    never leaks from one build into another.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    requires: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    legality: ClassVar[tuple[str, ...]] = ()
    gain_at_end: ClassVar[bool] = False
    size_estimate_note: ClassVar[str] = ""
    size_estimate_high: ClassVar[float] = 0.0
    quantizes_control: ClassVar[bool] = False
    contract_params: ClassVar[dict[str, Any]] = {}
    hooks: ClassVar[dict[str, tuple[str, ...]]] = {}  # hook name -> argument names it takes
    origin: ClassVar[str] = ""  # where it was registered from (module or plugin)

    def __init__(self, params: ParamsBase, spec: ModelSpec):
        self.params = params
        self.spec = spec
        self._log: Callable[[str], None] | None = None

    def size_cap(self) -> int | None:
        """Model bytes this technique's export step guarantees not to exceed (None: no such
        guarantee). The size estimate caps its allowance for calibration-dependent codes there."""
        return None

    def size_cap_note(self, capped: bool) -> str:
        """What the export step did to the size estimate's stand-in weights to stay within
        :meth:`size_cap`, as the start of a sentence ending "… its N-byte target"; ``capped``: the
        cap cut the allowance. "" when there is nothing to say."""
        return "the stand-in weights stayed within" if capped else ""

    def log(self, message: str) -> None:
        """A line in the run's log (``run.log`` and the console), prefixed with the technique's
        name; dropped when the technique runs outside a run (tests, the size estimate)."""
        if self._log is not None:
            self._log(f"{self.name}: {message}")

    def bind_log(self, sink: Callable[[str], None] | None) -> None:
        self._log = sink

    # -- state owned by the technique (EMA weights, calibrated temperature, ...) --------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"technique {self.name!r} has no state but was given keys {sorted(state)}")

    # -- helpers ---------------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(sys.modules.get(cls.__module__)) or inspect.getdoc(cls) or ""
        return " ".join(doc.strip().split("\n\n")[0].split())

    @classmethod
    def source_file(cls) -> Path | None:
        mod = sys.modules.get(cls.__module__)
        f = getattr(mod, "__file__", None)
        return Path(f) if f else None

    def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call this technique's implementation of ``hook_name`` with the arguments it takes."""
        wanted = type(self).hooks[hook_name]
        return getattr(self, hook_name)(**{k: kwargs[k] for k in wanted})

    def __repr__(self) -> str:
        return f"<technique {self.name} {self.params!r}>"


def _check_hooks(name: str, cls: type[Technique]) -> dict[str, tuple[str, ...]]:
    """Find the @hook methods of ``cls`` and check each against its spec."""
    found: dict[str, tuple[str, ...]] = {}
    for attr in dir(cls):
        fn = getattr(cls, attr, None)
        hook_name = getattr(fn, _HOOK_ATTR, None)
        if hook_name is None or not callable(fn):
            continue
        spec = HOOKS.get(hook_name)
        if spec is None:
            raise PgolfError(
                f"technique {name!r}: {hook_name!r} is not a hook{did_you_mean(hook_name, HOOKS)}. "
                f"Hooks: {', '.join(HOOKS)}"
            )
        expected = f"{hook_name}(self{''.join(', ' + a for a in spec.args)})"
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if not params or params[0].name != "self":
            raise PgolfError(f"technique {name!r}: hook {hook_name!r} must be a method; expected {expected}")
        args: list[str] = []
        for p in params[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise PgolfError(
                    f"technique {name!r}: hook {hook_name!r} may not take *args/**kwargs; "
                    f"expected a subset of {expected}"
                )
            if p.name not in spec.args:
                raise PgolfError(
                    f"technique {name!r}: hook {hook_name!r} takes an unknown argument {p.name!r}; "
                    f"expected a subset of {expected}"
                )
            args.append(p.name)
        found[hook_name] = tuple(args)
    for site in SITES.values():
        have = [h.name for h in site.hooks if h.name in found]
        missing = [m for m in site.required if m not in found]
        if have and missing:
            raise PgolfError(
                f"technique {name!r} fills the {site.name!r} site with {', '.join(have)} "
                f"but not {', '.join(missing)}; it needs all of: {', '.join(site.required)}"
            )
    return found


class Registry:
    """Name → technique class, filled from built-ins, entry points and local files."""

    def __init__(self) -> None:
        self._entries: dict[str, type[Technique]] = {}
        self._broken: dict[str, str] = {}  # technique or plugin name -> error text
        self._builtins_loaded = False
        self._entry_points_loaded = False
        self._files: dict[Path, str] = {}

    # -- registration ------------------------------------------------------------------------
    def add(self, name: str, cls: type[Technique], *, override: bool = False, origin: str = "") -> None:
        if not name.isidentifier() or name != name.lower():
            raise PgolfError(f"technique name {name!r} must be snake_case")
        if not (isinstance(cls, type) and issubclass(cls, Technique)):
            raise PgolfError(f"technique {name!r}: {cls!r} is not a subclass of pgolf.registry.Technique")
        if not (isinstance(cls.Params, type) and issubclass(cls.Params, Params)):
            raise PgolfError(f"technique {name!r}: Params must subclass pgolf.registry.Params")
        module = cls.__module__
        if module.startswith(BUILTIN_PACKAGE + ".") and module.rsplit(".", 1)[1] != name:
            raise PgolfError(
                f"built-in technique {name!r} must live in techniques/{name}.py (found {module})"
            )
        hooks = _check_hooks(name, cls)
        unknown = [t for t in cls.legality if t not in LEGALITY_TAGS]
        if unknown:
            raise PgolfError(
                f"technique {name!r}: unknown legality tag(s) {unknown}; allowed: {', '.join(LEGALITY_TAGS)}"
            )
        if name in self._entries and not override:
            prev = self._entries[name]
            if prev is cls:
                return
            raise PgolfError(
                f"technique {name!r} is registered twice: by {prev.origin or prev.__module__} and by "
                f"{origin or module}. Rename one, or pass override=True to replace it on purpose."
            )
        cls.name = name
        cls.hooks = hooks
        cls.origin = origin or module
        self._entries[name] = cls
        self._broken.pop(name, None)

    # -- loading -----------------------------------------------------------------------------
    def load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        pkg = importlib.import_module(BUILTIN_PACKAGE)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")

    def load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                self.add(ep.name, ep.load(), origin=f"entry point {ep.name} = {ep.value}")
            except Exception as e:  # one broken plugin must not break the registry
                detail = e if isinstance(e, PgolfError) else _short_exc(e)
                self._broken[ep.name] = f"plugin entry point {ep.name} = {ep.value} failed to load: {detail}"

    def load_file(self, path: str | Path) -> list[str]:
        """Import a local plugin file; returns the technique names it registered."""
        p = Path(path).expanduser().resolve()
        if p in self._files:
            return [n for n, c in self._entries.items() if c.__module__ == self._files[p]]
        if not p.is_file():
            raise PgolfError(f"plugin file {str(path)!r} does not exist")
        if p.suffix != ".py":
            raise PgolfError(f"plugin file {str(path)!r} must be a .py file")
        modname = "pgolf_plugin_" + hashlib.sha1(str(p).encode()).hexdigest()[:12] + "_" + p.stem
        spec = importlib.util.spec_from_file_location(modname, p)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        before = set(self._entries)
        try:
            spec.loader.exec_module(module)
        except PgolfError as e:
            sys.modules.pop(modname, None)
            raise PgolfError(f"plugin file {str(path)!r}: {e}") from None
        except Exception as e:
            sys.modules.pop(modname, None)
            raise PgolfError(f"plugin file {str(path)!r} failed to import: {_short_exc(e)}") from None
        self._files[p] = modname
        added = sorted(set(self._entries) - before)
        if not added:
            raise PgolfError(f"plugin file {str(path)!r} registered no technique (use @register('name'))")
        return added

    def ensure_loaded(self) -> None:
        self.load_builtins()
        self.load_entry_points()

    # -- lookup ------------------------------------------------------------------------------
    def get(self, name: str) -> type[Technique]:
        self.ensure_loaded()
        if name in self._entries:
            return self._entries[name]
        if name in self._broken:
            raise PgolfError(self._broken[name])
        raise PgolfError(f"unknown technique {name!r}{did_you_mean(name, self._entries)}")

    def names(self) -> list[str]:
        self.ensure_loaded()
        return sorted(self._entries)

    def broken(self) -> dict[str, str]:
        self.ensure_loaded()
        return dict(self._broken)

    def __contains__(self, name: object) -> bool:
        self.ensure_loaded()
        return name in self._entries


def _short_exc(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


REGISTRY = Registry()


def register(name: str, *, override: bool = False) -> Callable[[T], T]:
    """Class decorator registering a technique under ``name`` (snake_case, = its file name)."""

    def deco(cls: T) -> T:
        REGISTRY.add(name, cls, override=override)
        return cls

    return deco


# --------------------------------------------------------------------------------------------
# Resolving the techniques of a stack
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """A technique chosen by a stack: its class and validated params."""

    name: str
    cls: type[Technique]
    params: Params
    implicit: bool = False  # added because it is the default of an empty slot

    def instantiate(self, spec: ModelSpec) -> Technique:
        return self.cls(self.params, spec)


def pydantic_problems(err: ValidationError, prefix: str) -> list[tuple[str, str]]:
    """Turn a pydantic error into (key path, message) pairs."""
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        out.append((path, msg))
    return out


def unknown_key_hint(model: type[BaseModel], key: str) -> str:
    return did_you_mean(key, model.model_fields)


def resolve_techniques(raw: Mapping[str, Any]) -> tuple[list[Resolved], list[tuple[str, str]]]:
    """Validate the ``techniques:`` mapping of a stack and put it in run order.

    Returns the ordered techniques (slot defaults added) and a list of (key path, problem);
    every problem is collected, none raised.
    """
    REGISTRY.ensure_loaded()
    problems: list[tuple[str, str]] = []
    chosen: list[Resolved] = []
    for name, params in raw.items():
        path = f"techniques.{name}"
        try:
            cls = REGISTRY.get(name)
        except PgolfError as e:
            problems.append((path, str(e)))
            continue
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            problems.append((path, f"expected a mapping of parameters (or {{}}), got {params!r}"))
            continue
        try:
            chosen.append(Resolved(name, cls, cls.Params.model_validate(dict(params))))
        except ValidationError as e:
            probs = pydantic_problems(e, path)
            probs = [
                (p, m + unknown_key_hint(cls.Params, p.rsplit(".", 1)[1]) if m == "unknown key" else m)
                for p, m in probs
            ]
            problems.extend(probs)
    names = {r.name for r in chosen}
    reported: set[tuple[str, str]] = set()
    for r in chosen:
        for req in r.cls.requires:
            if req not in names and req not in raw:  # (a requirement that failed has its own error)
                problems.append((f"techniques.{r.name}", f"requires technique {req!r}; add it to the stack"))
        for other in chosen:
            if other.name != r.name and (other.name in r.cls.conflicts or r.name in other.cls.conflicts):
                a, b = sorted((r.name, other.name))
                if (a, b) not in reported:
                    reported.add((a, b))
                    problems.append(
                        (f"techniques.{a}", f"conflicts with technique {b!r}; remove one of them")
                    )
    # whole-model slots: one filler each (slots per layer / Linear / tensor are checked at build)
    for site in SITES.values():
        hook = site.required[0]
        fillers = [r.name for r in chosen if hook in r.cls.hooks]
        if site.kind == SLOT and len(fillers) > 1:
            problems.append(
                (
                    "techniques",
                    f"techniques {' and '.join(map(repr, fillers))} both fill the slot {site.name!r}; keep one",
                )
            )
    for site_name, default in DEFAULT_FILLERS.items():
        hook = SITES[site_name].required[0]
        if SITES[site_name].kind == SLOT and any(hook in r.cls.hooks for r in chosen):
            continue
        if any(r.name == default for r in chosen):
            continue
        cls = REGISTRY.get(default)
        chosen.append(Resolved(default, cls, cls.Params(), implicit=True))
    if problems:
        return chosen, problems
    try:
        return order_techniques(chosen), problems
    except PgolfError as e:
        return chosen, [("techniques", str(e))]


def order_techniques(chosen: list[Resolved]) -> list[Resolved]:
    """Topological order from before/after, ties kept in stack order (Kahn's algorithm)."""
    idx = {r.name: i for i, r in enumerate(chosen)}
    succ: dict[str, set[str]] = {r.name: set() for r in chosen}
    for r in chosen:
        for b in r.cls.before:
            if b in idx:
                succ[r.name].add(b)
        for a in r.cls.after:
            if a in idx:
                succ[a].add(r.name)
    indeg = {n: 0 for n in idx}
    for n in succ:
        for m in succ[n]:
            indeg[m] += 1
    ready = sorted((n for n in idx if indeg[n] == 0), key=idx.__getitem__)
    out: list[str] = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for m in sorted(succ[n], key=idx.__getitem__):
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
                ready.sort(key=idx.__getitem__)
    if len(out) != len(chosen):
        cyc = sorted(n for n in idx if n not in out)
        raise PgolfError(f"before/after constraints form a cycle among: {', '.join(cyc)}")
    return [chosen[idx[n]] for n in out]
