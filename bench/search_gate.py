"""Benchmark: driver seconds per trained trial of the search's size gate, before and after.

For ``searches/baseline_h100.yaml`` (most of its space cannot fit in 16,000,000 bytes) it
draws the same N points uniformly from the space (Optuna's random sampler, seeded) and sizes
each one twice:

* **before** — the gate as it was: one ``estimate_artifact_bytes`` after another in the driver,
  cached on a key that held every technique parameter (so EMA decay or an activation slope made
  every sample new);
* **after** — ``pgolf search --dry-run``'s path (search/sizing.py): layout key, analytic bound,
  codec proxy, and estimates as parallel Ray tasks.

Figures: for each, the wall seconds, the seconds the driver itself was busy, the feasible
samples, and **driver seconds per trained trial** = driver-busy seconds / feasible samples
(every feasible sample becomes a trained trial), against the goal of 5 % of a trial's 600 s
(30 s). "After" also reports the wall seconds of sizing per feasible sample with its parallel
workers: the estimates run while the GPUs train, and keep 8 GPUs fed while that stays under
600 s / 8 = 75 s. The machine (CPU count, load average, versions) goes into the results file.

    python bench/search_gate.py --samples 24 --workers 2
    python bench/search_gate.py --samples 24 --skip-before   # only the new gate

Writes ``bench/search_gate_results/search_gate_<date>_<host>.json`` and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRIAL_SECONDS = 600.0


def machine() -> dict[str, Any]:
    import optuna
    import ray
    import torch

    return {
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "load_average": list(os.getloadavg()),
    }


def before(loaded: Any, samples: int, totals: dict[int, int] | None = None) -> dict[str, Any]:
    """The old gate: serial real estimates in the driver, cached on every technique parameter."""
    import optuna

    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import estimate_artifact_bytes
    from pgolf.search import space as space_mod

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=loaded.spec.search.sampler_seed))
    limit = loaded.spec.constraint.artifact_bytes
    cache: dict[str, Any] = {}
    feasible = hits = 0
    seconds: list[float] = []
    t0 = time.perf_counter()
    for i in range(samples):
        ot = study.ask()
        point = space_mod.sample(loaded.dims, ot)
        data = space_mod.apply(loaded.base_data, point)
        data.setdefault("export", {})["artifact_limit"] = limit
        data.setdefault("train", {})["threads"] = 1
        rs = stack_from_dict(data, source=f"sample {i}", base_dir=Path(loaded.source).parent)
        d = rs.to_dict()
        key = json.dumps(
            [d["model"], d["techniques"], d["export"], d["plugins"], d["seed"], d["train"]["train_seq_len"]],
            sort_keys=True,
        )
        if key in cache:
            hits += 1
        else:
            cache[key] = estimate_artifact_bytes(rs, margin=loaded.spec.constraint.margin)
            seconds.append(cache[key].seconds)
        feasible += int(cache[key].fits)
        if totals is not None:
            totals[i] = cache[key].total
        study.tell(ot, state=optuna.trial.TrialState.FAIL)
        print(f"  before: sample {i}: {cache[key].total:,} bytes ({'fits' if cache[key].fits else 'too large'})",
              flush=True)  # fmt: skip
    wall = time.perf_counter() - t0
    return {
        "samples": samples,
        "feasible": feasible,
        "cache_hits": hits,
        "estimates": len(seconds),
        "estimate_seconds_mean": statistics.fmean(seconds) if seconds else 0.0,
        "wall_seconds": wall,
        "driver_seconds": wall,  # everything ran in the driver
        "driver_seconds_per_trained_trial": wall / feasible if feasible else math.inf,
    }


def after(loaded: Any, samples: int, workers: int, decisions: dict[int, Any] | None = None) -> dict[str, Any]:
    from pgolf.search.harness import dry_run

    def say(i: int, what: str, est: Any, note: str) -> None:
        size = f"{est.total:,} bytes ({est.method})" if est is not None else note
        print(f"  after: sample {i}: {what} {size}", flush=True)
        if decisions is not None and est is not None:
            decisions[i] = est

    r = dry_run(loaded, samples, workers=workers, on_decision=say)
    secs = r.pop("estimate_seconds")
    r.update(
        estimates=len(secs),
        estimate_seconds_mean=statistics.fmean(secs) if secs else 0.0,
        estimate_cpu_seconds=sum(secs),
        driver_seconds_per_trained_trial=r["driver_seconds"] / r["feasible"] if r["feasible"] else math.inf,
        sizing_wall_seconds_per_trained_trial=r["wall_seconds"] / r["feasible"]
        if r["feasible"]
        else math.inf,
    )
    return r


def agreement(decisions: dict[int, Any], totals: dict[int, int], limit: int) -> dict[str, Any]:
    """The new gate's decisions against the old gate's real estimate of the same samples."""
    out: dict[str, Any] = {
        "compared": 0,
        "different_decisions": [],
        "analytic_above_real": [],
        "proxy_rel_error": [],
    }
    for i, est in decisions.items():
        real = totals.get(i)
        if real is None:
            continue
        out["compared"] += 1
        if est.fits != (real <= limit):
            out["different_decisions"].append(i)
        if est.method == "analytic" and est.total > real:
            out["analytic_above_real"].append(i)
        if est.method == "proxy":
            out["proxy_rel_error"].append(round(est.total / real - 1, 5))
        if est.method in ("exact", "cached") and est.total != real:
            out.setdefault("exact_mismatch", []).append(i)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--search", default=str(ROOT / "searches" / "baseline_h100.yaml"))
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--workers", type=int, default=2, help="parallel estimates for 'after'")
    p.add_argument("--skip-before", action="store_true")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "search_gate_results"))
    args = p.parse_args(argv)

    from pgolf.search.spec import load_search

    loaded = load_search(args.search)
    result: dict[str, Any] = {
        "benchmark": "search size gate: driver seconds per trained trial",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "search": str(Path(args.search).resolve().relative_to(ROOT))
        if args.search.startswith(str(ROOT))
        else args.search,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "goal_seconds": 0.05 * TRIAL_SECONDS,
    }
    print(f"after: the new gate, {args.workers} parallel estimate(s)", flush=True)
    decisions: dict[int, Any] = {}
    totals: dict[int, int] = {}
    result["after"] = after(loaded, args.samples, args.workers, decisions)
    if not args.skip_before:
        print("before: serial estimates in the driver, old cache key", flush=True)
        result["before"] = before(loaded, args.samples, totals)
        result["agreement"] = agreement(decisions, totals, loaded.spec.constraint.artifact_bytes)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    for name in ("before", "after"):
        r = result.get(name)
        if r is None:
            continue
        per = r["driver_seconds_per_trained_trial"]
        print(
            f"{name}: {r['feasible']}/{r['samples']} samples fit; wall {r['wall_seconds']:.1f} s, driver busy "
            f"{r['driver_seconds']:.1f} s → {per:.2f} s of driver time per trained trial "
            f"({per / TRIAL_SECONDS:.2%} of a {TRIAL_SECONDS:.0f} s trial; goal < 5 %)"
        )
    a = result["after"]
    if a["feasible"]:
        print(
            f"after: {a['sizing_wall_seconds_per_trained_trial']:.1f} s of sizing wall time per trained trial with "
            f"{args.workers} worker(s), in the background of training ({a['methods']})"
        )
    if "agreement" in result:
        g = result["agreement"]
        print(
            f"agreement: {g['compared']} samples; decisions that differ from a real estimate: "
            f"{len(g['different_decisions'])}; analytic bounds above the real size: {len(g['analytic_above_real'])}; "
            f"proxy errors {g['proxy_rel_error']}"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"search_gate_{time.strftime('%Y%m%d-%H%M%S')}_{socket.gethostname()}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
