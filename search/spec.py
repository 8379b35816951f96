"""Search YAML: the schema of a search file and its validation (every problem at once).

A search is a stack plus a space, an objective, the size constraint, per-trial resources and
the search budget::

    name: quick                                  # default: the file name
    stack: ../stacks/quickstart.yaml             # a stack file, or an inline stack mapping
    space:
      model.num_layers: {int: [2, 4]}
      optim.matrix_lr: {logfloat: [0.01, 0.1]}
      techniques.bigram_hash: {optional: true}   # on/off
      techniques.bigram_hash.buckets: {choice: [1024, 2048]}   # sampled only when on
    objective: {metric: val_bpb, mode: min}
    constraint: {artifact_bytes: 16000000, margin: 0}
    trial: {gpus: 1, cpus: 1, max_wallclock_seconds: 600}
    search: {num_samples: 32, scheduler: asha, sampler_seed: 0, seeds: [1337]}

Space keys are dotted stack paths. Seeds are never a search dimension: ``search.seeds``
declares them, and every trial runs all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from pgolf.registry.api.config import (
    ARTIFACT_LIMIT,
    SECTIONS,
    ResolvedStack,
    apply_override,
    load_stack,
    parse_override,
    read_yaml,
    stack_from_dict,
)
from pgolf.registry.api.errors import ConfigError, PgolfError, did_you_mean
from pgolf.registry.api.sites import HOOKS, SITES
from pgolf.registry.api.technique import REGISTRY, pydantic_problems

KINDS = ("int", "float", "logfloat", "choice", "optional")
SEED_MESSAGE = "seeds are never a search dimension; use search.seeds: [1337, 1338, ...]"
NOT_SEARCHABLE = {
    "seed": SEED_MESSAGE,
    "name": "the stack name is not a search dimension (trials are named after the search)",
    "plugins": "plugins are not a search dimension; list them in the stack",
    "base": "the parent stack is not a search dimension",
    "export.artifact_limit": "the limit is set by constraint.artifact_bytes, not searched",
    "train.threads": "torch threads follow trial.cpus",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectiveSpec(_Section):
    metric: Literal["val_bpb", "val_loss"] = Field("val_bpb", description="what the search minimizes")
    mode: Literal["min"] = "min"
    multi_objective: bool = Field(
        False, description="minimize (metric, artifact bytes) together: Optuna keeps the Pareto front"
    )


class ConstraintSpec(_Section):
    artifact_bytes: int = Field(ARTIFACT_LIMIT, ge=1, description="artifact (model + code) limit in bytes")
    margin: int = Field(0, ge=0, description="bytes added to every pre-training estimate")
    prefilter_slack: float = Field(
        0.10,
        ge=0,
        lt=1,
        description="analytic pre-filter: reject when (1 - slack) x the lowest bytes/parameter seen "
        "x parameters is over the limit",
    )
    proxy_after_seconds: float = Field(
        5.0,
        ge=0,
        description="estimate with the default codec (scaled, calibrated) once real estimates of an "
        "export take this long; close calls still get a real estimate",
    )


class TrialSpec(_Section):
    gpus: float = Field(1.0, ge=0, description="GPUs per trial; 0 for CPU trials, fractions share a GPU")
    cpus: float = Field(1.0, gt=0, description="CPUs per trial; also the trial's torch threads")
    max_wallclock_seconds: float | None = Field(
        None,
        ge=0,
        description="training time cap per run (sets train.max_wallclock_seconds); null keeps the stack's",
    )
    timeout_seconds: float | None = Field(
        None,
        ge=0,
        description="hard limit on a trial's wall-clock, enforced by the driver; null = seeds x "
        "(1.25 x the training cap + 900 s) when there is a cap, none otherwise; 0 = none",
    )


class SearchSection(_Section):
    num_samples: int = Field(16, ge=1, description="trials to train (rejected samples do not count)")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once; default: as many as fit")
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(None, ge=1, description="ASHA: steps before the first cut")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep the best 1/reduction_factor per rung")
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    sampler_seed: int = Field(0, ge=0)
    n_startup_trials: int = Field(8, ge=0, description="TPE: random samples before the model is used")
    seeds: list[int] = Field(
        default_factory=lambda: [1337], min_length=1, description="each trial runs every seed"
    )
    max_resample: int = Field(50, ge=1, description="rejected samples in a row before the search gives up")
    start_with: list[dict[str, Any]] = Field(default_factory=list, description="points evaluated first")
    points_only: bool = Field(
        False,
        description="train exactly the start_with points, in order, each once: nothing is sampled, "
        "and a point the size gate rejects is reported, not replaced (pgolf ablate's studies)",
    )
    size_workers: int = Field(
        2, ge=0, description="size estimates computed at once as Ray tasks; 0 = one at a time in the driver"
    )
    warm_start: list[str] = Field(
        default_factory=list, description="earlier study folders whose finished trials seed the sampler"
    )
    confirm_top_k: int = Field(0, ge=0, description="re-run the best k trials on confirm_seeds at the end")
    confirm_seeds: list[int] = Field(
        default_factory=list, description="extra seeds for the top-k confirmation"
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"duplicate seeds in {seeds}")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be ≥ 0: {seeds}")
        return seeds


class EvalOnlySpec(_Section):
    run: str = Field(
        description="a run folder (stack.yaml + model.ptz), a study trial folder (its seed_* runs) "
        "or a study folder (its best trial), whose artifact every trial re-scores"
    )


class SearchSpec(_Section):
    name: str | None = None
    stack: str | dict[str, Any] | None = None
    eval_only: EvalOnlySpec | None = Field(
        None, description="search evaluation settings on a saved artifact; no training"
    )
    space: dict[str, Any] = Field(default_factory=dict)
    objective: ObjectiveSpec = ObjectiveSpec()
    constraint: ConstraintSpec = ConstraintSpec()
    trial: TrialSpec = TrialSpec()
    search: SearchSection = SearchSection()
    storage: str | None = Field(None, description="Optuna RDB URL; default sqlite in the study folder")
    study_name: str | None = Field(None, description="Optuna study name; default the study folder's name")


# --------------------------------------------------------------------------------------------
# Space dimensions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    """One searched stack key."""

    key: str
    kind: str  # int | float | logfloat | choice | optional
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def parts(self) -> list[str]:
        return self.key.split(".")

    @property
    def technique(self) -> str | None:
        """The technique this key belongs to (``techniques.<name>[.param]``), if any."""
        p = self.parts
        return p[1] if p[0] == "techniques" and len(p) >= 2 else None

    @property
    def is_toggle(self) -> bool:
        return self.kind == "optional"

    @property
    def scalar_choices(self) -> bool:
        return all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices)

    def contains(self, value: Any) -> bool:
        if self.kind == "optional":
            return isinstance(value, bool)
        if self.kind == "choice":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "optional":
            return "on/off"
        if self.kind == "choice":
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        extra = f" step {self.step:g}" if self.step else ""
        scale = " (log)" if self.kind == "logfloat" or self.log else ""
        return f"{self.kind} in [{self.low:g}, {self.high:g}]{extra}{scale}"


def yaml_number_hint(val: Any) -> str:
    """A hint for numbers YAML reads as text (``1.0e6``, ``1e-3``: YAML 1.1 wants a sign in the
    exponent and a dot in the mantissa)."""
    items = val if isinstance(val, list) else [val]
    for v in items:
        if isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                continue
            shown: float | int = int(x) if x.is_integer() and abs(x) < 1e15 else x
            return (
                f"; {v!r} is text to YAML, not a number: write it as {shown!r}"
                if "e" not in repr(shown)
                else f"; {v!r} is text to YAML, not a number: write it with a dot and a signed exponent, e.g. {x:.1e}".replace(
                    "e-0", "e-"
                ).replace("e+0", "e+")
            )
    return ""


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_dim(key: str, raw: Any, problems: list[tuple[str, str]]) -> Dim | None:
    """One ``space:`` entry → a :class:`Dim`; problems are appended with their key path."""
    path = f"space.{key}"
    if not isinstance(raw, Mapping) or not raw:
        problems.append(
            (
                path,
                f"expected one of {{int: [lo, hi]}}, {{float: [lo, hi]}}, {{logfloat: [lo, hi]}}, "
                f"{{choice: [...]}}, {{optional: true}}; got {raw!r}",
            )
        )
        return None
    kinds = [k for k in raw if k in KINDS]
    extra = [k for k in raw if k not in (*KINDS, "step", "log")]
    for k in extra:
        problems.append((f"{path}.{k}", "unknown key" + did_you_mean(str(k), (*KINDS, "step", "log"))))
    if len(kinds) != 1:
        problems.append(
            (
                path,
                f"give exactly one of {', '.join(KINDS)}" + (f" (got {', '.join(kinds)})" if kinds else ""),
            )
        )
        return None
    kind = kinds[0]
    val = raw[kind]
    step, log = raw.get("step"), raw.get("log", False)
    if kind in ("choice", "optional") and ("step" in raw or "log" in raw):
        problems.append((path, f"step/log apply to int and float ranges, not {kind}"))
    if kind == "optional":
        if val is not True:
            problems.append(
                (f"{path}.optional", f"must be true (got {val!r}); remove the entry to keep it fixed")
            )
            return None
        return Dim(key, "optional")
    if kind == "choice":
        if not isinstance(val, list) or not val:
            problems.append((f"{path}.choice", f"expected a non-empty list of values, got {val!r}"))
            return None
        enc = [json.dumps(v, sort_keys=True) for v in val]
        if len(set(enc)) != len(enc):
            problems.append((f"{path}.choice", f"duplicate values in {val!r}"))
            return None
        return Dim(key, "choice", choices=tuple(val))
    if not (isinstance(val, list) and len(val) == 2 and all(_is_num(v) for v in val)):
        problems.append(
            (f"{path}.{kind}", f"expected [low, high] numbers, got {val!r}" + yaml_number_hint(val))
        )
        return None
    lo, hi = val
    ok = True
    if kind == "int" and not all(isinstance(v, int) for v in val):
        problems.append((f"{path}.int", f"bounds must be integers, got {val!r}"))
        ok = False
    if not lo < hi:
        problems.append((f"{path}.{kind}", f"low must be below high, got {val!r}"))
        ok = False
    if kind == "logfloat" and lo <= 0:
        problems.append((f"{path}.logfloat", f"bounds must be > 0 for a log scale, got {val!r}"))
        ok = False
    if not isinstance(log, bool):
        problems.append((f"{path}.log", f"expected true or false, got {log!r}"))
        ok = False
    elif log and kind != "int":
        problems.append((f"{path}.log", "log applies to int ranges; use logfloat for floats"))
        ok = False
    if step is not None:
        if not _is_num(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
            problems.append(
                (
                    f"{path}.step",
                    f"expected a positive {'integer' if kind == 'int' else 'number'}, got {step!r}",
                )
            )
            ok = False
        elif kind == "logfloat" or log:
            problems.append((f"{path}.step", "step cannot be combined with a log scale"))
            ok = False
    if not ok:
        return None
    return Dim(key, kind, low=lo, high=hi, step=step, log=bool(log))


def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    f = model.model_fields[name]
    # the FieldInfo carries the field's range and validators
    return TypeAdapter(Annotated[f.annotation, f])  # type: ignore[arg-type]


def _check_values(dim: Dim, adapter: TypeAdapter[Any], problems: list[tuple[str, str]]) -> None:
    """Check the bounds / choices of a dimension against the field's own type and range."""
    values: Sequence[Any] = dim.choices if dim.kind == "choice" else (dim.low, dim.high)
    for v in values:
        try:
            adapter.validate_python(v)
        except ValidationError as e:
            msg = e.errors()[0]["msg"]
            problems.append(
                (f"space.{dim.key}", f"value {v!r} is not valid for this key: {msg}" + yaml_number_hint(v))
            )


def check_dims(dims: Sequence[Dim], base_techniques: Iterable[str]) -> list[tuple[str, str]]:
    """Check that every dimension names a real stack key and that its values fit the key."""
    problems: list[tuple[str, str]] = []
    in_stack = set(base_techniques)
    toggled = {d.technique for d in dims if d.is_toggle}
    for d in dims:
        path, parts = f"space.{d.key}", d.parts
        if d.key in NOT_SEARCHABLE or parts[0] in NOT_SEARCHABLE:
            problems.append((path, NOT_SEARCHABLE.get(d.key) or NOT_SEARCHABLE[parts[0]]))
            continue
        if parts[0] == "techniques":
            problems.extend(_check_technique_dim(d, in_stack, toggled))
            continue
        if d.is_toggle:
            problems.append(
                (
                    path,
                    "{optional: true} is for techniques.<name>; search other keys with "
                    "int/float/logfloat/choice",
                )
            )
            continue
        model = SECTIONS.get(parts[0])
        if model is None:
            problems.append(
                (
                    path,
                    "unknown stack key"
                    + did_you_mean(parts[0], [*SECTIONS, "techniques"])
                    + "; keys look like model.num_layers, optim.matrix_lr, techniques.<name>.<param>",
                )
            )
            continue
        if len(parts) != 2 or parts[1] not in model.model_fields:
            name = parts[1] if len(parts) > 1 else ""
            problems.append(
                (
                    path,
                    f"unknown key in {parts[0]}"
                    + did_you_mean(name, model.model_fields)
                    + f"; {parts[0]} has: {', '.join(model.model_fields)}",
                )
            )
            continue
        _check_values(d, _field_adapter(model, parts[1]), problems)
    return problems


def _check_technique_dim(d: Dim, in_stack: set[str], toggled: set[str | None]) -> list[tuple[str, str]]:
    path, parts = f"space.{d.key}", d.parts
    problems: list[tuple[str, str]] = []
    if len(parts) < 2 or len(parts) > 4:
        return [
            (
                path,
                "expected techniques.<name> ({optional: true}), techniques.<name>.<param> or, for a "
                "parameter set by kind, techniques.<name>.<param>.<kind>",
            )
        ]
    name = parts[1]
    if name not in REGISTRY:
        try:
            REGISTRY.get(name)
        except PgolfError as e:
            return [(path, str(e))]
    cls = REGISTRY.get(name)
    if len(parts) == 2:
        if not d.is_toggle:
            problems.append(
                (
                    path,
                    f"techniques.{name} takes {{optional: true}}; search its parameters as "
                    f"techniques.{name}.<param>",
                )
            )
        return problems
    if d.is_toggle:
        return [(path, "{optional: true} switches a whole technique: use the key techniques." + name)]
    param = parts[2]
    if param not in cls.Params.model_fields:
        fields = ", ".join(cls.Params.model_fields) or "no parameters"
        return [
            (
                path,
                f"technique {name!r} has no parameter {param!r}"
                + did_you_mean(param, cls.Params.model_fields)
                + f"; it has: {fields}",
            )
        ]
    if name not in in_stack and name not in toggled:
        problems.append(
            (
                path,
                f"technique {name!r} is not in the stack; add it there or search "
                f"techniques.{name}: {{optional: true}}",
            )
        )
    if len(parts) == 4:
        _check_entry_values(d, _field_adapter(cls.Params, param), f"techniques.{name}.{param}", problems)
    else:
        _check_values(d, _field_adapter(cls.Params, param), problems)
    return problems


def _check_entry_values(
    dim: Dim, adapter: TypeAdapter[Any], param: str, problems: list[tuple[str, str]]
) -> None:
    """A key ``techniques.<name>.<param>.<entry>`` sets one entry of a parameter given by kind
    (``gptq``'s ``sdclip_k: {default: 12.85, embed: 20}``): each bound or choice must be valid as
    that entry, and the parameter must take entries at all."""
    entry = dim.parts[3]
    values: Sequence[Any] = dim.choices if dim.kind == "choice" else (dim.low, dim.high)
    for v in values:
        try:
            adapter.validate_python({"default": v, entry: v})
        except ValidationError as e:
            errs = e.errors()
            own = [x for x in errs if x["type"] == "value_error"]  # the parameter's check: a kind
            at_entry = [x for x in errs if entry in x["loc"]]
            if own:
                msg = str(own[0]["msg"]).removeprefix("Value error, ")
            elif at_entry:
                msg = f"value {v!r} is not valid for this entry: {at_entry[0]['msg']}" + yaml_number_hint(v)
            else:
                msg = f"{param} takes one value, not entries by kind; search it as {param}"
            problems.append((f"space.{dim.key}", msg))
            return


def check_start_with(
    points: Sequence[Mapping[str, Any]], dims: Sequence[Dim], failed: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Check start points against the space; keys of space entries that failed to parse
    (``failed``) have their own error and are not reported again."""
    by_key = {d.key: d for d in dims}
    skip = set(failed)
    problems: list[tuple[str, str]] = []
    for i, point in enumerate(points):
        path = f"search.start_with[{i}]"
        for k, v in point.items():
            d = by_key.get(k)
            if k in skip:
                continue
            if d is None:
                problems.append((f"{path}.{k}", "not a space key" + did_you_mean(k, by_key)))
            elif not d.contains(v):
                problems.append((f"{path}.{k}", f"{v!r} is outside the space ({d.describe()})"))
        for k in point:
            d = by_key.get(k)
            if d is None or d.is_toggle or d.technique is None:
                continue
            toggle = by_key.get(f"techniques.{d.technique}")
            if toggle is not None and point.get(toggle.key) is False:
                problems.append((f"{path}.{k}", f"sets a parameter of {d.technique!r} while turning it off"))
    return problems


def check_points_only(
    points: Sequence[Mapping[str, Any]], dims: Sequence[Dim], failed: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """``search.points_only``: there must be points, and each must set every space key (a key
    it left out would be sampled)."""
    if not points:
        return [("search.points_only", "needs the points to train in search.start_with")]
    skip = set(failed)
    problems: list[tuple[str, str]] = []
    for i, point in enumerate(points):
        on = {d.technique: point.get(d.key) for d in dims if d.is_toggle}
        missing = [
            d.key
            for d in dims
            if d.key not in point
            and d.key not in skip
            and not (not d.is_toggle and d.technique is not None and on.get(d.technique) is False)
        ]
        if missing:
            problems.append(
                (
                    f"search.start_with[{i}]",
                    f"with search.points_only every space key needs a value (it is never sampled); "
                    f"missing: {', '.join(missing)}",
                )
            )
    return problems


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedSearch:
    """A validated search: the spec, its dimensions and the composed base stack."""

    spec: SearchSpec
    dims: list[Dim]
    base_data: dict[str, Any]  # the composed base stack mapping (no base:, absolute paths)
    base: ResolvedStack
    source: str
    name: str
    extra: dict[str, Any] = field(default_factory=dict)
    eval_runs: list[Path] = field(default_factory=list)  # eval-only: the runs whose artifacts are re-scored

    @property
    def eval_only(self) -> bool:
        return bool(self.eval_runs)

    def resolved_yaml(self, study_name: str | None = None, storage: str | None = None) -> str:
        """The search as a self-contained YAML (the stack inline): the study's ``search.yaml``
        (``storage``: the URL to write, e.g. with its password masked)."""
        d = self.spec.model_dump(mode="json")
        d["name"] = self.name
        if study_name is not None and d.get("study_name") is None:
            d["study_name"] = study_name
        if storage is not None:
            d["storage"] = storage
        if self.eval_runs:
            d["eval_only"] = {
                "run": str(self.eval_runs[0].parent if len(self.eval_runs) > 1 else self.eval_runs[0])
            }
            d.pop("stack", None)
            return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=100)
        d.pop("eval_only", None)
        d["stack"] = self.base_data
        return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=100)


def base_stack_data(rs: ResolvedStack) -> dict[str, Any]:
    """The base stack as a self-contained mapping: every value explicit, paths absolute (so it
    reloads from anywhere: a Ray worker, a resumed study), slot defaults left implicit (so that
    searching ``techniques.brotli: {optional: true}`` does not collide with an implicit zlib)."""
    out = rs.to_dict()
    out["techniques"] = {r.name: r.params.model_dump(mode="json") for r in rs.techniques if not r.implicit}
    cache = rs.stack.data.cache_dir
    if cache is not None:
        out["data"]["cache_dir"] = str(Path(cache).expanduser().resolve())
    return out


def load_search(path: str | Path, overrides: Iterable[str] = ()) -> LoadedSearch:
    """Read and validate a search file (``--set`` overrides apply to the search keys)."""
    p = Path(path)
    raw = read_yaml(p)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(raw, parts, value)
    return search_from_dict(raw, source=str(p), base_dir=p.parent, default_name=p.stem)


def search_from_dict(
    raw: Mapping[str, Any],
    *,
    source: str = "<search>",
    base_dir: Path | None = None,
    default_name: str = "search",
) -> LoadedSearch:
    base_dir = base_dir or Path.cwd()
    problems: list[tuple[str, str]] = []
    data = dict(raw)
    raw_space = data.get("space")
    if raw_space is not None and not isinstance(raw_space, Mapping):
        problems.append(("space", f"expected a mapping of stack key -> range, got {raw_space!r}"))
        data["space"] = {}
    spec: SearchSpec | None = None
    try:
        spec = SearchSpec.model_validate(data)
    except ValidationError as e:
        for p, m in pydantic_problems(e, ""):
            if p.startswith("space."):
                continue
            m += yaml_number_hint(_lookup(data, p))
            if m == "unknown key":
                section, _, key = p.rpartition(".")
                ann = (
                    SearchSpec.model_fields[section].annotation
                    if section in SearchSpec.model_fields
                    else None
                )
                fields = ann.model_fields if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if not section:
                    fields = SearchSpec.model_fields
                if fields is not None:
                    m += did_you_mean(key, fields) + f"; allowed: {', '.join(fields)}"
            problems.append((p, m))
    dims: list[Dim] = []
    for key, val in (data.get("space") or {}).items():
        d = parse_dim(str(key), val, problems)
        if d is not None:
            dims.append(d)
    stack_val = data.get("stack")
    base: ResolvedStack | None = None
    runs: list[Path] = []
    eval_raw = data.get("eval_only")
    if eval_raw is not None and stack_val is not None:
        problems.append(
            ("stack", "give either stack or eval_only.run (whose stack.yaml is the stack), not both")
        )
    elif isinstance(eval_raw, Mapping) and isinstance(eval_raw.get("run"), str):
        try:
            runs = find_eval_runs(eval_raw["run"], base_dir)
            base = load_stack(runs[0] / "stack.yaml")
        except ConfigError as e:
            problems.extend((f"eval_only.run.{p}" if p else "eval_only.run", m) for p, m in e.problems)
        except PgolfError as e:
            problems.append(("eval_only.run", str(e)))
    elif stack_val is None and eval_raw is None:
        problems.append(("stack", "required: a stack file or an inline stack mapping"))
    elif stack_val is not None:
        try:
            base = _load_base(stack_val, base_dir)
        except ConfigError as e:
            problems.extend((f"stack.{p}" if p else "stack", m) for p, m in e.problems)
        except PgolfError as e:
            problems.append(("stack", str(e)))
    if base is not None:
        problems.extend(check_dims(dims, base.technique_names()))
        problems.extend(_check_overlaps(spec, dims))
        if eval_raw is not None:
            problems.extend(check_eval_dims(dims))
    if spec is not None:
        failed = {str(k) for k in (data.get("space") or {})} - {d.key for d in dims}
        problems.extend(check_start_with(spec.search.start_with, dims, failed))
        if spec.search.points_only:
            problems.extend(check_points_only(spec.search.start_with, dims, failed))
        for i, folder in enumerate(spec.search.warm_start):
            wp = Path(folder).expanduser()
            wp = wp if wp.is_absolute() else base_dir / wp
            if not (wp / "trials.jsonl").is_file():
                problems.append(
                    (f"search.warm_start[{i}]", f"{folder!r} is not a study folder (no trials.jsonl)")
                )
    if problems or spec is None or base is None:
        raise ConfigError(problems, source=source)
    name = spec.name or default_name
    loaded = LoadedSearch(spec, dims, base_stack_data(base), base, source, name)
    loaded.eval_runs = runs
    return loaded


# --------------------------------------------------------------------------------------------
# Eval-only searches
# --------------------------------------------------------------------------------------------

ARTIFACT_FILE = "model.ptz"  # a run folder's artifact when its result.json names none


def _hook_plan(hook_name: str) -> str | None:
    """The plan (model, optimizer, schedule, data, train, export, eval) of a hook's site."""
    spec = HOOKS.get(hook_name)
    return SITES[spec.site].plan if spec is not None else None


def is_eval_technique(cls: type) -> bool:
    """A technique whose every hook belongs to evaluation (a scorer, a log-prob transform):
    switching it or changing its parameters leaves a trained artifact valid."""
    hooks = getattr(cls, "hooks", {}) or {}
    return bool(hooks) and all(_hook_plan(h) == "eval" for h in hooks)


def check_eval_dims(dims: Sequence[Dim]) -> list[tuple[str, str]]:
    """An eval-only search may only change what leaves the artifact valid."""
    problems = []
    for d in dims:
        if d.parts[0] == "eval":
            continue
        if (
            d.technique is not None
            and d.technique in REGISTRY
            and is_eval_technique(REGISTRY.get(d.technique))
        ):
            continue
        problems.append(
            (
                f"space.{d.key}",
                "an eval-only search re-scores a saved artifact, so it may search only eval.* keys "
                "and evaluation techniques (whose every hook runs at evaluation); this key changes "
                "the trained model",
            )
        )
    return problems


def _artifact(run: Path) -> Path:
    try:
        name = json.loads((run / "result.json").read_text()).get("artifact_file") or ARTIFACT_FILE
    except (OSError, ValueError):
        name = ARTIFACT_FILE
    return run / str(name)


def find_eval_runs(where: str, base_dir: Path) -> list[Path]:
    """The run folders an eval-only search re-scores: a run folder, a study trial folder (one
    run per seed) or a study folder (its best trial's runs)."""
    p = Path(where).expanduser()
    p = p if p.is_absolute() else (base_dir / p if (base_dir / p).exists() else Path.cwd() / p)
    if (p / "stack.yaml").is_file():
        runs = [p]
    elif sorted(p.glob("seed_*/stack.yaml")):
        runs = [f.parent for f in sorted(p.glob("seed_*/stack.yaml"))]
    elif (p / "trials.jsonl").is_file():
        from .results import load_study

        best = load_study(p).best()
        if best is None or not best.run_dir:
            raise PgolfError(f"study {str(p)!r} has no complete trial within its limit to re-score")
        return find_eval_runs(str(best.run_path(p)), base_dir)
    else:
        raise PgolfError(
            f"{where!r} is neither a run folder (stack.yaml + artifact), a trial folder (seed_*/) "
            "nor a study folder"
        )
    missing = [str(_artifact(r)) for r in runs if not _artifact(r).is_file()]
    if missing:
        raise PgolfError(f"no artifact in {missing[0]!r}: the run did not finish its export")
    return [r.resolve() for r in runs]


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """The raw value at a dotted key path (None when absent)."""
    node: Any = data
    for part in dotted.split("."):
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _check_overlaps(spec: SearchSpec | None, dims: Sequence[Dim]) -> list[tuple[str, str]]:
    if spec is None:
        return []
    keys = {d.key for d in dims}
    if spec.trial.max_wallclock_seconds is not None and "train.max_wallclock_seconds" in keys:
        return [
            (
                "space.train.max_wallclock_seconds",
                "also fixed by trial.max_wallclock_seconds; remove one of them",
            )
        ]
    return []


def _load_base(stack_val: Any, base_dir: Path) -> ResolvedStack:
    if isinstance(stack_val, str):
        p = Path(stack_val).expanduser()
        cand = [p] if p.is_absolute() else [base_dir / p, Path.cwd() / p]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise PgolfError(
                f"stack file {stack_val!r} not found (looked next to the search file and in the "
                f"current directory)"
            )
        return load_stack(found)
    if isinstance(stack_val, Mapping):
        return stack_from_dict(stack_val, source="stack", base_dir=base_dir)
    raise PgolfError(f"stack: expected a file name or a mapping, got {stack_val!r}")
