"""The Ray Tune function trainable: one trial = ``run()`` once per seed.

It runs in a Ray worker. The driver has already validated and sized the stack; here it is
rebuilt from its resolved mapping, run for every seed into ``<run_dir>/seed_<s>/``, and the
trial's summary is written to ``<run_dir>/trial_result.json`` before the final report, so a
resumed study can adopt a trial that finished while the driver was dying.

Intermediate reports carry ``search_step`` = seed index x steps per seed + step: a monotone
clock for ASHA that is comparable across trials (all trials run the same seeds in the same
order). A report taken at the end of the last seed's training (its step count is reached, or
its wall-clock cap has passed) carries ``last: True``: the scheduler never cuts on it, since
the final score is moments away. A failure (any exception: a config problem, CUDA out of
memory, a diverged loss, a non-finite final score) is caught and reported as a final result
with ``state: error`` and an ``error_kind``: the study goes on.

``mode: eval`` trials re-score saved artifacts with the trial's evaluation settings
(``score_artifact``), without training. ``confirm: True`` runs extra seeds of a finished trial
into the same trial folder (``confirm_result.json``). ``match_steps: {run_dir, ledger, number}``
stops each seed at the step count of the same seed of another trial (``pgolf ablate
--step-matched``): the seed waits for that trial's ``seed_<s>/result.json`` and fails when the
ledger says that trial ended without one.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .ledger import Ledger, finite_json

TRIAL_RESULT = "trial_result.json"
CONFIRM_RESULT = "confirm_result.json"
TIME_ATTR = "search_step"


class NonFiniteScore(ValueError):
    """The run finished but its score is NaN or infinite."""


class NoReference(RuntimeError):
    """A step-matched trial's reference ended without the seed it matches."""


def matched_steps(match: Mapping[str, Any], seed: int, poll_seconds: float = 2.0) -> int:
    """The step count of ``seed`` in the reference trial (``match['run_dir']``), waiting for it
    while the study ledger (``match['ledger']``) says the reference (``match['number']``) has
    not ended; raises :class:`NoReference` when it ended without that seed's result."""
    ref_dir, number = Path(match["run_dir"]), int(match["number"])
    result = ref_dir / f"seed_{seed}" / "result.json"
    ledger = Ledger(Path(match["ledger"]))
    while True:
        if result.is_file():
            try:
                steps = int(json.loads(result.read_text())["steps"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise NoReference(f"{result} is not a readable run result: {e!r}") from None
            if steps < 1:
                raise NoReference(f"the reference trial t{number:04d} trained no step on seed {seed}")
            return steps
        state = ledger.records().get(number, {}).get("state")
        if state not in (None, "running"):
            raise NoReference(
                f"the reference trial t{number:04d} ended ({state}) without a result for seed {seed}: "
                "there is no step count to match"
            )
        time.sleep(poll_seconds)


def _error_kind(e: BaseException) -> str:
    from pgolf.registry.api.errors import PgolfError, RunFailed
    from pgolf.registry.run.train import TrainingDiverged

    if isinstance(e, TrainingDiverged):
        return "diverged"
    if isinstance(e, NonFiniteScore):
        return "non_finite"
    if isinstance(e, NoReference):
        return "no_reference"
    if isinstance(e, RunFailed):  # run()'s own check of the reloaded artifact's score
        msg = str(e).lower()
        return "non_finite" if ("nan" in msg or "inf" in msg or "finite" in msg) else "no_valid_result"
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
        **verdict(results),
    }


def verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A trial is legal when every seed's run passed every legality probe; the reasons of the
    others, each once. Runs that recorded no verdict (re-scored artifacts) leave it out."""
    recorded = [r for r in results if isinstance(r.get("legal"), bool)]
    if not recorded:
        return {}
    reasons = list(dict.fromkeys(x for r in recorded for x in r.get("legal_reasons") or ()))
    return {"legal": all(r["legal"] for r in recorded), "legal_reasons": reasons}


def check_finite(res: Mapping[str, Any], what: str) -> None:
    """A result whose val_loss or val_bpb is not finite is a failure, never a score."""
    for k in ("val_loss", "val_bpb"):
        v = res.get(k)
        if not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise NonFiniteScore(f"{what}: {k} is {v} (not finite) after reloading the artifact")


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False) + "\n")
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
    mode = config.get("mode", "train")
    results: list[dict[str, Any]] = []
    clock = 0
    summary: dict[str, Any] = {"number": number, "state": "complete", "final": True, "error": ""}
    try:
        from pgolf.registry.api.config import stack_from_dict
        from pgolf.registry.run.pipeline import run

        if mode == "eval":
            results = eval_runs(config, run_dir)
        for i, seed in enumerate(seeds if mode != "eval" else []):
            data = {**config["stack"], "seed": seed}
            if config.get("match_steps"):  # exactly the reference's steps for this seed, no cap
                steps = matched_steps(config["match_steps"], seed)
                data["train"] = {**data["train"], "iterations": steps, "max_wallclock_seconds": 0}
            rs = stack_from_dict(data, source=f"trial {number}", base_dir=run_dir)
            out = run_dir / f"seed_{seed}"
            out.mkdir(parents=True, exist_ok=True)
            cfg = rs.stack.train
            t_start = time.time()
            last_seed = i == len(seeds) - 1

            def report(
                m: Mapping[str, Any],
                i: int = i,
                seed: int = seed,
                t_start: float = t_start,
                last_seed: bool = last_seed,
                cfg: Any = cfg,
            ) -> None:
                nonlocal clock
                if m.get("final"):
                    return
                clock = i * per_seed + int(m["step"])
                at_end = int(m["step"]) >= cfg.iterations or (
                    cfg.max_wallclock_seconds > 0 and time.time() - t_start >= cfg.max_wallclock_seconds
                )
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
                        "last": bool(at_end and last_seed),
                        "number": number,
                    }
                )

            res = run(rs, out, report=report, console=None, estimate=False).to_dict()
            check_finite(res, f"seed {seed}")
            results.append(res)
            clock = max(clock, i * per_seed + int(res["steps"]))
        summary.update(summarize(results, metric))
        if not math.isfinite(summary["objective"]):
            raise NonFiniteScore(f"the mean {metric} is {summary['objective']}")
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
    name = CONFIRM_RESULT if config.get("confirm") else TRIAL_RESULT
    write_json(run_dir / name, {**summary, "per_seed": results})
    tune.report(summary)


def eval_runs(config: Mapping[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Re-score each saved run's artifact with the trial's evaluation settings (no training):
    the run's own stack with the sampled point applied, through ``score_artifact``."""
    import yaml

    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import (
        artifact_builds,
        check_legality,
        estimate_artifact_bytes,
        prepare_data,
        probe_recorder,
        score_artifact,
    )
    from pgolf.registry.run.runtime import make_runtime, shutdown

    from .space import apply
    from .spec import _artifact

    out: list[dict[str, Any]] = []
    for folder in map(Path, config["runs"]):
        data = apply(yaml.safe_load((folder / "stack.yaml").read_text()), config.get("point") or {})
        data["train"] = {**data.get("train", {}), "threads": config["stack"]["train"].get("threads")}
        rs = stack_from_dict(data, source=f"eval of {folder}", base_dir=folder)
        artifact = _artifact(folder)
        source = prepare_data(rs.stack)
        runtime = make_runtime(rs.stack.train)
        try:
            t0 = time.perf_counter()
            val = source.validation(rs.stack.model.vocab_size)
            fresh = artifact_builds(rs, artifact, runtime, rs.stack.seed)
            recorder = probe_recorder(rs, val[0]) if not runtime.distributed else None
            ev = score_artifact(rs, artifact, runtime, source, validation=val, fresh=fresh, inspect=recorder)
            eval_seconds = time.perf_counter() - t0
            # the sampled evaluation is probed like a run's: the data probe as its run recorded it
            recorded = (_read_json(folder / "result.json").get("legality") or {}).get("probes") or {}
            verdict = check_legality(
                rs, artifact, runtime, val[0], ev, recorded.get("data"), source.provenance, fresh, recorder
            )
        finally:
            shutdown(runtime)
        size = artifact.stat().st_size
        code = estimate_artifact_bytes(rs, model_bytes=size).code_bytes
        res = {
            "seed": rs.stack.seed,
            "val_loss": ev.val_loss,
            "val_bpb": ev.val_bpb,
            "model_bytes": size,
            "code_bytes": code,
            "artifact_bytes": size + code,
            "artifact_limit": rs.stack.export.artifact_limit,
            "fits": size + code <= rs.stack.export.artifact_limit,
            "params": 0,
            "steps": 0,
            "tokens_per_second": ev.tokens / max(ev.seconds, 1e-9),
            "train_seconds": 0.0,
            "eval_seconds": eval_seconds,
            "artifact": str(artifact),
            "eval": rs.stack.eval.model_dump(mode="json"),
            "legal": verdict.legal,
            "legal_reasons": verdict.reasons,
            "legality": verdict.to_dict(),
        }
        check_finite(res, f"re-scoring {artifact}")
        seed_dir = run_dir / f"seed_{rs.stack.seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        write_json(seed_dir / "eval_result.json", res)
        out.append(res)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when it is missing or not an object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
