"""What a run shows while it works: plain progress lines off a terminal, the slow-down hint, the
ticker of slow steps, the trainer's time-based reports, the training-curve plot; and the thread
count chosen by ``train.threads: auto``."""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_stack
from rich.console import Console

from pgolf.registry.api.config import TrainConfig, stack_from_dict
from pgolf.registry.run import runtime as R
from pgolf.registry.run.train import Progress
from pgolf.registry.tools import progress as P
from pgolf.registry.tools.plots import plot_training_curve


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200, highlight=False), buf


def prog(step: int, elapsed: float) -> Progress:
    return Progress(step, 100, 4.0, elapsed, 1000.0, 60.0, 1.0)


def test_off_a_terminal_a_progress_line_every_interval(tmp_path: Path) -> None:
    console, buf = plain_console()
    log = P.RunLog(tmp_path / "run.log", console)
    with P.LiveProgress(console, 100, 0, log=log, interval=0.05) as bar:
        bar.update(prog(1, 0.1))  # too soon after the start: nothing yet
        time.sleep(0.06)
        bar.update(prog(2, 0.2))
        bar.update(prog(3, 0.3))  # too soon after the last line
    lines = [ln for ln in buf.getvalue().splitlines() if "train:" in ln]
    assert len(lines) == 1 and "train: step 2/100  loss 4.0000" in lines[0] and lines[0].startswith("[0:00]")
    assert "train:" not in (tmp_path / "run.log").read_text()  # console only: run.log keeps its own lines
    assert [p["step"] for p in bar.points] == [1, 2, 3]  # the curve records every report


def test_slowdown_hint_once_per_slow_spell() -> None:
    w = P.SpeedWatch("HINT", window=1.0, factor=2.5)
    msgs = []
    t, step = 0.0, 0
    for rate in [10, 10, 10, 2, 2, 10, 10, 3]:  # steps per second in each 1-s window
        step += rate
        t += 1.0
        msgs.append(w.observe(step, t, tokens_per_step=100))
    hits = [(i, m) for i, m in enumerate(msgs) if m]
    assert [i for i, _ in hits] == [3, 7]  # not again at 4 (same spell); again after recovering
    assert "200 tokens/s from 1,000" in hits[0][1] and hits[0][1].endswith("HINT")


def test_slowdown_hint_names_the_threads() -> None:
    two = P.slowdown_hint("cpu", 2)
    assert "--set train.threads=1" in two and "2 CPU threads" in two
    assert "threads=1" not in P.slowdown_hint("cpu", 1)
    assert "GPU" in P.slowdown_hint("cuda", 8)


def test_ticker_is_silent_when_quick_and_speaks_when_slow() -> None:
    console, buf = plain_console()
    with P.Ticker(console, "sizing", delay=0.5):
        pass
    assert buf.getvalue() == ""
    with P.Ticker(console, "sizing", delay=0.05, interval=0.1):
        time.sleep(0.35)
    out = buf.getvalue().splitlines()
    assert out[0].startswith("sizing … 0:00") and len(out) >= 3 and out[-1] == "sizing: done in 0:00"


def test_trainer_reports_at_least_every_second_of_training(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    """A run whose log interval is far away still reports progress once per training second."""
    from pgolf.registry.run import data
    from pgolf.registry.run import train as T
    from pgolf.registry.run.pipeline import build, prepare_data
    from pgolf.registry.run.runtime import make_runtime

    d = tiny_stack(cache_dir)
    d["train"].update({"iterations": 30, "train_log_every": 1000, "warmup_steps": 0})
    rs = stack_from_dict(d)
    source = prepare_data(rs.stack)
    rt = make_runtime(rs.stack.train)
    b = build(rs, rt.device)
    trainer = T.Trainer(b.model, b.sites, rs.stack, rt, data.DistributedTokenLoader(source.train, 0, 1))
    ticks = itertools.count()
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(ticks) * 0.25)  # a slow machine
    seen: list[int] = []
    trainer.run(on_progress=lambda p: seen.append(p.step))
    late = [s for s in seen if s > 10 and s != 30]
    assert late, seen  # before: steps 1-10 and 30 only (log interval 1000 // 10 = 100 steps)


def test_training_curve_png(tmp_path: Path) -> None:
    train = [{"step": s, "train_seconds": s * 0.5, "train_loss": 6.0 / (1 + s)} for s in range(1, 50)]
    val = [{"step": 25, "train_seconds": 12.5, "val_bpb": 2.0}, {"step": 49, "train_seconds": 24.5,
                                                                   "val_bpb": float("nan")}]  # fmt: skip
    out = plot_training_curve(tmp_path / "c.png", train, val, title="t", final={"steps": 49, "val_bpb": 1.9})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# -- threads -----------------------------------------------------------------------------------


def test_threads_default_is_auto_and_accepts_old_null() -> None:
    assert TrainConfig().threads == "auto"
    assert TrainConfig.model_validate({"threads": None}).threads == "auto"
    assert TrainConfig.model_validate({"threads": 3}).threads == 3


@pytest.mark.parametrize(
    ("cores", "busy", "world", "expected"),
    [(2, 0.05, 1, 2), (2, 1.0, 1, 1), (2, 1.9, 1, 1), (8, 2.2, 1, 6), (8, 0.0, 4, 2), (2, None, 1, 2)],
)
def test_auto_threads_never_exceed_free_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, busy: float | None, world: int, expected: int
) -> None:
    monkeypatch.setattr(R, "usable_cores", lambda: cores)
    monkeypatch.setattr(R, "busy_cores", lambda window=0.15: busy)
    n, note = R.auto_threads(world)
    assert n == expected and note.startswith("auto:")


def test_usable_cores_follow_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(R, "_cgroup_cpu_quota", lambda: 1.5)
    assert R.usable_cores() == 2
    monkeypatch.setattr(R, "_cgroup_cpu_quota", lambda: None)
    assert R.usable_cores() == 64


def test_busy_cores_sees_a_spinning_process() -> None:
    import multiprocessing as mp

    if R.busy_cores(0.05) is None:
        pytest.skip("no /proc/stat")
    p = mp.Process(target=_spin, daemon=True)
    p.start()
    try:
        time.sleep(0.2)
        busy = R.busy_cores(0.3)
    finally:
        p.terminate()
        p.join()
    assert busy is not None and busy >= 0.8


def _spin() -> None:
    while True:
        pass


def test_make_runtime_applies_auto_threads_and_pins_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "auto_threads", lambda world_size=1: (1, "auto: test"))
    before = torch.get_num_threads()
    try:
        rs = stack_from_dict(tiny_stack(train={"threads": "auto"}))
        rt = R.make_runtime(rs.stack.train)
        assert rt.threads == 1 == torch.get_num_threads() and rt.threads_note == "auto: test"
        pinned: Any = R.pin_runtime(rs, rt).stack.train
        assert (pinned.threads, pinned.device, pinned.compile, pinned.autocast, pinned.attention) == (
            1, "cpu", "off", "off", "sdpa")  # fmt: skip
    finally:
        torch.set_num_threads(before)
