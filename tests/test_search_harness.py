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
LIMIT = (
    400_000 + counted_code_bytes()
)  # the width-64 model (~222 KB) fits, width 128 (~546 KB) does not; 360 KB results fit


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


def test_estimates_are_cached_per_layout(runner: Any) -> None:
    runner.next_config()  # 128 rejected, then 64
    n = len(runner.gate.cache)
    runner.study.enqueue_trial({"model.model_dim": 64, "optim.matrix_lr": 0.05})  # only the lr differs
    cfg = runner.next_config()
    assert len(runner.gate.cache) == n
    assert runner.records[cfg["number"]]["estimate"]["method"] == "cached"


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
    stored = runner.records[adopt]["run_dir"]
    assert stored == f"trials/t{adopt:04d}"  # relative to the study: a copied study still finds it
    run_dir = runner.dir / stored
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
    assert again.study.get_trials(deepcopy=False)[orphan].user_attrs["pgolf_state"] == "interrupted"
    assert all(r["finished_events"] == 1 for r in recs.values())
    frozen = again.study.get_trials(deepcopy=False)
    assert not [t for t in frozen if t.state == TrialState.RUNNING]
    assert frozen[adopt].value == 2.4 and frozen[told].value == 2.6
    assert any("had finished" in n for n in notes) and any("queued again" in n for n in notes)
    assert again.trained() == 2
    # the interrupted points are sampled again first, unchanged
    cfg = again.next_config()
    assert cfg is not None and recs[rerun]["point"] == again.records[cfg["number"]]["point"]


def test_a_non_finite_final_score_is_a_failed_trial_everywhere(runner: Any) -> None:
    from pgolf.search.results import load_study, write_all

    n = runner.next_config()["number"]
    runner.on_result(n, {"state": "running", "final": False, "search_step": 10, "objective": 3.0,
                         "val_bpb": 3.0, "step": 10})  # fmt: skip
    nan = float("nan")
    runner.finish(n, {**_final(nan), "val_loss": nan}, error=False)
    rec = runner.ledger.records()[n]
    assert rec["state"] == "error" and rec["error_kind"] == "non_finite" and "not finite" in rec["error"]
    frozen = _frozen(runner, n)
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["error_kind"] == "non_finite"
    assert runner.display.rows[n].val_bpb is None  # the stale intermediate score is not shown as final
    (runner.dir / "search.yaml").write_text(runner.loaded.resolved_yaml(study_name="study"))
    study = load_study(runner.dir)
    row = next(r for r in study.rows if r.number == n)
    assert row.state == "error" and row.rank is None and study.best() is None
    write_all(study)
    csv_row = next(
        line for line in (runner.dir / "results.csv").read_text().splitlines() if f"t{n:04d}" in line
    )
    assert ",error," in csv_row and ",2.5" not in csv_row


def test_user_attributes_mark_size_rejections_apart_from_asha_cuts(runner: Any) -> None:
    a = runner.next_config()["number"]  # t0000 (width 128) was rejected by the size gate
    b = runner.next_config()["number"]
    runner.finish(a, _final(2.5, size=365_000), error=False)
    runner.cut.add(b)
    runner.finish(
        b, {"state": "running", "final": False, "search_step": 10, "objective": 3.5, "step": 10}, False
    )
    rejected, done, cut = _frozen(runner, 0), _frozen(runner, a), _frozen(runner, b)
    assert rejected.state == cut.state == TrialState.PRUNED  # Optuna has one state for both...
    assert (
        rejected.user_attrs["pruned_by"] == "size_gate" and cut.user_attrs["pruned_by"] == "asha"
    )  # ...pgolf two
    assert (
        rejected.user_attrs["pgolf_state"] == "infeasible" and rejected.user_attrs["estimated_bytes"] > LIMIT
    )
    assert rejected.user_attrs["estimate_method"] == "exact"
    ua = done.user_attrs
    assert ua["pgolf_state"] == "complete" and ua["artifact_bytes"] == 365_000 and ua["val_bpb"] == 2.5
    assert ua["fits"] is True and ua["legal"] is True and ua["run_dir"] == f"trials/t{a:04d}"


def test_the_watchdog_kills_a_trial_past_its_timeout(runner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    from types import SimpleNamespace

    killed: list[Any] = []
    monkeypatch.setattr(harness.ray, "kill", lambda actor, no_restart: killed.append(actor))
    runner.timeout = 5.0
    n = runner.next_config()["number"]
    trial = SimpleNamespace(
        status="RUNNING", config={"number": n}, temporary_state=SimpleNamespace(ray_actor="A")
    )
    runner.started_at[n] = time.time() - 4
    runner.check_timeouts([trial])
    assert not killed
    runner.started_at[n] = time.time() - 6
    runner.check_timeouts([trial])
    runner.check_timeouts([trial])  # killed once
    assert killed == ["A"]
    runner.finish(n, None, error=True)  # what Tune reports for the killed actor
    rec = runner.ledger.records()[n]
    assert rec["state"] == "timeout" and rec["error_kind"] == "timeout" and "5 s" in rec["error"]
    assert _frozen(runner, n).state == TrialState.FAIL and runner.trained() == 1


def test_a_dead_worker_has_an_error_kind(runner: Any) -> None:
    n = runner.next_config()["number"]
    runner.error_detail(n, "ray.exceptions.ActorDiedError: The actor died unexpectedly")
    runner.finish(n, None, error=True)
    rec = runner.ledger.records()[n]
    assert rec["state"] == "error" and rec["error_kind"] == "worker_died" and "ActorDiedError" in rec["error"]


def test_default_trial_timeout() -> None:
    def loaded(**trial: Any) -> Any:
        return search_from_dict(
            {
                "stack": {"base": str(ROOT / "stacks" / "baseline_sp1024.yaml")},
                "trial": trial,
                "search": {"seeds": [1, 2]},
            }
        )

    assert harness.trial_timeout(loaded()) == 2 * (1.25 * 600 + 900)  # the stack's 600 s cap
    assert harness.trial_timeout(loaded(max_wallclock_seconds=0)) is None
    assert harness.trial_timeout(loaded(timeout_seconds=30)) == 30
    assert harness.trial_timeout(loaded(timeout_seconds=0)) is None


def test_resume_counts_an_adopted_trial_once() -> None:
    from pgolf.search.display import Display

    d = Display(None, total=6, limit=LIMIT, quiet=True)
    d.finished(3, "complete", 2.5, 360_000)  # reconcile adopts t0003 ...
    d.resume_from(
        {n: {"state": "complete", "val_bpb": 2.6, "fits": True} for n in (0, 1, 2, 3)}
    )  # ...and it is in the ledger
    assert d.status().startswith("4/6 trained")  # not 5/6
    d.finished(5, "error", None, None, "boom")  # this session's own trial counts
    assert d.status().startswith("5/6 trained")


def test_storage_password_stays_out_of_the_study_files(tmp_path: Path) -> None:
    from pgolf.search import storage

    url = "postgresql://golfer:s3cret@db.example:5432/studies"
    assert storage.redact(url) == "postgresql://golfer:***@db.example:5432/studies"
    assert storage.redact("postgresql://golfer@db/x") == "postgresql://golfer@db/x"
    assert "s3cret" not in storage.redact_text(f"could not connect to {url} as golfer:s3cret", url)
    storage.keep_secret(url, tmp_path)
    assert (tmp_path / storage.SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert storage.resolve_url(storage.redact(url), tmp_path) == url  # --resume finds the real URL


def test_a_queued_point_is_launched_first_whatever_order_estimates_finish_in(runner: Any) -> None:
    """Estimates run in parallel: a fresh sample sized before the queued (start_with) point must
    not take its place."""
    from pgolf.search import sizing

    class Slow(sizing.InlineRunner):  # parallel, finishing jobs only when told, newest first
        parallel = True

        def __init__(self) -> None:
            super().__init__()
            self.held: list[Any] = []
            self.release = False

        def submit(self, job: Any) -> None:
            self.held.append(job)

        def poll(self, timeout: float = 0.0) -> list[Any]:
            if not self.release:
                return []
            out = [(j, sizing.compute(j.stack, j.base_dir)) for j in reversed(self.held)]
            self.held = []
            return out

    runner.spec = runner.spec.model_copy(
        update={"search": runner.spec.search.model_copy(update={"size_workers": 3})}
    )
    runner.attach_sizer(Slow())
    assert runner.next_config() is harness.NOT_READY  # 0 (128), 1 (64, queued) and a fresh one in flight
    runner.sizer.release = True
    cfg = runner.next_config()
    assert cfg is not None and cfg["number"] == 1  # the queued point, though the fresh one finished first
    assert runner.records[0]["state"] == "infeasible"


def test_an_illegal_run_is_infeasible_for_optuna_and_recorded_with_its_reasons(runner: Any) -> None:
    a = runner.next_config()["number"]
    b = runner.next_config()["number"]
    why = "future probe: changing the tokens after position 180 changed the distribution at position 180"
    runner.finish(a, {**_final(2.0), "legal": False, "legal_reasons": [why]}, error=False)  # the better score
    runner.finish(b, {**_final(2.5), "legal": True, "legal_reasons": []}, error=False)
    rec = runner.ledger.records()[a]
    assert rec["legal"] is False and rec["legal_reasons"] == [why]
    assert _frozen(runner, a).constraints["legal"] == 1.0 and _frozen(runner, b).constraints["legal"] == 0.0
    assert _frozen(runner, a).user_attrs["legal"] is False
    assert runner.study.best_trial.number == b  # Optuna never picks the illegal one
    assert runner.display.best == (2.5, b)  # nor does the live display
    assert runner.display.rows[a].note.startswith(
        "NOT LEGAL: future probe: changing the tokens after position 180"
    )
