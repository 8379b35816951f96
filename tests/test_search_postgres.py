"""A tiny study on a real PostgreSQL server (Debian's package; .ci/run installs it): killed with
SIGKILL mid-way and resumed, every finished trial kept once; the password never lands in the
study's files or output; Optuna's trials in the database match the ledger. Both `pgolf search`
calls join the test session's Ray cluster (conftest's ``ray_cluster``): what is tested here is
the storage, not Ray's start-up (tests/test_search_e2e.py kills and resumes a study on its own Ray).

The server is started here on 127.0.0.1 (a throw-away cluster in a temporary folder, as the
``postgres`` user when the tests run as root, which initdb refuses to be)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RayCluster

from pgolf.search.ledger import Ledger

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-pw"
NUM_SAMPLES = 3  # killed after the first is complete: the resume trains the others


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not installed; .ci/run installs Debian's postgresql"
        )
    pytest.importorskip("psycopg", reason="pgolf[postgres] (psycopg 3) is not installed")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="pgolf-pg-", dir="/tmp"))
    if os.geteuid() == 0:  # initdb will not run as root: run the server as the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "golfer", "--no-sync"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
         f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", "start"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=golfer dbname=postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE studies")
        yield f"postgresql://golfer:{PASSWORD}@127.0.0.1:{port}/studies"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


def _stack(cache: Path) -> dict[str, Any]:
    return {
        "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
        "model": {"num_layers": 1, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
        "train": {"train_seq_len": 128, "train_batch_tokens": 1024, "micro_batch_tokens": 1024, "iterations": 12,
                  "max_wallclock_seconds": 0, "warmdown_iters": 4, "warmup_steps": 0, "val_loss_every": 6},
        "eval": {"batch_tokens": 8192},
        "data": {"cache_dir": str(cache)},
    }  # fmt: skip


def test_study_on_postgres_survives_kill_and_resume(
    postgres_url: str, cache_dir: Path, tmp_path: Path, ray_cluster: RayCluster
) -> None:
    import optuna

    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import prepare_data

    prepare_data(stack_from_dict(_stack(cache_dir)).stack)
    search = {
        "name": "pg",
        "stack": _stack(cache_dir),
        "space": {"optim.matrix_lr": {"logfloat": [0.01, 0.1]}, "techniques.ema": {"optional": True}},
        "trial": {"gpus": 0, "cpus": 1},
        "search": {"num_samples": NUM_SAMPLES, "max_concurrent": 1, "size_workers": 0},
        "storage": postgres_url,
    }
    spec, out = tmp_path / "pg.yaml", tmp_path / "study"
    spec.write_text(yaml.safe_dump(search))
    ledger = Ledger(out / "trials.jsonl")
    log = (tmp_path / "first.log").open("w")
    cli = [sys.executable, "-m", "pgolf.registry.tools.cli", "search", "--address", ray_cluster.address]
    cmd = [*cli, str(spec), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while not any(r.get("state") == "complete" for r in ledger.records().values()):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.5)
        before = {n: r for n, r in ledger.records().items() if r.get("state") == "complete"}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    r = subprocess.run(
        [*cli, "--resume", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    recs = ledger.records()
    for n, rec in before.items():
        assert recs[n]["state"] == "complete" and recs[n]["val_bpb"] == rec["val_bpb"]
    assert all(rec["finished_events"] == 1 for rec in recs.values())
    assert sum(1 for rec in recs.values() if rec["state"] in ("complete", "stopped", "error")) == NUM_SAMPLES
    # the password is nowhere in the study's files or output, except the secret file
    saved = (out / "search.yaml").read_text()
    assert PASSWORD not in saved and "golfer:***@127.0.0.1" in saved
    assert (out / ".storage_url").stat().st_mode & 0o777 == 0o600
    # (nor in Ray's logs of the processes that ran the study: the cluster's temp dir)
    for f in [*out.rglob("*"), *ray_cluster.temp_dir.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):  # a log Ray removed meanwhile
            if f.is_file() and f.name != ".storage_url" and f.stat().st_size < 5_000_000:
                assert PASSWORD.encode() not in f.read_bytes(), f
    assert PASSWORD not in r.stdout + r.stderr + (tmp_path / "first.log").read_text()
    # Optuna's view in PostgreSQL matches the ledger
    study = optuna.load_study(study_name="study", storage=optuna.storages.RDBStorage(postgres_url))
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    done = {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert done == {n for n, rec in recs.items() if rec["state"] == "complete"}
    assert all(
        "artifact_bytes" in t.user_attrs and "val_bpb" in t.user_attrs
        for t in study.trials
        if t.number in done
    )
    # and optuna-dashboard, pointed at the database, lists them with bytes and val_bpb
    from test_search_e2e import dashboard_trials

    shown = dashboard_trials(postgres_url, "study")
    assert set(shown) == {t.number for t in study.trials}
    for n in done:
        assert {"artifact_bytes", "val_bpb", "pgolf_state"} <= set(shown[n]["user_attrs"])
