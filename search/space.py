"""The search space, define-by-run: sample a point with an Optuna trial and apply it to a stack.

A technique toggled by ``techniques.<name>: {optional: true}`` is decided first; the
parameters under ``techniques.<name>.`` are sampled only when it is on, so Optuna sees a
conditional space (and TPE with ``group=True`` models each branch on its own).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pgolf.registry.api.config import apply_override
from pgolf.registry.api.technique import REGISTRY

from .spec import Dim


class TrialLike(Protocol):
    """The part of ``optuna.Trial`` that sampling uses."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def _ordered(dims: Sequence[Dim]) -> list[Dim]:
    """Toggles first (in file order), then everything else (in file order)."""
    return [d for d in dims if d.is_toggle] + [d for d in dims if not d.is_toggle]


def encode_choice(dim: Dim, value: Any) -> Any:
    """The value Optuna stores for a choice (non-scalar choices travel as JSON text)."""
    return value if dim.scalar_choices else json.dumps(value, sort_keys=True)


def suggest(dim: Dim, trial: TrialLike) -> Any:
    if dim.kind == "optional":
        return bool(trial.suggest_categorical(dim.key, [False, True]))
    if dim.kind == "choice":
        if dim.scalar_choices:
            return trial.suggest_categorical(dim.key, list(dim.choices))
        return json.loads(trial.suggest_categorical(dim.key, [encode_choice(dim, c) for c in dim.choices]))
    assert dim.low is not None and dim.high is not None
    if dim.kind == "int":
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    if dim.kind == "logfloat":
        return trial.suggest_float(dim.key, float(dim.low), float(dim.high), log=True)
    return trial.suggest_float(dim.key, float(dim.low), float(dim.high), step=dim.step)


def sample(dims: Sequence[Dim], trial: TrialLike) -> dict[str, Any]:
    """One point of the space: {stack key: value}. A technique's parameters appear only when
    the technique is on (or is in the base stack and not toggled)."""
    point: dict[str, Any] = {}
    on: dict[str, bool] = {}
    for d in _ordered(dims):
        tech = d.technique
        if not d.is_toggle and tech is not None and tech in on and not on[tech]:
            continue
        value = suggest(d, trial)
        point[d.key] = value
        if d.is_toggle and tech is not None:
            on[tech] = value
    return point


def encode_point(dims: Sequence[Dim], point: Mapping[str, Any]) -> dict[str, Any]:
    """A (partial) point as Optuna parameters, e.g. for ``study.enqueue_trial``."""
    by_key = {d.key: d for d in dims}
    return {k: encode_choice(by_key[k], v) if by_key[k].kind == "choice" else v for k, v in point.items()}


def distributions(dims: Sequence[Dim]) -> dict[str, Any]:
    """The Optuna distribution of each dimension, as :func:`suggest` samples it (for trials
    added from elsewhere, e.g. a warm start)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for d in dims:
        if d.kind == "optional":
            out[d.key] = CategoricalDistribution([False, True])
        elif d.kind == "choice":
            out[d.key] = CategoricalDistribution([encode_choice(d, c) for c in d.choices])
        elif d.kind == "int":
            assert d.low is not None and d.high is not None
            out[d.key] = IntDistribution(int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            assert d.low is not None and d.high is not None
            log = d.kind == "logfloat"
            out[d.key] = FloatDistribution(float(d.low), float(d.high), step=None if log else d.step, log=log)
    return out


def apply(base: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, Any]:
    """The stack mapping ``base`` with the point's values set (toggles add or remove techniques)."""
    data = copy.deepcopy(dict(base))
    techs: dict[str, Any] = dict(data.get("techniques") or {})
    for key, value in point.items():
        parts = key.split(".")
        if parts[0] == "techniques" and len(parts) == 2:
            if value:
                techs.setdefault(parts[1], {})
            else:
                techs.pop(parts[1], None)
    # a parameter before its entries by kind (techniques.gptq.sdclip_k before ….sdclip_k.embed)
    for key, value in sorted(point.items(), key=lambda kv: kv[0].count(".")):
        parts = key.split(".")
        if parts[0] == "techniques":
            if len(parts) >= 3:
                entry = techs.get(parts[1])
                entry = dict(entry) if isinstance(entry, Mapping) else {}
                if len(parts) == 3:
                    entry[parts[2]] = value
                else:
                    entry[parts[2]] = _with_entry(parts[1], parts[2], entry.get(parts[2]), parts[3], value)
                techs[parts[1]] = entry
            continue
        apply_override(data, parts, value)
    data["techniques"] = techs
    return data


def _with_entry(technique: str, param: str, current: Any, entry: str, value: Any) -> dict[str, Any]:
    """A parameter given by kind with one entry set: ``{default: 12.85, embed: 20}`` from the
    stack's mapping, or from its single value (which is the default entry), or from the
    technique's own default when the stack leaves the parameter out."""
    if current is None:
        current = REGISTRY.get(technique).Params.model_fields[param].default
    mapping = dict(current) if isinstance(current, Mapping) else {"default": current}
    mapping[entry] = value
    return mapping


def describe_point(point: Mapping[str, Any]) -> str:
    """Short text of a point, e.g. ``num_layers=3 matrix_lr=0.042 +bigram_hash(buckets=1024) -ema``."""
    toggles = {
        k.split(".")[1]: v for k, v in point.items() if k.startswith("techniques.") and k.count(".") == 1
    }
    tparams: dict[str, list[str]] = {}
    out: list[str] = []
    for k, v in point.items():
        parts = k.split(".")
        if parts[0] == "techniques":
            if len(parts) >= 3:
                tparams.setdefault(parts[1], []).append(f"{'.'.join(parts[2:])}={fmt_value(v)}")
            continue
        out.append(f"{parts[-1]}={fmt_value(v)}")
    names = list(dict.fromkeys([*toggles, *tparams]))
    for name in names:
        if toggles.get(name) is False:
            out.append(f"-{name}")
            continue
        sign = "+" if toggles.get(name) else ""
        inner = ",".join(tparams.get(name, []))
        out.append(f"{sign}{name}({inner})" if inner else f"{sign}{name}")
    return " ".join(out)


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)
