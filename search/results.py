"""``pgolf results DIR``: the ranked table, ``results.csv``, ``pareto.png`` and ``best_stack.yaml``.

Reads only the study folder (``trials.jsonl``, ``search.yaml``, ``base_stack.yaml``): no Ray,
no Optuna. Trained trials are ranked by the objective (mean over seeds); rejected samples are
listed after them with their estimated size.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table
from rich.text import Text

from pgolf.registry.api.config import read_yaml
from pgolf.registry.api.errors import PgolfError

from .ledger import LEDGER_NAME, Ledger, run_path
from .space import fmt_value

# keys the harness sets on every trial, not differences the search chose
HARNESS_KEYS = {"name", "seed", "train.threads", "export.artifact_limit", "plugins"}

CSV_COLUMNS = [
    "rank", "trial", "state", "val_bpb", "val_loss", "val_bpb_std", "artifact_bytes", "estimated_bytes",
    "estimate_error_bytes", "fits", "legal", "legal_reasons", "params", "tokens_per_second", "steps", "train_seconds",
    "seeds", "changes", "point", "error", "run_dir",
]  # fmt: skip


@dataclass
class TrialRow:
    number: int
    state: str
    rank: int | None = None
    val_bpb: float | None = None
    val_loss: float | None = None
    val_bpb_std: float | None = None
    objective: float | None = None
    artifact_bytes: int | None = None
    estimated_bytes: int | None = None
    estimate_error_bytes: int | None = None
    fits: bool | None = None
    legal: bool | None = None
    legal_reasons: list[str] = field(default_factory=list)  # the failed probes' messages
    params: int | None = None
    tokens_per_second: float | None = None
    steps: float | None = None
    train_seconds: float | None = None
    seeds: list[int] = field(default_factory=list)
    changes: str = ""
    point: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    run_dir: str = ""
    stack: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"t{self.number:04d}"

    @property
    def size(self) -> int | None:
        return self.artifact_bytes if self.artifact_bytes is not None else self.estimated_bytes

    def run_path(self, study_dir: Path) -> Path:
        return run_path(self.run_dir, study_dir)


@dataclass
class Study:
    dir: Path
    name: str
    limit: int
    metric: str
    seeds: list[int]
    num_samples: int
    base: dict[str, Any]
    rows: list[TrialRow]

    def best(self) -> TrialRow | None:
        ok = [
            r
            for r in self.rows
            if r.state == "complete" and r.fits and r.legal is not False and _finite(r.objective)
        ]
        return min(ok, key=lambda r: r.objective or math.inf) if ok else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k != "techniques" and prefix != "techniques.":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def stack_changes(base: Mapping[str, Any], stack: Mapping[str, Any]) -> str:
    """What a trial's resolved stack changes in the base stack: ``+tech(p=v)``, ``-tech``,
    ``tech.p=v`` and ``section.key=v`` (keys the harness sets on every trial are left out)."""
    out: list[str] = []
    fb, fs = (
        flatten({k: v for k, v in base.items() if k != "techniques"}),
        flatten({k: v for k, v in stack.items() if k != "techniques"}),
    )
    for k in fs:
        if k in HARNESS_KEYS or k.startswith("data."):
            continue
        if fb.get(k) != fs[k]:
            out.append(f"{k}={fmt_value(fs[k])}")
    bt, st = dict(base.get("techniques") or {}), dict(stack.get("techniques") or {})
    for name, params in st.items():
        if name not in bt:
            inner = ",".join(f"{p}={fmt_value(v)}" for p, v in (params or {}).items())
            out.append(f"+{name}({inner})")
        else:
            for p, v in (params or {}).items():
                if (bt[name] or {}).get(p) != v:
                    out.append(f"{name}.{p}={fmt_value(v)}")
    out.extend(f"-{name}" for name in bt if name not in st)
    return " ".join(out)


def load_study(study_dir: Path) -> Study:
    ledger = Ledger(study_dir / LEDGER_NAME)
    spec_file = study_dir / "search.yaml"
    if not spec_file.is_file() or not ledger.path.is_file():
        raise PgolfError(f"{str(study_dir)!r} is not a study folder (needs search.yaml and {LEDGER_NAME})")
    spec = read_yaml(spec_file)  # malformed YAML: one error naming the file and line
    base_file = study_dir / "base_stack.yaml"
    base = read_yaml(base_file) if base_file.is_file() else dict(spec.get("stack") or {})
    try:
        rows = [_row(n, rec, base) for n, rec in ledger.records().items() if rec.get("state")]
        study = Study(
            dir=study_dir,
            name=str(spec.get("name") or study_dir.name),
            limit=int((spec.get("constraint") or {}).get("artifact_bytes", 16_000_000)),
            metric=str((spec.get("objective") or {}).get("metric", "val_bpb")),
            seeds=list((spec.get("search") or {}).get("seeds", [1337])),
            num_samples=int((spec.get("search") or {}).get("num_samples", 0)),
            base=base,
            rows=rank(rows),
        )
    except (AttributeError, TypeError, ValueError) as e:
        raise PgolfError(f"{study_dir}: malformed study files ({type(e).__name__}: {e})") from None
    return study


def _row(n: int, rec: Mapping[str, Any], base: Mapping[str, Any]) -> TrialRow:
    stack = rec.get("stack")
    return TrialRow(
        number=n,
        state=str(rec.get("state")),
        val_bpb=rec.get("val_bpb"),
        val_loss=rec.get("val_loss"),
        val_bpb_std=rec.get("val_bpb_std"),
        objective=rec.get("objective"),
        artifact_bytes=rec.get("artifact_bytes"),
        estimated_bytes=rec.get("estimated_bytes"),
        estimate_error_bytes=rec.get("estimate_error_bytes"),
        fits=rec.get("fits"),
        legal=rec.get("legal"),
        legal_reasons=[str(x) for x in rec.get("legal_reasons") or ()],
        params=rec.get("params_count"),
        tokens_per_second=rec.get("tokens_per_second"),
        steps=rec.get("steps"),
        train_seconds=rec.get("train_seconds"),
        seeds=list(rec.get("seeds") or []),
        changes=stack_changes(base, stack) if isinstance(stack, Mapping) else str(rec.get("point_text", "")),
        point=dict(rec.get("point") or {}),
        error=str(rec.get("error") or ""),
        run_dir=str(rec.get("run_dir") or ""),
        stack=stack if isinstance(stack, dict) else None,
    )


STATE_ORDER = {
    "complete": 0,
    "stopped": 1,
    "running": 2,
    "error": 3,
    "timeout": 4,
    "interrupted": 5,
    "infeasible": 6,
    "invalid": 7,
    "unused": 8,
    "imported": 9,
}


def rank(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Complete trials by objective (lower first; an illegal one after every legal one), then
    stopped ones by their last score, then the rest by state and number. Only complete trials
    get a rank."""

    def key(r: TrialRow) -> tuple[int, bool, float, int]:
        score = float(r.objective) if r.objective is not None and _finite(r.objective) else math.inf
        illegal = r.state == "complete" and r.legal is False
        return (
            STATE_ORDER.get(r.state, 9),
            illegal,
            score if r.state in ("complete", "stopped") else 0.0,
            r.number,
        )

    out = sorted(rows, key=key)
    k = 0
    for r in out:
        if r.state == "complete" and _finite(r.objective):
            k += 1
            r.rank = k
    return out


# --------------------------------------------------------------------------------------------
# Table and CSV
# --------------------------------------------------------------------------------------------


def _shorten(text: str, width: int) -> str:
    import textwrap

    line = " ".join(text.split())
    return textwrap.shorten(line, width=width, placeholder=" …") if len(line) > width else line


def _f(v: Any, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _yes(v: bool | None) -> str:
    return "" if v is None else ("yes" if v else "NO")


def table(study: Study, top: int | None = None) -> Table:
    t = Table(
        box=None,
        pad_edge=False,
        header_style="bold",
        title_justify="left",
        title=f"{study.name}: {len(study.rows)} trials, metric {study.metric} (mean over seeds "
        f"{', '.join(map(str, study.seeds))}), limit {study.limit:,} bytes",
    )
    cols = [
        ("#", "right"),
        ("trial", "left"),
        ("state", "left"),
        ("val_bpb", "right"),
        ("val_loss", "right"),
        ("bytes", "right"),
        ("fits", "left"),
        ("legal", "left"),
        ("params", "right"),
        ("tok/s", "right"),
        ("changes vs base stack", "left"),
    ]
    for name, just in cols:
        t.add_column(name, justify=just, overflow="fold")  # type: ignore[arg-type]
    rows = study.rows if top is None else study.rows[:top]
    for r in rows:
        size = "" if r.size is None else f"{r.size:,}" + ("" if r.artifact_bytes is not None else "~")
        note = (
            r.changes
            if r.state in ("complete", "stopped") or not r.error
            else f"{r.changes}  [{_shorten(r.error, 60)}]"
        )
        if r.legal is False and r.legal_reasons:
            note = f"{note}  [not legal: {_shorten(r.legal_reasons[0], 80)}]"
        style = "" if r.state == "complete" else "dim"
        bpb = _f(r.val_bpb, ".4f")
        if bpb and len(r.seeds) > 1 and r.val_bpb_std is not None:
            bpb += f" ±{r.val_bpb_std:.4f}"  # sample std over the trial's seeds
        t.add_row(
            _f(r.rank, "d"),
            r.name,
            r.state,
            bpb,
            _f(r.val_loss, ".4f"),
            size,
            _yes(r.fits),
            _yes(r.legal),
            _f(r.params, ",d"),
            _f(r.tokens_per_second, ",.0f"),
            Text(note),
            style=style,
        )
    return t


def footer(study: Study) -> list[str]:
    lines = []
    counts: dict[str, int] = {}
    for r in study.rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(
        "bytes: the real artifact (model + code) of a trained trial; ~ marks the pre-training estimate"
    )
    lines.append(
        "trials: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda x: STATE_ORDER.get(x[0], 9)))
    )
    errs = [r.estimate_error_bytes for r in study.rows if r.estimate_error_bytes is not None]
    if errs:
        under = max(errs)
        worst = (
            f"worst under-estimate {under:+,d} bytes (the artifact was larger than estimated); set "
            f"constraint.margin above {under:,d} bytes to be safe"
            if under > 0
            else "no trial's artifact was larger than its estimate"
        )
        lines.append(
            f"size estimate error (real − estimated): mean {sum(errs) / len(errs):+,.0f} bytes over "
            f"{len(errs)} trials; {worst}"
        )
    if any(r.legal is not None for r in study.rows):
        lines.append(
            "legal: a trained trial passed every legality probe (future, normalisation, data, provenance, tags); "
            "an illegal one ranks after every legal one and is never best (before training: no technique is "
            "tagged illegal or needs_review)"
        )
    best = study.best()
    if best is not None:
        lines.append(
            f"best: {best.name} val_bpb {best.val_bpb:.4f} val_loss {best.val_loss:.4f} "
            f"({best.size:,} bytes): {best.changes or 'the base stack'}"
        )
    return lines


def write_csv(study: Study, path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in study.rows:
        w.writerow([
            r.rank if r.rank is not None else "", r.name, r.state, _f(r.val_bpb, ".6f"), _f(r.val_loss, ".6f"),
            _f(r.val_bpb_std, ".6f"), _f(r.artifact_bytes, "d"), _f(r.estimated_bytes, "d"),
            _f(r.estimate_error_bytes, "d"), _yes(r.fits), _yes(r.legal), " | ".join(r.legal_reasons),
            _f(r.params, "d"),
            _f(r.tokens_per_second, ".1f"), _f(r.steps, "g"), _f(r.train_seconds, ".2f"),
            " ".join(map(str, r.seeds)), r.changes, json.dumps(r.point, sort_keys=True), r.error, r.run_dir,
        ])  # fmt: skip
    path.write_text(buf.getvalue())


# --------------------------------------------------------------------------------------------
# Pareto plot
# --------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (bytes, score) not beaten by any smaller-or-equal artifact with a lower score,
    sorted by bytes."""
    front: list[tuple[float, float]] = []
    best = math.inf
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(study: Study, path: Path) -> int:
    """Draw val_bpb vs artifact bytes; returns the number of trials plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = 1e6
    # (MB, val_bpb, fits, row) of every trial trained to the end
    done = [
        (r.artifact_bytes / mb, float(r.val_bpb), bool(r.fits), r)
        for r in study.rows
        if r.state == "complete" and r.artifact_bytes and r.val_bpb is not None and _finite(r.val_bpb)
    ]
    fit = [(x, y) for x, y, ok, _ in done if ok]
    over = [(x, y) for x, y, ok, _ in done if not ok]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if fit:
        ax.scatter(
            [p[0] for p in fit],
            [p[1] for p in fit],
            s=28,
            color="#1f77b4",
            alpha=0.75,
            label=f"trials that fit ({len(fit)})",
            zorder=3,
        )
    if over:
        ax.scatter(
            [p[0] for p in over],
            [p[1] for p in over],
            s=28,
            marker="x",
            color="#999999",
            label=f"over the limit after training ({len(over)})",
            zorder=3,
        )
    front = pareto_front(fit)
    if front:  # the best score reachable with at most x bytes, drawn out to the limit
        xs, ys = [p[0] for p in front], [p[1] for p in front]
        xs.append(max(study.limit / mb, xs[-1]))
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", color="#d62728", linewidth=1.6, label="Pareto front", zorder=2)
        names = {(x, y): r.name for x, y, ok, r in done if ok}
        for x, y in front:
            ax.annotate(names.get((x, y), ""), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                        color="#d62728")  # fmt: skip
    rejected_rows = [r for r in study.rows if r.state == "infeasible" and r.estimated_bytes]
    hi = max(
        [study.limit / mb * 1.08]
        + [x for x, *_ in done]
        + [(r.estimated_bytes or 0) / mb for r in rejected_rows]
    )
    lo = min([0.0] + [x for x, *_ in done])
    ax.set_xlim(lo, hi * 1.02)
    ax.axvspan(lo, study.limit / mb, color="#2ca02c", alpha=0.06, label="feasible (≤ limit)")
    ax.axvline(
        study.limit / mb, color="black", linestyle="--", linewidth=1.2, label=f"limit {study.limit:,} bytes"
    )
    if rejected_rows:  # no score: drawn along the bottom at their estimated size
        ax.scatter(
            [r.estimated_bytes / mb for r in rejected_rows if r.estimated_bytes],
            [0.02] * len(rejected_rows),
            transform=ax.get_xaxis_transform(),
            marker="|",
            s=80,
            color="#9467bd",
            label=f"rejected before training, at estimated size ({len(rejected_rows)})",
            zorder=3,
        )
    best = study.best()
    if best is not None and best.artifact_bytes and best.val_bpb is not None:
        bx, by = best.artifact_bytes / mb, float(best.val_bpb)
        ax.scatter([bx], [by], s=120, facecolors="none", edgecolors="#d62728", linewidths=2, zorder=4)
        ax.annotate(
            f"best {best.name}: {by:.4f}", (bx, by), textcoords="offset points", xytext=(8, 8), fontsize=9
        )
    ax.set_xlabel("artifact size (MB = 10⁶ bytes: compressed model + code)")
    ax.set_ylabel("val_bpb (bits per byte, lower is better)")
    rejected = sum(1 for r in study.rows if r.state == "infeasible")
    ax.set_title(
        f"{study.name}: val_bpb vs artifact size ({len(done)} trials trained to the end, "
        f"{rejected} rejected as too large before training)",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    if done or study.limit:
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(done)


# --------------------------------------------------------------------------------------------
# Best stack
# --------------------------------------------------------------------------------------------


def best_stack_yaml(study: Study) -> str | None:
    """The best fitting trial's fully resolved stack, loadable by ``pgolf run``."""
    best = study.best()
    if best is None or best.stack is None:
        return None
    stack = json.loads(json.dumps(best.stack))  # as the trial ran it: threads, device, compile...
    stack["name"] = f"{study.name}-best-{best.name}"
    head = (
        f"# Best stack of study {study.name} ({study.dir}): trial {best.name}\n"
        f"# val_bpb {best.val_bpb:.6f}, val_loss {best.val_loss:.6f} (mean over seeds "
        f"{', '.join(map(str, best.seeds or study.seeds))}); artifact {best.size:,} of {study.limit:,} bytes\n"
        f"# changes vs the base stack: {best.changes or '(none)'}\n"
    )
    return head + yaml.safe_dump(stack, sort_keys=False, default_flow_style=False, width=100)


@dataclass
class Written:
    csv: Path
    png: Path | None
    best_yaml: Path | None
    history: Path | None = None


def write_all(
    study: Study, csv_path: Path | None = None, png_path: Path | None = None, best_path: Path | None = None
) -> Written:
    csv_path = csv_path or study.dir / "results.csv"
    png_path = png_path or study.dir / "pareto.png"
    best_path = best_path or study.dir / "best_stack.yaml"
    write_csv(study, csv_path)
    plot_pareto(study, png_path)
    history = study.dir / "history.png"
    plot_history(study, history)
    text = best_stack_yaml(study)
    if text is not None:
        best_path.write_text(text)
    return Written(csv_path, png_path, best_path if text is not None else None, history)


# --------------------------------------------------------------------------------------------
# History, confirmation, importance
# --------------------------------------------------------------------------------------------


def plot_history(study: Study, path: Path) -> int:
    """The objective of each trained trial in trial order, and the best so far (fitting,
    complete trials); returns the number of points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(
        (r for r in study.rows if r.state in ("complete", "stopped") and _finite(r.objective)),
        key=lambda r: r.number,
    )
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ok = [r for r in rows if r.state == "complete" and r.fits]
    other = [r for r in rows if r not in ok]
    if ok:
        ax.scatter(
            [r.number for r in ok],
            [float(r.objective or 0) for r in ok],
            s=22,
            color="#1f77b4",
            label="complete, fits",
        )
    if other:
        ax.scatter([r.number for r in other], [float(r.objective or 0) for r in other], s=22, marker="x", color="#999999",
                   label="stopped by ASHA (last score) or over the limit")  # fmt: skip
    best: list[tuple[int, float]] = []
    cur = math.inf
    for r in ok:
        cur = min(cur, float(r.objective or math.inf))
        best.append((r.number, cur))
    if best:
        ax.step(
            [b[0] for b in best], [b[1] for b in best], where="post", color="#d62728", label="best so far"
        )
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"{study.metric} (lower is better)")
    ax.set_title(f"{study.name}: {study.metric} by trial", fontsize=10)
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(rows)


def _seed_scores(run_dir: Path) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    for f in sorted(run_dir.glob("seed_*/result.json")):
        try:
            d = json.loads(f.read_text())
            loss, bpb = float(d["val_loss"]), float(d["val_bpb"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if math.isfinite(loss) and math.isfinite(bpb):
            out[int(d.get("seed", f.parent.name.removeprefix("seed_")))] = (loss, bpb)
    return out


def confirmation(study: Study) -> list[str]:
    """Trials run on several seeds (top-k confirmation), ranked by mean val_loss, each tested
    against the best (Welch, one-sided, in nats) and the reference against the challenge bar."""
    import statistics

    from .stats import BAR_NATS, BAR_P, meets_bar, welch_less

    groups = []
    for r in study.rows:
        if r.state != "complete" or not r.run_dir:
            continue
        scores = _seed_scores(r.run_path(study.dir))
        if len(scores) >= 2:
            groups.append((statistics.fmean(v[0] for v in scores.values()), r, scores))
    if not groups:
        return []
    groups.sort(key=lambda g: g[0])
    best_loss = [v[0] for v in groups[0][2].values()]
    ref = next((g for g in groups if g[1].stack and g[1].point and g[1].number == _reference(study)), None)
    lines = [
        f"confirmation (mean over seeds; Welch one-sided test in nats; bar {BAR_NATS} nats at p < {BAR_P}):"
    ]
    for i, (mean, r, scores) in enumerate(groups, 1):
        loss = [v[0] for v in scores.values()]
        bpb = [v[1] for v in scores.values()]
        sd = statistics.stdev(loss)
        text = (f"  {i}. {r.name}: val_loss {mean:.5f} ± {sd:.5f} nats, val_bpb {statistics.fmean(bpb):.5f} "
                f"over {len(loss)} seeds")  # fmt: skip
        if i > 1:
            w = welch_less(best_loss, loss)
            text += f"; {groups[0][1].name} better with p = {w.p:.3g}"
        if ref is not None and r is not ref[1]:
            w = welch_less(loss, [v[0] for v in ref[2].values()])
            text += f"; vs reference {ref[1].name}: {w.diff:+.5f} nats, p = {w.p:.3g}, bar {'MET' if meets_bar(w) else 'not met'}"
        lines.append(text)
    return lines


def _reference(study: Study) -> int | None:
    ledger = Ledger(study.dir / LEDGER_NAME)
    for n, rec in ledger.records().items():
        if rec.get("reference"):
            return n
    return None


def importance_lines(study: Study) -> list[str]:
    """Optuna's parameter importance (its default evaluator) over the complete trials."""
    import warnings

    import optuna

    from .storage import open_storage, resolve_url

    spec = yaml.safe_load((study.dir / "search.yaml").read_text()) or {}
    url = resolve_url(spec.get("storage"), study.dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.load_study(
        study_name=str(spec.get("study_name") or study.dir.name), storage=open_storage(url)
    )
    done = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return [f"parameter importance: needs at least 2 complete trials (have {len(done)})"]
    target = (lambda t: t.values[0]) if len(st.directions) > 1 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(st, target=target)
    except (RuntimeError, ValueError) as e:
        return [f"parameter importance: not available ({e})"]
    lines = [f"parameter importance for {study.metric} (Optuna's default evaluator over {len(done)} complete trials; "
             "parameters present in every one of them):"]  # fmt: skip
    lines += [f"  {k:<40} {v:.3f}" for k, v in imp.items()]
    return lines
