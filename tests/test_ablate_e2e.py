"""`pgolf ablate` end to end on CPU through the CLI (the issue's Done-when): a tiny 4-technique
stack (bigram_hash, xsa, ema, brotli) on 2 seeds, step-matched, killed with SIGKILL once two
variants are done and resumed; the variant without brotli falls back to zlib and no longer fits,
so it is reported and not trained. The table and the plot are written; every finished variant is
kept once; each variant's seeds stopped at the full stack's step counts. Both `pgolf ablate` calls
join the test session's Ray cluster (conftest's ``ray_address``) instead of each starting its
own (tests/test_search_e2e.py kills and resumes a study on its own Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgolf.search.ledger import Ledger

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = {"bigram_hash": {"buckets": 512, "dim": 16}, "xsa": {"layers": "all"}, "ema": {"decay": 0.9},
              "brotli": {}}  # fmt: skip


def tiny_stack(cache: Path, limit: int) -> dict[str, Any]:
    return {
        "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
        "name": "tiny4",
        "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
        "train": {
            "train_seq_len": 64,
            "train_batch_tokens": 1024,
            "micro_batch_tokens": 512,
            "iterations": 100_000,
            "max_wallclock_seconds": 1.5,  # the full stack's step counts differ by seed
            "warmdown_iters": 4,
            "warmup_steps": 0,
            "val_loss_every": 0,
        },
        "eval": {"batch_tokens": 4096},
        "data": {"cache_dir": str(cache)},
        "export": {"artifact_limit": limit},
        "techniques": TECHNIQUES,
    }


def _complete(ledger: Ledger) -> dict[int, dict[str, Any]]:
    return {n: r for n, r in ledger.records().items() if r.get("state") == "complete"}


def test_ablate_kill_resume_table_and_plot(tmp_path: Path, cache_dir: Path, ray_address: str) -> None:
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import estimate_artifact_bytes, prepare_data

    # the limit: 1,000 bytes below the estimate of the stack without brotli (zlib-9 instead)
    probe = tiny_stack(cache_dir, 16_000_000)
    prepare_data(stack_from_dict(probe).stack)  # the default corpus, built before Ray starts
    no_brotli = stack_from_dict(
        {**probe, "techniques": {k: v for k, v in TECHNIQUES.items() if k != "brotli"}}
    )
    limit = estimate_artifact_bytes(no_brotli).total - 1_000
    stack = tmp_path / "tiny4.yaml"
    stack.write_text(yaml.safe_dump(tiny_stack(cache_dir, limit), sort_keys=False))
    out = tmp_path / "study"
    ledger = Ledger(out / "trials.jsonl")
    cmd = [sys.executable, "-m", "pgolf.registry.tools.cli", "ablate", "--address", ray_address]

    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        [*cmd, str(stack), "--seeds", "2", "--step-matched", "--out", str(out), "--max-concurrent", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and len(_complete(ledger)) < 2:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()  # killed before it ends
        assert len(_complete(ledger)) >= 2, (tmp_path / "first.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _complete(ledger)
    before_points = {json.dumps(r["point"], sort_keys=True): n for n, r in before.items()}

    second = subprocess.run(
        [*cmd, "--resume", str(out)], capture_output=True, text=True, timeout=400, cwd=tmp_path
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stderr == ""
    recs = ledger.records()
    by_text: dict[str, list[dict[str, Any]]] = {}
    for r in recs.values():
        # an interrupted trial is re-run under a new number (one being sized when the driver
        # was killed has no point yet)
        if r["state"] != "interrupted":
            by_text.setdefault(str(r.get("point_text")), []).append(r)
    # every variant once: four trained, the one without brotli rejected before training
    assert {t: sorted(r["state"] for r in rs) for t, rs in by_text.items()} == {
        "full": ["complete"], "-bigram_hash": ["complete"], "-xsa": ["complete"], "-ema": ["complete"],
        "-brotli": ["infeasible"],
    }  # fmt: skip
    for key, n in before_points.items():  # kept, not re-run
        assert recs[n]["state"] == "complete"
        assert [m for m, r in recs.items() if json.dumps(r.get("point"), sort_keys=True) == key] == [n]
    rejected = by_text["-brotli"][0]
    assert (
        rejected["estimated_bytes"] > limit and not (out / "trials" / f"t{rejected['number']:04d}").exists()
    )
    # step-matched: each variant's seed stopped at the full stack's step count for that seed
    full_dir = out / by_text["full"][0]["run_dir"]
    steps = {
        s: json.loads((full_dir / f"seed_{s}" / "result.json").read_text())["steps"] for s in (1337, 1338)
    }
    for text in ("-bigram_hash", "-xsa", "-ema"):
        run_dir = out / next(r for r in by_text[text] if r["state"] == "complete")["run_dir"]
        for s, n in steps.items():
            res = json.loads((run_dir / f"seed_{s}" / "result.json").read_text())
            assert res["steps"] == n
            assert yaml.safe_load((run_dir / f"seed_{s}" / "stack.yaml").read_text())["train"] == {
                **yaml.safe_load((full_dir / f"seed_{s}" / "stack.yaml").read_text())["train"],
                "iterations": n,
                "max_wallclock_seconds": 0,
            }
    # the table, in the output and in the files, and the plot
    assert "ablation of tiny4" in second.stdout and "step-matched" in second.stdout
    assert "-brotli" in second.stdout and "does not fit" in second.stdout
    rows = {r["variant"]: r for r in json.loads((out / "ablation_results.json").read_text())["rows"]}
    assert set(rows) == {"full", "-bigram_hash", "-xsa", "-ema", "-brotli"}
    for name in ("-bigram_hash", "-xsa", "-ema"):
        r = rows[name]
        assert r["n_seeds"] == 2 and 0 <= r["p"] <= 1 and r["ci_low_bpb"] < r["d_val_bpb"] < r["ci_high_bpb"]
        assert isinstance(r["bar_met"], bool) and r["d_bytes"] is not None
    assert rows["-brotli"]["state"] == "infeasible" and rows["-brotli"]["d_estimated_bytes"] < 0
    assert (out / "ablation.csv").is_file() and (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
