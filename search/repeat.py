"""``pgolf repeat`` (one stack, several seeds) and ``pgolf compare`` (two groups of runs).

Seeds are part of the experiment, never of the search space: a claim that stack A beats stack B
is a one-sided Welch test on val_loss (nats) over A's and B's seeds, against the challenge bar
(≥ 0.005 nats lower at p < 0.01). BPB equivalents are shown beside, converted with the
validation set's bytes per token (val_bpb / val_loss is the same for every run on one set).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.registry.api.errors import PgolfError, RunFailed

from .stats import BAR_NATS, BAR_P, Welch, meets_bar, welch_less

RESULT = "result.json"


@dataclass(frozen=True)
class RunScore:
    path: Path
    seed: int | None
    val_loss: float
    val_bpb: float
    artifact_bytes: int | None
    stack_hash: str


def _read(path: Path) -> RunScore:
    try:
        d = json.loads(path.read_text())
        loss, bpb = float(d["val_loss"]), float(d["val_bpb"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PgolfError(f"{str(path)!r} is not a readable run result: {e!r}") from None
    if not (math.isfinite(loss) and math.isfinite(bpb)):
        raise PgolfError(
            f"{str(path)!r} holds no valid result (val_loss {loss}, val_bpb {bpb}); remove that run"
        )
    return RunScore(
        path.parent, d.get("seed"), loss, bpb, d.get("artifact_bytes"), str(d.get("stack_hash", ""))
    )


def find_runs(paths: Iterable[str | Path]) -> list[RunScore]:
    """Run folders (with result.json), or folders of them (``pgolf repeat`` output, search
    trials with seed_* folders): each found once."""
    found: dict[Path, RunScore] = {}
    for p in map(Path, paths):
        if (p / RESULT).is_file():
            files = [p / RESULT]
        elif p.is_dir():
            files = sorted(p.glob(f"seed_*/{RESULT}")) or sorted(p.glob(f"*/{RESULT}"))
        else:
            raise PgolfError(f"{str(p)!r} does not exist")
        if not files:
            raise PgolfError(f"{str(p)!r} has no {RESULT} (nor seed_*/{RESULT}): is it a run folder?")
        for f in files:
            found.setdefault(f.resolve(), _read(f))
    return list(found.values())


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


@dataclass(frozen=True)
class Comparison:
    a: list[RunScore]
    b: list[RunScore]
    welch: Welch
    bpb_per_nat: float  # val_bpb / val_loss on this validation set
    bar_met: bool

    def lines(self) -> list[str]:
        w, k = self.welch, self.bpb_per_nat

        def grp(name: str, runs: list[RunScore], m: float, s: float) -> str:
            bpb = [r.val_bpb for r in runs]
            seeds = ", ".join(str(r.seed) for r in runs)
            return (
                f"{name}: n={len(runs)}  val_loss {m:.5f} ± {s:.5f} nats  "
                f"(val_bpb {statistics.fmean(bpb):.5f} ± {_std(bpb):.5f})  seeds {seeds}"
            )

        verdict = "MET" if self.bar_met else "NOT met"
        why = []
        if -w.diff < BAR_NATS:
            why.append(f"improvement {-w.diff:.5f} < {BAR_NATS} nats")
        if not w.p < BAR_P:
            why.append(f"p = {w.p:.3g} ≥ {BAR_P}")
        test = (
            f"t = {w.t:.4f}, df = {w.df:.2f}, p = {w.p:.3g}"
            if math.isfinite(w.t)
            else (
                "both groups have zero spread: "
                + (f"p = {w.p:.3g}" if math.isfinite(w.p) else "the means are equal, p undefined")
            )
        )
        return [
            grp("A", self.a, w.mean_a, w.std_a),
            grp("B", self.b, w.mean_b, w.std_b),
            f"A − B: {w.diff:+.5f} nats  (≈ {w.diff * k:+.5f} bpb)",
            f"Welch one-sided (H1: A's val_loss < B's): {test}",
            f"challenge bar (≥ {BAR_NATS} nats ≈ {BAR_NATS * k:.5f} bpb lower, p < {BAR_P}): {verdict}"
            + (f" ({'; '.join(why)})" if why else ""),
        ]

    def to_dict(self) -> dict[str, Any]:
        """The comparison as strict JSON data: an undefined statistic (t, p when both groups have
        zero spread) is ``None``."""
        w = self.welch

        def num(x: float) -> float | None:
            return x if math.isfinite(x) else None

        d: dict[str, Any] = {
            "n_a": w.n_a,
            "n_b": w.n_b,
            "mean_a": w.mean_a,
            "mean_b": w.mean_b,
            "std_a": w.std_a,
            "std_b": w.std_b,
            "diff_nats": w.diff,
            "diff_bpb": w.diff * self.bpb_per_nat,
            "t": w.t,
            "df": w.df,
            "p": w.p,
            "bar_met": self.bar_met,
        }
        return {k: num(v) if isinstance(v, float) else v for k, v in d.items()}


def compare(a_paths: Sequence[str | Path], b_paths: Sequence[str | Path]) -> Comparison:
    a, b = find_runs(a_paths), find_runs(b_paths)
    shared = {r.path.resolve() for r in a} & {r.path.resolve() for r in b}
    if shared:
        raise PgolfError(f"a run is in both groups: {sorted(map(str, shared))[0]}")
    for name, runs in (("A", a), ("B", b)):
        if len(runs) < 2:
            raise PgolfError(
                f"group {name} has {len(runs)} run ({', '.join(str(r.path) for r in runs)}); the Welch "
                "test needs at least 2 per group: run more seeds with `pgolf repeat`"
            )
    w = welch_less([r.val_loss for r in a], [r.val_loss for r in b])
    ratios = [r.val_bpb / r.val_loss for r in (*a, *b) if r.val_loss > 0]
    k = statistics.fmean(ratios) if ratios else math.nan
    return Comparison(a, b, w, k, meets_bar(w))


# --------------------------------------------------------------------------------------------
# repeat
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepeatSummary:
    runs: list[RunScore]
    skipped: list[int]
    failed: dict[int, str] = field(default_factory=dict)  # seed -> why (kept as seed_<s>.failed)

    def lines(self) -> list[str]:
        out = []
        if self.runs:
            loss = [r.val_loss for r in self.runs]
            bpb = [r.val_bpb for r in self.runs]
            spread = (
                f" ± {_std(loss):.5f} nats, val_bpb {statistics.fmean(bpb):.5f} ± {_std(bpb):.5f} "
                "(mean ± sample std)"
                if len(self.runs) > 1
                else f" nats, val_bpb {statistics.fmean(bpb):.5f} (one seed: no spread)"
            )
            out.append(
                f"{len(self.runs)} seeds ({', '.join(str(r.seed) for r in self.runs)}): "
                f"val_loss {statistics.fmean(loss):.5f}{spread}"
            )
        for seed, why in self.failed.items():
            out.append(f"seed {seed} failed (kept as seed_{seed}.failed): {why}")
        return out


def repeat(
    stack_path: str | Path,
    seeds: Sequence[int],
    out: Path,
    overrides: Sequence[str] = (),
    *,
    on_seed: Callable[[int, RunScore | None], None] | None = None,
) -> RepeatSummary:
    """Run a stack once per seed into ``out/seed_<s>/``; a seed already done is kept, not re-run."""
    from pgolf.registry.api.config import load_stack
    from pgolf.registry.run.pipeline import prepare_data, run
    from pgolf.registry.run.record import keep_failed

    base = load_stack(stack_path, overrides)  # validate once, before anything is written
    prepare_data(base.stack)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[RunScore] = []
    skipped: list[int] = []
    failed: dict[int, str] = {}
    for seed in seeds:
        d = out / f"seed_{seed}"
        if (d / RESULT).is_file():
            runs.append(_read(d / RESULT))
            skipped.append(seed)
            if on_seed:
                on_seed(seed, runs[-1])
            continue
        if d.exists():  # a run that died: start it again
            import shutil

            shutil.rmtree(d)
        d.mkdir()
        rs = load_stack(stack_path, [*overrides, f"seed={seed}"])
        if on_seed:
            on_seed(seed, None)
        try:
            run(rs, d, console=None)
        except RunFailed as e:  # diverged or no valid score: keep it apart, go on with the others
            keep_failed(d, d, e)
            failed[seed] = str(e)
            continue
        runs.append(_read(d / RESULT))
        if on_seed:
            on_seed(seed, runs[-1])
    return RepeatSummary(runs, skipped, failed)
