"""The Ray Tune function trainable: one trial = ``run()`` once per seed.

It runs in a Ray worker. The driver has already validated and sized the stack; here it is
rebuilt from its resolved mapping, run for every seed into ``<run_dir>/seed_<s>/``, and the
trial's summary is written to ``<run_dir>/trial_result.json`` before the final report, so a
resumed study can adopt a trial that finished while the driver was dying.

Intermediate reports carry ``search_step`` = seed index x steps per seed + step: a monotone
clock for ASHA that is comparable across trials (all trials run the same seeds in the same
order). A failure (any exception: a config problem, CUDA out of memory, a diverged loss) is
caught and reported as a final result with ``state: error``: the study goes on.
"""

from __future__ import annotations

import json
import math
import statistics
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRIAL_RESULT = "trial_result.json"
TIME_ATTR = "search_step"


def _error_kind(e: BaseException) -> str:
    from pgolf.registry.api.errors import PgolfError
    from pgolf.registry.run.train import TrainingDiverged

    if isinstance(e, TrainingDiverged):
        return "diverged"
    if "OutOfMemoryError" in type(e).__name__ or "out of memory" in str(e).lower():
        return "out_of_memory"
    if isinstance(e, PgolfError):
        return "config"
    return "exception"


def summarize(results: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Mean over seeds of the scores; the worst case of the sizes."""

    def mean(k: str) -> float:
        return float(statistics.fmean(r[k] for r in results))

    def std(k: str) -> float:
        return float(statistics.stdev(r[k] for r in results)) if len(results) > 1 else 0.0

    first = results[0]
    return {
        "val_bpb": mean("val_bpb"),
        "val_loss": mean("val_loss"),
        "val_bpb_std": std("val_bpb"),
        "val_loss_std": std("val_loss"),
        "artifact_bytes": max(r["artifact_bytes"] for r in results),
        "model_bytes": max(r["model_bytes"] for r in results),
        "code_bytes": first["code_bytes"],
        "artifact_limit": first["artifact_limit"],
        "fits": all(r["fits"] for r in results),
        "params_count": first["params"],
        "steps": mean("steps"),
        "tokens_per_second": mean("tokens_per_second"),
        "train_seconds": mean("train_seconds"),
        "n_seeds": len(results),
        "objective": mean(metric),
    }


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable (see the module docstring for ``config``'s keys)."""
    from ray import tune

    number = int(config["number"])
    run_dir = Path(config["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in config["seeds"]]
    per_seed = int(config["steps_per_seed"])
    metric = str(config["metric"])
    results: list[dict[str, Any]] = []
    clock = 0
    summary: dict[str, Any] = {"number": number, "state": "complete", "final": True, "error": ""}
    try:
        from pgolf.registry.api.config import stack_from_dict
        from pgolf.registry.run.pipeline import run

        for i, seed in enumerate(seeds):
            rs = stack_from_dict(
                {**config["stack"], "seed": seed}, source=f"trial {number}", base_dir=run_dir
            )
            out = run_dir / f"seed_{seed}"
            out.mkdir(parents=True, exist_ok=True)

            def report(m: Mapping[str, Any], i: int = i, seed: int = seed) -> None:
                nonlocal clock
                if m.get("final"):
                    return
                clock = i * per_seed + int(m["step"])
                tune.report(
                    {
                        TIME_ATTR: clock,
                        "step": int(m["step"]),
                        "seed": seed,
                        "val_bpb": m["val_bpb"],
                        "val_loss": m["val_loss"],
                        "objective": m[metric],
                        "state": "running",
                        "final": False,
                        "number": number,
                    }
                )

            res = run(rs, out, report=report, console=None, estimate=False)
            results.append(res.to_dict())
            clock = max(clock, i * per_seed + res.steps)
        summary.update(summarize(results, metric))
    except Exception as e:  # every failure is a recorded trial, never a dead study
        summary.update(
            state="error",
            error_kind=_error_kind(e),
            error=f"{type(e).__name__}: {e}",
            val_bpb=math.nan,
            val_loss=math.nan,
            objective=math.nan,
        )
        (run_dir / "error.txt").write_text("".join(traceback.format_exception(e)))
        _free_cuda()
    summary[TIME_ATTR] = clock
    summary["seeds"] = [r["seed"] for r in results]
    write_json(run_dir / TRIAL_RESULT, {**summary, "per_seed": results})
    tune.report(summary)


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
