"""``pgolf ablate``: what each technique of a stack is worth, in nats, with its significance.

An ablation is a study of fixed points run by the search harness (``search.points_only``: the
ledger, the size gate, one trial per GPU, resume after a kill), planned here:

* ``full``: the stack as it is (the reference of the leave-one-out variants);
* ``-X`` for each technique X: the stack without X (and without the techniques that require X);
* with ``--add-one-in``, ``base``: the stack without any of the ablated techniques, and ``+X``:
  the base with X (and the techniques X requires).

Removing a technique that fills a slot (a quantizer, a codec) puts the slot's default back
(``int8_rowwise``, ``zlib``): ``-gptq`` measures GPTQ against the baseline's quantizer. Every
variant is sized before it trains; one that no longer fits the stack's ``export.artifact_limit``
is reported and not trained. Each runs on the same seeds and is compared with its reference by the
one-sided Welch test of ``pgolf compare`` on val_loss in nats (H1: with X lower than without),
against the challenge bar (≥ 0.005 nats lower at p < 0.01).

Differences are always *with − without* the technique: a negative Δval_bpb means the technique
helps; Δbytes is what it costs in artifact bytes, Δtokens/s what it costs in speed. The interval
is the two-sided 98 % Welch interval, which lies wholly below 0 exactly when p < 0.01.

With ``step_matched`` every variant stops, seed by seed, at the full stack's step count for that
seed (no wall-clock cap), so that a faster or slower variant is compared at equal steps and
wall-clock noise does not hide a small lever (the practice of the records after PR #1953,
../shared/reference/techniques.md §8.2).

This module plans and reports (no Ray); :mod:`pgolf.search.ablate_run` runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from pgolf.registry.api.config import ResolvedStack
from pgolf.registry.api.errors import PgolfError, did_you_mean

from .ledger import LEDGER_NAME, Ledger, run_path
from .repeat import Comparison, compare
from .spec import base_stack_data
from .stats import BAR_NATS, BAR_P, welch_interval

ABLATION_FILE = "ablation.json"
TABLE_CSV = "ablation.csv"
TABLE_JSON = "ablation_results.json"
PLOT_FILE = "ablation.png"
LEVEL = 1.0 - 2.0 * BAR_P  # the interval that matches the bar's one-sided test


@dataclass(frozen=True)
class Variant:
    """One stack of the ablation."""

    name: str  # "full", "-xsa", "base", "+xsa"
    kind: str  # full | leave_one_out | base | add_one_in
    technique: str | None  # the technique measured (None for full and base)
    toggled: tuple[str, ...]  # what differs from the reference: the technique, then what follows it
    point: dict[str, bool]  # techniques.<name>: on/off, for every ablated technique
    reference: str | None  # the variant it is compared with ("full" or "base")

    @property
    def key(self) -> str:
        return json.dumps(self.point, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "technique": self.technique,
            "toggled": list(self.toggled),
            "point": self.point,
            "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Variant:
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            technique=d.get("technique"),
            toggled=tuple(d.get("toggled") or ()),
            point={str(k): bool(v) for k, v in dict(d["point"]).items()},
            reference=d.get("reference"),
        )


@dataclass
class Plan:
    """What an ablation runs: the techniques of the stack, the ablated ones, the variants."""

    stack_source: str
    stack_name: str
    stack_techniques: list[str]  # every technique the stack names (slot defaults excluded)
    ablated: list[str]
    variants: list[Variant]
    seeds: list[int]
    step_matched: bool = False
    add_one_in: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[dict[str, bool]]:
        """The distinct points, full stack first (variants with the same stack share a trial)."""
        seen: dict[str, dict[str, bool]] = {}
        for v in self.variants:
            seen.setdefault(v.key, v.point)
        return list(seen.values())

    @property
    def full(self) -> Variant:
        return next(v for v in self.variants if v.kind == "full")

    def names_of(self, point: Mapping[str, Any]) -> list[str]:
        key = json.dumps(dict(point), sort_keys=True)
        return [v.name for v in self.variants if v.key == key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack_source,
            "stack_name": self.stack_name,
            "stack_techniques": self.stack_techniques,
            "ablated": self.ablated,
            "seeds": self.seeds,
            "step_matched": self.step_matched,
            "add_one_in": self.add_one_in,
            "variants": [v.to_dict() for v in self.variants],
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        known = {"stack", "stack_name", "stack_techniques", "ablated", "seeds", "step_matched", "add_one_in",
                 "variants"}  # fmt: skip
        return cls(
            stack_source=str(d["stack"]),
            stack_name=str(d["stack_name"]),
            stack_techniques=list(d["stack_techniques"]),
            ablated=list(d["ablated"]),
            variants=[Variant.from_dict(v) for v in d["variants"]],
            seeds=[int(s) for s in d["seeds"]],
            step_matched=bool(d.get("step_matched")),
            add_one_in=bool(d.get("add_one_in")),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def write(self, study_dir: Path) -> Path:
        from .trainable import write_json

        path = study_dir / ABLATION_FILE
        write_json(path, self.to_dict())
        return path


def read_plan(study_dir: Path) -> Plan:
    path = study_dir / ABLATION_FILE
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise PgolfError(f"{str(study_dir)!r} is not an ablation study (no {ABLATION_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PgolfError(f"{path}: malformed ablation file ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _requires(rs: ResolvedStack) -> dict[str, set[str]]:
    return {r.name: set(r.cls.requires) for r in rs.techniques}


def dependents(rs: ResolvedStack, removed: set[str]) -> set[str]:
    """``removed`` and every technique of the stack that (transitively) requires one of them."""
    req, out = _requires(rs), set(removed)
    changed = True
    while changed:
        changed = False
        for name, needs in req.items():
            if name not in out and needs & out:
                out.add(name)
                changed = True
    return out


def requirements(rs: ResolvedStack, added: set[str]) -> set[str]:
    """``added`` and every technique they (transitively) require."""
    req, out = _requires(rs), set(added)
    todo = list(added)
    while todo:
        for need in req.get(todo.pop(), set()):
            if need not in out:
                out.add(need)
                todo.append(need)
    return out


def plan(
    rs: ResolvedStack,
    *,
    seeds: Sequence[int],
    techniques: Sequence[str] | None = None,
    add_one_in: bool = False,
    step_matched: bool = False,
    source: str = "<stack>",
) -> Plan:
    """The variants of an ablation of ``rs`` over ``techniques`` (default: every technique the
    stack names; slot defaults are not techniques the stack chose)."""
    named = [r.name for r in rs.techniques if not r.implicit]
    if not named:
        raise PgolfError(f"{source}: the stack names no technique: there is nothing to ablate")
    if techniques:
        unknown = [t for t in techniques if t not in named]
        if unknown:
            raise PgolfError(
                f"--techniques: {unknown[0]!r} is not a technique of the stack"
                + did_you_mean(unknown[0], named)
                + f"; the stack has: {', '.join(named)}"
            )
        if len(set(techniques)) != len(techniques):
            raise PgolfError(f"--techniques names a technique twice: {', '.join(techniques)}")
    ablated = [t for t in named if t in set(techniques or named)]
    if len(seeds) < 2:
        raise PgolfError(
            f"an ablation needs at least 2 seeds per variant for the Welch test (got {len(seeds)}); "
            "use --seeds 2 or more (3 is the records' practice)"
        )

    def point(off: set[str]) -> dict[str, bool]:
        return {f"techniques.{n}": n not in off for n in named}

    variants = [Variant("full", "full", None, (), point(set()), None)]
    for t in ablated:
        gone = dependents(rs, {t})
        rest = tuple(sorted(gone - {t}, key=named.index))
        variants.append(Variant(f"-{t}", "leave_one_out", t, (t, *rest), point(gone), "full"))
    if add_one_in:
        base_off = dependents(rs, set(ablated))
        variants.append(Variant("base", "base", None, (), point(base_off), None))
        for t in ablated:
            on = requirements(rs, {t})
            rest = tuple(sorted((on - {t}) & base_off, key=named.index))
            variants.append(Variant(f"+{t}", "add_one_in", t, (t, *rest), point(base_off - on), "base"))
    return Plan(
        stack_source=source,
        stack_name=rs.stack.name or Path(source).stem,
        stack_techniques=named,
        ablated=ablated,
        variants=variants,
        seeds=list(seeds),
        step_matched=step_matched,
        add_one_in=add_one_in,
    )


def search_dict(
    rs: ResolvedStack,
    p: Plan,
    *,
    gpus: float,
    cpus: float,
    max_concurrent: int | None = None,
    timeout_seconds: float | None = None,
    size_workers: int = 2,
) -> dict[str, Any]:
    """The ablation as a search (a mapping for :func:`pgolf.search.spec.search_from_dict`): the
    stack inline, one on/off dimension per technique the stack names, the variants' points as
    ``start_with`` with ``points_only``, FIFO (no early stopping), every seed in every trial."""
    points = p.points()
    cap = rs.stack.train.max_wallclock_seconds
    if timeout_seconds is None and p.step_matched and cap:
        # a step-matched variant runs the full stack's steps without the cap: leave it room
        timeout_seconds = len(p.seeds) * (2.5 * cap + 900.0)
    return {
        "name": f"ablate-{p.stack_name}",
        "stack": base_stack_data(rs),
        "space": {f"techniques.{n}": {"optional": True} for n in p.stack_techniques},
        "objective": {"metric": "val_bpb", "mode": "min"},
        "constraint": {"artifact_bytes": rs.stack.export.artifact_limit, "margin": 0},
        "trial": {"gpus": gpus, "cpus": cpus, "timeout_seconds": timeout_seconds},
        "search": {
            "num_samples": len(points),
            "max_concurrent": max_concurrent,
            "scheduler": "fifo",
            "sampler": "random",
            "seeds": list(p.seeds),
            "start_with": points,
            "points_only": True,
            "size_workers": size_workers,
        },
    }


# --------------------------------------------------------------------------------------------
# Reporting (reads the study folder only: no Ray, no Optuna)
# --------------------------------------------------------------------------------------------

DONE_OK = "complete"
NOT_TRAINED = ("infeasible", "invalid")


@dataclass
class Row:
    """One variant's outcome, and its comparison with its reference."""

    variant: Variant
    state: str  # ledger state of the variant's trial; "pending" when it has not run
    record: dict[str, Any] = field(default_factory=dict)
    comparison: Comparison | None = None
    interval_bpb: tuple[float, float] | None = None
    note: str = ""

    def get(self, key: str) -> Any:
        v = self.record.get(key)
        return v if not (isinstance(v, float) and not math.isfinite(v)) else None

    @property
    def bytes(self) -> int | None:
        b = self.get("artifact_bytes")
        return int(b) if b is not None else None

    @property
    def estimated_bytes(self) -> int | None:
        b = self.get("estimated_bytes")
        return int(b) if b is not None else None

    @property
    def d_bpb(self) -> float | None:
        c = self.comparison
        return c.welch.diff * c.bpb_per_nat if c else None

    @property
    def d_nats(self) -> float | None:
        return self.comparison.welch.diff if self.comparison else None

    @property
    def p(self) -> float | None:
        return self.comparison.welch.p if self.comparison else None

    @property
    def bar_met(self) -> bool | None:
        return self.comparison.bar_met if self.comparison else None


@dataclass
class Report:
    dir: Path
    plan: Plan
    rows: list[Row]
    deltas: dict[str, dict[str, float | None]]  # variant name -> d_bytes, d_tokens_per_second

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.variant.name == name)

    @property
    def bpb_per_nat(self) -> float | None:
        ks = [r.comparison.bpb_per_nat for r in self.rows if r.comparison is not None]
        return statistics.fmean(ks) if ks else None


def _pick(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The record that stands for a point: a complete trial if there is one, else the latest."""
    if not records:
        return None
    done = [r for r in records if r.get("state") == DONE_OK]
    return (done or sorted(records, key=lambda r: int(r["number"])))[-1]


def report(study_dir: Path) -> Report:
    """The ablation table of a study folder (as far as it has run)."""
    p = read_plan(study_dir)
    records = Ledger(study_dir / LEDGER_NAME).records()
    by_point: dict[str, list[dict[str, Any]]] = {}
    for rec in records.values():
        if isinstance(rec.get("point"), dict) and rec.get("state"):
            by_point.setdefault(json.dumps(rec["point"], sort_keys=True), []).append(rec)
    rows: dict[str, Row] = {}
    for v in p.variants:
        picked = _pick(by_point.get(v.key, []))
        state = str(picked.get("state")) if picked else "pending"
        if state in ("interrupted", "unused"):
            state = "pending"
        row = Row(v, state, dict(picked or {}))
        if state in NOT_TRAINED:
            est = row.estimated_bytes
            row.note = (
                f"not trained: does not fit ({est:,} > {_limit(study_dir):,} bytes)"
                if state == "infeasible" and est is not None
                else f"not trained: {_first_line(str(row.record.get('error', '')))}"
            )
        elif state not in (DONE_OK, "pending", "running"):
            row.note = f"{state}: {_first_line(str(row.record.get('error', '')))}"
        rows[v.name] = row
    deltas: dict[str, dict[str, float | None]] = {}
    for row in rows.values():
        v = row.variant
        if v.reference is None:
            continue
        ref = rows[v.reference]
        with_, without = (ref, row) if v.kind == "leave_one_out" else (row, ref)
        deltas[v.name] = {
            "d_bytes": _diff(with_.bytes, without.bytes),
            "d_estimated_bytes": _diff(with_.estimated_bytes, without.estimated_bytes),
            "d_tokens_per_second": _diff(with_.get("tokens_per_second"), without.get("tokens_per_second")),
        }
        if row.state != DONE_OK:
            continue
        if ref.state != DONE_OK:
            row.note = f"no comparison: {ref.variant.name} is {ref.state}"
            continue
        try:
            c = compare(
                [run_path(with_.record["run_dir"], study_dir)],
                [run_path(without.record["run_dir"], study_dir)],
            )
        except PgolfError as e:
            row.note = f"no comparison: {e}"
            continue
        row.comparison = c
        lo, hi = welch_interval(c.welch, LEVEL)
        row.interval_bpb = (lo * c.bpb_per_nat, hi * c.bpb_per_nat)
    return Report(study_dir, p, [rows[v.name] for v in p.variants], deltas)


def _limit(study_dir: Path) -> int:
    from pgolf.registry.api.config import read_yaml

    try:
        limit: Any = (read_yaml(study_dir / "search.yaml").get("constraint") or {}).get("artifact_bytes")
        return int(limit)
    except (PgolfError, TypeError, ValueError):
        return 16_000_000


def _first_line(text: str, width: int = 100) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def _diff(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def _num(x: float | int | None, fmt: str, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return format(x, ("+" if sign else "") + fmt)


def _bpb_text(row: Row) -> str:
    bpb = row.get("val_bpb")
    if bpb is None:
        return ""
    std = row.get("val_bpb_std")
    return f"{bpb:.4f}" + (f" ±{std:.4f}" if std is not None else "")


def _bar_text(row: Row) -> str:
    if row.comparison is None:
        return ""
    return "MET" if row.comparison.bar_met else "no"


def title(rep: Report) -> str:
    p = rep.plan
    kinds = "leave-one-out" + (" and add-one-in" if p.add_one_in else "")
    return (
        f"ablation of {p.stack_name} ({p.stack_source}): {len(p.ablated)} techniques, {kinds}, "
        f"seeds {', '.join(map(str, p.seeds))}"
        + (", step-matched to the full stack" if p.step_matched else "")
    )


def table(rep: Report) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold", title_justify="left", title=title(rep))
    cols = [
        ("variant", "left"), ("state", "left"), ("val_bpb", "right"), ("bytes", "right"), ("tok/s", "right"),
        ("Δval_bpb", "right"), (f"{LEVEL:.0%} CI (bpb)", "right"), ("Δnats", "right"), ("Δbytes", "right"),
        ("Δtok/s", "right"), ("p", "right"), ("bar", "left"), ("note", "left"),
    ]  # fmt: skip
    for name, just in cols:
        t.add_column(name, justify=just, overflow="fold")  # type: ignore[arg-type]
    for row in rep.rows:
        v, d = row.variant, rep.deltas.get(row.variant.name, {})
        size = _num(row.bytes, ",d") or (_num(row.estimated_bytes, ",d") + "~" if row.estimated_bytes else "")
        d_bytes = _num(d.get("d_bytes"), ",.0f", sign=True) or (
            _num(d.get("d_estimated_bytes"), ",.0f", sign=True) + "~"
            if d.get("d_estimated_bytes") is not None
            else ""
        )
        ci = f"[{row.interval_bpb[0]:+.4f}, {row.interval_bpb[1]:+.4f}]" if row.interval_bpb else ""
        label = v.name + (f" (with {', '.join(v.toggled[1:])})" if len(v.toggled) > 1 else "")
        style = "bold" if v.reference is None else ("" if row.state == DONE_OK else "dim")
        t.add_row(
            label, row.state, _bpb_text(row), size, _num(row.get("tokens_per_second"), ",.0f"),
            _num(row.d_bpb, ".4f", sign=True), ci, _num(row.d_nats, ".4f", sign=True), d_bytes,
            _num(d.get("d_tokens_per_second"), ",.0f", sign=True), _num(row.p, ".3g"), _bar_text(row),
            Text(row.note), style=style,
        )  # fmt: skip
    return t


def footer(rep: Report) -> list[str]:
    k = rep.bpb_per_nat
    bar_bpb = f" ≈ {BAR_NATS * k:.5f} bpb" if k else ""
    lines = [
        "Δ = with the technique − without it: a negative Δval_bpb means the technique helps; Δbytes is "
        "its cost in artifact bytes (~: estimates of variants not trained), Δtok/s its cost in speed",
        f"p: one-sided Welch test on val_loss in nats (H1: with < without), as pgolf compare; bar: "
        f"≥ {BAR_NATS} nats{bar_bpb} lower at p < {BAR_P}; CI: two-sided {LEVEL:.0%} Welch interval "
        "(wholly below 0 exactly when p < 0.01)",
    ]
    if rep.plan.step_matched:
        lines.append("step-matched: every variant ran each seed for the full stack's step count on that seed")
    counts: dict[str, int] = {}
    for r in rep.rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append("variants: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return lines


def table_rows(rep: Report) -> list[dict[str, Any]]:
    """The table as plain data (CSV and JSON)."""
    out = []
    for row in rep.rows:
        v, d = row.variant, rep.deltas.get(row.variant.name, {})
        c = row.comparison
        out.append(
            {
                "variant": v.name,
                "kind": v.kind,
                "technique": v.technique,
                "toggled": " ".join(v.toggled),
                "reference": v.reference,
                "state": row.state,
                "val_bpb": row.get("val_bpb"),
                "val_bpb_std": row.get("val_bpb_std"),
                "val_loss": row.get("val_loss"),
                "val_loss_std": row.get("val_loss_std"),
                "artifact_bytes": row.bytes,
                "estimated_bytes": row.estimated_bytes,
                "tokens_per_second": row.get("tokens_per_second"),
                "steps": row.get("steps"),
                "d_val_bpb": row.d_bpb,
                "d_val_loss": row.d_nats,
                "ci_low_bpb": row.interval_bpb[0] if row.interval_bpb else None,
                "ci_high_bpb": row.interval_bpb[1] if row.interval_bpb else None,
                "d_bytes": d.get("d_bytes"),
                "d_estimated_bytes": d.get("d_estimated_bytes"),
                "d_tokens_per_second": d.get("d_tokens_per_second"),
                "t": c.welch.t if c and math.isfinite(c.welch.t) else None,
                "df": c.welch.df if c else None,
                "p": row.p,
                "bar_met": row.bar_met,
                "n_seeds": len(c.a) if c else None,
                "note": row.note,
                "run_dir": row.record.get("run_dir", ""),
            }
        )
    return out


def write_csv(rep: Report, path: Path) -> Path:
    rows = table_rows(rep)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    from pgolf.registry.run.export import atomic_write

    atomic_write(path, buf.getvalue().encode())
    return path


def write_json(rep: Report, path: Path) -> Path:
    from .trainable import write_json as write

    write(path, {"title": title(rep), "bar_nats": BAR_NATS, "bar_p": BAR_P, "ci_level": LEVEL,
                 "bpb_per_nat": rep.bpb_per_nat, "rows": table_rows(rep)})  # fmt: skip
    return path


def plot(rep: Report, path: Path) -> Path:
    """Each technique's Δval_bpb (with − without) with its 98 % interval, one panel per kind of
    variant; the challenge bar as a dashed line; variants without a comparison named in grey."""
    from matplotlib.figure import Figure

    from pgolf.registry.run.export import atomic_write

    panels = [("leave_one_out", "leave-one-out: full stack − stack without the technique")]
    if rep.plan.add_one_in:
        panels.append(("add_one_in", "add-one-in: base + technique − base"))
    groups = [[r for r in rep.rows if r.variant.kind == kind] for kind, _ in panels]
    height = 1.2 + 0.38 * sum(max(len(g), 1) for g in groups) + 0.6 * len(groups)
    fig = Figure(figsize=(9, max(height, 3.0)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    k = rep.bpb_per_nat
    for ax, (_, heading), rows in zip(axes, panels, groups, strict=True):
        ys = list(range(len(rows)))[::-1]
        labels = []
        for y, row in zip(ys, rows, strict=True):
            v = row.variant
            labels.append(
                str(v.technique) + (f" (+{', '.join(v.toggled[1:])})" if len(v.toggled) > 1 else "")
            )
            if row.comparison is None or row.interval_bpb is None or row.d_bpb is None:
                why = row.note or row.state
                ax.annotate(why, (0, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                            color="grey")  # fmt: skip
                ax.plot([0], [y], "x", color="grey", ms=6)
                continue
            lo, hi = row.interval_bpb
            color = "tab:green" if row.bar_met else ("tab:orange" if (row.p or 1) < BAR_P else "tab:grey")
            ax.errorbar([row.d_bpb], [y], xerr=[[row.d_bpb - lo], [hi - row.d_bpb]], fmt="o", color=color,
                        capsize=3, ms=5)  # fmt: skip
            ax.annotate(f"{row.d_bpb:+.4f}  p={row.p:.2g}", (row.d_bpb, y), xytext=(0, 6),
                        textcoords="offset points", ha="center", fontsize=7, color=color)  # fmt: skip
        ax.axvline(0.0, color="black", lw=0.8)
        if k:
            ax.axvline(-BAR_NATS * k, color="tab:green", lw=0.8, ls="--", label=f"bar: −{BAR_NATS} nats")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_ylim(-0.8, max(len(rows), 1) - 0.2)
        ax.set_title(heading, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(
        f"Δval_bpb (negative: the technique helps); bars: {LEVEL:.0%} Welch interval; green: the challenge "
        "bar is met, orange: p < 0.01 below the bar",
        fontsize=8,
    )
    fig.suptitle(title(rep), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    return path


@dataclass
class Written:
    csv: Path
    json: Path
    png: Path


def write_all(rep: Report) -> Written:
    return Written(
        write_csv(rep, rep.dir / TABLE_CSV),
        write_json(rep, rep.dir / TABLE_JSON),
        plot(rep, rep.dir / PLOT_FILE),
    )
