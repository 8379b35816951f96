"""A tiny search on CPU, end to end, through the CLI (the Done-when list of the search issue):

* a sampled stack too large for the constraint is rejected without training;
* a deliberately failing trial is recorded while the others finish;
* a trial whose worker process dies (what the kernel's OOM killer does) is an error, not the end,
  and Ray's message about it goes to a log file, not to the output;
* the study is killed (SIGKILL to its whole process group) and resumed: every trial that had
  finished is kept, exactly once, and not re-run;
* results table, CSV, PNG and best-stack YAML are written, and that YAML runs with `pgolf run`.

All of it is one study, run by `pgolf search` in its own process the way a user runs it on one
box: each session starts and stops its own Ray, and the SIGKILL takes that Ray down with the
driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from conftest import counted_code_bytes

from pgolf.search.ledger import Ledger

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LIMIT = 300_000 + counted_code_bytes()  # the width-64 model (~222 KB) fits, width 128 (~546 KB) does not
NUM_SAMPLES = 7

EXPLODE = '''"""Explode: raise at the start of training when model_dim equals at_dim (a test-only technique)."""
import os

from pydantic import Field

from pgolf.registry import Params, Technique, hook, register


class ExplodeParams(Params):
    at_dim: int = Field(48, description="the model width that fails")
    die_flag: str = Field("", description="a file: the first other trial to take it (renames it) exits its process")


@register("explode")
class Explode(Technique):
    """Explode: raise at the start of training when model_dim equals at_dim (tests only)."""

    Params = ExplodeParams

    @hook
    def on_train_start(self, model):
        if self.spec.model_dim == self.params.at_dim:
            raise RuntimeError("exploded on purpose")
        if self.params.die_flag:
            try:
                os.rename(self.params.die_flag, self.params.die_flag + ".taken")
            except FileNotFoundError:
                return
            os._exit(3)  # the worker dies, as when the OOM killer ends it
'''


def tiny_stack(cache: Path, **extra: Any) -> dict[str, Any]:
    return {
        "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
        "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
        "train": {
            "train_seq_len": 128,
            "train_batch_tokens": 2048,
            "micro_batch_tokens": 1024,
            "iterations": 12,  # three ASHA rungs (a report every 4 steps) in ~2 s of training
            "max_wallclock_seconds": 0,
            "warmdown_iters": 4,
            "warmup_steps": 0,
            "val_loss_every": 4,
        },
        "eval": {"batch_tokens": 8192},
        "data": {"cache_dir": str(cache)},
        **extra,
    }


def pgolf(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgolf.registry.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 300),
        **kw,
    )


@pytest.fixture(scope="module")
def corpus_cache(cache_dir: Path) -> Path:
    """The embedded default corpus in the session's cache (conftest), built before Ray starts."""
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import prepare_data

    prepare_data(stack_from_dict(tiny_stack(cache_dir)).stack)
    return cache_dir


def _trained(ledger: Ledger) -> dict[int, dict[str, Any]]:
    return {n: r for n, r in ledger.records().items() if r.get("state") in ("complete", "stopped", "error")}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, corpus_cache: Path) -> SimpleNamespace:
    """Run the search, kill it once three trials are done (one of them complete), resume it; keep
    what each phase saw."""
    work = tmp_path_factory.mktemp("search")
    (work / "explode.py").write_text(EXPLODE)
    (work / "die.flag").write_text("")  # exactly one trial's worker dies
    search = {
        "name": "e2e",
        "stack": tiny_stack(
            corpus_cache, plugins=["explode.py"], techniques={"explode": {"die_flag": str(work / "die.flag")}}
        ),
        "space": {
            "model.model_dim": {"choice": [48, 64, 128]},  # 48 explodes, 128 cannot fit
            "optim.matrix_lr": {"logfloat": [0.02, 0.08]},
            "techniques.ema": {"optional": True},
            "techniques.ema.decay": {"float": [0.9, 0.99]},
        },
        "constraint": {"artifact_bytes": LIMIT},
        "trial": {"gpus": 0, "cpus": 1},
        "search": {
            "num_samples": NUM_SAMPLES,
            "max_concurrent": 2,
            "sampler_seed": 1,
            "start_with": [{"model.model_dim": 128}, {"model.model_dim": 48}],
        },
    }
    spec = work / "search.yaml"
    spec.write_text(yaml.safe_dump(search, sort_keys=False))
    out = work / "study"
    ledger = Ledger(out / "trials.jsonl")

    t0 = time.perf_counter()
    log = (work / "first.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgolf.registry.tools.cli", "search", str(spec), "--out", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=work,
    )
    try:
        deadline = time.time() + 240
        while len(_trained(ledger)) < 3 or not any(
            r["state"] == "complete" for r in _trained(ledger).values()
        ):
            assert proc.poll() is None, (work / "first.log").read_text()
            assert time.time() < deadline, "the search did not finish 3 trials, one complete, in time"
            time.sleep(0.5)
        before_kill = _trained(ledger)
        mtimes = {
            n: Path(out, r["run_dir"], "seed_1337", "result.json").stat().st_mtime_ns
            for n, r in before_kill.items()
            if r["state"] == "complete"
        }
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(timeout=60)
        log.close()
    t_kill = time.perf_counter() - t0
    at_kill = ledger.records()

    t1 = time.perf_counter()
    resumed = pgolf("search", "--resume", str(out), cwd=work)
    t_resume = time.perf_counter() - t1
    return SimpleNamespace(
        dir=out,
        work=work,
        ledger=ledger,
        before_kill=before_kill,
        at_kill=at_kill,
        mtimes=mtimes,
        resumed=resumed,
        t_kill=t_kill,
        t_resume=t_resume,
    )


def test_resumed_search_finishes_quietly(study: SimpleNamespace) -> None:
    r = study.resumed
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""  # no Ray or Optuna noise
    assert "resumed" in r.stdout and "best:" in r.stdout
    print(f"\nfirst session until kill: {study.t_kill:.1f}s, resumed session: {study.t_resume:.1f}s")


def test_too_large_stack_is_rejected_without_training(study: SimpleNamespace) -> None:
    import optuna

    recs = study.ledger.records()
    rejected = [r for r in recs.values() if r["state"] == "infeasible"]
    assert rejected, "the enqueued width-128 point must be rejected"
    first = recs[0]  # the first enqueued point: model_dim 128
    assert first["state"] == "infeasible" and first["point"]["model.model_dim"] == 128
    for r in rejected:
        n = r["number"]
        assert r["estimated_bytes"] > LIMIT and r["estimate"]["seconds"] < 30
        assert not (study.dir / "trials" / f"t{n:04d}").exists()  # no run folder: nothing trained
        assert not list((study.dir / "ray").glob(f"session-*/t{n:04d}"))  # never a Ray trial
    storage = optuna.storages.RDBStorage(f"sqlite:///{study.dir / 'optuna.db'}")
    ot = optuna.load_study(study_name="study", storage=storage).trials[0]
    assert ot.state == optuna.trial.TrialState.PRUNED and ot.constraints["artifact_bytes"] > 0


def test_failing_trial_is_recorded_and_others_finish(study: SimpleNamespace) -> None:
    recs = study.ledger.records()
    errors = [r for r in recs.values() if r["state"] == "error" and r.get("error_kind") != "worker_died"]
    assert errors and all("exploded on purpose" in r["error"] for r in errors)
    assert all(r["point"]["model.model_dim"] == 48 for r in errors)
    n = errors[0]["number"]
    assert "exploded on purpose" in (study.dir / "trials" / f"t{n:04d}" / "error.txt").read_text()
    complete = [r for r in recs.values() if r["state"] == "complete"]
    assert complete and all(r["fits"] and r["artifact_bytes"] <= LIMIT for r in complete)
    assert all(isinstance(r.get("estimate_error_bytes"), int) for r in complete)  # recorded per trial


def test_resume_keeps_every_finished_trial_once(study: SimpleNamespace) -> None:
    import optuna

    recs = study.ledger.records()
    for n, before in study.before_kill.items():  # finished before the kill: kept as they were
        assert recs[n]["state"] == before["state"] and recs[n].get("val_bpb") == before.get("val_bpb")
    for n, mtime in study.mtimes.items():  # and not re-run
        assert Path(study.dir, recs[n]["run_dir"], "seed_1337", "result.json").stat().st_mtime_ns == mtime
    assert all(r["finished_events"] == 1 for r in recs.values()), "a trial finished twice"
    trained = [r for r in recs.values() if r["state"] in ("complete", "stopped", "error")]
    assert len(trained) == NUM_SAMPLES
    # what was running at the kill either had finished (its trial_result.json was written just
    # before the kill: adopted, not re-run) or is re-run under a new number with the same point
    for n in (n for n, r in study.at_kill.items() if r.get("state") == "running"):
        r = recs[n]
        if r["state"] == "interrupted":
            assert any(o["number"] > n and o["point"] == r["point"] for o in trained)
        else:
            assert r["state"] in ("complete", "error")
            assert (study.dir / r["run_dir"] / "trial_result.json").is_file()
    storage = optuna.storages.RDBStorage(f"sqlite:///{study.dir / 'optuna.db'}")
    trials = optuna.load_study(study_name="study", storage=storage).trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(trials) == len(recs)
    complete = {r["number"] for r in recs.values() if r["state"] == "complete"}
    assert {t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE} == complete


def test_results_files_and_best_stack_runs(
    study: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    for f in ("results.csv", "pareto.png", "best_stack.yaml", "search.yaml", "optuna.db"):
        assert (study.dir / f).is_file(), f
    from pgolf.registry.tools.cli import main

    capsys.readouterr()
    assert main(["results", str(study.dir), "--csv", str(study.work / "again.csv")]) == 0  # in this process
    shown = capsys.readouterr().out
    assert "val_bpb" in shown and "infeasible" in shown and "error" in shown
    rows = (study.work / "again.csv").read_text().splitlines()
    assert len(rows) == 1 + len(study.ledger.records())
    best = yaml.safe_load((study.dir / "best_stack.yaml").read_text())
    best_rec = min(
        (r for r in study.ledger.records().values() if r["state"] == "complete"), key=lambda r: r["val_bpb"]
    )
    assert best["name"].endswith(f"t{best_rec['number']:04d}")
    out = study.work / "best_run"
    # the best stack keeps what the trial ran with (one torch thread: trial.cpus = 1), so a plain
    # `pgolf run` reproduces it bit for bit on CPU
    assert best["train"]["threads"] == 1
    r = pgolf("run", str(study.dir / "best_stack.yaml"), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["artifact_bytes"] <= LIMIT
    # same stack, same seed, same threads: the trial's score again
    assert result["val_bpb"] == pytest.approx(best_rec["val_bpb"], abs=1e-6)


def test_a_trial_whose_process_dies_is_recorded(study: SimpleNamespace) -> None:
    """A worker killed from outside (what the kernel's OOM killer does) is an error, not the end."""
    died = [r for r in study.ledger.records().values() if r.get("error_kind") == "worker_died"]
    assert len(died) == 1, died  # the trial that took the flag; the study went on after it
    assert died[0]["state"] == "error" and "worker process has died" in died[0]["error"]
    assert died[0]["point"]["model.model_dim"] != 48 and (study.work / "die.flag.taken").is_file()
    for text in ((study.work / "first.log").read_text(), study.resumed.stdout):
        assert "raylet" not in text and "Worker exit" not in text  # Ray's message went to a log file
    assert "worker" in (study.dir / "ray" / "driver_messages.log").read_text().lower()


def test_repeat_then_compare(corpus_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pgolf.registry.tools.cli import main

    stack = tmp_path / "tiny.yaml"
    stack.write_text(yaml.safe_dump(tiny_stack(corpus_cache)))
    args = ["--set", "train.iterations=6", "--set", "train.val_loss_every=0"]
    a = tmp_path / "a"
    assert main(["repeat", str(stack), "--seeds", "2", "--out", str(a), *args]) == 0
    assert sorted(p.name for p in a.iterdir()) == ["seed_1337", "seed_1338"]
    assert "2 seeds (1337, 1338)" in capsys.readouterr().out
    assert main(["repeat", str(stack), "--seeds", "2", "--out", str(a), *args]) == 0  # done seeds are kept
    assert "kept earlier results for seed(s) 1337, 1338" in capsys.readouterr().out
    b = tmp_path / "b"
    assert (
        main(
            [
                "repeat",
                str(stack),
                "--seed-list",
                "7,8",
                "--out",
                str(b),
                *args,
                "--set",
                "optim.matrix_lr=0.0",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in b.iterdir()) == ["seed_7", "seed_8"]
    rc = main(["compare", str(a), "--vs", str(b), "--json", str(tmp_path / "c.json")])
    assert rc in (0, 1) and "Welch one-sided" in capsys.readouterr().out
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["n_a"] == 2 and d["n_b"] == 2 and d["mean_a"] < d["mean_b"]  # training beats lr 0


def dashboard_trials(storage_url: str, study_name: str) -> dict[int, dict[str, Any]]:
    """Start optuna-dashboard on loopback against ``storage_url`` and read the study's trials back
    from its API: {number: {"state": ..., "user_attrs": {key: value}}}."""
    import shutil
    import socket
    import urllib.request

    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).parent / "optuna-dashboard")
    if not Path(exe).is_file():
        pytest.skip("optuna-dashboard is not installed (it is in pgolf's dev extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [exe, storage_url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                body = json.loads(urllib.request.urlopen(f"{url}/api/studies", timeout=5).read())
                studies = body["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "optuna-dashboard did not start"
                time.sleep(0.5)
        sid = next(s["study_id"] for s in studies if s["study_name"] == study_name)
        detail = json.loads(urllib.request.urlopen(f"{url}/api/studies/{sid}", timeout=10).read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        t["number"]: {"state": t["state"], "user_attrs": {a["key"]: a["value"] for a in t["user_attrs"]}}
        for t in detail["trials"]
    }


def test_optuna_dashboard_lists_the_trials_with_pgolf_attributes(study: SimpleNamespace) -> None:
    """The documented set-up: `optuna-dashboard sqlite:///STUDY/optuna.db` on loopback; its API
    lists every trial, with bytes and val_bpb, and tells size rejections from ASHA cuts."""
    trials = dashboard_trials(f"sqlite:///{study.dir / 'optuna.db'}", "study")
    recs = study.ledger.records()
    assert set(trials) == set(recs)
    for n, rec in recs.items():
        attrs = trials[n]["user_attrs"]
        assert attrs["pgolf_state"] == rec["state"], (n, attrs)
        if rec["state"] == "complete":
            assert "artifact_bytes" in attrs and "val_bpb" in attrs and attrs["run_dir"] == f"trials/t{n:04d}"
        if rec["state"] == "infeasible":
            assert attrs["pruned_by"] == "size_gate" and "estimated_bytes" in attrs
