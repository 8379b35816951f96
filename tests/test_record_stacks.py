"""The reference stacks of the published records (stacks/pr*.yaml): each resolves, orders its
techniques and counts the published number of parameters; each runs end to end on the CPU scaled
down with --set (its evaluation techniques and the legality probes included); the two
``_as_published`` variants are flagged not legal, the others legal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_stack

from pgolf.registry.api.config import load_stack, stack_from_dict
from pgolf.registry.run.pipeline import dry_build, run

ROOT = Path(__file__).resolve().parents[1]


def test_evaluation_adapters_are_not_counted_as_model_parameters() -> None:
    """LoRA TTT allocates A / B for every document slot of a batch (role adapter): a record's
    parameter count is the trained, exported model's, so they stay out of it."""
    plain = dry_build(stack_from_dict(tiny_stack(eval={"seq_len": 64})))
    lora = tiny_stack(eval={"seq_len": 64}, techniques={"lora_ttt": {"rank": 4, "docs_per_batch": 4}})
    assert dry_build(stack_from_dict(lora)).params == plain.params > 0


STACKS = ROOT / "stacks"
PUBLISHED_PARAMS = {"pr576": 33_600_000, "pr2135": 35_945_673}  # techniques.md §8.1; the issue
RECORDS = ["pr1539", "pr576", "pr754", "pr826", "pr1716", "pr2135"]
AS_PUBLISHED = {"pr1539_as_published": "data", "pr826_as_published": "normalisation"}

# Every stack keeps its 11 layers (layer lists such as value_embeddings' [9, 10] stay valid) at width
# 64 on the embedded SP1024 corpus, a few steps; the keys below shrink what is sized for 8×H100.
TINY = [
    "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2", "data.tokenizer=sp1024",
    "train.train_seq_len=64", "train.train_batch_tokens=1024", "train.micro_batch_tokens=512",
    "train.iterations=4", "train.max_wallclock_seconds=0", "train.warmdown_iters=2", "train.warmup_steps=1",
    "train.val_loss_every=0", "train.threads=1", "eval.seq_len=64", "eval.batch_tokens=4096",
]  # fmt: skip
SHRINK: dict[str, dict[str, Any]] = {
    "partial_rope": {"dims": 8},
    "gptq": {"calibration_batches": 2},
    "brotli": {"quality": 1},
    "zstd": {"level": 3},
    "lzma": {"preset": 1},
    "progressive_context": {"lengths": [16, 32, 64], "rewarm_steps": 2},
    "perplexity_curriculum": {"fit_tokens": 4096, "score_tokens": 4096},
    "score_first_ttt": {"chunk_tokens": 2048, "batch_rows": 4, "epochs": 1},
    "lora_ttt": {"docs_per_batch": 16, "chunk_tokens": 64, "short_chunks": []},
    "phased_ttt": {"docs_per_batch": 4, "chunk_tokens": 64, "short_chunks": [], "prefix_docs": 8, "rank": 4},
    "ngram_cache": {"buckets": 4096},
    "hashed_ngram_cache": {"buckets": 4096},
    "ngram_tilt": {"buckets": 4096, "order": 2},
    "pre_quant_ttt": {"epochs": 1, "batch_rows": 4},
}


def tiny_overrides(name: str, cache_dir: Path) -> list[str]:
    rs = load_stack(STACKS / f"{name}.yaml")
    sets = [*TINY, f"data.cache_dir={cache_dir}"]
    for r in rs.techniques:
        sets += [f"techniques.{r.name}.{k}={json.dumps(v)}" for k, v in SHRINK.get(r.name, {}).items()]
    return sets


@pytest.mark.parametrize("name", [*RECORDS, *AS_PUBLISHED])
def test_each_record_stack_resolves_with_its_published_parameter_count(name: str) -> None:
    """pgolf check without the size estimate (a full-size estimate takes minutes on the CPU: its
    figures are in the stacks' header comments): the stack resolves, its techniques are ordered,
    and the model counts the published number of parameters within 2 % where one is published."""
    rs = load_stack(STACKS / f"{name}.yaml")
    dry = dry_build(rs)
    published = PUBLISHED_PARAMS.get(name.removesuffix("_as_published"))
    if published is not None:
        assert abs(dry.params - published) <= 0.02 * published, (dry.params, published)
    text = (STACKS / f"{name}.yaml").read_text()
    assert text.startswith("# parameter-golf PR #")
    assert ("as published" if name in AS_PUBLISHED else "Not reproduced, and why") in text


@pytest.mark.slow
@pytest.mark.parametrize("name", [*RECORDS, *AS_PUBLISHED])
def test_each_record_stack_runs_end_to_end_at_a_tiny_size(name: str, cache_dir: Path, tmp_path: Path) -> None:
    """Scaled down with --set keys: train, export, reload, evaluate with the stack's own evaluation
    techniques, then the legality probes: the published records' legal forms pass every probe; the
    two as published are flagged, naming the probe that catches them."""
    rs = load_stack(STACKS / f"{name}.yaml", tiny_overrides(name, cache_dir))
    r = run(rs, tmp_path, estimate=False)
    assert math.isfinite(r.val_bpb) and r.val_tokens > 0
    assert set(r.techniques) == {t.name for t in rs.techniques}
    if name in AS_PUBLISHED:
        assert r.legal is False and any(
            reason.startswith(f"{AS_PUBLISHED[name]} probe:") for reason in r.legal_reasons
        ), r.legal_reasons
    else:
        assert r.legal is True, r.legal_reasons


# Companion searches exist for the records whose size estimate fits (bench/record_estimates.json): the
# size gate would reject every point of the others.
SEARCHES = ["pr576", "pr754", "pr826"]


@pytest.mark.parametrize("name", SEARCHES)
def test_each_companion_search_starts_from_the_published_values(name: str) -> None:
    """searches/<record>_h100.yaml: validates against its stack, one trial per GPU under the
    challenge's limit, and its first point is the stack as published (every start value is the
    stack's own)."""
    from pgolf.search.spec import load_search

    s = load_search(ROOT / "searches" / f"{name}_h100.yaml")
    assert s.spec.trial.gpus == 1 and s.spec.constraint.artifact_bytes == 16_000_000
    assert s.spec.search.max_concurrent == 8 and len(s.dims) >= 6
    (start,) = s.spec.search.start_with
    stack = load_stack(STACKS / f"{name}.yaml").stack.model_dump(mode="json")
    for key, value in start.items():
        node: Any = stack
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, node, value)
