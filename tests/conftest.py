"""Shared fixtures: tiny stacks, a session cache for the default corpus, a real-text dataset."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
SP1024 = ASSETS / "fineweb_1024_bpe.model"  # copy of the challenge tokenizer
BASELINE = REPO / "stacks" / "baseline_sp1024.yaml"

TINY: dict[str, Any] = {
    "base": str(BASELINE),
    "name": "tiny",
    "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
    "train": {
        "train_seq_len": 64,
        "train_batch_tokens": 1024,
        "micro_batch_tokens": 512,
        "iterations": 8,
        "max_wallclock_seconds": 0,
        "warmdown_iters": 4,
        "warmup_steps": 1,
        "val_loss_every": 0,
        "train_log_every": 4,
        "threads": 1,
    },
    "eval": {"batch_tokens": 4096},
}


def small_spec(num_layers: int = 2, vocab_size: int = 64) -> Any:
    """A width-32 GQA (4 query / 2 KV heads) model spec for unit tests of the model's maths."""
    from pgolf.registry.api.technique import ModelSpec

    return ModelSpec(vocab_size=vocab_size, num_layers=num_layers, model_dim=32, num_heads=4, num_kv_heads=2,
                     mlp_hidden=64, train_seq_len=16)  # fmt: skip


def counted_code_bytes(stack: Path = BASELINE) -> int:
    """The code bytes a run of ``stack`` counts (its techniques, the default corpus if it uses
    it): what an artifact limit in a test must leave room for besides the model."""
    from pgolf.registry.api.config import load_stack
    from pgolf.registry.run.code import code_bytes

    return code_bytes(load_stack(stack)).bytes


def tiny_build(techniques: dict[str, Any], *, device: str = "cpu", seed: int = 0, **model: Any) -> Any:
    """A fresh build (model, technique instances, sites) of a width-32 GQA stack (4 query / 2 KV
    heads, 2 layers, vocab 64, train_seq_len 16) with ``techniques``; ``model`` keys override its
    shape."""
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import build
    from pgolf.registry.run.runtime import seed_everything

    shape = {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 64, **model}
    train = {"train_seq_len": 16, "train_batch_tokens": 64, "micro_batch_tokens": 32}
    rs = stack_from_dict({"model": shape, "train": train, "techniques": techniques})
    seed_everything(seed)
    return build(rs, torch.device(device))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the tests that join the session's Ray cluster (``ray_cluster``) run last, one after the
    # other: the cluster is up only while they run, not idle under the rest of the suite
    items.sort(key=lambda item: "ray_cluster" in getattr(item, "fixturenames", ()))  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _registry_of_the_module() -> Iterator[None]:
    """Each test module starts from the techniques pgolf ships (and installed plugins): the toy and
    deliberately broken plugins a module registers are gone after it, so a test generated from the
    registry (the pairwise test, the contract, the bench's list) never depends on test order."""
    from pgolf.registry import REGISTRY

    REGISTRY.ensure_loaded()
    saved = (dict(REGISTRY._entries), dict(REGISTRY._broken), dict(REGISTRY._files))
    yield
    for live, kept in zip((REGISTRY._entries, REGISTRY._broken, REGISTRY._files), saved, strict=True):
        live.clear()
        live.update(kept)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for the default corpus shared by the whole test session."""
    return tmp_path_factory.mktemp("pgolf-cache")


def tiny_stack(cache_dir: Path | None = None, **sections: Any) -> dict[str, Any]:
    """The tiny CPU stack as a mapping; keyword arguments deep-merge into its sections."""
    d = copy.deepcopy(TINY)
    if cache_dir is not None:
        d["data"] = {"cache_dir": str(cache_dir)}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key].update(value)
        else:
            d[key] = value
    return d


def real_text_documents(n: int) -> list[str]:
    """Real English (standard-library docstrings) that the challenge tokenizer encodes without
    <unk> and that its normalization leaves unchanged, so byte counts can be checked exactly."""
    import sentencepiece as spm

    from pgolf.registry.tools.corpus import stdlib_documents

    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    out = []
    for doc in stdlib_documents():
        text = " ".join(doc.split())
        if not text.isascii():
            continue
        ids = sp.encode(text)
        if sp.unk_id() in ids or sp.decode(ids) != text:
            continue
        out.append(text)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """Shards built with the challenge tokenizer from 300 real documents; the first 12 are validation."""
    import json

    from pgolf.registry.tools.corpus import build_dataset

    docs = real_text_documents(300)
    root = tmp_path_factory.mktemp("text-data")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    build_dataset([src], root / "data", tokenizer=SP1024, val_docs=12)
    yield root / "data", docs[:12]


@pytest.fixture
def chdir_tmp(tmp_path: Path) -> Iterator[Path]:
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


@pytest.fixture
def code_counted_from_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs in this test count their code from the files they execute (``code_bytes``' own
    fallback for a stack whose script cannot be generated) instead of generating the submission
    script of each technique set (15-20 s of CPU the first time for each set). Only for tests that
    assert nothing about code bytes; tests/test_submission.py and tests/test_code.py test the script."""
    from pgolf.registry.tools import script
    from pgolf.registry.tools.bundle import BundleError

    def not_generated(*args: Any, **kwargs: Any) -> Any:
        raise BundleError("the submission script is not generated in this test")

    monkeypatch.setattr(script, "build_script", not_generated)


# --------------------------------------------------------------------------------------------
# One local Ray cluster for the test session
# --------------------------------------------------------------------------------------------

RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_ports() -> list[str]:
    """``ray start`` options that put the fixed-default ports of a node (dashboard 8265, dashboard
    agent 52365) on free ones, so a node started by a test does not collide with the Ray of another
    test run on the same machine (the client server's 10001 is not started: no ``ray[client]``)."""
    return ["--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of the session ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid and int(entry) != os.getpid():
            out.append(int(entry))
    return out


def end_session(sid: int, grace: float = 3.0) -> list[int]:
    """End every process of the session ``sid`` (what a ``ray start`` run with a new session
    started: its daemons and, as their children, its workers and agents, whose command lines Ray
    rewrites): SIGTERM, then SIGKILL what is left after ``grace`` seconds. Returns the pids still
    alive after that (none, normally)."""
    import contextlib
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)
    return session_pids(sid)


def start_ray_head(temp_dir: Path, num_cpus: int = 2, env: dict[str, str] | None = None) -> tuple[str, int]:
    """``ray start --head`` on 127.0.0.1 in a new session; returns (address, session id)."""
    import subprocess
    import sys

    ray = Path(sys.executable).parent / "ray"
    if not ray.is_file():
        pytest.skip("the `ray` command is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--port", str(port), "--num-cpus", str(num_cpus), "--include-dashboard",
         "false", "--disable-usage-stats", "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
         *ray_ports()],
        env={**os.environ, **RAY_ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        end_session(proc.pid)
        raise
    if proc.returncode != 0:
        end_session(proc.pid)
        raise RuntimeError(f"`ray start --head` failed ({proc.returncode}):\n{out}")
    return f"127.0.0.1:{port}", proc.pid


@dataclass(frozen=True)
class RayCluster:
    address: str  # host:port of its GCS, for --address
    temp_dir: Path  # its --temp-dir: the logs of its processes and of every job run on it


class _SharedRay:
    """The test session's Ray cluster: started for the first test that uses it, ended after the
    last one (counted from the session's tests), so it does not idle under the rest of the suite."""

    def __init__(self, users: int) -> None:
        self.users_left = users
        self.cluster: RayCluster | None = None
        self._sid: int | None = None
        self._tmp: Path | None = None

    def start(self) -> RayCluster:
        import tempfile

        if self.cluster is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="pgr-", dir="/tmp"))  # short: Ray's socket paths
            address, self._sid = start_ray_head(self._tmp / "ray")
            self.cluster = RayCluster(address, self._tmp / "ray")
        return self.cluster

    def stop(self) -> None:
        import shutil

        left = end_session(self._sid) if self._sid is not None else []
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self.cluster, self._sid, self._tmp = None, None, None
        assert not left, f"processes of the test session's Ray cluster outlived it: {left}"


@pytest.fixture(scope="session")
def _shared_ray(request: pytest.FixtureRequest) -> Iterator[_SharedRay]:
    shared = _SharedRay(sum("ray_cluster" in item.fixturenames for item in request.session.items))
    yield shared
    shared.stop()  # when the count was off (a user skipped before it asked for the cluster)


@pytest.fixture
def ray_cluster(_shared_ray: _SharedRay) -> Iterator[RayCluster]:
    """One local Ray cluster (``ray start --head`` on 127.0.0.1, 2 CPUs) that the tests of the
    session share: a test of what a study does, rather than of Ray's start-up on one box, passes
    its address to ``pgolf search`` / ``pgolf ablate`` with ``--address`` and so skips starting
    and stopping a Ray of its own (~3-8 s a call on 2 cores). Started for the first test that
    asks for it, ended after the last (every process of it, workers included, by its session id;
    none may be left). Only for test functions: the users are counted from the session's tests."""
    cluster = _shared_ray.start()
    try:
        yield cluster
    finally:
        _shared_ray.users_left -= 1
        if _shared_ray.users_left <= 0:
            _shared_ray.stop()


@pytest.fixture
def ray_address(ray_cluster: RayCluster) -> str:
    """The address of the session's Ray cluster (see ``ray_cluster``)."""
    return ray_cluster.address
