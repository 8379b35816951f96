"""`pgolf search --address` on a Ray cluster started with `ray start --head`: a study runs on it,
and a node that cannot see the study folder stops the search before any trial, with a message
that says what to share.

The blind node is a second `ray start` on this machine inside its own mount namespace
(``unshare -m``), where an empty tmpfs hides the study folder's parent. Ray runs one machine's
several nodes in its multi-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1), which addresses
them by this machine's interface address; the traffic stays on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import end_session, ray_ports, start_ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    if not RAY.is_file():
        pytest.skip("the `ray` command is not installed")
    if shutil.which("unshare") is None:
        pytest.skip("`unshare` (util-linux) is not installed: cannot make a node that does not see a folder")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not permitted here (unshare -m: {probe.stderr.decode().strip()})")
    tmp = Path(tempfile.mkdtemp(prefix="pgc-", dir="/tmp"))  # short: Ray's socket paths
    sessions: list[int] = []  # each `ray start` runs in a session of its own: its processes end with it
    try:
        address, sid = start_ray_head(tmp / "ray", env=ENV)
        sessions.append(sid)
        yield {"address": address, "tmp": tmp, "sessions": sessions}
    finally:
        left = [pid for sid in sessions for pid in end_session(sid)]
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes of the test's Ray nodes outlived it: {left}"


def _search(tmp: Path, cache: Path) -> Path:
    stack = {
        "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
        "model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1},
        "train": {"train_seq_len": 64, "train_batch_tokens": 512, "micro_batch_tokens": 512, "iterations": 3,
                  "max_wallclock_seconds": 0, "warmdown_iters": 1, "warmup_steps": 0, "val_loss_every": 0},
        "eval": {"batch_tokens": 4096},
        "data": {"cache_dir": str(cache)},
    }  # fmt: skip
    search = {
        "stack": stack,
        "space": {"optim.matrix_lr": {"logfloat": [0.01, 0.1]}},
        "trial": {"gpus": 0, "cpus": 1},
        "search": {"num_samples": 1, "size_workers": 1},
    }
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def _pgolf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgolf.registry.tools.cli", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=ENV,
    )  # fmt: skip


def test_search_on_a_cluster_and_a_node_that_cannot_see_the_study(
    cluster: dict[str, Any], cache_dir: Path
) -> None:
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import prepare_data

    tmp, address = cluster["tmp"], cluster["address"]
    spec = _search(tmp, cache_dir)
    prepare_data(stack_from_dict(yaml.safe_load(spec.read_text())["stack"]).stack)
    r = _pgolf("search", str(spec), "--address", address, "--out", str(tmp / "seen" / "study"), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 complete" in r.stdout

    hidden = tmp / "hidden"
    hidden.mkdir()
    blind = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs none {hidden} && exec {RAY} start --address {address} --num-cpus 1 "
         f"--temp-dir {tmp / 'ray'} --disable-usage-stats {' '.join(ray_ports())}"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    cluster["sessions"].append(blind.pid)
    joined, _ = blind.communicate(timeout=180)
    assert blind.returncode == 0, joined
    study = hidden / "study"
    r = _pgolf("search", str(spec), "--address", address, "--out", str(study), cwd=tmp)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr
    assert "1 Ray node(s) cannot see the study folder" in err and "FileNotFoundError" in err, err
    assert "storage every node mounts at the same path" in err and "Traceback" not in err
    assert not study.exists()  # nothing trained, nothing left behind
