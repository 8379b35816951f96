"""Welch's one-sided test and `pgolf compare`, checked against scipy (a test-only dependency)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from pgolf.registry.tools.cli import main
from pgolf.search.repeat import compare, find_runs
from pgolf.search.stats import betainc, meets_bar, t_cdf, welch_less

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")

SETS = [
    # (A, B): made-up val_loss sets in nats, incl. unequal n and very unequal variances
    ([2.001, 2.003, 1.999, 2.002, 2.000], [2.010, 2.012, 2.009, 2.011, 2.013]),
    ([2.0500, 2.0510], [2.0520, 2.0480, 2.0600, 2.0550, 2.0490, 2.0530, 2.0515]),
    ([1.90, 1.95, 1.85], [1.91, 1.92]),
    ([3.0001, 3.0002, 3.0000, 3.0001], [2.9, 3.1, 3.05, 2.95, 3.2, 2.8]),
    ([2.5, 2.6, 2.4, 2.55, 2.45, 2.52, 2.48, 2.51, 2.49, 2.5], [2.49, 2.51]),
    ([1.0, 1.1], [0.9, 0.95, 1.0]),  # A worse: p close to 1
]


@pytest.mark.parametrize(("a", "b"), SETS)
def test_welch_matches_scipy(a: list[float], b: list[float]) -> None:
    ours = welch_less(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False, alternative="less")
    assert ours.t == pytest.approx(ref.statistic, rel=1e-9, abs=1e-9)
    assert ours.df == pytest.approx(ref.df, rel=1e-9)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-9)
    assert ours.std_a == pytest.approx(float(scipy_stats.tstd(a)), rel=1e-12)


def test_welch_random_sets_match_scipy() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.gauss(2.0, rng.uniform(1e-4, 0.05)) for _ in range(rng.randint(2, 12))]
        b = [
            rng.gauss(2.0 + rng.uniform(-0.02, 0.02), rng.uniform(1e-4, 0.05))
            for _ in range(rng.randint(2, 12))
        ]
        ref = scipy_stats.ttest_ind(a, b, equal_var=False, alternative="less")
        assert welch_less(a, b).p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("df", [0.5, 1.0, 2.5, 7.0, 30.0, 400.0])
@pytest.mark.parametrize("t", [-12.0, -3.1, -0.7, 0.0, 0.4, 2.2, 9.0])
def test_t_cdf_matches_scipy(t: float, df: float) -> None:
    assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), rel=1e-9, abs=1e-14)


@pytest.mark.parametrize(
    ("a", "b", "x"), [(0.5, 0.5, 0.3), (2.0, 3.0, 0.9), (15.0, 0.5, 0.99), (0.1, 40.0, 0.001)]
)
def test_betainc_matches_scipy(a: float, b: float, x: float) -> None:
    assert betainc(a, b, x) == pytest.approx(scipy_special.betainc(a, b, x), rel=1e-10, abs=1e-15)


def test_welch_needs_two_values_per_group() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        welch_less([1.0], [1.0, 2.0])


def test_zero_variance_groups() -> None:
    w = welch_less([1.0, 1.0], [2.0, 2.0])
    assert w.p == 0.0 and w.t == -math.inf


def test_challenge_bar() -> None:
    better = welch_less([2.000, 2.001, 1.999, 2.000], [2.010, 2.011, 2.009, 2.010])
    assert better.p < 0.01 and -better.diff >= 0.005 and meets_bar(better)
    small = welch_less([2.000, 2.001, 1.999, 2.000], [2.003, 2.004, 2.002, 2.003])
    assert small.p < 0.01 and not meets_bar(small)  # significant but below 0.005 nats
    noisy = welch_less([1.95, 2.05], [2.0, 2.1])
    assert -noisy.diff >= 0.005 and not meets_bar(noisy)  # big but not significant


def _write_runs(root: Path, losses: list[float], bpb_per_nat: float = 0.52) -> Path:
    for i, v in enumerate(losses):
        d = root / f"seed_{1337 + i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(
            json.dumps(
                {
                    "val_loss": v,
                    "val_bpb": v * bpb_per_nat,
                    "seed": 1337 + i,
                    "artifact_bytes": 15_000_000,
                    "stack_hash": root.name,
                }
            )
        )
    return root


def test_compare_reads_run_folders_and_reports_bpb(tmp_path: Path) -> None:
    a_losses, b_losses = SETS[0]
    a = _write_runs(tmp_path / "a", a_losses)
    b = _write_runs(tmp_path / "b", b_losses)
    c = compare([a], [b])
    ref = scipy_stats.ttest_ind(a_losses, b_losses, equal_var=False, alternative="less")
    assert c.welch.p == pytest.approx(ref.pvalue, rel=1e-6)
    assert c.bpb_per_nat == pytest.approx(0.52)
    assert c.bar_met
    text = "\n".join(c.lines())
    assert "nats" in text and "bpb" in text and "MET" in text
    # single run folders are accepted too, and a folder given twice counts once
    runs = find_runs([a / "seed_1337", a / "seed_1338", a])
    assert len(runs) == len(a_losses)


def test_compare_cli_exit_status_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write_runs(tmp_path / "a", [2.000, 2.001, 1.999])
    b = _write_runs(tmp_path / "b", [2.003, 2.004, 2.002])
    out = tmp_path / "c.json"
    assert main(["compare", str(a), "--vs", str(b), "--json", str(out)]) == 1  # bar not met
    d = json.loads(out.read_text())
    ref = scipy_stats.ttest_ind(
        [2.000, 2.001, 1.999], [2.003, 2.004, 2.002], equal_var=False, alternative="less"
    )
    assert d["p"] == pytest.approx(ref.pvalue, rel=1e-6) and d["bar_met"] is False
    assert "NOT met" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "missing"), "--vs", str(b)]) == 2  # a user error, no traceback
