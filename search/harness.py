"""``pgolf search``: Ray Tune runs the trials, Optuna samples them, the driver sizes them first.

The flow of one sample, all in the driver process::

    Optuna ask ─► sample the space (define-by-run) ─► build and validate the trial's stack
      ─► estimate its artifact (real quantizer + codec on the freshly built model, + code bytes
         + margin) ─► too large: tell Optuna (set_constraint, PRUNED), log it, sample again
      ─► fits: hand the stack to Ray Tune, which runs ``train_trial`` when resources free up
      ─► intermediate val_bpb ─► ASHA (never cuts a trial with a gain_at_end technique)
      ─► final result (or error) ─► ledger, Optuna tell (value + real-size constraint)

Only this module imports Ray and Optuna; ``pgolf.search.cli`` imports it inside the command.
"""

from __future__ import annotations

import os

# Ray reads these when it is imported / initialised (see docs/search.md, "quiet and local").
for _k, _v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}.items():
    os.environ.setdefault(_k, _v)

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import optuna  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from rich.console import Console  # noqa: E402

from pgolf.registry.api.config import ResolvedStack, stack_from_dict  # noqa: E402
from pgolf.registry.api.errors import PgolfError  # noqa: E402
from pgolf.registry.run.pipeline import SizeEstimate, estimate_artifact_bytes, prepare_data  # noqa: E402

from . import space as space_mod  # noqa: E402
from .display import Display  # noqa: E402
from .ledger import LEDGER_NAME, TRAINED, Ledger  # noqa: E402
from .spec import LoadedSearch, load_search  # noqa: E402
from .trainable import TIME_ATTR, TRIAL_RESULT, train_trial  # noqa: E402

SEARCH_FILE = "search.yaml"
BASE_STACK_FILE = "base_stack.yaml"
RAY_DIR = "ray"
MAX_SOCKET_DIR = 40  # Ray adds ~62 characters under its temp dir; Unix socket paths stop at 107
METRIC = "objective"


class _Quiet:
    """Silence Ray's and Optuna's loggers and warnings while the search runs."""

    LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "optuna")

    def __enter__(self) -> _Quiet:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.logging.disable_default_handler()
        self._levels = {n: logging.getLogger(n).level for n in self.LOGGERS}
        for n in self.LOGGERS:
            logging.getLogger(n).setLevel(logging.CRITICAL)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.filterwarnings("ignore", module=r"(ray|optuna|pyarrow|torch)(\.|$)")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return self

    def __exit__(self, *exc: object) -> None:
        self._warn.__exit__(None, None, None)
        for n, lvl in self._levels.items():
            logging.getLogger(n).setLevel(lvl)


# --------------------------------------------------------------------------------------------
# The driver's state: Optuna study, ledger, estimates, display
# --------------------------------------------------------------------------------------------


def _sampler(loaded: LoadedSearch, seed: int) -> optuna.samplers.BaseSampler:
    s = loaded.spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Explicit: Optuna 5 changed TPE's defaults. group=True models each branch of the
        # conditional (define-by-run) space separately; constant_liar keeps concurrent
        # suggestions apart.
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.n_startup_trials, multivariate=True, group=True, constant_liar=True
        )


def storage_url(loaded: LoadedSearch, study_dir: Path) -> str:
    return loaded.spec.storage or f"sqlite:///{(study_dir / 'optuna.db').resolve()}"


def _steps_per_seed(loaded: LoadedSearch) -> int:
    """An upper bound of a run's steps, for the trial clock (seed index x this + step)."""
    hi = loaded.base.stack.train.iterations
    for d in loaded.dims:
        if d.key == "train.iterations":
            hi = max(int(d.high or 0), *(int(c) for c in d.choices if isinstance(c, int)), hi)
    return max(hi, 1)


class StudyRunner:
    """Everything the driver does around Ray Tune, for one study folder."""

    def __init__(
        self, loaded: LoadedSearch, study_dir: Path, *, console: Console | None, quiet: bool, resume: bool
    ):
        self.loaded = loaded
        self.spec = loaded.spec
        self.dir = study_dir
        self.limit = self.spec.constraint.artifact_bytes
        self.metric = self.spec.objective.metric
        self.seeds = list(self.spec.search.seeds)
        self.threads = max(1, int(self.spec.trial.cpus))
        self.steps_per_seed = _steps_per_seed(loaded)
        self.ledger = Ledger(study_dir / LEDGER_NAME)
        self.console = console
        self.live: dict[int, optuna.trial.Trial] = {}
        self.reported: dict[int, int] = {}
        self.gave_up = False
        self.cut: set[int] = set()  # trials ASHA decided to stop
        self._estimates: dict[str, SizeEstimate] = {}
        self.study_name = self.spec.study_name or study_dir.name
        self.study = self._open_study(resume)
        self.records = self.ledger.records()
        self.display = Display(console, total=self.spec.search.num_samples, limit=self.limit, quiet=quiet)

    # -- Optuna ----------------------------------------------------------------------------------
    def _open_study(self, resume: bool) -> optuna.Study:
        url = storage_url(self.loaded, self.dir)
        storage = optuna.storages.RDBStorage(url)
        seed = self.spec.search.sampler_seed
        if resume:
            try:
                n = len(optuna.load_study(study_name=self.study_name, storage=storage).trials)
            except KeyError:
                raise PgolfError(f"no Optuna study {self.study_name!r} in {url}") from None
            # a different seed per session: replaying the first session's random draws would
            # propose its startup points again
            return optuna.load_study(
                study_name=self.study_name, storage=storage, sampler=_sampler(self.loaded, seed + n)
            )
        try:
            return optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                direction="minimize",
                sampler=_sampler(self.loaded, seed),
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise PgolfError(
                f"an Optuna study named {self.study_name!r} already exists in {url}; "
                "continue it with --resume or choose another study_name"
            ) from None

    def _tell(
        self, number: int, state: TrialState, value: float | None = None, constraint: float | None = None
    ) -> None:
        """Tell Optuna a trial's end (a no-op when Optuna already knows it)."""
        trial = self.live.get(number)
        if trial is None:  # a trial of an earlier session (resume)
            frozen = self.study.get_trials(deepcopy=False)[number]
            if frozen.state != TrialState.RUNNING:
                return
            trial = optuna.trial.Trial(self.study, frozen._trial_id)
        if constraint is not None:
            trial.set_constraint("artifact_bytes", constraint)
        if state == TrialState.COMPLETE and value is not None and math.isfinite(value):
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=TrialState.FAIL if state == TrialState.COMPLETE else state)

    def violation(self, total_bytes: int) -> float:
        """Optuna constraint value: ≤ 0 fits; > 0 is the fraction over the limit."""
        return total_bytes / self.limit - 1.0

    # -- building and sizing a sample ------------------------------------------------------------
    def trial_stack_data(self, point: Mapping[str, Any], number: int) -> dict[str, Any]:
        data = space_mod.apply(self.loaded.base_data, point)
        data["name"] = f"{self.loaded.name}-t{number:04d}"
        data["seed"] = self.seeds[0]
        train = data.setdefault("train", {})
        train["threads"] = self.threads
        if self.spec.trial.max_wallclock_seconds is not None:
            train["max_wallclock_seconds"] = self.spec.trial.max_wallclock_seconds
        data.setdefault("export", {})["artifact_limit"] = self.limit
        return data

    def estimate(self, rs: ResolvedStack) -> SizeEstimate:
        """The artifact estimate, cached on what it depends on (shape, techniques, export)."""
        d = rs.to_dict()
        key = json.dumps(
            [d["model"], d["techniques"], d["export"], d["plugins"], d["seed"], d["train"]["train_seq_len"]],
            sort_keys=True,
        )
        if key not in self._estimates:
            self._estimates[key] = estimate_artifact_bytes(rs, margin=self.spec.constraint.margin)
        return self._estimates[key]

    def next_config(self) -> dict[str, Any] | None:
        """Sample until a stack fits (at most search.max_resample times); None = give up."""
        for _ in range(self.spec.search.max_resample):
            ot = self.study.ask()
            n = ot.number
            point = space_mod.sample(self.loaded.dims, ot)
            text = space_mod.describe_point(point)
            try:
                rs = stack_from_dict(
                    self.trial_stack_data(point, n), source=f"trial t{n:04d}", base_dir=self.dir
                )
                est = self.estimate(rs)
            except PgolfError as e:
                self._reject(ot, "invalid", point, text, None, str(e))
                continue
            except Exception as e:  # a technique that fails to build this point: not the study's end
                self._reject(ot, "invalid", point, text, None, f"{type(e).__name__}: {e}")
                continue
            if not est.fits:
                self._reject(ot, "infeasible", point, text, est, "", rs)
                continue
            try:
                prepare_data(rs.stack)
            except PgolfError as e:
                self._reject(ot, "invalid", point, text, est, str(e), rs)
                continue
            return self._launch(ot, point, text, rs, est)
        self.gave_up = True
        return None

    def _est_dict(self, est: SizeEstimate) -> dict[str, Any]:
        return {
            "model_bytes": est.model_bytes,
            "code_bytes": est.code_bytes,
            "margin": est.margin,
            "total": est.total,
            "limit": est.limit,
            "seconds": round(est.seconds, 3),
        }

    def _reject(
        self,
        ot: optuna.trial.Trial,
        state: str,
        point: dict[str, Any],
        text: str,
        est: SizeEstimate | None,
        note: str,
        rs: ResolvedStack | None = None,
    ) -> None:
        ev: dict[str, Any] = {
            "number": ot.number,
            "state": state,
            "point": point,
            "point_text": text,
            "error": note,
        }
        if est is not None:
            ev["estimate"] = self._est_dict(est)
            ev["estimated_bytes"] = est.total
        if rs is not None:
            ev["stack"] = rs.to_dict()
        self.ledger.append(ev)
        self.records[ot.number] = {**ev, "finished_events": 1}
        # Told as PRUNED with a positive constraint: TPE ranks it below every feasible trial (by
        # how far over it is) and best_trial never picks it.
        # An invalid point counts as twice the limit.
        bad = self.violation(est.total) if est is not None and state == "infeasible" else 1.0
        ot.set_constraint("artifact_bytes", bad)
        self.study.tell(ot, state=TrialState.PRUNED)
        self.display.rejected(
            ot.number, state, text, est.total if est else None, note.splitlines()[0] if note else ""
        )

    def _launch(
        self, ot: optuna.trial.Trial, point: dict[str, Any], text: str, rs: ResolvedStack, est: SizeEstimate
    ) -> dict[str, Any]:
        n = ot.number
        gain_at_end = [r.name for r in rs.techniques if r.cls.gain_at_end]
        legality = {r.name: list(r.cls.legality) for r in rs.techniques if r.cls.legality}
        run_dir = (self.dir / "trials" / f"t{n:04d}").resolve()
        ev = {
            "number": n,
            "state": "running",
            "point": point,
            "point_text": text,
            "stack": rs.to_dict(),
            "estimate": self._est_dict(est),
            "estimated_bytes": est.total,
            "gain_at_end": gain_at_end,
            "legality": legality,
            "legal": not any("needs_review" in t for t in legality.values()),
            "run_dir": str(run_dir),
            "seeds": self.seeds,
        }
        self.ledger.append(ev)
        self.records[n] = {**ev, "finished_events": 0}
        self.live[n] = ot
        self.display.started(n, text + ("  (gain_at_end: not cut early)" if gain_at_end else ""), est.total)
        return {
            "number": n,
            "stack": rs.to_dict(),
            "run_dir": str(run_dir),
            "seeds": self.seeds,
            "steps_per_seed": self.steps_per_seed,
            "metric": self.metric,
            "gain_at_end": gain_at_end,
        }

    # -- results -------------------------------------------------------------------------------
    def on_result(self, number: int, result: Mapping[str, Any]) -> None:
        if result.get("final") or result.get("state") != "running":
            return
        step, value = int(result[TIME_ATTR]), float(result[METRIC])
        ot = self.live.get(number)
        if ot is not None and math.isfinite(value) and self.reported.get(number, -1) < step:
            ot.report(value, step)
            self.reported[number] = step
        self.display.progress(number, int(result.get("step", 0)), float(result.get("val_bpb", math.nan)))

    def finish(self, number: int, result: Mapping[str, Any] | None, error: bool) -> None:
        rec = self.records.get(number, {})
        ev: dict[str, Any] = {"number": number}
        cut = number in self.cut
        if error:
            ev.update(
                state="error", error="the trial's Ray worker failed (details follow when Ray reports them)"
            )
        elif result is None or (not result.get("final") and not cut):
            # ended by neither itself nor ASHA: the search was interrupted (Ctrl-C) before or while
            # it ran. The ledger keeps it "running"; --resume re-runs it.
            self.live.pop(number, None)
            self.display.finished(number, "interrupted", None, None, "re-run on --resume")
            return
        elif result.get("state") == "error":
            ev.update(state="error", error=str(result.get("error", "")), error_kind=result.get("error_kind"))
        elif result.get("final"):
            ev.update(state="complete")
            for k in (
                "val_bpb",
                "val_loss",
                "val_bpb_std",
                "val_loss_std",
                "artifact_bytes",
                "model_bytes",
                "code_bytes",
                "fits",
                "params_count",
                "steps",
                "tokens_per_second",
                "train_seconds",
                "objective",
                "n_seeds",
            ):
                if k in result:
                    ev[k] = result[k]
            est = rec.get("estimate") or {}
            if "artifact_bytes" in result and "total" in est:
                unmargined = int(est["total"]) - int(est.get("margin", 0))
                ev["estimate_error_bytes"] = int(result["artifact_bytes"]) - unmargined
                ev["estimate_error"] = ev["estimate_error_bytes"] / max(int(result["artifact_bytes"]), 1)
        else:
            ev.update(
                state="stopped",
                step=result.get("step"),
                val_bpb=result.get("val_bpb"),
                val_loss=result.get("val_loss"),
                objective=result.get(METRIC),
                error=f"stopped by ASHA at step {result.get('step')}",
            )
        ev[TIME_ATTR] = (result or {}).get(TIME_ATTR)
        self.ledger.append(ev)
        self.records[number] = {**rec, **ev, "finished_events": rec.get("finished_events", 0) + 1}
        self._tell_finished(number, self.records[number])
        self.live.pop(number, None)
        state = ev["state"]
        self.display.finished(
            number,
            state,
            ev.get("val_bpb"),
            ev.get("artifact_bytes"),
            "" if state == "complete" else str(ev.get("error", ""))[:80],
        )

    def _tell_finished(self, number: int, rec: Mapping[str, Any]) -> None:
        state = rec["state"]
        if state == "complete":
            size = rec.get("artifact_bytes")
            self._tell(
                number,
                TrialState.COMPLETE,
                value=rec.get("objective"),
                constraint=self.violation(int(size)) if size is not None else None,
            )
        elif state == "stopped":
            est = rec.get("estimated_bytes")
            self._tell(number, TrialState.PRUNED, constraint=self.violation(int(est)) if est else None)
        elif state in ("infeasible", "invalid"):
            est = rec.get("estimated_bytes")
            bad = self.violation(int(est)) if est and state == "infeasible" else 1.0
            self._tell(number, TrialState.PRUNED, constraint=bad)
        else:
            self._tell(number, TrialState.FAIL)

    def error_detail(self, number: int, message: str) -> None:
        self.ledger.append({"number": number, "error": message})
        self.records.setdefault(number, {})["error"] = message

    # -- resume ----------------------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Bring the ledger and Optuna in line after a driver that died; returns notes."""
        notes: list[str] = []
        open_in_optuna = {
            t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }
        for n, rec in list(self.records.items()):
            state = rec.get("state")
            if state == "running":
                saved = Path(rec.get("run_dir", "")) / TRIAL_RESULT
                result = _read_json(saved)
                if result is not None and result.get("final"):
                    self.finish(n, result, error=False)
                    notes.append(
                        f"t{n:04d} had finished before the driver died: kept ({result.get('state')})"
                    )
                    continue
                self.ledger.append(
                    {
                        "number": n,
                        "state": "interrupted",
                        "error": "the search stopped while it ran; its point is re-run",
                    }
                )
                self.records[n] = {
                    **rec,
                    "state": "interrupted",
                    "finished_events": rec.get("finished_events", 0) + 1,
                }
                self._tell(n, TrialState.FAIL)
                self.study.enqueue_trial(space_mod.encode_point(self.loaded.dims, rec.get("point", {})))
                notes.append(f"t{n:04d} was running when the search stopped: its point is queued again")
            elif state is not None and n in open_in_optuna:  # the driver died between ledger and tell
                self._tell_finished(n, rec)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in self.records:  # sampled, but the driver died before sizing it
                ev = {
                    "number": t.number,
                    "state": "interrupted",
                    "point": {},
                    "error": "sampled but not started when the search stopped",
                }
                self.ledger.append(ev)
                self.records[t.number] = {**ev, "finished_events": 1}
                self.study.tell(t.number, state=TrialState.FAIL)
        return notes

    def trained(self) -> int:
        return sum(1 for r in self.records.values() if r.get("state") in TRAINED)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Ray Tune pieces
# --------------------------------------------------------------------------------------------


class _Detached:
    """Tune pickles its config into tuner.pkl (for Tuner.restore, which we do not use): keep the
    live driver objects out of it."""

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class ConstrainedSearcher(_Detached, Searcher):
    """A Tune Searcher that asks the driver's :class:`StudyRunner` for sized, fitting stacks."""

    def __init__(self, runner: StudyRunner):
        super().__init__(metric=METRIC, mode="min")
        self.runner = runner
        self.numbers: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | None:
        cfg = self.runner.next_config()
        if cfg is None:
            return Searcher.FINISHED  # type: ignore[return-value]  # Tune's documented "no more trials"
        self.numbers[trial_id] = cfg["number"]
        return cfg

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        n = self.numbers.pop(trial_id, None)
        if n is not None:
            self.runner.finish(n, result, error)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(
            json.dumps({"note": "state lives in the Optuna storage and trials.jsonl"})
        )

    def restore(self, checkpoint_path: str) -> None:
        return None


class GainAwareASHA(_Detached, AsyncHyperBandScheduler):
    """ASHA on the intermediate objective, except that a trial whose stack has a technique with
    ``gain_at_end`` (EMA, QAT, warmdown, TTT) is never cut before its final report; its
    intermediate scores still count toward the other trials' cut-offs. An ``error`` result is
    not a score."""

    def __init__(self, *, on_cut: Callable[[int], None] | None = None, **kw: Any):
        super().__init__(**kw)
        self.on_cut = on_cut

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("state") == "error":
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and not result.get("final"):
            if trial.config.get("gain_at_end"):
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            if self.on_cut is not None:
                self.on_cut(int(trial.config["number"]))
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result.get("state") == "error":
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


class _DriverCallback(_Detached, tune.Callback):
    def __init__(self, runner: StudyRunner):
        self.runner = runner

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.runner.display.running(int(trial.config["number"]))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.runner.on_result(int(trial.config["number"]), result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        msg = "the trial's Ray worker failed"
        path = getattr(trial, "error_file", None)
        if path and Path(path).is_file():
            lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
            msg = lines[-1] if lines else msg
        self.runner.error_detail(int(trial.config["number"]), msg)


def _trial_name(trial: Any) -> str:
    return f"t{int(trial.config['number']):04d}"


def make_scheduler(
    loaded: LoadedSearch, steps_per_seed: int, on_cut: Callable[[int], None] | None = None
) -> TrialScheduler:
    s = loaded.spec.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    every = loaded.base.stack.train.val_loss_every
    grace = s.grace_period or max(every, 1)
    max_t = steps_per_seed * len(s.seeds) + 1  # never reached: the final report is not cut for size
    return GainAwareASHA(
        time_attr=TIME_ATTR,
        grace_period=min(grace, max_t),
        max_t=max_t,
        reduction_factor=s.reduction_factor,
        on_cut=on_cut,
    )


# --------------------------------------------------------------------------------------------
# Ray start-up
# --------------------------------------------------------------------------------------------


def _short_temp_dir(study_dir: Path) -> tuple[str, Path | None]:
    """Ray's temp dir inside the study folder, through a short /tmp link when the real path is
    too long for the Unix sockets Ray creates under it; returns (path, the link or None)."""
    target = (study_dir / RAY_DIR / "tmp").resolve()
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= MAX_SOCKET_DIR:
        return str(target), None
    link = Path(tempfile.gettempdir()) / f"pgolf-{hashlib.sha1(str(target).encode()).hexdigest()[:10]}"
    if link.is_symlink() and link.resolve() == target:
        return str(link), link
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return str(link), link


@contextlib.contextmanager
def _driver_messages_to(path: Path) -> Iterator[None]:
    """Ray's driver prints the errors the raylet publishes (e.g. "A worker died ...") to stdout
    even with log_to_driver=False; send them to a file in the study folder instead (the ledger
    records each failed trial with Ray's message)."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None:  # a Ray without this hook: nothing to redirect
        yield
        return

    def to_file(data: dict, ignore_prefix: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("\n".join(str(x) for x in data.get("lines", [])) + "\n")

    ray_worker.print_to_stdstream = to_file
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = original


@contextlib.contextmanager
def ray_session(study_dir: Path, address: str | None) -> Iterator[None]:
    """Start (or join) Ray quietly for the search; shut it down after if this started it."""
    if ray.is_initialized():  # e.g. a test session's Ray: use it as it is
        yield
        return
    kw: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    link = None
    if address:
        ray.init(address=address, **kw)
    else:
        tmp, link = _short_temp_dir(study_dir)
        ray.init(_temp_dir=tmp, **kw)
    try:
        yield
    finally:
        ray.shutdown()
        if link is not None and link.is_symlink():
            link.unlink()


def _concurrency(loaded: LoadedSearch) -> int:
    t, s = loaded.spec.trial, loaded.spec.search
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    if t.gpus > gpus:
        raise PgolfError(
            f"trial.gpus is {t.gpus:g} but the Ray cluster has {gpus:g} GPU(s); "
            "set trial.gpus: 0 to train on CPUs"
        )
    if t.cpus > cpus:
        raise PgolfError(f"trial.cpus is {t.cpus:g} but the Ray cluster has {cpus:g} CPU(s)")
    fit = int(gpus // t.gpus) if t.gpus > 0 else int(cpus // t.cpus)
    fit = min(fit, int(cpus // t.cpus)) if t.cpus > 0 else fit
    return max(1, min(fit, s.max_concurrent or fit))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _study_lock(study_dir: Path) -> Iterator[None]:
    f = (study_dir / ".lock").open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise PgolfError(f"another `pgolf search` is running on {str(study_dir)!r}") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def load_study_spec(study_dir: Path, overrides: list[str] | None = None) -> LoadedSearch:
    path = study_dir / SEARCH_FILE
    if not path.is_file():
        raise PgolfError(f"{str(study_dir)!r} is not a study folder (no {SEARCH_FILE})")
    loaded = load_search(path, overrides or [])
    saved = yaml.safe_load(path.read_text())
    if overrides:  # only the budget and resources may change when a study goes on
        now = yaml.safe_load(loaded.resolved_yaml())
        for key in ("stack", "space", "objective", "constraint", "storage", "study_name"):
            if now.get(key) != saved.get(key):
                raise PgolfError(
                    f"--set cannot change {key!r} of an existing study (only search.* budget "
                    "keys and trial.* resources); start a new study instead"
                )
        for key in ("seeds", "sampler", "scheduler", "start_with"):
            if now["search"].get(key) != saved["search"].get(key):
                raise PgolfError(f"--set cannot change search.{key} of an existing study")
        loaded.extra["overrides"] = list(overrides)
    return loaded


def run_search(
    loaded: LoadedSearch,
    study_dir: Path,
    *,
    address: str | None = None,
    resume: bool = False,
    console: Console | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run (or continue) a study in ``study_dir``; returns a summary dict."""
    study_dir.mkdir(parents=True, exist_ok=True)
    with _study_lock(study_dir), _Quiet():
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if not resume:
            (study_dir / SEARCH_FILE).write_text(
                f"# resolved search of {loaded.source} ({stamp})\n"
                + loaded.resolved_yaml(study_name=study_dir.name)
            )
            (study_dir / BASE_STACK_FILE).write_text(loaded.base.to_yaml())
        elif loaded.extra.get("overrides"):  # a new budget: the next --resume must see it too
            old = (study_dir / SEARCH_FILE).read_text().splitlines()[0]
            head = old if old.startswith("#") else "# resolved search"
            (study_dir / SEARCH_FILE).write_text(
                f"{head}\n# changed on resume ({stamp}): {' '.join(loaded.extra['overrides'])}\n"
                + loaded.resolved_yaml()
            )
        runner = StudyRunner(loaded, study_dir, console=console, quiet=quiet, resume=resume)
        notes = runner.reconcile() if resume else []
        if not resume:
            for point in loaded.spec.search.start_with:
                runner.study.enqueue_trial(space_mod.encode_point(loaded.dims, point))
        remaining = loaded.spec.search.num_samples - runner.trained()
        runner.display.resume_from(runner.records)
        summary: dict[str, Any] = {"study_dir": str(study_dir), "notes": notes, "ran": 0}
        if remaining <= 0:
            summary["message"] = f"all {loaded.spec.search.num_samples} trials are done"
            return summary
        prepare_data(loaded.base.stack)  # build or check the data once, before any trial
        with (
            _driver_messages_to(study_dir / RAY_DIR / "driver_messages.log"),
            ray_session(study_dir, address),
        ):
            conc = _concurrency(loaded)
            session = 1 + sum(1 for p in (study_dir / RAY_DIR).glob("session-*"))
            tuner = tune.Tuner(
                tune.with_resources(
                    train_trial, {"cpu": loaded.spec.trial.cpus, "gpu": loaded.spec.trial.gpus}
                ),
                tune_config=tune.TuneConfig(
                    metric=METRIC,
                    mode="min",
                    search_alg=ConstrainedSearcher(runner),
                    scheduler=make_scheduler(loaded, runner.steps_per_seed, runner.cut.add),
                    num_samples=remaining,
                    max_concurrent_trials=conc,
                    reuse_actors=True,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=f"session-{session}",
                    storage_path=str((study_dir / RAY_DIR).resolve()),
                    verbose=0,
                    callbacks=[_DriverCallback(runner)],
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
            if loaded.spec.search.scheduler == "asha" and not loaded.base.stack.train.val_loss_every:
                notes.append(
                    "train.val_loss_every is 0: no intermediate scores, so ASHA stops no trial early"
                )
            for note in notes:
                runner.display.note(note)
            runner.display.start()
            try:
                tuner.fit()
            finally:
                runner.display.stop()
        summary.update(
            ran=remaining,
            trained=runner.trained(),
            gave_up=runner.gave_up,
            num_samples=loaded.spec.search.num_samples,
        )
        return summary
