"""``pgolf search``: Ray Tune runs the trials, Optuna samples them, the driver sizes them first.

The flow of one sample, all driven from the driver process::

    Optuna ask ─► sample the space (define-by-run) ─► build and validate the trial's stack
      ─► size gate (search/sizing.py): cached layout / analytic bound / estimate job (Ray task)
      ─► too large: tell Optuna (set_constraint, PRUNED, user attrs), log it, sample again
      ─► fits: hand the stack to Ray Tune, which runs ``train_trial`` when resources free up
      ─► intermediate val_bpb ─► ASHA (never cuts a gain_at_end trial, the reference trial, or
         a trial at the end of its training)
      ─► final result, error, timeout ─► ledger, Optuna tell (value + real-size constraint)

Estimates run in the background while trials train: the controller's every step collects
finished estimates and keeps ``search.size_workers`` of them in flight, so that a free GPU finds
a sized stack waiting. A watchdog kills a trial that runs past ``trial.timeout_seconds``.
SIGINT and SIGTERM stop the study gracefully (exit 130 / 143).
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
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
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
from pgolf.registry.run.pipeline import prepare_data  # noqa: E402

from . import sizing  # noqa: E402
from . import space as space_mod  # noqa: E402
from .display import Display  # noqa: E402
from .ledger import LEDGER_NAME, TRAINED, Ledger, rel_path, run_path  # noqa: E402
from .spec import LoadedSearch, load_search  # noqa: E402
from .storage import SECRET_FILE, has_password, keep_secret, open_storage, redact, resolve_url  # noqa: E402
from .trainable import TIME_ATTR, TRIAL_RESULT, train_trial  # noqa: E402

SEARCH_FILE = "search.yaml"
BASE_STACK_FILE = "base_stack.yaml"
RAY_DIR = "ray"
MAX_SOCKET_DIR = 40  # Ray adds ~62 characters under its temp dir; Unix socket paths stop at 107
METRIC = "objective"
NOT_READY: dict[str, Any] = {}  # next_config: nothing sized yet, ask again
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

# user attributes every Optuna trial carries (optuna-dashboard shows them)
USER_ATTRS = ("pgolf_state", "artifact_bytes", "estimated_bytes", "estimate_method", "val_loss",
              "val_bpb", "fits", "legal", "run_dir", "error_kind", "pruned_by")  # fmt: skip


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


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def shorten(text: str, width: int = 80) -> str:
    """One line of at most ``width`` characters, cut at a word boundary."""
    line = " ".join(str(text).split())
    return textwrap.shorten(line, width=width, placeholder=" …") if len(line) > width else line


# --------------------------------------------------------------------------------------------
# The driver's state: Optuna study, ledger, size gate, display
# --------------------------------------------------------------------------------------------


def _sampler(loaded: LoadedSearch, seed: int) -> optuna.samplers.BaseSampler:
    s = loaded.spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        # Explicit: Optuna 5 changed TPE's defaults. group=True models each branch of the
        # conditional (define-by-run) space separately; constant_liar keeps concurrent
        # suggestions apart.
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.n_startup_trials, multivariate=True, group=True, constant_liar=True
        )


def storage_url(loaded: LoadedSearch, study_dir: Path) -> str:
    return resolve_url(loaded.spec.storage, study_dir)


def _steps_per_seed(loaded: LoadedSearch) -> int:
    """An upper bound of a run's steps, for the trial clock (seed index x this + step)."""
    hi = loaded.base.stack.train.iterations
    for d in loaded.dims:
        if d.key == "train.iterations":
            hi = max(int(d.high or 0), *(int(c) for c in d.choices if isinstance(c, int)), hi)
    return max(hi, 1)


def trial_timeout(loaded: LoadedSearch) -> float | None:
    """``trial.timeout_seconds``, or its default: seeds x (1.25 x the training cap + 900 s)
    when trials have a wall-clock cap (compile, export and a 10-minute evaluation fit in the
    900 s), none otherwise; 0 means none."""
    t = loaded.spec.trial
    if t.timeout_seconds is not None:
        return t.timeout_seconds or None
    cap = t.max_wallclock_seconds
    if cap is None:
        cap = loaded.base.stack.train.max_wallclock_seconds
    if not cap:
        return None
    return len(loaded.spec.search.seeds) * (1.25 * cap + 900.0)


@dataclass
class Sample:
    """A sampled point on its way through the size gate."""

    ot: optuna.trial.Trial
    point: dict[str, Any]
    text: str
    rs: ResolvedStack
    layout: sizing.Layout | None = None
    est: sizing.Estimate | None = None

    @property
    def fixed(self) -> bool:
        """A queued point (search.start_with, or re-queued on resume): launched before any
        freshly sampled one, whatever order the parallel estimates finish in."""
        return "fixed_params" in self.ot.storage.get_trial_system_attrs(self.ot._trial_id)


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
        self.multi = self.spec.objective.multi_objective
        self.seeds = list(self.spec.search.seeds)
        self.threads = max(1, int(self.spec.trial.cpus))
        self.steps_per_seed = _steps_per_seed(loaded)
        self.timeout = trial_timeout(loaded)
        self.ledger = Ledger(study_dir / LEDGER_NAME)
        self.console = console
        self.live: dict[int, optuna.trial.Trial] = {}
        self.reported: dict[int, int] = {}
        self.gave_up = False
        self.cut: set[int] = set()  # trials ASHA decided to stop
        self.timed_out: set[int] = set()
        self.started_at: dict[int, float] = {}
        self.study_name = self.spec.study_name or study_dir.name
        self.url = storage_url(loaded, study_dir)
        self.storage = open_storage(self.url)
        self.study = self._open_study(resume)
        self.records = self.ledger.records()
        c = self.spec.constraint
        self.gate = sizing.SizeGate(
            self.limit, c.margin, slack=c.prefilter_slack, proxy_after_seconds=c.proxy_after_seconds
        )
        self.gate.seed_from(self.records.values())
        self.sizer: sizing.Runner = sizing.InlineRunner()
        self.ready: deque[Sample] = deque()
        self.pending: dict[int, Sample] = {}  # id(job) -> sample
        self.jobs: dict[int, sizing.Job] = {}
        self.rejected_in_a_row = 0
        self.to_launch = self.spec.search.num_samples
        self.points_only = self.spec.search.points_only
        self.exhausted = False  # points_only: every queued point has been asked for
        self._data_checked: set[str] = set()
        self.sizing_seconds = 0.0  # driver time spent deciding sizes (not the parallel jobs)
        self.stop: StopSignal | None = None
        self.display = Display(console, total=self.spec.search.num_samples, limit=self.limit, quiet=quiet)

    # -- Optuna ----------------------------------------------------------------------------------
    def _open_study(self, resume: bool) -> optuna.Study:
        seed = self.spec.search.sampler_seed
        directions: list[optuna.study.StudyDirection] = [optuna.study.StudyDirection.MINIMIZE] * (
            2 if self.multi else 1
        )
        if resume:
            try:
                n = len(optuna.load_study(study_name=self.study_name, storage=self.storage).trials)
            except KeyError:
                raise PgolfError(f"no Optuna study {self.study_name!r} in {redact(self.url)}") from None
            # a different seed per session: replaying the first session's random draws would
            # propose its startup points again
            return optuna.load_study(
                study_name=self.study_name, storage=self.storage, sampler=_sampler(self.loaded, seed + n)
            )
        try:
            return optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                directions=directions,
                sampler=_sampler(self.loaded, seed),
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise PgolfError(
                f"an Optuna study named {self.study_name!r} already exists in {redact(self.url)}; "
                "continue it with --resume or choose another study_name"
            ) from None

    def _trial_id(self, number: int) -> int | None:
        t = self.live.get(number)
        if t is not None:
            return int(t._trial_id)
        trials = self.study.get_trials(deepcopy=False)
        return int(trials[number]._trial_id) if number < len(trials) else None

    def set_attrs(self, number: int, attrs: Mapping[str, Any]) -> None:
        """User attributes of a running Optuna trial (optuna-dashboard shows them)."""
        tid = self._trial_id(number)
        if tid is None:
            return
        if self.storage.get_trial(tid).state.is_finished():
            return
        for k, v in attrs.items():
            v = _clean(v)
            if v is not None:
                self.storage.set_trial_user_attr(tid, k, v)

    def _attrs_of(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        state = rec.get("state")
        return {
            "pgolf_state": state,
            "artifact_bytes": rec.get("artifact_bytes"),
            "estimated_bytes": rec.get("estimated_bytes"),
            "estimate_method": (rec.get("estimate") or {}).get("method"),
            "val_loss": rec.get("val_loss"),
            "val_bpb": rec.get("val_bpb"),
            "fits": rec.get("fits"),
            "legal": rec.get("legal"),
            "run_dir": rec.get("run_dir"),
            "error_kind": rec.get("error_kind") or None,
            "pruned_by": {"infeasible": "size_gate", "invalid": "invalid", "stopped": "asha"}.get(str(state)),
        }

    def _tell(
        self,
        number: int,
        state: TrialState,
        value: float | None = None,
        constraint: float | None = None,
        size: int | None = None,
        legal: bool | None = None,
    ) -> None:
        """Tell Optuna a trial's end (a no-op when Optuna already knows it). An illegal run
        (``legal`` False: a legality probe failed) is infeasible, so best_trial never picks it."""
        trial = self.live.get(number)
        if trial is None:  # a trial of an earlier session (resume)
            frozen = self.study.get_trials(deepcopy=False)[number]
            if frozen.state != TrialState.RUNNING:
                return
            trial = optuna.trial.Trial(self.study, frozen._trial_id)
        if constraint is not None:
            trial.set_constraint("artifact_bytes", constraint)
        if legal is not None:
            trial.set_constraint("legal", 0.0 if legal else 1.0)
        if state == TrialState.COMPLETE and value is not None and math.isfinite(value):
            if self.multi:
                self.study.tell(trial, [value, float(size if size is not None else math.inf)])
            else:
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

    def attach_sizer(self, runner: sizing.Runner) -> None:
        self.sizer = runner

    def _is_reference(self, point: Mapping[str, Any]) -> bool:
        """A sample that is one of ``search.start_with`` (the reference point): never cut."""
        return any(
            all(point.get(k) == v for k, v in ref.items()) for ref in self.spec.search.start_with if ref
        )

    def point_text(self, point: Mapping[str, Any]) -> str:
        """How a point is shown in the live table and the ledger."""
        return space_mod.describe_point(point)

    def queued(self) -> int:
        """Points queued in Optuna (start_with, re-queued on resume) and not yet asked for."""
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def budget(self) -> int:
        """Trials still to launch: ``num_samples`` less those trained; with ``points_only`` at
        most the points still queued."""
        left = max(self.spec.search.num_samples - self.trained(), 0)
        return min(left, self.queued()) if self.points_only else left

    def _sample_one(self) -> None:
        """Ask Optuna for one point and push it through the fast part of the gate."""
        t0 = time.perf_counter()
        if self.points_only and not self.queued():  # never sample: the points are the study
            self.exhausted = True
            return
        ot = self.study.ask()
        n = ot.number
        point = space_mod.sample(self.loaded.dims, ot)
        text = self.point_text(point)
        try:
            rs = stack_from_dict(self.trial_stack_data(point, n), source=f"trial t{n:04d}", base_dir=self.dir)
            smp = Sample(ot, point, text, rs)
            if self.loaded.eval_only:
                smp.est = None
                self._decided(smp)
                return
            smp.layout = sizing.layout(rs)
            est = self.gate.fast(rs, smp.layout)
        except PgolfError as e:
            self._reject(ot, "invalid", point, text, None, str(e))
            return
        except Exception as e:  # a technique that fails to build this point: not the study's end
            self._reject(ot, "invalid", point, text, None, f"{type(e).__name__}: {e}")
            return
        finally:
            self.sizing_seconds += time.perf_counter() - t0
        if est is not None:
            smp.est = est
            self._decided(smp)
            return
        job = self.gate.job(rs, smp.layout)
        self._submit(job, smp)

    def _submit(self, job: sizing.Job, smp: Sample) -> None:
        self.pending[id(job)] = smp
        self.jobs[id(job)] = job
        self.sizer.submit(job)

    def _collect(self, timeout: float = 0.0) -> None:
        for job, result in self.sizer.poll(timeout):
            if job.kind == "calibrate":  # teaches the proxy; no sample waits on it
                if not isinstance(result, BaseException):
                    self.gate.absorb(job, result)
                continue
            smp = self.pending.pop(id(job), None)
            self.jobs.pop(id(job), None)
            if smp is None:
                continue
            t0 = time.perf_counter()
            if isinstance(result, BaseException):
                msg = str(result) if isinstance(result, PgolfError) else f"{type(result).__name__}: {result}"
                self._reject(smp.ot, "invalid", smp.point, smp.text, None, msg)
                continue
            out = self.gate.absorb(job, result)
            if isinstance(out, sizing.Job):
                self._submit(out, smp)
            elif out is not None:
                smp.est = out
                calib = self.gate.calibration_job(job)
                if calib is not None:
                    self.sizer.submit(calib)  # no sample waits on it
                self._decided(smp)
            self.sizing_seconds += time.perf_counter() - t0

    def _decided(self, smp: Sample) -> None:
        est = smp.est
        if est is not None and not est.fits:
            self._reject(smp.ot, "infeasible", smp.point, smp.text, est, "", smp.rs)
            return
        data_key = json.dumps(smp.rs.stack.data.model_dump(mode="json"), sort_keys=True)
        if data_key not in self._data_checked:
            try:
                prepare_data(smp.rs.stack)
            except PgolfError as e:
                self._reject(smp.ot, "invalid", smp.point, smp.text, est, str(e), smp.rs)
                return
            self._data_checked.add(data_key)
        self.rejected_in_a_row = 0
        self.ready.append(smp)

    def pump(self, wait: float = 0.0) -> None:
        """Collect finished estimates and keep the gate busy: ask for more samples while fewer
        are sized and waiting than ``search.size_workers`` (and than trials still to launch),
        with at most that many estimates in flight."""
        self._collect(wait)
        workers = max(1, self.spec.search.size_workers)
        # points_only: every point will be trained, so size them all ahead (a point held back,
        # e.g. behind pgolf ablate's full stack, must not keep the others from being asked for)
        want = (
            self.to_launch if self.points_only else min(self.to_launch, workers if self.sizer.parallel else 1)
        )
        while not (self.gave_up or self.exhausted) and len(self.ready) < want and len(self.pending) < workers:
            if self.rejected_in_a_row >= self.spec.search.max_resample and not self.points_only:
                self.gave_up = True
                break
            self._sample_one()
            self._collect(0.0)

    def next_config(self, wait: float = 0.0) -> dict[str, Any] | None:
        """A sized stack that fits, as a Tune config; ``NOT_READY`` while estimates run; None
        when the search gives up (``search.max_resample`` rejections in a row) or is done."""
        if self.to_launch <= 0:
            return None
        deadline = time.perf_counter() + wait
        while True:
            self.pump()
            smp = self._next_ready()
            if smp is not None:
                self.to_launch -= 1
                return self._launch(smp)
            if not self.pending and not self.ready:
                if self.exhausted:  # points_only: every point launched or rejected
                    return None
                if self.gave_up or (
                    self.rejected_in_a_row >= self.spec.search.max_resample and not self.points_only
                ):
                    self.gave_up = True
                    return None
                continue  # instant rejections only: sample again
            left = deadline - time.perf_counter()
            if left <= 0:
                return NOT_READY
            if self.pending:
                self._collect(min(left, 0.5))
            else:  # sized samples held back by _next_ready: wait, do not spin
                time.sleep(min(left, 0.5))

    def _next_ready(self) -> Sample | None:
        """The sample to launch: queued points first, in order; a fresh sample waits while a
        queued point is still being sized (so that it cannot take the queued point's place)."""
        if not self.ready:
            return None
        fixed = [s for s in self.ready if s.fixed]
        if fixed:
            pick = min(fixed, key=lambda s: s.ot.number)
        elif any(s.fixed for s in self.pending.values()):
            return None
        else:
            pick = min(self.ready, key=lambda s: s.ot.number)
        self.ready.remove(pick)
        return pick

    def _reject(
        self,
        ot: optuna.trial.Trial,
        state: str,
        point: dict[str, Any],
        text: str,
        est: sizing.Estimate | None,
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
            ev["estimate"] = est.to_dict()
            ev["estimated_bytes"] = est.total
        if rs is not None:
            ev["stack"] = rs.to_dict()
        self.ledger.append(ev)
        self.records[ot.number] = {**ev, "finished_events": 1}
        self.rejected_in_a_row += 1
        # Told as PRUNED with a positive constraint: TPE ranks it below every feasible trial (by
        # how far over it is) and best_trial never picks it. An invalid point counts as twice
        # the limit.
        bad = self.violation(est.total) if est is not None and state == "infeasible" else 1.0
        self.set_attrs(ot.number, self._attrs_of(ev))
        ot.set_constraint("artifact_bytes", bad)
        self.study.tell(ot, state=TrialState.PRUNED)
        how = f" ({est.method})" if est is not None else ""
        self.display.rejected(
            ot.number, state, text + how, est.total if est else None, shorten(note) if note else ""
        )

    def summary_extras(self) -> dict[str, Any]:
        """Keys added to :func:`run_search`'s summary."""
        return {}

    def launch_extras(self, smp: Sample) -> dict[str, Any]:
        """Keys added to a launched trial's ledger event and to its trainable config."""
        return {}

    def _launch(self, smp: Sample) -> dict[str, Any]:
        ot, point, text, rs, est = smp.ot, smp.point, smp.text, smp.rs, smp.est
        n = ot.number
        gain_at_end = [r.name for r in rs.techniques if r.cls.gain_at_end]
        legality = {r.name: list(r.cls.legality) for r in rs.techniques if r.cls.legality}
        run_dir = self.dir / "trials" / f"t{n:04d}"
        reference = self._is_reference(point)
        ev: dict[str, Any] = {
            "number": n,
            "state": "running",
            "point": point,
            "point_text": text,
            "stack": rs.to_dict(),
            "gain_at_end": gain_at_end,
            "legality": legality,
            "legal": not any({"needs_review", "illegal"} & set(t) for t in legality.values()),
            "run_dir": rel_path(run_dir, self.dir),
            "seeds": self.seeds,
            "reference": reference,
        }
        if est is not None:
            ev.update(estimate=est.to_dict(), estimated_bytes=est.total)
        extras = self.launch_extras(smp)
        ev.update(extras)
        self.ledger.append(ev)
        self.records[n] = {**ev, "finished_events": 0}
        self.live[n] = ot
        self.set_attrs(n, self._attrs_of(ev))
        cuts = self.spec.search.scheduler == "asha" and not self.loaded.eval_only  # FIFO cuts nothing
        notes = [
            s
            for s, on in (("gain_at_end: not cut early", gain_at_end and cuts), ("reference", reference))
            if on
        ]
        self.display.started(
            n, text + (f"  ({'; '.join(notes)})" if notes else ""), est.total if est else None
        )
        cfg: dict[str, Any] = {
            "number": n,
            "stack": rs.to_dict(),
            "run_dir": str(run_dir.resolve()),
            "seeds": self.seeds,
            "steps_per_seed": self.steps_per_seed,
            "metric": self.metric,
            "gain_at_end": gain_at_end,
            "protect": reference,
        }
        if self.loaded.eval_only:
            cfg.update(mode="eval", runs=[str(r) for r in self.loaded.eval_runs], point=point)
        cfg.update(extras)
        return cfg

    def leftovers(self) -> int:
        """Close the samples sized but never launched (the budget was spent, or the study
        stopped): ``unused`` in the ledger, FAIL in Optuna; --resume samples their points first."""
        smps = list(self.ready) + list(self.pending.values())
        self.sizer.cancel_all()
        self.ready.clear()
        self.pending.clear()
        self.jobs.clear()
        for smp in smps:
            n = smp.ot.number
            ev = {
                "number": n,
                "state": "unused",
                "point": smp.point,
                "point_text": smp.text,
                "error": "sampled but never trained: the study stopped or had launched all its trials",
            }
            if smp.est is not None:
                ev.update(estimate=smp.est.to_dict(), estimated_bytes=smp.est.total)
            self.ledger.append(ev)
            self.records[n] = {**ev, "finished_events": 1}
            self.set_attrs(n, {"pgolf_state": "unused"})
            self.study.tell(smp.ot, state=TrialState.FAIL)
        return len(smps)

    # -- results -------------------------------------------------------------------------------
    def on_result(self, number: int, result: Mapping[str, Any]) -> None:
        if result.get("final") or result.get("state") != "running":
            return
        step, value = int(result[TIME_ATTR]), float(result[METRIC])
        ot = self.live.get(number)
        if (
            ot is not None
            and math.isfinite(value)
            and self.reported.get(number, -1) < step
            and not self.multi
        ):
            ot.report(value, step)
            self.reported[number] = step
        self.display.progress(number, int(result.get("step", 0)), float(result.get("val_bpb", math.nan)))

    def finish(self, number: int, result: Mapping[str, Any] | None, error: bool) -> None:
        rec = self.records.get(number, {})
        ev: dict[str, Any] = {"number": number}
        cut = number in self.cut
        if number in self.timed_out:
            ev.update(
                state="timeout",
                error_kind="timeout",
                error=f"killed after {self.timeout:.0f} s (trial.timeout_seconds)",
            )
        elif error:
            ev.update(
                state="error",
                error_kind="worker_died",
                error=rec.get("error") or "the trial's Ray worker failed",
            )
        elif result is None or (not result.get("final") and not cut):
            # ended by neither itself nor ASHA: the search was interrupted (Ctrl-C, SIGTERM)
            # before or while it ran. The ledger keeps it "running"; --resume re-runs it.
            self.live.pop(number, None)
            self.display.finished(number, "interrupted", None, None, "re-run on --resume")
            return
        elif result.get("state") == "error":
            ev.update(
                state="error",
                error=str(result.get("error", "")),
                error_kind=result.get("error_kind") or "exception",
            )
        elif result.get("final"):
            objective = result.get("objective")
            finite = isinstance(objective, (int, float)) and math.isfinite(objective)
            ev.update(state="complete" if finite else "error")
            if not finite:
                ev.update(
                    error_kind="non_finite", error=f"the final {self.metric} is {objective} (not finite)"
                )
            for k in ("val_bpb", "val_loss", "val_bpb_std", "val_loss_std", "artifact_bytes", "model_bytes",
                      "code_bytes", "fits", "params_count", "steps", "tokens_per_second", "train_seconds",
                      "objective", "n_seeds", "legal", "legal_reasons"):  # fmt: skip
                if k in result:
                    ev[k] = result[k]
            est = rec.get("estimate") or {}
            if finite and "artifact_bytes" in result and "total" in est:
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
            ev.get("val_bpb") if state in ("complete", "stopped") else None,
            ev.get("artifact_bytes"),
            _end_note(ev),
            ev.get("legal") if state == "complete" else None,
        )

    def _tell_finished(self, number: int, rec: Mapping[str, Any]) -> None:
        state = rec["state"]
        self.set_attrs(number, self._attrs_of(rec))
        if state == "complete":
            size = rec.get("artifact_bytes")
            self._tell(
                number,
                TrialState.COMPLETE,
                value=rec.get("objective"),
                constraint=self.violation(int(size)) if size is not None else None,
                size=size,
                legal=rec.get("legal"),
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
        if number in self.timed_out:  # Ray's "killed by ray.kill" says less than the timeout does
            return
        self.ledger.append({"number": number, "error": message})
        self.records.setdefault(number, {})["error"] = message

    # -- the watchdog --------------------------------------------------------------------------
    def check_timeouts(self, trials: list[Any]) -> None:
        """Kill the Ray actor of every trial that has run past ``trial.timeout_seconds`` (a
        trial hung inside a step never reports, so this cannot wait for it)."""
        if not self.timeout:
            return
        now = time.time()
        for trial in trials:
            if trial.status != "RUNNING":
                continue
            n = int(trial.config["number"])
            t0 = self.started_at.get(n)
            if t0 is None or n in self.timed_out or now - t0 < self.timeout:
                continue
            actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
            if actor is None:
                continue
            self.timed_out.add(n)
            ray.kill(actor, no_restart=True)

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
                saved = run_path(rec.get("run_dir", ""), self.dir) / TRIAL_RESULT
                result = _read_json(saved)
                if result is not None and result.get("final"):
                    self.finish(n, result, error=False)
                    notes.append(
                        f"t{n:04d} had finished before the driver died: kept ({self.records[n].get('state')})"
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
                self.set_attrs(n, {"pgolf_state": "interrupted"})
                self._tell(n, TrialState.FAIL)
                self.study.enqueue_trial(space_mod.encode_point(self.loaded.dims, rec.get("point", {})))
                notes.append(f"t{n:04d} was running when the search stopped: its point is queued again")
            elif state == "unused" and not rec.get("requeued"):
                self.study.enqueue_trial(space_mod.encode_point(self.loaded.dims, rec.get("point", {})))
                self.ledger.append({"number": n, "requeued": True})
                self.records[n]["requeued"] = True
            elif state is not None and n in open_in_optuna:  # the driver died between ledger and tell
                self._tell_finished(n, rec)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in self.records:  # sampled, but the driver died before sizing it
                fixed = t.system_attrs.get("fixed_params")
                ev = {
                    "number": t.number,
                    "state": "interrupted",
                    "point": {},
                    "error": "sampled but not started when the search stopped"
                    + ("; its queued point is queued again" if fixed else ""),
                }
                self.ledger.append(ev)
                self.records[t.number] = {**ev, "finished_events": 1}
                self.storage.set_trial_user_attr(t._trial_id, "pgolf_state", "interrupted")
                self.study.tell(t.number, state=TrialState.FAIL)
                if fixed:  # a start_with point (or one queued on an earlier resume) is never lost
                    self.study.enqueue_trial(dict(fixed))
                    notes.append(
                        f"t{t.number:04d} was being sized when the search stopped: its point is queued again"
                    )
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
    """A Tune Searcher that asks the driver's :class:`StudyRunner` for sized, fitting stacks.
    While estimates are still running it answers None (Tune asks again at its next step)."""

    def __init__(self, runner: StudyRunner):
        super().__init__(metric=METRIC, mode="min")
        self.runner = runner
        self.numbers: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | None:
        cfg = self.runner.next_config(wait=0.5)
        if cfg is NOT_READY:
            return None
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


def _protected(trial: Any, result: Mapping[str, Any]) -> bool:
    """Reports ASHA must never cut on: a gain_at_end stack, the reference (start_with) trial,
    and a report at the end of the trial's training (its final score follows)."""
    cfg = trial.config
    return bool(cfg.get("gain_at_end") or cfg.get("protect") or result.get("last"))


class GainAwareASHA(_Detached, AsyncHyperBandScheduler):
    """ASHA on the intermediate objective, except that a protected trial or report (see
    :func:`_protected`) is never cut before its final report; its intermediate scores still
    count toward the other trials' cut-offs. An ``error`` result is not a score."""

    def __init__(self, *, on_cut: Callable[[int], None] | None = None, **kw: Any):
        super().__init__(**kw)
        self.on_cut = on_cut

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("state") == "error":
            return TrialScheduler.CONTINUE
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and not result.get("final"):
            if _protected(trial, result):
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

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.runner.stop is not None:
            self.runner.stop.chain_tune()
        self.runner.pump()  # keep estimates going while every trial slot is busy
        self.runner.check_timeouts(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        n = int(trial.config["number"])
        self.runner.started_at[n] = time.time()
        self.runner.display.running(n)

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
    if s.scheduler == "fifo" or loaded.eval_only:
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
# Ray start-up, the cluster check, signals
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
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            tmp, link = _short_temp_dir(study_dir)
            ray.init(_temp_dir=tmp, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PgolfError(
            f"cannot start or join Ray{f' at {address}' if address else ''}: {shorten(str(e), 200)}"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()
        if link is not None and link.is_symlink():
            link.unlink()


def _probe(path: str, token: str) -> dict[str, Any]:
    """Runs on one node: can it read the token the driver wrote, and write next to it?"""
    import socket

    here = Path(path)
    out: dict[str, Any] = {"host": socket.gethostname(), "ok": False}
    try:
        out["read"] = (here / "token").read_text() == token
        probe = here / f"from-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
        out["ok"] = bool(out["read"])
        if not out["read"]:
            out["why"] = "the token file holds something else (another folder at the same path)"
    except OSError as e:
        out["why"] = f"{type(e).__name__}: {e.strerror or e}"
    return out


def check_nodes_see(study_dir: Path, timeout: float = 120.0) -> list[str]:
    """Run a probe on every alive Ray node: each must read a token the driver just wrote into
    the study folder and write there (trials write their run folders into it). Returns one
    line per node that cannot; [] when all can."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1 and not ray.get_runtime_context().gcs_address:
        return []
    folder = (study_dir / ".node_check").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    (folder / "token").write_text(token)
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    refs = {
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        ).remote(str(folder), token): n
        for n in nodes
    }
    bad: list[str] = []
    try:
        ready, missing = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            node = refs[ref]
            try:
                res = ray.get(ref)
            except Exception as e:
                res = {"ok": False, "why": f"the probe failed: {shorten(str(e), 120)}"}
            if not res.get("ok"):
                bad.append(f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:8]}): {res.get('why')}")
        for ref in missing:
            node = refs[ref]
            bad.append(
                f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:8]}): no answer in {timeout:.0f} s"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return bad


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


class StopSignal:
    """SIGINT / SIGTERM while the study runs: remember which, and let Ray Tune stop gracefully.
    Inside ``Tuner.fit`` Tune's own SIGINT handler finishes the step and returns; this wraps it
    (:meth:`chain_tune`, from the first controller step) to note the signal, and turns SIGTERM
    into that SIGINT. Outside fit a signal raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}
        self._tune: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signum
        if signum == signal.SIGTERM and first:
            os.kill(os.getpid(), signal.SIGINT)  # Tune's own graceful stop (or KeyboardInterrupt)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def chain_tune(self) -> None:
        """Wrap the SIGINT handler Tune installed for this fit (once per fit)."""
        current = signal.getsignal(signal.SIGINT)
        if current in (self._handler, self._wrapped) or not callable(current):
            return
        self._tune = current
        signal.signal(signal.SIGINT, self._wrapped)

    def _wrapped(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        tune_handler, self._tune = self._tune, None
        signal.signal(signal.SIGINT, self._handler)  # a second Ctrl-C stops at once
        if callable(tune_handler):
            tune_handler(signum, frame)

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.received), 1) if self.received else 0


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
        for key in ("stack", "space", "objective", "constraint", "storage", "study_name", "eval_only"):
            if now.get(key) != saved.get(key):
                raise PgolfError(
                    f"--set cannot change {key!r} of an existing study (only search.* budget "
                    "keys and trial.* resources); start a new study instead"
                )
        for key in ("seeds", "sampler", "scheduler", "start_with", "warm_start"):
            if now["search"].get(key) != saved["search"].get(key):
                raise PgolfError(f"--set cannot change search.{key} of an existing study")
        loaded.extra["overrides"] = list(overrides)
    return loaded


def _write_spec(loaded: LoadedSearch, study_dir: Path, stamp: str, url: str) -> None:
    text = f"# resolved search of {loaded.source} ({stamp})\n" + loaded.resolved_yaml(
        study_name=study_dir.name, storage=redact(loaded.spec.storage) if loaded.spec.storage else None
    )
    (study_dir / SEARCH_FILE).write_text(text)
    if has_password(url):
        keep_secret(url, study_dir)


def _end_note(ev: Mapping[str, Any]) -> str:
    """What the live display says after a trial's state: its error, or why it is not legal."""
    if ev["state"] != "complete":
        return shorten(str(ev.get("error", "")))
    if ev.get("legal") is False:
        return "NOT LEGAL: " + shorten("; ".join(ev.get("legal_reasons") or ["a legality probe failed"]))
    return ""


def warm_start(runner: StudyRunner) -> list[str]:
    """Add the finished trials of earlier studies to this study's Optuna storage (COMPLETE with
    their value and size constraint; infeasible samples PRUNED with theirs), so the sampler
    starts from what they learned. Points outside this space are skipped."""
    from .results import load_study

    dims = {d.key: d for d in runner.loaded.dims}
    dists = space_mod.distributions(runner.loaded.dims)
    notes: list[str] = []
    for folder in runner.spec.search.warm_start:
        p = Path(folder).expanduser()
        p = p if p.is_absolute() else Path(runner.loaded.source).parent / p
        old = load_study(p)
        added = skipped = 0
        for row in old.rows:
            if row.state not in ("complete", "infeasible") or not row.point:
                continue
            if any(k not in dims or not dims[k].contains(v) for k, v in row.point.items()):
                skipped += 1
                continue
            params = space_mod.encode_point(runner.loaded.dims, row.point)
            size = row.artifact_bytes if row.state == "complete" else row.estimated_bytes
            attrs = {"pgolf_state": "imported", "imported_from": f"{p} {row.name}", "artifact_bytes": size,
                     "val_bpb": row.val_bpb}  # fmt: skip
            system = {"constraints:artifact_bytes": runner.violation(size) if size else 1.0}
            if row.legal is False:  # an illegal run stays infeasible for the sampler
                system["constraints:legal"] = 1.0
            if row.state == "complete" and row.objective is not None and math.isfinite(row.objective):
                values = [row.objective, float(size or math.inf)] if runner.multi else [row.objective]
                t = optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    values=values,
                    user_attrs={k: v for k, v in attrs.items() if v is not None},
                    system_attrs=system,
                )
            else:
                t = optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    state=TrialState.PRUNED,
                    user_attrs={k: v for k, v in attrs.items() if v is not None},
                    system_attrs=system,
                )
            runner.study.add_trial(t)
            n = len(runner.study.trials) - 1
            ev = {"number": n, "state": "imported", "point": row.point, "point_text": space_mod.describe_point(row.point),
                  "from": f"{p} {row.name}", "objective": row.objective, "val_bpb": row.val_bpb,
                  "artifact_bytes": size}  # fmt: skip
            runner.ledger.append(ev)
            runner.records[n] = {**ev, "finished_events": 1}
            added += 1
        notes.append(
            f"warm start: {added} finished trials of {p} added to the sampler"
            + (f" ({skipped} outside this space skipped)" if skipped else "")
        )
    return notes


@dataclass
class _Made:
    """What a new study created, to remove if it fails before its first sample."""

    dir_created: bool
    files: list[Path]


def run_search(
    loaded: LoadedSearch,
    study_dir: Path,
    *,
    address: str | None = None,
    resume: bool = False,
    console: Console | None = None,
    quiet: bool = False,
    runner_cls: type[StudyRunner] | None = None,
    prepare: Callable[[Path], Path] | None = None,
) -> dict[str, Any]:
    """Run (or continue) a study in ``study_dir``; returns a summary dict (``exit_code`` 130 or
    143 when a signal stopped it). A new study that fails before its first sample (storage,
    Ray, data) leaves nothing behind. ``runner_cls``: a :class:`StudyRunner` subclass that
    decides more (``pgolf ablate``'s); ``prepare``: writes a file of a new study that the runner
    reads (``pgolf ablate``'s plan) into the folder and returns its path."""
    made = _Made(not study_dir.exists(), [])
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _study_lock(study_dir), _Quiet():
            if prepare is not None and not resume:
                made.files.append(prepare(study_dir))
            return _run_search(
                loaded, study_dir, address, resume, console, quiet, made, runner_cls or StudyRunner
            )
    except BaseException:
        if not resume and not (study_dir / LEDGER_NAME).exists():
            if made.dir_created:
                shutil.rmtree(study_dir, ignore_errors=True)
            else:
                for f in [*made.files, study_dir / ".lock", study_dir / RAY_DIR]:
                    shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        raise


def _run_search(
    loaded: LoadedSearch,
    study_dir: Path,
    address: str | None,
    resume: bool,
    console: Console | None,
    quiet: bool,
    made: _Made,
    runner_cls: type[StudyRunner],
) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if resume and loaded.extra.get("overrides"):  # a new budget: the next --resume must see it too
        old = (study_dir / SEARCH_FILE).read_text().splitlines()[0]
        head = old if old.startswith("#") else "# resolved search"
        (study_dir / SEARCH_FILE).write_text(
            f"{head}\n# changed on resume ({stamp}): {' '.join(loaded.extra['overrides'])}\n"
            + loaded.resolved_yaml(storage=redact(loaded.spec.storage) if loaded.spec.storage else None)
        )
    runner = runner_cls(loaded, study_dir, console=console, quiet=quiet, resume=resume)  # opens the storage
    notes: list[str] = []
    if not resume:
        made.files += [study_dir / SEARCH_FILE, study_dir / BASE_STACK_FILE, study_dir / SECRET_FILE]
        _write_spec(loaded, study_dir, stamp, runner.url)
        (study_dir / BASE_STACK_FILE).write_text(loaded.base.to_yaml())
        if loaded.spec.storage is None:
            made.files.append(study_dir / "optuna.db")
        notes += warm_start(runner)
        for point in loaded.spec.search.start_with:
            runner.study.enqueue_trial(space_mod.encode_point(loaded.dims, point))
    else:
        notes += runner.reconcile()
    remaining = runner.budget()
    runner.to_launch = remaining
    runner.display.resume_from(runner.records)
    summary: dict[str, Any] = {"study_dir": str(study_dir), "notes": notes, "ran": 0, "exit_code": 0}
    confirm_left = _confirm_pending(runner)
    if remaining <= 0 and not confirm_left:
        summary["message"] = f"all {loaded.spec.search.num_samples} trials are done"
        return summary
    if loaded.eval_only:
        for r in loaded.eval_runs:
            prepare_data(stack_from_dict(yaml.safe_load((r / "stack.yaml").read_text())).stack)
    else:
        prepare_data(loaded.base.stack)  # build or check the data once, before any trial
    stop = StopSignal()
    runner.stop = stop
    with (
        _driver_messages_to(study_dir / RAY_DIR / "driver_messages.log"),
        ray_session(study_dir, address),
    ):
        stop.install()  # after ray.init, which sets its own SIGTERM handler
        try:
            blind = check_nodes_see(study_dir) if address else []
            if blind:
                raise PgolfError(
                    f"{len(blind)} Ray node(s) cannot see the study folder {str(study_dir.resolve())!r}, "
                    "where trials write their runs: " + "; ".join(blind) + ". Put the study folder "
                    "on storage every node mounts at the same path (NFS, a cluster file system) and "
                    "pass it with --out, or run the search on one node."
                )
            conc = _concurrency(loaded)
            runner.attach_sizer(sizing.make_runner(loaded.spec.search.size_workers))
            for note in notes:
                runner.display.note(note)
            if remaining > 0:
                if loaded.spec.search.scheduler == "asha" and not loaded.base.stack.train.val_loss_every:
                    runner.display.note(
                        "train.val_loss_every is 0: no intermediate scores, so ASHA stops no trial early"
                    )
                _fit(runner, study_dir, conc, remaining, stop)
            if not stop.received and loaded.spec.search.confirm_top_k:
                _confirm(runner, study_dir, conc, stop)
        except KeyboardInterrupt:
            stop.received = stop.received or signal.SIGINT
        finally:
            runner.leftovers()
            runner.display.stop()
            stop.restore()
    summary.update(
        ran=remaining,
        trained=runner.trained(),
        gave_up=runner.gave_up,
        num_samples=loaded.spec.search.num_samples,
        exit_code=stop.exit_code,
        signal=signal.Signals(stop.received).name if stop.received else None,
        sizing=dict(runner.gate.counts),
        sizing_seconds=runner.sizing_seconds,
        **runner.summary_extras(),
    )
    return summary


def _tuner(runner: StudyRunner, study_dir: Path, search_alg: Searcher, scheduler: TrialScheduler,
           num: int, conc: int, name: str) -> tune.Tuner:  # fmt: skip
    spec = runner.spec
    return tune.Tuner(
        tune.with_resources(train_trial, {"cpu": spec.trial.cpus, "gpu": spec.trial.gpus}),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num,
            max_concurrent_trials=conc,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str((study_dir / RAY_DIR).resolve()),
            verbose=0,
            callbacks=[_DriverCallback(runner)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def _fit(runner: StudyRunner, study_dir: Path, conc: int, remaining: int, stop: StopSignal) -> None:
    session = 1 + sum(1 for p in (study_dir / RAY_DIR).glob("session-*"))
    tuner = _tuner(
        runner,
        study_dir,
        ConstrainedSearcher(runner),
        make_scheduler(runner.loaded, runner.steps_per_seed, runner.cut.add),
        remaining,
        conc,
        f"session-{session}",
    )
    runner.display.start()
    tuner.fit()


# --------------------------------------------------------------------------------------------
# Top-k confirmation
# --------------------------------------------------------------------------------------------


def confirm_candidates(runner: StudyRunner) -> list[int]:
    """The best ``confirm_top_k`` complete trials that fit, plus the reference trial."""
    k = runner.spec.search.confirm_top_k
    done = [
        (float(r["objective"]), n)
        for n, r in runner.records.items()
        if r.get("state") == "complete" and r.get("fits") and isinstance(r.get("objective"), (int, float))
    ]
    picked = [n for _, n in sorted(done)[:k]]
    ref = [n for n, r in runner.records.items() if r.get("reference") and r.get("state") == "complete"]
    return picked + [n for n in ref[:1] if n not in picked]


def _confirm_pending(runner: StudyRunner) -> list[tuple[int, list[int]]]:
    """(trial, seeds still to run) for the confirmation."""
    if not runner.spec.search.confirm_top_k or not runner.spec.search.confirm_seeds:
        return []
    out = []
    for n in confirm_candidates(runner):
        rd = run_path(runner.records[n].get("run_dir", ""), runner.dir)
        missing = [
            s for s in runner.spec.search.confirm_seeds if not (rd / f"seed_{s}" / "result.json").is_file()
        ]
        if missing:
            out.append((n, missing))
    return out


class _ConfirmSearcher(_Detached, Searcher):
    def __init__(self, runner: StudyRunner, todo: list[tuple[int, list[int]]]):
        super().__init__(metric=METRIC, mode="min")
        self.runner, self.todo = runner, list(todo)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if not self.todo:
            return Searcher.FINISHED  # type: ignore[return-value]
        n, seeds = self.todo.pop(0)
        rec = self.runner.records[n]
        self.runner.display.note(f"t{n:04d} confirmation on seeds {', '.join(map(str, seeds))}")
        return {
            "number": n,
            "stack": rec["stack"],
            "run_dir": str(run_path(rec["run_dir"], self.runner.dir).resolve()),
            "seeds": seeds,
            "steps_per_seed": self.runner.steps_per_seed,
            "metric": self.runner.metric,
            "confirm": True,
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get("final") and "number" in result:
            self.runner.ledger.append(
                {
                    "number": int(result["number"]),
                    "confirm_seeds": result.get("seeds"),
                    "confirm_state": result.get("state"),
                    "confirm_error": result.get("error", ""),
                }
            )

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text("{}")

    def restore(self, checkpoint_path: str) -> None:
        return None


def _confirm(runner: StudyRunner, study_dir: Path, conc: int, stop: StopSignal) -> None:
    todo = _confirm_pending(runner)
    if not todo:
        return
    session = 1 + sum(1 for p in (study_dir / RAY_DIR).glob("confirm-*"))
    tuner = _tuner(
        runner,
        study_dir,
        _ConfirmSearcher(runner, todo),
        FIFOScheduler(),
        len(todo),
        conc,
        f"confirm-{session}",
    )
    tuner.fit()


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


def dry_run(
    loaded: LoadedSearch,
    samples: int,
    *,
    workers: int | None = None,
    check: bool = False,
    on_decision: Callable[[int, str, sizing.Estimate | None, str], None] | None = None,
) -> dict[str, Any]:
    """Sample ``samples`` points uniformly (Optuna's random sampler, ``search.sampler_seed``),
    size each through the gate, train nothing. ``check``: also run a real estimate for every
    sample the analytic bound or the proxy decided, to measure their errors. Returns figures."""
    workers = loaded.spec.search.size_workers if workers is None else workers
    c = loaded.spec.constraint
    gate = sizing.SizeGate(
        c.artifact_bytes, c.margin, slack=c.prefilter_slack, proxy_after_seconds=c.proxy_after_seconds
    )
    limit = c.artifact_bytes
    base = dict(loaded.base_data)
    t_start = time.perf_counter()
    driver = 0.0
    decided: list[tuple[int, sizing.Estimate]] = []
    invalid = 0
    job_seconds: list[float] = []
    wrong: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pgolf-dry-") as tmp, _Quiet():
        study = optuna.create_study(
            sampler=optuna.samplers.RandomSampler(seed=loaded.spec.search.sampler_seed)
        )
        ctx = ray_session(Path(tmp), None) if workers > 0 else contextlib.nullcontext()
        with ctx:
            runner = sizing.make_runner(workers)
            waiting: dict[int, tuple[int, ResolvedStack, sizing.Layout]] = {}
            checks: dict[int, tuple[int, sizing.Estimate]] = {}

            def done(n: int, est: sizing.Estimate) -> None:
                decided.append((n, est))
                if on_decision:
                    on_decision(n, "fits" if est.fits else "infeasible", est, "")
                if check and est.method in ("analytic", "proxy"):
                    _rs = sample_rs[n]
                    job = sizing.Job("exact", _rs.to_dict(), str(_rs.base_dir), est_layout[n], _rs)
                    checks[id(job)] = (n, est)
                    runner.submit(job)

            sample_rs: dict[int, ResolvedStack] = {}
            est_layout: dict[int, sizing.Layout] = {}
            i = 0
            while i < samples or waiting or checks or runner.busy:
                while i < samples and runner.capacity() > 0:
                    t0 = time.perf_counter()
                    ot = study.ask()
                    point = space_mod.sample(loaded.dims, ot)
                    data = space_mod.apply(base, point)
                    data.setdefault("export", {})["artifact_limit"] = limit
                    data.setdefault("train", {})["threads"] = 1
                    try:
                        rs = stack_from_dict(data, source=f"sample {i}", base_dir=Path(loaded.source).parent)
                        lay = sizing.layout(rs)
                        est = gate.fast(rs, lay)
                    except Exception as e:
                        invalid += 1
                        if on_decision:
                            on_decision(i, "invalid", None, shorten(str(e)))
                        study.tell(ot, state=TrialState.FAIL)
                        i += 1
                        driver += time.perf_counter() - t0
                        continue
                    study.tell(ot, state=TrialState.FAIL)
                    sample_rs[i], est_layout[i] = rs, lay
                    if est is not None:
                        done(i, est)
                    else:
                        job = gate.job(rs, lay)
                        waiting[id(job)] = (i, rs, lay)
                        runner.submit(job)
                    i += 1
                    driver += time.perf_counter() - t0
                for job, result in runner.poll(0.2 if workers else 0.0):
                    t0 = time.perf_counter()
                    if job.kind == "calibrate":
                        if not isinstance(result, BaseException):
                            gate.absorb(job, result)
                        continue
                    if id(job) in checks:
                        n, est = checks.pop(id(job))
                        if not isinstance(result, BaseException):
                            real = int(result["model_bytes"]) + int(result["code_bytes"]) + c.margin
                            if (real <= limit) != est.fits:
                                wrong.append(f"sample {n}: {est.method} said {est.total:,}, real {real:,}")
                        continue
                    n, rs, lay = waiting.pop(id(job), (None, None, None))  # type: ignore[assignment]
                    if n is None:
                        continue
                    if isinstance(result, BaseException):
                        invalid += 1
                        if on_decision:
                            on_decision(n, "invalid", None, shorten(str(result)))
                        continue
                    job_seconds.append(float(result["seconds"]))
                    out = gate.absorb(job, result)
                    if isinstance(out, sizing.Job):
                        waiting[id(out)] = (n, rs, lay)
                        runner.submit(out)
                    elif out is not None:
                        calib = gate.calibration_job(job)
                        if calib is not None:
                            runner.submit(calib)
                        done(n, out)
                    driver += time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    feasible = sum(1 for _, e in decided if e.fits)
    valid = len(decided)
    per_method = {m: sum(1 for _, e in decided if e.method == m) for m in sizing.METHODS}
    return {
        "samples": samples,
        "invalid": invalid,
        "sized": valid,
        "feasible": feasible,
        "feasible_fraction": feasible / valid if valid else 0.0,
        "methods": per_method,
        "estimate_seconds": job_seconds,
        "wall_seconds": wall,
        "driver_seconds": driver,
        "workers": workers,
        "seconds_per_feasible": wall / feasible if feasible else math.inf,
        "wrong_decisions": wrong if check else None,
    }
