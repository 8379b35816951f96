"""Stacks end to end on CPU: every registered technique in the tiny stack, through `run()` (train,
finalize, calibrate, export with read-back verification, reload, score).

They run on the SP1024 shards of conftest's ``text_dataset``: 12 validation documents, where the
embedded corpus has 112 (the test-time-training scorers adapt on every one: 15-20 s each there)."""

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


def shards(text_dataset: tuple[Path, list[str]]) -> dict[str, str]:
    """The ``data`` section that reads the text dataset's shards with its SP1024 tokenizer."""
    return {"path": str(text_dataset[0]), "tokenizer": str(text_dataset[0] / "tokenizer.model")}


@pytest.mark.usefixtures("code_counted_from_files")  # one script per technique: minutes of CPU
@pytest.mark.parametrize("name", TECHNIQUES)
def test_each_technique_runs_end_to_end(
    name: str, text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    cls = REGISTRY.get(name)
    techniques = {req: {} for req in cls.requires}
    techniques[name] = dict(cls.contract_params)  # params that fit the tiny models
    d = tiny_stack(
        techniques=techniques, eval={"seq_len": 64, "batch_tokens": 4096}, data=shards(text_dataset)
    )
    d["train"] = {**d["train"], "iterations": 4, "warmdown_iters": 2}
    r = run(stack_from_dict(d), tmp_path, estimate=False)
    assert math.isfinite(r.val_bpb) and r.val_tokens > 0 and name in r.techniques
    assert set(r.phase_seconds) == {"train", "finalize", "calibration", "export", "evaluation"}


def test_the_combined_stack_runs_end_to_end_at_a_tiny_size(
    text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """stacks/combined_v2.yaml (depth recurrence, parallel residuals, value residual, partial
    RoPE, gated skips, late QAT, GPTQ int6, zstd, sliding-window evaluation, temperature), shrunk
    to 6 layers × 64 for the CPU: every site works together, the switches flip, GPTQ calibrates."""
    from pgolf.registry.api.config import load_stack

    tiny = [
        "model.num_layers=6", "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
        "train.train_seq_len=64", "train.train_batch_tokens=1024", "train.micro_batch_tokens=512",
        "train.iterations=8", "train.max_wallclock_seconds=0", "train.warmdown_iters=8",
        "train.warmup_steps=1", "train.val_loss_every=0", "train.threads=1",
        f"data.path={text_dataset[0]}", "data.tokenizer=sp1024", "eval.seq_len=128", "eval.batch_tokens=4096",
        "techniques.parallel_residuals.start_layer=4", "techniques.gptq.calibration_batches=2",
        "techniques.zstd.level=3",
    ]  # fmt: skip
    rs = load_stack(Path(__file__).resolve().parent.parent / "stacks" / "combined_v2.yaml", tiny)
    r = run(rs, tmp_path, estimate=False)
    assert math.isfinite(r.val_bpb) and r.val_tokens > 0
    assert r.switches == ["depth_recurrence", "late_qat"]  # both flipped during the 8 steps
    assert r.phase_seconds["calibration"] > 0
    log = (tmp_path / "run.log").read_text()
    assert "gptq: Hessians of" in log and "switch(es) depth_recurrence on" in log


def test_the_record_stack_runs_end_to_end_at_a_tiny_size(
    text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """stacks/record_pr2135.yaml (the current record's training side) shrunk to 6 layers × 64 on
    SP1024 shards: lanes, loops, document masking and packing, progressive context, Parallel
    Muon, EMA and GPTQ work together; every length switch and the loop happen."""
    from pgolf.registry.api.config import load_stack

    tiny = [
        "model.num_layers=6", "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
        "data.tokenizer=sp1024", f"data.path={text_dataset[0]}", "train.train_seq_len=64",
        "train.train_batch_tokens=1024", "train.micro_batch_tokens=512", "train.iterations=10",
        "train.max_wallclock_seconds=0", "train.warmup_steps=1", "train.val_loss_every=0", "train.threads=1",
        "eval.seq_len=64", "eval.batch_tokens=4096",
        "techniques.depth_recurrence.loop_start=1", "techniques.depth_recurrence.loop_end=2",
        "techniques.parallel_residuals.start_layer=4", "techniques.progressive_context.lengths=[16, 32, 64]",
        "techniques.progressive_context.rewarm_steps=2", "techniques.gptq.calibration_batches=2",
        "techniques.brotli.quality=1",
    ]  # fmt: skip
    rs = load_stack(Path(__file__).resolve().parent.parent / "stacks" / "record_pr2135.yaml", tiny)
    assert rs.stack.model.vocab_size == 1024
    r = run(rs, tmp_path, estimate=False)
    assert math.isfinite(r.val_bpb) and r.val_tokens > 0 and r.switches == ["depth_recurrence"]
    log = (tmp_path / "run.log").read_text()
    assert (
        "training length 16 → 32" in log and "training length 32 → 64" in log and "gptq: Hessians of" in log
    )
