"""The size gate (search/sizing.py): what the cache key depends on, the analytic bound, the
codec proxy, and that each fast decision agrees with a real estimate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgolf.registry import HOOKS
from pgolf.registry.api.config import load_stack, stack_from_dict
from pgolf.registry.api.technique import REGISTRY
from pgolf.registry.run.pipeline import estimate_artifact_bytes
from pgolf.search import sizing

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "stacks" / "baseline_sp1024.yaml"


def _tiny(**kw: Any) -> Any:
    model = {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, **kw.pop("model", {})}
    return stack_from_dict({"base": str(BASELINE), "model": model, **kw})


def _key(*overrides: str) -> str:
    return sizing.layout(load_stack(BASELINE, list(overrides))).key


def test_size_key_ignores_what_cannot_change_the_size() -> None:
    base = _key(
        "techniques.ema.decay=0.99", "techniques.leaky_relu_sq.slope=0.3", "techniques.xsa.layers=all"
    )
    for same in (
        ("techniques.ema.decay=0.995", "techniques.leaky_relu_sq.slope=0.6", "techniques.xsa.layers=all"),
        ("techniques.ema.decay=0.99", "techniques.leaky_relu_sq.slope=0.3", "techniques.xsa.layers=last(2)"),
        (
            "techniques.ema.decay=0.99",
            "techniques.leaky_relu_sq.slope=0.3",
            "techniques.xsa.layers=all",
            "optim.matrix_lr=0.01",
            "train.iterations=7",
            "techniques.sliding_window.stride=32",
            "techniques.cosine_lr.final=0.1",
        ),
    ):
        assert _key(*same) == base, same
    plain = _key()
    for changed in (
        "model.num_layers=10",
        "model.mlp_mult=3",
        "techniques.bigram_hash.buckets=2048",
        "techniques.brotli.quality=5",
        "techniques.int8_rowwise.clip_percentile=99.9",
        "techniques.zlib.level=1",
        "seed=7",
        "export.passthrough_max_numel=0",
        "export.passthrough_dtype=bf16",
        "techniques.gptq.bits=5",
    ):
        assert _key(changed) != plain, changed


def test_every_hook_is_classified_and_export_hooks_count() -> None:
    """A hook added to the vocabulary lands in the key unless it is listed as harmless: the
    list must name only real hooks, and every export hook counts."""
    from pgolf.registry import SITES

    assert set(HOOKS) >= sizing.LAYOUT_HOOKS | sizing.TRAINING_HOOKS
    for name, spec in HOOKS.items():
        if SITES[spec.site].plan == "export":
            assert name not in sizing.LAYOUT_HOOKS | sizing.TRAINING_HOOKS
    assert sizing.size_relevant(REGISTRY.get("gptq")) and sizing.size_relevant(REGISTRY.get("zstd"))
    assert not sizing.size_relevant(REGISTRY.get("sliding_window"))
    assert sizing.size_relevant(REGISTRY.get("brotli")) and sizing.size_relevant(REGISTRY.get("int8_rowwise"))
    assert not sizing.size_relevant(REGISTRY.get("ema")) and not sizing.size_relevant(
        REGISTRY.get("leaky_relu_sq")
    )


def _exact(gate: sizing.SizeGate, rs: Any) -> sizing.Estimate:
    lay = sizing.layout(rs)
    job = gate.job(rs, lay)
    assert job.kind == "exact"
    out = gate.absorb(job, sizing.compute(job.stack, job.base_dir))
    assert isinstance(out, sizing.Estimate)
    return out


def test_cached_decision_is_the_real_estimate() -> None:
    gate = sizing.SizeGate(limit=10**9)
    first = _exact(gate, _tiny(optim={"matrix_lr": 0.01}, techniques={"ema": {"decay": 0.9}}))
    other = _tiny(optim={"matrix_lr": 0.08}, techniques={"ema": {"decay": 0.99}})
    cached = gate.fast(other, sizing.layout(other))
    assert cached is not None and cached.method == "cached"
    real = estimate_artifact_bytes(other)
    assert (cached.model_bytes, cached.code_bytes) == (real.model_bytes, real.code_bytes)
    assert cached.model_bytes == first.model_bytes
    no_ema = _tiny()  # same layout, less code: the code is counted per stack
    est = gate.fast(no_ema, sizing.layout(no_ema))
    assert est is not None and est.code_bytes == estimate_artifact_bytes(no_ema).code_bytes < first.code_bytes


def test_analytic_bound_rejects_only_what_cannot_fit() -> None:
    small = _tiny()
    real_small = estimate_artifact_bytes(small).total
    gate = sizing.SizeGate(limit=int(real_small * 1.02), slack=0.1)
    assert gate.fast(small, sizing.layout(small)) is None  # nothing learnt yet: no guess
    _exact(gate, small)
    deep = _tiny(model={"num_layers": 3})  # the same make-up of tensors, one block more
    est = gate.fast(deep, sizing.layout(deep))
    assert est is not None and est.method == "analytic" and not est.fits and est.bound
    real = estimate_artifact_bytes(deep).total
    assert est.total <= real and real > gate.limit  # a lower bound, and it really does not fit
    gate.limit = int(real * 0.97)  # over the limit, but within the slack: a real estimate decides
    assert gate.fast(deep, sizing.layout(deep)) is None
    # a width-192 model: int8 instead of fp16 for most tensors, fewer bytes per parameter than
    # the width-64 one. Its make-up differs, so the ratio is not applied (it would reject a
    # stack that fits: 1.86 vs 1.23 bytes/parameter)
    wide = _tiny(model={"model_dim": 192, "num_heads": 4, "num_kv_heads": 2})
    gate.limit = estimate_artifact_bytes(wide).total + 1000
    assert gate.fast(wide, sizing.layout(wide)) is None
    deeper = _tiny(model={"num_layers": 12})  # too different a make-up to extrapolate to
    assert sizing.profile_distance(sizing.layout(deeper).profile, sizing.layout(small).profile) > 0.15
    assert gate.fast(deeper, sizing.layout(deeper)) is None


def test_codec_proxy_is_calibrated_and_close_calls_get_a_real_estimate() -> None:
    gate = sizing.SizeGate(limit=10**9, proxy_after_seconds=0.0, min_proxy_pairs=2)
    stacks = [_tiny(model={"num_layers": n}, techniques={"brotli": {"quality": 9}}) for n in (1, 2, 3)]
    for rs in stacks[:2]:  # real estimates, then the default codec on the same stack
        lay = sizing.layout(rs)
        job = gate.job(rs, lay)
        assert job.kind == "exact"
        gate.absorb(job, sizing.compute(job.stack, job.base_dir))
        calib = gate.calibration_job(job)
        assert calib is not None and "brotli" not in calib.stack["techniques"]
        assert gate.absorb(calib, sizing.compute(calib.stack, calib.base_dir)) is None
    rs = stacks[2]
    lay = sizing.layout(rs)
    job = gate.job(rs, lay)
    assert job.kind == "proxy"
    real = estimate_artifact_bytes(rs)
    out = gate.absorb(job, sizing.compute(job.stack, job.base_dir))
    assert isinstance(out, sizing.Estimate) and out.method == "proxy"
    assert out.model_bytes == pytest.approx(real.model_bytes, rel=0.01)
    gate.limit = real.total  # now the same sample is a close call
    again = gate.absorb(job, sizing.compute(job.stack, job.base_dir))
    assert isinstance(again, sizing.Job) and again.kind == "exact"


def test_gate_relearns_from_a_ledger() -> None:
    gate = sizing.SizeGate(limit=10**9)
    rs = _tiny()
    est = _exact(gate, rs)
    fresh = sizing.SizeGate(limit=10**9)
    assert fresh.seed_from([{"estimate": est.to_dict()}]) == 1
    hit = fresh.fast(rs, sizing.layout(rs))
    assert hit is not None and hit.method == "cached" and hit.total == est.total
