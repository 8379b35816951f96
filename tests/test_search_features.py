"""What researchers use Optuna and Ray Tune for, on tiny CPU searches run in this process (one
Ray instance for the module): multi-objective (val_bpb, bytes) with the Pareto front from the
study, top-k confirmation on more seeds with the nats test, parameter importance, warm start
from an earlier study, and eval-only trials that re-score a saved artifact without training."""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

harness = pytest.importorskip("pgolf.search.harness")
import optuna  # noqa: E402

from pgolf.registry.api.errors import ConfigError  # noqa: E402
from pgolf.search.ledger import Ledger  # noqa: E402
from pgolf.search.results import confirmation, importance_lines, load_study  # noqa: E402
from pgolf.search.spec import search_from_dict  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    tmp = tempfile.mkdtemp(prefix="pgf-", dir="/tmp")
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, _temp_dir=tmp
    )
    try:
        yield
    finally:
        ray.shutdown()


def _stack(cache: Path) -> dict[str, Any]:
    return {
        "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
        "model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1},
        "train": {"train_seq_len": 128, "train_batch_tokens": 1024, "micro_batch_tokens": 1024, "iterations": 6,
                  "max_wallclock_seconds": 0, "warmdown_iters": 2, "warmup_steps": 0, "val_loss_every": 0},
        "eval": {"batch_tokens": 8192},
        "data": {"cache_dir": str(cache)},
    }  # fmt: skip


def _run(raw: dict[str, Any], out: Path, source: Path) -> dict[str, Any]:
    source.write_text(json.dumps(raw))  # a search file next to which relative paths resolve
    loaded = search_from_dict(raw, source=str(source), base_dir=source.parent)
    return harness.run_search(loaded, out, quiet=True)


@pytest.fixture(scope="module")
def first(ray_local: None, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multi-objective, with the best trial and the reference confirmed on one more seed."""
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import prepare_data

    prepare_data(stack_from_dict(_stack(cache_dir)).stack)
    work = tmp_path_factory.mktemp("features")
    raw = {
        "name": "mo",
        "stack": _stack(cache_dir),
        "space": {"optim.matrix_lr": {"logfloat": [0.02, 0.1]}, "model.num_layers": {"int": [1, 2]}},
        "objective": {"multi_objective": True},
        "trial": {"gpus": 0, "cpus": 1},
        "search": {"num_samples": 3, "max_concurrent": 2, "size_workers": 1, "confirm_top_k": 1,
                   "confirm_seeds": [1338], "start_with": [{"optim.matrix_lr": 0.04, "model.num_layers": 1}]},
    }  # fmt: skip
    summary = _run(raw, work / "mo", work / "mo.yaml")
    assert summary["exit_code"] == 0 and summary["trained"] == 3, summary
    return work / "mo"


def test_multi_objective_front_comes_from_the_study(first: Path) -> None:
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{first / 'optuna.db'}")
    assert len(study.directions) == 2
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:  # (val_bpb, artifact bytes), both to minimise
        assert (
            t.values[0] == pytest.approx(t.user_attrs["val_bpb"])
            and t.values[1] == t.user_attrs["artifact_bytes"]
        )
    front = {t.number for t in study.best_trials}
    assert front and front <= {t.number for t in done}
    for t in done:  # a trial off the front is dominated by one on it
        if t.number not in front:
            assert any(all(a <= b for a, b in zip(f.values, t.values)) for f in study.best_trials)


def test_top_k_confirmation_reruns_on_more_seeds_and_tests_in_nats(first: Path) -> None:
    recs = Ledger(first / "trials.jsonl").records()
    confirmed = [n for n, r in recs.items() if r.get("confirm_seeds")]
    ref = next(n for n, r in recs.items() if r.get("reference"))
    assert ref in confirmed and len(confirmed) in (1, 2)
    for n in confirmed:
        assert (first / recs[n]["run_dir"] / "seed_1338" / "result.json").is_file()
        assert (first / recs[n]["run_dir"] / "seed_1337" / "result.json").is_file()
    lines = confirmation(load_study(first))
    assert lines[0].startswith("confirmation") and "nats" in lines[0]
    assert all("over 2 seeds" in ln for ln in lines[1:])
    if len(confirmed) == 2:
        assert "p = " in lines[2] and "vs reference" in "".join(lines[1:])


def test_parameter_importance(first: Path) -> None:
    lines = importance_lines(load_study(first))
    assert "parameter importance" in lines[0]
    names = {ln.split()[0] for ln in lines[1:]}
    assert names <= {"optim.matrix_lr", "model.num_layers"} and names


def test_warm_start_imports_the_finished_trials(first: Path, cache_dir: Path) -> None:
    raw = {
        "name": "warm",
        "stack": _stack(cache_dir),
        "space": {"optim.matrix_lr": {"logfloat": [0.02, 0.1]}, "model.num_layers": {"int": [1, 2]}},
        "trial": {"gpus": 0, "cpus": 1},
        "search": {"num_samples": 1, "size_workers": 0, "warm_start": [str(first)], "sampler": "tpe",
                   "n_startup_trials": 2},
    }  # fmt: skip
    out = first.parent / "warm"
    summary = _run(raw, out, first.parent / "warm.yaml")
    assert summary["exit_code"] == 0 and summary["trained"] == 1
    assert any("warm start: 3 finished trials" in n for n in summary["notes"])
    recs = Ledger(out / "trials.jsonl").records()
    imported = [r for r in recs.values() if r["state"] == "imported"]
    assert len(imported) == 3 and all(r["from"].startswith(str(first)) for r in imported)
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{out / 'optuna.db'}")
    assert [t.user_attrs.get("pgolf_state") for t in study.trials[:3]] == ["imported"] * 3
    assert study.trials[3].state == optuna.trial.TrialState.COMPLETE  # trained after them
    table_states = {r.state for r in load_study(out).rows}
    assert "imported" in table_states and load_study(out).best() is not None


def test_eval_only_trials_rescore_the_saved_artifact(first: Path) -> None:
    raw = {
        "name": "evalonly",
        "eval_only": {"run": str(first)},  # the study's best trial
        "space": {"eval.seq_len": {"choice": [64, 128]}},
        "trial": {"gpus": 0, "cpus": 1},
        "search": {"num_samples": 2, "size_workers": 0, "sampler": "random",
                   "start_with": [{"eval.seq_len": 128}, {"eval.seq_len": 64}]},
    }  # fmt: skip
    out = first.parent / "evalonly"
    summary = _run(raw, out, first.parent / "evalonly.yaml")
    assert summary["exit_code"] == 0 and summary["trained"] == 2, summary
    best = load_study(first).best()
    assert best is not None
    # the best trial was confirmed on a second seed: both of its runs are re-scored, and averaged
    runs = [json.loads(f.read_text()) for f in sorted(best.run_path(first).glob("seed_*/result.json"))]
    assert len(runs) == 2
    recs = Ledger(out / "trials.jsonl").records()
    by_len = {r["point"]["eval.seq_len"]: r for r in recs.values() if r["state"] == "complete"}
    # the training's own evaluation settings give back the training's own scores, bit for bit
    assert by_len[128]["val_bpb"] == statistics.fmean(r["val_bpb"] for r in runs)
    assert by_len[128]["val_loss"] == statistics.fmean(r["val_loss"] for r in runs)
    assert by_len[64]["val_bpb"] != by_len[128]["val_bpb"]  # a shorter context scores differently
    # the same compressed model (the counted code is the script, which holds eval.seq_len)
    assert by_len[64]["model_bytes"] == max(r["model_bytes"] for r in runs)
    for r in by_len.values():  # nothing was trained or exported again
        folder = out / r["run_dir"]
        assert not list(folder.rglob("model.ptz")) and list(folder.rglob("eval_result.json"))
        # the sampled evaluation is probed as a run's is (the data probe as the training recorded it)
        assert r["legal"] is True and r["legal_reasons"] == []
        probes = json.loads(next(folder.rglob("eval_result.json")).read_text())["legality"]["probes"]
        assert {k for k, p in probes.items() if p["passed"]} == {"tags", "data", "provenance", "future",
                                                                 "normalisation"}  # fmt: skip


def test_eval_only_search_refuses_keys_that_change_the_model(first: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        search_from_dict({"eval_only": {"run": str(first)}, "space": {"model.num_layers": {"int": [1, 2]}}})
    assert "eval-only search re-scores a saved artifact" in dict(ei.value.problems)["space.model.num_layers"]
    # evaluation techniques (scorer slot, logprobs chain) may be searched on a saved artifact
    search_from_dict(
        {
            "eval_only": {"run": str(first)},
            "space": {
                "techniques.sliding_window": {"optional": True},
                "techniques.sliding_window.stride": {"choice": [32, 64]},
                "techniques.temperature": {"optional": True},
                "techniques.temperature.temperature": {"float": [0.9, 1.1]},
            },
        }
    )
    with pytest.raises(ConfigError) as ei:  # a training technique may not
        search_from_dict(
            {"eval_only": {"run": str(first)}, "space": {"techniques.ema.decay": {"float": [0.9, 0.99]}}}
        )
    assert "space.techniques.ema.decay" in dict(ei.value.problems)
