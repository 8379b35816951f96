"""`pgolf results` on a synthetic study: ranking, table, CSV, Pareto PNG and best-stack YAML."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pgolf.registry.api.config import load_stack, stack_from_dict
from pgolf.registry.tools.cli import main
from pgolf.search import space
from pgolf.search.ledger import Ledger, fold
from pgolf.search.results import best_stack_yaml, load_study, pareto_front, stack_changes, table, write_all
from pgolf.search.spec import search_from_dict

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 400_000


def _fake_study(tmp: Path) -> Path:
    """A study folder as `pgolf search` leaves it, with made-up trial outcomes."""
    loaded = search_from_dict(
        {
            "name": "synthetic",
            "stack": {
                "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
                "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
            },
            "space": {"model.num_layers": {"int": [1, 3]}, "techniques.ema": {"optional": True}},
            "constraint": {"artifact_bytes": LIMIT},
        }
    )
    d = tmp / "study"
    d.mkdir()
    (d / "search.yaml").write_text(loaded.resolved_yaml(study_name="synthetic-1"))
    (d / "base_stack.yaml").write_text(loaded.base.to_yaml())
    led = Ledger(d / "trials.jsonl")

    def stack(point: dict[str, Any], n: int) -> dict[str, Any]:
        data = space.apply(loaded.base_data, point)
        data.update(name=f"synthetic-t{n:04d}", seed=1337)
        data["train"]["threads"] = 1
        data["export"]["artifact_limit"] = LIMIT
        return stack_from_dict(data).to_dict()  # the ledger keeps the fully resolved stack

    outcomes = [  # number, point, final event
        (
            0,
            {"model.num_layers": 2, "techniques.ema": False},
            {"state": "complete", "val_bpb": 2.80, "val_loss": 5.30, "artifact_bytes": 360_000, "fits": True},
        ),
        (
            1,
            {"model.num_layers": 3, "techniques.ema": True},
            {"state": "complete", "val_bpb": 2.70, "val_loss": 5.10, "artifact_bytes": 395_000, "fits": True},
        ),
        (
            2,
            {"model.num_layers": 1, "techniques.ema": False},
            {"state": "complete", "val_bpb": 2.95, "val_loss": 5.60, "artifact_bytes": 300_000, "fits": True},
        ),
        (
            3,
            {"model.num_layers": 3, "techniques.ema": False},
            {
                "state": "complete",
                "val_bpb": 2.60,
                "val_loss": 4.90,
                "artifact_bytes": 410_000,
                "fits": False,
            },
        ),
        (
            4,
            {"model.num_layers": 2, "techniques.ema": True},
            {"state": "stopped", "val_bpb": 3.20, "val_loss": 6.0},
        ),
        (
            5,
            {"model.num_layers": 1, "techniques.ema": True},
            {"state": "error", "error": "RuntimeError: boom"},
        ),
        (
            6,
            {"model.num_layers": 2, "techniques.ema": False},
            {"state": "complete", "val_bpb": 2.85, "val_loss": 5.40, "artifact_bytes": 361_000, "fits": True},
        ),
    ]
    for n, point, final in outcomes:
        led.append(
            {
                "number": n,
                "state": "running",
                "point": point,
                "stack": stack(point, n),
                "estimated_bytes": 350_000,
                "estimate": {"total": 350_000, "margin": 0},
                "legal": True,
                "seeds": [1337],
                "run_dir": str(d / "trials" / f"t{n:04d}"),
            }
        )
        extra = (
            {
                "objective": final["val_bpb"],
                "params_count": 1000 * (n + 1),
                "tokens_per_second": 1e4,
                "estimate_error_bytes": final["artifact_bytes"] - 350_000,
            }
            if final["state"] == "complete"
            else {}
        )
        led.append({"number": n, **final, **extra})
    led.append(
        {
            "number": 7,
            "state": "infeasible",
            "point": {"model.num_layers": 3},
            "estimated_bytes": 690_000,
            "stack": stack({"model.num_layers": 3, "techniques.ema": True}, 7),
        }
    )
    return d


@pytest.fixture()
def study_dir(tmp_path: Path) -> Path:
    return _fake_study(tmp_path)


def test_ranking_and_best(study_dir: Path) -> None:
    study = load_study(study_dir)
    ranked = [(r.name, r.rank) for r in study.rows]
    # complete trials by val_bpb (the one over the limit is ranked but never best), then the rest
    assert ranked[:5] == [("t0003", 1), ("t0001", 2), ("t0000", 3), ("t0006", 4), ("t0002", 5)]
    assert [r.state for r in study.rows[5:]] == ["stopped", "error", "infeasible"]
    assert all(r.rank is None for r in study.rows[5:])
    best = study.best()
    assert best is not None and best.name == "t0001"  # t0003 scores better but does not fit
    assert best.changes == "model.num_layers=3 +ema(decay=0.997)"


def test_table_shows_the_columns(study_dir: Path) -> None:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table(load_study(study_dir)))
    text = console.export_text()
    for col in ("val_bpb", "val_loss", "bytes", "fits", "legal", "params", "tok/s", "changes vs base stack"):
        assert col in text
    assert "2.7000" in text and "395,000" in text and "690,000~" in text and "RuntimeError: boom" in text


def test_csv_png_and_best_yaml(study_dir: Path, tmp_path: Path) -> None:
    study = load_study(study_dir)
    written = write_all(study)
    rows = list(csv.DictReader(io.StringIO(written.csv.read_text())))
    assert [r["trial"] for r in rows][:2] == ["t0003", "t0001"]
    assert rows[0]["fits"] == "NO" and rows[1]["fits"] == "yes" and rows[1]["rank"] == "2"
    assert rows[1]["estimate_error_bytes"] == "45000"
    assert {r["state"] for r in rows} == {"complete", "stopped", "error", "infeasible"}
    png = written.png
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert written.best_yaml is not None
    text = written.best_yaml.read_text()
    assert text.startswith("# Best stack of study synthetic") and "t0001" in text
    rs = load_stack(written.best_yaml)  # what `pgolf run` does first
    assert rs.stack.model.num_layers == 3 and "ema" in rs.technique_names()
    assert rs.stack.train.threads == 1  # as the trial ran: `pgolf run` reproduces it bit for bit on CPU
    assert rs.stack.export.artifact_limit == LIMIT


def test_results_cli(study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_csv, out_png, out_yaml = tmp_path / "r.csv", tmp_path / "p.png", tmp_path / "b.yaml"
    rc = main(
        [
            "results",
            str(study_dir),
            "--csv",
            str(out_csv),
            "--png",
            str(out_png),
            "--best-yaml",
            str(out_yaml),
        ]
    )
    assert rc == 0 and out_csv.is_file() and out_png.is_file() and out_yaml.is_file()
    out = capsys.readouterr().out
    assert "best: t0001" in out and "1 infeasible" in out
    assert main(["results", str(tmp_path / "nope")]) == 2


def test_no_best_when_nothing_fits(tmp_path: Path) -> None:
    d = _fake_study(tmp_path)
    led = Ledger(d / "trials.jsonl")
    for n in (0, 1, 2, 6):
        led.append({"number": n, "state": "complete", "fits": False, "artifact_bytes": 500_000})
    study = load_study(d)
    assert study.best() is None and best_stack_yaml(study) is None
    assert write_all(study).best_yaml is None


def test_pareto_front() -> None:
    pts = [(3.0, 2.5), (1.0, 3.0), (2.0, 2.9), (2.5, 2.95), (4.0, 2.5), (2.0, 2.8)]
    assert pareto_front(pts) == [(1.0, 3.0), (2.0, 2.8), (3.0, 2.5)]


def test_stack_changes() -> None:
    base = {
        "model": {"num_layers": 2},
        "seed": 1,
        "techniques": {"xsa": {"layers": "all"}, "ema": {"decay": 0.9}},
    }
    trial = {
        "model": {"num_layers": 3},
        "seed": 7,
        "techniques": {"xsa": {"layers": "last(1)"}, "zlib": {"level": 6}},
    }
    assert stack_changes(base, trial) == "model.num_layers=3 xsa.layers=last(1) +zlib(level=6) -ema"


def test_fold_counts_final_events() -> None:
    recs = fold(
        [
            {"number": 1, "state": "running"},
            {"number": 1, "state": "complete", "val_bpb": 2.0},
            {"number": 1, "error": "detail"},
            {"number": 2, "state": "infeasible"},
        ]
    )
    assert recs[1]["state"] == "complete" and recs[1]["finished_events"] == 1 and recs[1]["error"] == "detail"
    assert recs[2]["finished_events"] == 1


def test_ledger_survives_a_line_cut_by_a_crash(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "trials.jsonl")
    led.append({"number": 0, "state": "complete", "val_bpb": 2.5})
    with led.path.open("a") as f:
        f.write('{"number": 1, "state": "comp')  # the driver died mid-write
    led.append({"number": 2, "state": "infeasible"})
    recs = led.records()
    assert sorted(recs) == [0, 2] and recs[2]["state"] == "infeasible"
    led.append({"number": 0, "val_bpb": float("nan")})  # NaN is stored as null (strict JSON)
    assert recs[0]["val_bpb"] == 2.5 and led.records()[0]["val_bpb"] is None


def test_live_display_table_and_progress_line() -> None:
    from pgolf.search.display import Display

    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    d = Display(console, total=4, limit=LIMIT)
    d.resume_from({0: {"state": "complete", "val_bpb": 2.6, "fits": True}, 1: {"state": "error"}})
    d.start()
    d.started(2, "num_layers=3", 350_000)
    d.progress(2, 10, 2.9)
    d.rejected(3, "infeasible", "num_layers=9", 990_000, "")
    d.finished(2, "complete", 2.5, 361_000)
    d.stop()
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "3/4 trained" in d.status() and "best val_bpb 2.5000 (t0002)" in d.status()
    assert "1 infeasible" in d.status()
    assert "t0003" in out and "990,000~" in out and "361,000" in out


def test_footer_margin_advice_uses_the_worst_under_estimate(study_dir: Path) -> None:
    """Errors are +10k, +45k, −50k, +60k, +11k: the margin must cover the +60k under-estimate;
    the −50k over-estimate (the largest by absolute value) needs no margin."""
    from pgolf.search.results import footer

    line = next(ln for ln in footer(load_study(study_dir)) if ln.startswith("size estimate error"))
    assert "worst under-estimate +60,000 bytes" in line and "above 60,000 bytes" in line
    assert "-50,000" not in line


def test_history_plot_and_relative_run_dirs(study_dir: Path, tmp_path: Path) -> None:
    import shutil

    from pgolf.search.results import plot_history

    study = load_study(study_dir)
    assert plot_history(study, tmp_path / "h.png") == 5  # 4 complete + 1 stopped (the error has no score)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    moved = shutil.copytree(study_dir, tmp_path / "copied")
    led = Ledger(moved / "trials.jsonl")
    led.append({"number": 0, "run_dir": "trials/t0000"})  # as the harness now stores it
    row = next(r for r in load_study(moved).rows if r.number == 0)
    assert row.run_path(moved) == moved / "trials" / "t0000"


def test_an_illegal_trial_ranks_after_every_legal_one_and_says_why(study_dir: Path) -> None:
    reason = "normalisation probe: technique 'hashed_ngram_cache' ... sums to 3.2 at position 17"
    Ledger(study_dir / "trials.jsonl").append(
        {"number": 1, "legal": False, "legal_reasons": [reason]}  # t0001: the best that fits, but illegal
    )
    study = load_study(study_dir)
    ranked = [(r.name, r.rank, r.legal) for r in study.rows[:5]]
    assert ranked == [("t0003", 1, True), ("t0000", 2, True), ("t0006", 3, True), ("t0002", 4, True),
                      ("t0001", 5, False)]  # fmt: skip
    best = study.best()
    assert best is not None and best.name == "t0000"  # the legal trial that fits with the lowest score
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(table(study))
    assert "not legal: normalisation probe" in console.export_text()
    rows = {r["trial"]: r for r in csv.DictReader(io.StringIO(write_all(study).csv.read_text()))}
    assert rows["t0001"]["legal"] == "NO" and rows["t0001"]["legal_reasons"] == reason


def test_a_trial_is_legal_only_when_every_seeds_run_is() -> None:
    from pgolf.search.trainable import verdict

    ok = {"legal": True, "legal_reasons": []}
    bad = {
        "legal": False,
        "legal_reasons": ["data probe: validation shard fineweb_val_000000.bin was opened"],
    }
    assert verdict([ok, ok]) == {"legal": True, "legal_reasons": []}
    assert verdict([ok, bad, bad]) == {"legal": False, "legal_reasons": bad["legal_reasons"]}
    assert verdict([{"val_bpb": 1.0}]) == {}  # a re-scored artifact records no verdict
