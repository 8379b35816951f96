"""Checkpoints and ``pgolf run --resume``: a run killed with SIGKILL leaves its ``.partial`` folder,
and resuming it ends, on CPU, with exactly the weights and score of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_stack

from pgolf.registry.run import checkpoint as C
from pgolf.registry.tools.cli import main


def resumable_stack(cache_dir: Path, iterations: int) -> dict[str, Any]:
    """The tiny stack with state everywhere a resume can lose it: EMA weights (technique state),
    Muon and Adam moments, a warmdown (schedule), periodic validation (history)."""
    d = tiny_stack(cache_dir, techniques={"ema": {"decay": 0.9}})
    d["train"].update({"iterations": iterations, "warmdown_iters": iterations // 2, "val_loss_every": 15,
                       "train_log_every": 10, "checkpoint_minutes": 1e-6})  # fmt: skip
    return d


def finished_run(tmp_path: Path, cache_dir: Path, iterations: int, name: str) -> tuple[Path, Path]:
    """(the stack file, the folder of a run of it that went through to the end)."""
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(resumable_stack(cache_dir, iterations)))
    out = tmp_path / name
    assert main(["run", str(f), "--out", str(out), "--quiet"]) == 0
    assert not list(out.glob("checkpoint*")), "checkpoints are removed when the run finishes"
    return f, out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_files_are_atomic_and_checked(tmp_path: Path) -> None:
    p = C.checkpoint_path(tmp_path)
    size = C.save(p, {"step": 3, "model": {"w": torch.arange(4.0)}, "rng": C.rng_state()})
    assert size == p.stat().st_size and [x.name for x in tmp_path.iterdir()] == ["checkpoint.pt"]
    back = C.load(p)
    assert back["step"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))
    torch.manual_seed(5)
    state = C.rng_state()
    a = torch.rand(3)
    C.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    p.write_bytes(p.read_bytes()[:100])  # truncated
    with pytest.raises(C.ResumeError, match="not a readable checkpoint"):
        C.load(p)
    with pytest.raises(C.ResumeError, match="no checkpoint here"):
        C.load(tmp_path / "none.pt")
    assert C.checkpoint_path(tmp_path, 3).name == "checkpoint.rank3.pt"


def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f, ref = finished_run(tmp_path, cache_dir, 60, "ref")

    out = tmp_path / "killed"
    partial = tmp_path / ".killed.partial"
    proc = subprocess.Popen([sys.executable, "-m", "pgolf.registry.tools.cli", "run", str(f), "--out", str(out),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = partial / "checkpoint.pt"
            if ckpt.exists() and C.load(ckpt)["train_state"]["step"] >= 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the run ended before it could be killed: {proc.stderr.read() if proc.stderr else ''}"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert partial.is_dir() and not out.exists()
    saved = C.load(partial / "checkpoint.pt")
    step = saved["train_state"]["step"]
    assert 20 <= step < 60
    assert saved["shards_opened"] and saved["validation_opened"] == {}  # what the data probe has seen so far

    # starting it again without --resume points at --resume
    assert main(["run", str(f), "--out", str(out)]) == 2
    assert f"pgolf run --resume {out}" in capsys.readouterr().err

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert out.is_dir() and not partial.exists() and not list(out.glob("checkpoint*"))
    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, out))
    assert b["val_bpb"] == a["val_bpb"] and b["val_loss"] == a["val_loss"] and b["steps"] == 60
    assert sha(out / "model.ptz") == sha(ref / "model.ptz")  # the same weights, bit for bit
    assert [h["step"] for h in b["history"]] == [h["step"] for h in a["history"]] == [15, 30, 45, 60]
    assert [p["step"] for p in b["train_history"]] == [p["step"] for p in a["train_history"]]
    assert f"resumed from step {step}" in (out / "run.log").read_text()
    assert b["legal"] is True and b["legality"]["probes"]["data"]["passed"] is True
    assert (
        b["legality"]["probes"]["data"]["shards_opened"] == a["legality"]["probes"]["data"]["shards_opened"]
    )


def test_resume_refuses_what_it_cannot_continue(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f, done = finished_run(tmp_path, cache_dir, 4, "done")
    assert main(["run", "--resume", str(done)]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert main(["run", str(f), "--resume", str(done)]) == 2
    assert "not both" in capsys.readouterr().err
    # a partial folder whose stack.yaml was edited after the checkpoint
    partial = tmp_path / ".edited.partial"
    partial.mkdir()
    (partial / "stack.yaml").write_text((done / "stack.yaml").read_text())
    C.save(C.checkpoint_path(partial), {"stack_hash": "0" * 16, "world_size": 1})
    assert main(["run", "--resume", str(partial)]) == 2
    assert "stack.yaml changed since the checkpoint" in capsys.readouterr().err


def test_prefetching_loader_saves_the_position_it_served(cache_dir: Path) -> None:
    """On a GPU batches are read ahead: a checkpoint must hold the position of the last batch
    the step used, not of the last one read."""
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.data import DistributedTokenLoader, PrefetchingLoader
    from pgolf.registry.run.pipeline import prepare_data

    source = prepare_data(stack_from_dict(tiny_stack(cache_dir)).stack)
    plain = DistributedTokenLoader(source.train, 0, 1)
    ahead = PrefetchingLoader(DistributedTokenLoader(source.train, 0, 1), 512, 64, depth=4)
    for _ in range(3):
        ahead.next_batch(512, 64)
        plain.next_batch(512, 64)
    time.sleep(0.2)  # let the prefetcher run ahead
    state = ahead.state_dict()
    assert state == plain.state_dict()
    expected = [plain.next_batch(512, 64) for _ in range(2)]
    again = PrefetchingLoader(DistributedTokenLoader(source.train, 0, 1), 512, 64)
    again.load_state_dict(state)
    for x, y in expected:
        gx, gy = again.next_batch(512, 64)
        assert torch.equal(gx, x) and torch.equal(gy, y)
    ahead.close()
    again.close()


def test_ctrl_c_during_export_resumes_without_retraining(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pgolf.registry.run import pipeline

    f, ref = finished_run(tmp_path, cache_dir, 20, "ref")
    out = tmp_path / "out"

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "atomic_write", interrupted)  # the artifact's write, after training
        assert main(["run", str(f), "--out", str(out), "--quiet"]) == 130
    assert f"pgolf run --resume {out}" in capsys.readouterr().err
    partial = tmp_path / ".out.partial"
    saved = C.load(partial / "checkpoint.pt")
    assert saved["finished"] is True and saved["train_state"]["step"] == 20
    assert main(["run", "--resume", str(partial), "--quiet"]) == 0
    assert sha(out / "model.ptz") == sha(ref / "model.ptz")
    log = (out / "run.log").read_text()
    assert "resumed from step 20" in log and log.count("trained 20 steps") == 2  # once per session
    assert main(["eval", str(out)]) == 0  # the manifest holds for the resumed run folder


def test_a_checkpoint_that_cannot_be_written_does_not_stop_the_run(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def no_space(path: Path, payload: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(C, "save", no_space)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(resumable_stack(cache_dir, 4)))
    assert main(["run", str(f), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    log = (tmp_path / "out" / "run.log").read_text()
    assert "warning: could not write a checkpoint at step 1 (No space left on device" in log
