"""`pgolf ablate` without Ray: the plan (variants, requirements), the ablation as a search of fixed
points (`search.points_only`), the step matching of the trainable, and the report (table, Welch
tests, intervals, CSV, JSON, plot) on a study written by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import BASELINE

from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.api.errors import ConfigError, PgolfError
from pgolf.search import ablate
from pgolf.search.ledger import Ledger
from pgolf.search.spec import search_from_dict
from pgolf.search.stats import t_cdf, t_ppf, welch_interval, welch_less

FOUR = {"bigram_hash": {"buckets": 512, "dim": 16}, "xsa": {"layers": "all"}, "leaky_relu_sq": {}, "ema": {}}


def four_stack(**techniques: Any) -> Any:
    return stack_from_dict(
        {
            "base": str(BASELINE),
            "name": "four",
            "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
            "export": {"artifact_limit": 600_000},
            "techniques": techniques or FOUR,
        }
    )


def test_leave_one_out_and_add_one_in_points() -> None:
    p = ablate.plan(four_stack(), seeds=[1, 2], add_one_in=True)
    names = [v.name for v in p.variants]
    assert names == ["full", "-bigram_hash", "-xsa", "-leaky_relu_sq", "-ema",
                     "base", "+bigram_hash", "+xsa", "+leaky_relu_sq", "+ema"]  # fmt: skip
    by = {v.name: v for v in p.variants}
    assert all(by["full"].point.values()) and not any(by["base"].point.values())
    assert by["-xsa"].point == {"techniques.bigram_hash": True, "techniques.xsa": False,
                                "techniques.leaky_relu_sq": True, "techniques.ema": True}  # fmt: skip
    assert [k for k, on in by["+ema"].point.items() if on] == ["techniques.ema"]
    assert by["-xsa"].reference == "full" and by["+xsa"].reference == "base"
    assert len(p.points()) == 10 and p.points()[0] == by["full"].point


def test_only_the_named_techniques_are_ablated_and_the_rest_stay() -> None:
    p = ablate.plan(four_stack(), seeds=[1, 2], techniques=["ema", "xsa"], add_one_in=True)
    assert p.ablated == ["xsa", "ema"]  # in the stack's order
    base = next(v for v in p.variants if v.kind == "base")
    assert [k for k, on in base.point.items() if not on] == ["techniques.xsa", "techniques.ema"]
    # two techniques: "-xsa" is the base with ema, so it shares "+ema"'s trial
    assert len(p.variants) == 6 and len(p.points()) == 4
    assert p.names_of(next(v for v in p.variants if v.name == "-xsa").point) == ["-xsa", "+ema"]


def test_requirements_go_with_the_technique(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgolf.registry import REGISTRY

    monkeypatch.setattr(REGISTRY.get("bigram_hash"), "requires", ("xsa",))  # as if bigram_hash needed xsa
    rs = four_stack()
    p = ablate.plan(rs, seeds=[1, 2], add_one_in=True)
    by = {v.name: v for v in p.variants}
    assert by["-xsa"].toggled == ("xsa", "bigram_hash")  # removing xsa removes what needs it
    assert not by["-xsa"].point["techniques.bigram_hash"]
    assert by["+bigram_hash"].toggled == ("bigram_hash", "xsa")  # adding it adds what it needs
    assert by["+bigram_hash"].point["techniques.xsa"]
    for v in p.variants:  # every variant is a valid stack
        on = {k.split(".")[1] for k, val in v.point.items() if val}
        assert "bigram_hash" not in on or "xsa" in on


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"techniques": ["xsa", "nope"]}, "'nope' is not a technique of the stack"),
        ({"techniques": ["xsa", "xsa"]}, "twice"),
        ({"seeds": [1]}, "at least 2 seeds"),
    ],
)
def test_plan_errors(kw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"seeds": [1, 2], **kw}
    with pytest.raises(PgolfError, match=message):
        ablate.plan(four_stack(), **args)


def test_a_stack_without_techniques_has_nothing_to_ablate() -> None:
    rs = stack_from_dict({"base": str(BASELINE)})
    with pytest.raises(PgolfError, match="nothing to ablate"):
        ablate.plan(rs, seeds=[1, 2])


def test_the_ablation_is_a_valid_search_of_fixed_points() -> None:
    rs = four_stack()
    p = ablate.plan(rs, seeds=[1, 2, 3], add_one_in=True)
    loaded = search_from_dict(ablate.search_dict(rs, p, gpus=0, cpus=1))
    s = loaded.spec
    assert s.search.points_only and s.search.scheduler == "fifo" and s.search.seeds == [1, 2, 3]
    assert s.search.start_with == p.points() and s.search.num_samples == len(p.points())
    assert s.constraint.artifact_bytes == 600_000  # the stack's own limit
    assert {d.key for d in loaded.dims} == {f"techniques.{n}" for n in FOUR}


def test_step_matched_ablations_get_room_past_the_cap() -> None:
    rs = four_stack()
    p = ablate.plan(rs, seeds=[1, 2], step_matched=True)
    d = ablate.search_dict(rs, p, gpus=1, cpus=1)
    assert d["trial"]["timeout_seconds"] == 2 * (2.5 * 600 + 900)


def test_points_only_needs_complete_points() -> None:
    rs = four_stack()
    p = ablate.plan(rs, seeds=[1, 2])
    d = ablate.search_dict(rs, p, gpus=0, cpus=1)
    d["search"]["start_with"][1] = {"techniques.xsa": False}
    with pytest.raises(ConfigError, match=r"start_with\[1\].*missing: techniques.bigram_hash"):
        search_from_dict(d)
    d["search"]["start_with"] = []
    with pytest.raises(ConfigError, match="needs the points"):
        search_from_dict(d)


# --------------------------------------------------------------------------------------------
# Statistics: the interval matches the test
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("q", "df"), [(0.99, 3.65), (0.975, 1.0), (0.9, 30.0), (0.01, 2.5), (0.5, 4.0)])
def test_t_quantile_against_scipy(q: float, df: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    assert t_ppf(q, df) == pytest.approx(float(stats.t.ppf(q, df)), rel=1e-9, abs=1e-12)
    assert t_cdf(t_ppf(q, df), df) == pytest.approx(q, abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([4.67, 4.68, 4.665], [4.70, 4.71, 4.72]),
        ([1.0, 1.1], [1.05, 1.2]),
        ([2.0, 2.002, 2.001], [2.01, 2.0]),
    ],
)
def test_the_98_percent_interval_excludes_zero_exactly_when_p_is_below_001(
    a: list[float], b: list[float]
) -> None:
    stats = pytest.importorskip("scipy.stats")
    w = welch_less(a, b)
    lo, hi = welch_interval(w)
    assert lo < w.diff < hi
    assert (hi < 0) == (w.p < 0.01)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    half = float(stats.t.ppf(0.99, w.df)) * se
    assert (lo, hi) == pytest.approx((w.diff - half, w.diff + half), rel=1e-9)


# --------------------------------------------------------------------------------------------
# The report of a study written by hand
# --------------------------------------------------------------------------------------------

K = 0.5  # bpb per nat of this made-up validation set


def _trial(study: Path, number: int, point: dict[str, bool], losses: list[float], **rec: Any) -> None:
    run_dir = f"trials/t{number:04d}"
    for seed, loss in zip([1, 2, 3], losses, strict=False):
        d = study / run_dir / f"seed_{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"val_loss": loss, "val_bpb": K * loss, "seed": seed}))
    Ledger(study / "trials.jsonl").append(
        {"number": number, "state": "running", "point": point, "run_dir": run_dir, "estimated_bytes": 1000}
    )
    Ledger(study / "trials.jsonl").append(
        {"number": number, "state": "complete", "val_loss": statistics.fmean(losses),
         "val_bpb": K * statistics.fmean(losses), "val_bpb_std": K * statistics.stdev(losses), **rec}
    )  # fmt: skip


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    rs = four_stack()
    p = ablate.plan(rs, seeds=[1, 2, 3], add_one_in=True, techniques=["bigram_hash", "xsa", "ema"])
    d = tmp_path / "study"
    d.mkdir()
    p.write(d)
    (d / "search.yaml").write_text("constraint: {artifact_bytes: 600000}\n")
    by = {v.name: v.point for v in p.variants}
    _trial(d, 0, by["full"], [3.000, 3.002, 3.001], artifact_bytes=500_000, tokens_per_second=1000.0)
    _trial(d, 1, by["-bigram_hash"], [3.050, 3.052, 3.049], artifact_bytes=450_000, tokens_per_second=1100.0)
    _trial(d, 2, by["-xsa"], [3.001, 3.004, 2.999], artifact_bytes=499_000, tokens_per_second=1200.0)
    Ledger(d / "trials.jsonl").append(
        {"number": 3, "state": "infeasible", "point": by["-ema"], "estimated_bytes": 650_000}
    )
    _trial(d, 4, by["base"], [3.300, 3.310, 3.305], artifact_bytes=420_000, tokens_per_second=1500.0)
    Ledger(d / "trials.jsonl").append(
        {"number": 5, "state": "error", "point": by["+xsa"], "error": "RuntimeError: boom\nmore"}
    )
    return d


def test_report_compares_each_variant_with_its_reference(study: Path) -> None:
    from pgolf.search.repeat import compare

    rep = ablate.report(study)
    full, nob, nox, noe = (rep.row(n) for n in ("full", "-bigram_hash", "-xsa", "-ema"))
    assert full.state == "complete" and full.comparison is None
    # with − without: full − (−bigram_hash), the Welch test of `pgolf compare`
    c = compare([study / "trials/t0000"], [study / "trials/t0001"])
    assert nob.comparison is not None and nob.comparison.welch == c.welch
    assert nob.d_nats == pytest.approx(3.001 - 3.0503333, abs=1e-6)
    assert nob.d_bpb == pytest.approx(K * nob.d_nats)
    assert nob.bar_met and nob.p is not None and nob.p < 0.01
    lo, hi = nob.interval_bpb or (0, 0)
    assert lo < nob.d_bpb < hi < 0
    assert rep.deltas["-bigram_hash"] == {
        "d_bytes": 50_000,
        "d_estimated_bytes": 0,
        "d_tokens_per_second": -100.0,
    }
    assert nox.comparison is not None and not nox.bar_met  # within noise
    assert noe.state == "infeasible" and noe.comparison is None
    assert "does not fit (650,000 > 600,000 bytes)" in noe.note
    # add-one-in: base + technique − base; the failed one says why
    plus_x = rep.row("+xsa")
    assert plus_x.state == "error" and plus_x.note == "error: RuntimeError: boom"
    assert rep.row("+bigram_hash").state == "pending" and rep.row("+ema").state == "pending"


def test_report_files(study: Path) -> None:
    from rich.console import Console

    rep = ablate.report(study)
    written = ablate.write_all(rep)
    rows = json.loads(written.json.read_text())["rows"]
    assert [r["variant"] for r in rows] == [v.name for v in rep.plan.variants]
    r = next(r for r in rows if r["variant"] == "-bigram_hash")
    assert r["bar_met"] is True and r["d_bytes"] == 50_000 and r["n_seeds"] == 3
    assert r["d_val_bpb"] == pytest.approx(rep.row("-bigram_hash").d_bpb)
    text = written.csv.read_text().splitlines()
    assert text[0].startswith("variant,kind,technique") and len(text) == 1 + len(rows)
    assert written.png.stat().st_size > 10_000 and written.png.read_bytes()[:4] == b"\x89PNG"
    console = Console(width=200, record=True)
    console.print(ablate.table(rep))
    out = console.export_text()
    assert "-bigram_hash" in out and "MET" in out and "650,000~" in out
    assert any("98%" in line for line in ablate.footer(rep))


def test_an_interrupted_variant_is_pending_and_a_rerun_counts(study: Path) -> None:
    p = ablate.read_plan(study)
    point = next(v.point for v in p.variants if v.name == "+ema")
    Ledger(study / "trials.jsonl").append({"number": 6, "state": "running", "point": point, "run_dir": "x"})
    Ledger(study / "trials.jsonl").append({"number": 6, "state": "interrupted"})
    assert ablate.report(study).row("+ema").state == "pending"
    _trial(study, 7, point, [3.2, 3.21, 3.19], artifact_bytes=421_000, tokens_per_second=1400.0)
    row = ablate.report(study).row("+ema")
    assert row.state == "complete" and row.bar_met  # 3.20 vs base 3.305


def test_not_an_ablation_study(tmp_path: Path) -> None:
    with pytest.raises(PgolfError, match="not an ablation study"):
        ablate.report(tmp_path)
    (tmp_path / "ablation.json").write_text("{")
    with pytest.raises(PgolfError, match="malformed ablation file"):
        ablate.report(tmp_path)


# --------------------------------------------------------------------------------------------
# Step matching in the trainable
# --------------------------------------------------------------------------------------------


def test_matched_steps_wait_for_the_reference_seed(tmp_path: Path) -> None:
    import threading

    from pgolf.search.trainable import matched_steps

    ref = tmp_path / "trials" / "t0000"
    ledger = tmp_path / "trials.jsonl"
    Ledger(ledger).append({"number": 0, "state": "running"})
    match = {"number": 0, "run_dir": str(ref), "ledger": str(ledger)}

    def finish_seed() -> None:
        (ref / "seed_7").mkdir(parents=True)
        (ref / "seed_7" / "result.json").write_text(json.dumps({"steps": 4321}))

    threading.Timer(0.3, finish_seed).start()
    assert matched_steps(match, 7, poll_seconds=0.05) == 4321


def test_matched_steps_fail_when_the_reference_ended_without_the_seed(tmp_path: Path) -> None:
    from pgolf.search.trainable import NoReference, _error_kind, matched_steps

    ledger = tmp_path / "trials.jsonl"
    Ledger(ledger).append({"number": 0, "state": "running"})
    Ledger(ledger).append({"number": 0, "state": "timeout"})
    match = {"number": 0, "run_dir": str(tmp_path / "t0000"), "ledger": str(ledger)}
    with pytest.raises(NoReference, match=r"t0000 ended \(timeout\) without a result for seed 3") as e:
        matched_steps(match, 3, poll_seconds=0.01)
    assert _error_kind(e.value) == "no_reference"


# --------------------------------------------------------------------------------------------
# The driver (no Ray): fixed points only, the full stack first, step matching
# --------------------------------------------------------------------------------------------


def _runner(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    limit: int = 600_000,
    reverse: bool = False,
    **plan_kw: Any,
) -> Any:
    harness = pytest.importorskip("pgolf.search.harness")
    from pgolf.search.ablate_run import AblationRunner

    monkeypatch.setattr(harness, "prepare_data", lambda stack: None)  # data are not under test here
    rs = four_stack()
    p = ablate.plan(rs, seeds=[1, 2], **{"techniques": ["xsa", "ema"], **plan_kw})
    d = ablate.search_dict(rs, p, gpus=0, cpus=1, size_workers=0)
    d["constraint"]["artifact_bytes"] = limit
    loaded = search_from_dict(d)
    study = tmp_path / "study"
    study.mkdir()
    p.write(study)
    r = AblationRunner(loaded, study, console=None, quiet=True, resume=False)
    points = loaded.spec.search.start_with
    for point in reversed(points) if reverse else points:  # reverse: as after a resume, full last
        r.study.enqueue_trial(point)
    r.to_launch = r.budget()
    return r


def test_only_the_points_are_trained_and_a_rejected_one_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _runner(tmp_path, monkeypatch)
    assert r.budget() == 3  # full, -xsa, -ema
    # -xsa does not fit: pretend its layout is huge by rejecting it in the gate
    real_fast = r.gate.fast

    def fast(rs: Any, layout: Any) -> Any:
        est = real_fast(rs, layout)
        if "xsa" not in rs.technique_names() and est is not None:
            return dataclasses.replace(est, model_bytes=10**9)
        return est

    monkeypatch.setattr(r.gate, "fast", fast)
    launched = []
    while (cfg := r.next_config()) is not None:
        launched.append(r.records[cfg["number"]]["point_text"])
    assert launched == ["full", "-ema"]
    states = {rec["point_text"]: rec["state"] for rec in r.ledger.records().values()}
    assert states == {"full": "running", "-xsa": "infeasible", "-ema": "running"}
    assert r.exhausted and not r.gave_up and len(r.study.trials) == 3  # nothing sampled


def test_the_full_stack_is_launched_first_and_step_matched_variants_wait_for_its_first_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = pytest.importorskip("pgolf.search.harness")
    r = _runner(tmp_path, monkeypatch, step_matched=True, reverse=True)
    r.pump()  # every point is sized ahead (points_only)
    assert [(s.ot.number, s.text) for s in r.ready] == [(0, "-ema"), (1, "-xsa"), (2, "full")]
    cfg = r.next_config()
    assert cfg is not None and r.records[cfg["number"]]["point_text"] == "full" and "match_steps" not in cfg
    assert r.next_config(wait=0.1) is harness.NOT_READY  # full's first seed has not finished
    seed = r.dir / r.records[cfg["number"]]["run_dir"] / "seed_1"
    seed.mkdir(parents=True)
    (seed / "result.json").write_text(json.dumps({"steps": 123}))
    nxt = r.next_config()
    assert nxt is not None and nxt["match_steps"] == {
        "number": cfg["number"],
        "run_dir": str(seed.parent.resolve()),
        "ledger": str((r.dir / "trials.jsonl").resolve()),
    }
    assert r.records[nxt["number"]]["match_steps"]["number"] == cfg["number"]  # in the ledger too


def test_step_matched_variants_are_not_trained_when_the_full_stack_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _runner(tmp_path, monkeypatch, step_matched=True)
    cfg = r.next_config()
    r.finish(cfg["number"], {"final": True, "state": "error", "error": "RuntimeError: out of memory",
                             "objective": math.nan}, error=False)  # fmt: skip
    assert r.next_config() is None
    assert r.halt is not None and "ended error (RuntimeError: out of memory)" in r.halt
    assert r.summary_extras() == {"halt": r.halt}
    assert r.leftovers() == 2  # the sized variants are closed as unused


def test_a_queued_point_being_sized_when_the_driver_died_is_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgolf.search.ablate_run import AblationRunner

    r = _runner(tmp_path, monkeypatch)
    asked = r.study.ask()  # the full stack's point, asked for but never recorded
    again = AblationRunner(r.loaded, r.dir, console=None, quiet=True, resume=True)
    notes = again.reconcile()
    assert again.records[asked.number]["state"] == "interrupted"
    assert any("being sized" in n for n in notes)
    assert again.budget() == 3  # the three points are still to train
    again.to_launch = again.budget()
    cfg = again.next_config()
    assert cfg is not None and again.records[cfg["number"]]["point_text"] == "full"


def test_a_new_ablation_that_fails_before_its_first_variant_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = pytest.importorskip("pgolf.search.harness")
    from pgolf.registry.tools.cli import main

    seen: list[bool] = []

    def no_data(stack: Any) -> None:  # after the runner read the plan, before Ray
        seen.append((out / ablate.ABLATION_FILE).is_file())
        raise PgolfError("no data here")

    monkeypatch.setattr(harness, "prepare_data", no_data)
    stack = tmp_path / "four.yaml"
    stack.write_text(json.dumps({"base": str(BASELINE), "name": "four", "techniques": FOUR}))
    out = tmp_path / "study"
    args = ["ablate", str(stack), "--out", str(out), "--gpus", "0", "--cpus", "1", "--techniques", "xsa"]
    assert main(args) == 2 and "no data here" in capsys.readouterr().err
    assert seen == [True] and not out.exists()
    out.mkdir()  # an empty folder the user made: kept, and still empty
    assert main(args) == 2 and seen == [True, True]
    assert out.is_dir() and not any(out.iterdir())
