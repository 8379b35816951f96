"""Stacks end to end on CPU: every registered technique in the tiny stack, through `run()` (train,
finalize, calibrate, export with read-back verification, reload, score)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_stack

from pgolf.registry import REGISTRY
from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.api.sites import DEFAULT_FILLERS
from pgolf.registry.run.pipeline import run

# evaluation windows of 64 tokens so that the sliding scorers' default stride (64) fits
TECHNIQUES = [n for n in REGISTRY.names() if n not in DEFAULT_FILLERS.values()]


@pytest.mark.parametrize("name", TECHNIQUES)
def test_each_technique_runs_end_to_end(name: str, cache_dir: Path, tmp_path: Path) -> None:
    cls = REGISTRY.get(name)
    techniques = {req: {} for req in cls.requires}
    techniques[name] = dict(cls.contract_params)  # params that fit the tiny models
    d = tiny_stack(cache_dir, techniques=techniques, eval={"seq_len": 64, "batch_tokens": 4096})
    d["train"] = {**d["train"], "iterations": 4, "warmdown_iters": 2}
    r = run(stack_from_dict(d), tmp_path, estimate=False)
    assert math.isfinite(r.val_bpb) and r.val_tokens > 0 and name in r.techniques
    assert set(r.phase_seconds) == {"train", "finalize", "calibration", "export", "evaluation"}
