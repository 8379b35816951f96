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


def test_asha_never_cuts_at_the_end_of_training_nor_the_reference_trial() -> None:
    """tiny_cpu's settings: 60 steps, grace 20, reduction 3: a rung falls on step 60, the last
    step, where the report of a fully trained trial arrives just before its final score."""
    from pgolf.search.spec import load_search

    loaded = load_search(ROOT / "searches" / "tiny_cpu.yaml")
    s = harness.make_scheduler(loaded, harness._steps_per_seed(loaded), None)
    assert s.set_search_properties("objective", "min")
    assert 60 in [r for r, _ in s._brackets[0]._rungs]  # the rung is there...
    good, weak, ref = (
        FakeTrial("good", {"number": 0}),
        FakeTrial("weak", {"number": 1}),
        FakeTrial("ref", {"number": 2, "protect": True}),
    )
    for t in (good, weak, ref):
        s.on_trial_add(None, t)
    assert s.on_trial_result(None, good, _res(20, 2.0)) == CONTINUE
    assert s.on_trial_result(None, good, _res(60, 1.5, last=True)) == CONTINUE
    assert s.on_trial_result(None, weak, _res(20, 1.9)) == CONTINUE
    # ...but the report at step 60 of a trial that has finished training is never cut there
    assert s.on_trial_result(None, weak, _res(60, 3.0, last=True)) == CONTINUE
    # the reference (start_with) trial is never cut, whatever the timing
    assert s.on_trial_result(None, ref, _res(20, 9.0)) == CONTINUE
    assert s.on_trial_result(None, ref, _res(60, 9.0)) == CONTINUE
    # an ordinary report at a rung is still cut
    other = FakeTrial("other", {"number": 3})
    s.on_trial_add(None, other)
    assert s.on_trial_result(None, other, _res(20, 9.0)) == STOP


def test_trainable_marks_the_report_at_the_end_of_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    """Run the trainable in-process (Tune's report captured): the validation at the last step is
    flagged ``last``; a run whose reloaded artifact scores NaN is an error of kind non_finite."""
    import json

    from ray import tune

    from pgolf.search import trainable

    poison = tmp_path / "poison.py"
    poison.write_text(
        "import torch\nfrom pgolf.registry import Params, Technique, hook, register\n\n\n"
        "@register('poison')\nclass Poison(Technique):\n    '''NaN weights after training (tests).'''\n\n"
        "    @hook\n    def finalize(self, model):\n        with torch.no_grad():\n"
        "            for p in model.parameters():\n                p.fill_(float('nan'))\n"
    )
    reports: list[dict[str, Any]] = []
    monkeypatch.setattr(tune, "report", lambda m, **kw: reports.append(dict(m)))
    stack = {
        **TINY_STACK,
        "model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1},
        "train": {
            "train_seq_len": 32,
            "train_batch_tokens": 256,
            "micro_batch_tokens": 256,
            "iterations": 4,
            "max_wallclock_seconds": 0,
            "warmup_steps": 0,
            "warmdown_iters": 2,
            "val_loss_every": 2,
            "threads": 1,
        },
        "eval": {"batch_tokens": 2048},
        "data": {"cache_dir": str(cache_dir)},
    }
    from pgolf.registry.api.config import stack_from_dict

    cfg = {"number": 0, "stack": stack_from_dict(stack).to_dict(), "run_dir": str(tmp_path / "t0"),
           "seeds": [1337], "steps_per_seed": 4, "metric": "val_bpb"}  # fmt: skip
    trainable.train_trial(cfg)
    steps = [(r["step"], r["last"]) for r in reports if not r.get("final")]
    assert steps == [(2, False), (4, True)]
    assert reports[-1]["final"] and reports[-1]["state"] == "complete"
    reports.clear()
    bad = {**stack, "plugins": [str(poison)], "techniques": {"poison": {}}}
    cfg = {**cfg, "number": 1, "stack": stack_from_dict(bad).to_dict(), "run_dir": str(tmp_path / "t1")}
    trainable.train_trial(cfg)
    final = reports[-1]
    assert final["state"] == "error" and final["error_kind"] == "non_finite", final
    saved = json.loads((tmp_path / "t1" / "trial_result.json").read_text())
    assert saved["state"] == "error" and saved["error_kind"] == "non_finite"
