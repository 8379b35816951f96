"""A study stopped the way Slurm, Kubernetes and a user stop it: SIGTERM and Ctrl-C (SIGINT)
end it gracefully — the ledger is finished, the results are written, the resume hint printed,
the exit status is 143 / 130 — and no Ray process outlives the driver. A trial that hangs
inside a step is killed after trial.timeout_seconds and recorded as ``timeout``."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgolf.search.ledger import Ledger

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

HANG = '''"""Hang: sleep inside training when model_dim equals at_dim (a test-only technique)."""
import time

from pydantic import Field

from pgolf.registry import Params, Technique, hook, register


class HangParams(Params):
    at_dim: int = Field(48, description="the model width that hangs")


@register("hang")
class Hang(Technique):
    """Hang: sleep inside training when model_dim equals at_dim (tests only)."""

    Params = HangParams

    @hook
    def on_train_start(self, model):
        if self.spec.model_dim == self.params.at_dim:
            time.sleep(3600)
'''


def _ray_processes(study: Path) -> list[str]:
    """Command lines of live processes that belong to this study's Ray (its temp dir)."""
    target = (study / "ray" / "tmp").resolve()
    marks = [str(target), f"pgolf-{hashlib.sha1(str(target).encode()).hexdigest()[:10]}"]
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in marks):
            out.append(f"{pid}: {cmd[:120]}")
    return out


def _wait(cond: Any, proc: subprocess.Popen[str], log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, log.read_text()
        assert time.time() < deadline, f"{what} did not happen in time:\n{log.read_text()}"
        time.sleep(0.3)


def _gone(study: Path, timeout: float = 30) -> list[str]:
    deadline = time.time() + timeout
    while _ray_processes(study) and time.time() < deadline:
        time.sleep(0.5)
    return _ray_processes(study)


def test_timeout_then_sigterm_then_sigint(cache_dir: Path, tmp_path: Path) -> None:
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import prepare_data

    stack = {
        "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
        "model": {"num_layers": 1, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
        "train": {"train_seq_len": 128, "train_batch_tokens": 1024, "micro_batch_tokens": 1024, "iterations": 400,
                  "max_wallclock_seconds": 0, "warmdown_iters": 4, "warmup_steps": 0, "val_loss_every": 0},
        "eval": {"batch_tokens": 8192},
        "data": {"cache_dir": str(cache_dir)},
        "plugins": ["hang.py"],
        "techniques": {"hang": {}},
    }  # fmt: skip
    (tmp_path / "hang.py").write_text(HANG)
    prepare_data(stack_from_dict({**stack, "plugins": [], "techniques": {}}).stack)
    search = {
        "stack": stack,
        "space": {"model.model_dim": {"choice": [48, 64]}, "optim.matrix_lr": {"logfloat": [0.01, 0.1]}},
        "trial": {"gpus": 0, "cpus": 1, "timeout_seconds": 8},
        "search": {"num_samples": 6, "max_concurrent": 2, "size_workers": 0, "scheduler": "fifo",
                   "start_with": [{"model.model_dim": 48}, {"model.model_dim": 64, "optim.matrix_lr": 0.02}]},
    }  # fmt: skip
    spec, out, log = tmp_path / "s.yaml", tmp_path / "study", tmp_path / "search.log"
    spec.write_text(yaml.safe_dump(search))
    ledger = Ledger(out / "trials.jsonl")
    cli = [sys.executable, "-m", "pgolf.registry.tools.cli", "search"]

    with log.open("w") as f:
        proc = subprocess.Popen([*cli, str(spec), "--out", str(out)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=tmp_path, text=True)  # fmt: skip
    try:
        _wait(lambda: ledger.records().get(0, {}).get("state") == "timeout", proc, log, "the timeout")
        proc.send_signal(signal.SIGTERM)  # what Slurm / Kubernetes send
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 143, text
    assert "Traceback" not in text and "stopped by SIGTERM" in text and f"pgolf search --resume {out}" in text
    assert (out / "results.csv").is_file() and "timeout" in (out / "results.csv").read_text()
    recs = ledger.records()
    assert recs[0]["state"] == "timeout" and recs[0]["error_kind"] == "timeout"
    assert not _gone(out), "Ray processes outlived the driver"

    log2 = tmp_path / "resume.log"
    with log2.open("w") as f:
        proc = subprocess.Popen([*cli, "--resume", str(out)], stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                                text=True)  # fmt: skip
    try:
        n0 = len(ledger.records())
        _wait(lambda: any(r.get("state") == "running" for n, r in ledger.records().items() if n >= n0),
              proc, log2, "a trial starting after the resume")  # fmt: skip
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log2.read_text()
    assert rc == 130, text
    assert "Traceback" not in text and "stopped by SIGINT" in text and "--resume" in text
    assert all(r["finished_events"] <= 1 for r in ledger.records().values())
    assert not _gone(out), "Ray processes outlived the driver"
