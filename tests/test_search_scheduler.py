"""The ASHA wrapper: gain_at_end trials are never cut before their final report; errors are not
scores. Also: the search CLI module must not import Ray or Optuna."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

harness = pytest.importorskip("pgolf.search.harness")
from ray.tune.schedulers import TrialScheduler  # noqa: E402

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE
ROOT = Path(__file__).resolve().parents[1]
TINY_STACK = {
    "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
    "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
}


@dataclass
class FakeTrial:
    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)


def _asha(cuts: list[int] | None = None) -> Any:
    s = harness.GainAwareASHA(
        time_attr="search_step",
        grace_period=10,
        max_t=1001,
        reduction_factor=2,
        on_cut=None if cuts is None else cuts.append,
    )
    assert s.set_search_properties("objective", "min")
    return s


def _res(step: int, value: float, **kw: Any) -> dict[str, Any]:
    return {"search_step": step, "objective": value, "state": "running", "final": False, **kw}


def test_plain_asha_cuts_a_weak_trial_but_not_a_gain_at_end_one() -> None:
    cuts: list[int] = []
    s = _asha(cuts)
    good = FakeTrial("good", {"number": 0})
    weak = FakeTrial("weak", {"number": 1})
    ema = FakeTrial("ema", {"number": 2, "gain_at_end": ["ema"]})
    for t in (good, weak, ema):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, good, _res(10, 2.0)) == CONTINUE
    assert s.on_trial_result(None, weak, _res(10, 3.0)) == STOP  # worse than the rung's cut-off
    assert s.on_trial_result(None, ema, _res(10, 3.5)) == CONTINUE  # even worse, but protected
    assert s.on_trial_result(None, good, _res(20, 1.9)) == CONTINUE
    assert s.on_trial_result(None, ema, _res(20, 3.4)) == CONTINUE  # still protected at the next rung
    assert s.on_trial_result(None, good, _res(40, 1.8)) == CONTINUE
    # the final report is the real score: it is judged as usual (the trial ends either way)
    assert s.on_trial_result(None, ema, _res(40, 3.6, final=True, state="complete")) == STOP
    assert cuts == [1]  # only the cut trial is reported as stopped by ASHA


def test_error_results_are_not_scores() -> None:
    s = _asha()
    a, b = FakeTrial("a"), FakeTrial("b")
    s.on_trial_add(None, a)
    s.on_trial_add(None, b)
    assert s.on_trial_result(None, a, _res(10, float("nan"), state="error", final=True)) == CONTINUE
    s.on_trial_complete(None, a, _res(10, float("nan"), state="error", final=True))
    assert all("a" not in recorded for _, recorded in s._brackets[0]._rungs)  # no NaN in any rung
    assert "a" not in s._trial_info
    assert s.on_trial_result(None, b, _res(10, 5.0)) == CONTINUE


def test_scheduler_choice_and_rungs() -> None:
    from pgolf.search.spec import search_from_dict

    loaded = search_from_dict(
        {
            "stack": {**TINY_STACK, "train": {"iterations": 300, "val_loss_every": 50}},
            "space": {"train.iterations": {"int": [100, 500]}},
            "search": {"seeds": [1, 2]},
        }
    )
    steps = harness._steps_per_seed(loaded)
    assert steps == 500  # the upper bound of the searched iterations
    sched = harness.make_scheduler(loaded, steps)
    assert isinstance(sched, harness.GainAwareASHA)
    assert sched._max_t == 2 * 500 + 1 and sched._brackets[0]._rungs[-1][0] == 50  # grace = val_loss_every
    fifo = search_from_dict({"stack": TINY_STACK, "space": {}, "search": {"scheduler": "fifo"}})
    assert not isinstance(harness.make_scheduler(fifo, 10), harness.GainAwareASHA)


def test_search_cli_does_not_import_ray_or_optuna() -> None:
    code = (
        "import sys, pgolf.search.cli, pgolf.registry.tools.cli as c; c.build_parser(); "
        "bad = [m for m in ('ray', 'optuna') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_registers_the_search_commands() -> None:
    from pgolf.registry.tools.cli import build_parser

    parser = build_parser()
    for argv in (
        ["search", "x.yaml"],
        ["results", "d"],
        ["repeat", "s.yaml", "--seeds", "3"],
        ["compare", "a", "b", "--vs", "c"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func)
    assert parser.parse_args(["compare", "a", "b", "--vs", "c"]).a == ["a", "b"]
