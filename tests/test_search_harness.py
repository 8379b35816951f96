"""The driver's bookkeeping without Ray: sizing before training, what Optuna is told, and how a
study is reconciled after its driver died."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

harness = pytest.importorskip("pgolf.search.harness")
import optuna  # noqa: E402
from conftest import counted_code_bytes  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from pgolf.search.spec import search_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 300_000 + counted_code_bytes()  # the width-64 model (~222 KB) fits, width 128 (~546 KB) does not


@pytest.fixture()
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(harness, "prepare_data", lambda stack: None)  # data are not under test here
    loaded = search_from_dict(
        {
            "name": "unit",
            "stack": {
                "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
                "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
                "train": {"val_loss_every": 10},
            },
            "space": {"model.model_dim": {"choice": [64, 128]}, "optim.matrix_lr": {"logfloat": [0.01, 0.1]}},
            "constraint": {"artifact_bytes": LIMIT},
            "trial": {"gpus": 0, "cpus": 2},
            "search": {"start_with": [{"model.model_dim": 128}, {"model.model_dim": 64}]},
        }
    )
    d = tmp_path / "study"
    d.mkdir()
    r = harness.StudyRunner(loaded, d, console=None, quiet=True, resume=False)
    for point in loaded.spec.search.start_with:
        r.study.enqueue_trial(point)
    return r


def _frozen(r: Any, n: int) -> optuna.trial.FrozenTrial:
    return r.study.get_trials(deepcopy=False)[n]


def test_too_large_sample_is_rejected_and_resampled(runner: Any) -> None:
    cfg = runner.next_config()
    recs = runner.ledger.records()
    assert recs[0]["state"] == "infeasible" and recs[0]["estimated_bytes"] > LIMIT
    assert _frozen(runner, 0).state == TrialState.PRUNED
    assert _frozen(runner, 0).constraints["artifact_bytes"] == pytest.approx(
        recs[0]["estimated_bytes"] / LIMIT - 1
    )
    # the next sample fits and is handed to Tune with its resolved stack
    assert cfg is not None and cfg["number"] == 1 and recs[1]["state"] == "running"
    stack = cfg["stack"]
    assert stack["model"]["model_dim"] == 64 and stack["train"]["threads"] == 2
    assert stack["export"]["artifact_limit"] == LIMIT and stack["name"] == "unit-t0001"
    assert cfg["steps_per_seed"] == 20000 and cfg["seeds"] == [1337]
    assert not (runner.dir / "trials").exists()  # nothing ran


def test_estimates_are_cached_per_shape(runner: Any) -> None:
    runner.next_config()  # 128 rejected, then 64
    n = len(runner._estimates)
    runner.study.enqueue_trial({"model.model_dim": 64, "optim.matrix_lr": 0.05})  # only the lr differs
    runner.next_config()
    assert len(runner._estimates) == n


def test_gives_up_after_max_resample(runner: Any) -> None:
    runner.spec = runner.spec.model_copy(
        update={"search": runner.spec.search.model_copy(update={"max_resample": 3})}
    )
    assert runner.next_config() is not None  # the start_with points: 128 rejected, 64 fits
    for _ in range(3):
        runner.study.enqueue_trial({"model.model_dim": 128})
    assert runner.next_config() is None and runner.gave_up


def _final(value: float, size: int = 360_000) -> dict[str, Any]:
    return {"final": True, "state": "complete", "objective": value, "val_bpb": value, "val_loss": 2 * value,
            "artifact_bytes": size, "fits": size <= LIMIT, "search_step": 30}  # fmt: skip


def test_what_optuna_and_the_ledger_are_told(runner: Any) -> None:
    numbers = [runner.next_config()["number"] for _ in range(4)]  # 1..4 (0 was rejected)
    a, b, c, d = numbers
    runner.on_result(a, {"state": "running", "final": False, "search_step": 10, "objective": 3.0, "step": 10})
    runner.finish(a, _final(2.5, size=365_000), error=False)
    runner.cut.add(b)
    runner.on_result(b, {"state": "running", "final": False, "search_step": 10, "objective": 3.5, "step": 10})
    runner.finish(
        b, {"state": "running", "final": False, "search_step": 10, "objective": 3.5, "step": 10}, False
    )
    runner.finish(
        c, {"state": "error", "final": True, "error": "RuntimeError: boom", "objective": float("nan")}, False
    )
    runner.finish(d, None, error=False)  # Ctrl-C before it ran: neither its end nor a cut
    recs = runner.ledger.records()
    assert (
        recs[a]["state"] == "complete"
        and recs[a]["estimate_error_bytes"] == 365_000 - recs[a]["estimated_bytes"]
    )
    assert recs[b]["state"] == "stopped" and recs[b]["val_bpb"] is None and recs[b]["objective"] == 3.5
    assert recs[c]["state"] == "error" and recs[c]["error"] == "RuntimeError: boom"
    assert recs[d]["state"] == "running"  # left for --resume
    fa, fb, fc, fd = (_frozen(runner, n) for n in numbers)
    assert fa.state == TrialState.COMPLETE and fa.value == 2.5 and fa.constraints["artifact_bytes"] < 0
    assert fa.intermediate_values == {10: 3.0}
    assert fb.state == TrialState.PRUNED and fb.intermediate_values == {10: 3.5}
    assert fc.state == TrialState.FAIL and fd.state == TrialState.RUNNING
    assert runner.study.best_trial.number == a


def test_reconcile_after_the_driver_died(runner: Any, tmp_path: Path) -> None:
    numbers = [runner.next_config()["number"] for _ in range(4)]
    adopt, rerun, told, _ = numbers
    # `adopt` finished (its trial_result.json is there) but the driver died before recording it
    run_dir = Path(runner.records[adopt]["run_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "trial_result.json").write_text(json.dumps({**_final(2.4), "number": adopt}))
    # `told`: in the ledger as complete, but the driver died before telling Optuna
    runner.ledger.append({"number": told, "state": "complete", "objective": 2.6, "val_bpb": 2.6,
                          "artifact_bytes": 361_000, "fits": True})  # fmt: skip
    # the last one is still running (its record says so, nothing on disk); one more was asked
    # from Optuna but never recorded
    orphan = runner.study.ask().number

    again = harness.StudyRunner(runner.loaded, runner.dir, console=None, quiet=True, resume=True)
    notes = again.reconcile()
    recs = again.ledger.records()
    assert recs[adopt]["state"] == "complete" and recs[adopt]["val_bpb"] == 2.4
    assert recs[rerun]["state"] == "interrupted" and recs[numbers[3]]["state"] == "interrupted"
    assert recs[told]["state"] == "complete"
    assert recs[orphan]["state"] == "interrupted"
    assert all(r["finished_events"] == 1 for r in recs.values())
    frozen = again.study.get_trials(deepcopy=False)
    assert not [t for t in frozen if t.state == TrialState.RUNNING]
    assert frozen[adopt].value == 2.4 and frozen[told].value == 2.6
    assert any("had finished" in n for n in notes) and any("queued again" in n for n in notes)
    assert again.trained() == 2
    # the interrupted points are sampled again first, unchanged
    cfg = again.next_config()
    assert cfg is not None and recs[rerun]["point"] == again.records[cfg["number"]]["point"]
