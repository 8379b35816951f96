"""The export library as a whole: every quantizer × serializer × codec combination (a generated
test) writes an artifact that reads back bit-exactly, each post-quantization step on top of every
quantizer too, and the byte layouts each serializer promises."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from runs import tiny_stack, tiny_trainer, token_shard

from pgolf.registry.run.export import dequantize_state, export_model, load_artifact, write_artifact
from pgolf.registry.run.pipeline import build, estimate_artifact_bytes, surrogate_calibration
from pgolf.techniques._rowquant import is_rowwise

QUANTIZERS: dict[str, dict[str, Any]] = {
    "int8_rowwise": {},  # the default quantizer takes every tensor
    "rtn5_sdclip": {"rtn": {"bits": 5}},
    "rtn7_percentile": {"rtn": {"bits": {"default": 7, "mlp_down": 8}, "clip": "percentile"}},
    "rtn6_absmax": {"rtn": {"bits": 6, "clip": "absmax", "scale_floor": True}},
    "gptq6": {"gptq": {"bits": 6, "calibration_batches": 2}},
    "gptq5_awq": {"gptq": {"bits": 5, "calibration_batches": 2, "awq_groups": 2, "awq_group_size": 8}},
    "gptq8_hessian_clip": {"gptq": {"bits": 8, "calibration_batches": 2, "hessian_clip_lambda": 0.175}},
    "passthrough_bf16": {"passthrough": {"scope": "all", "dtype": "bf16"}},
    "passthrough_int8": {"passthrough_int8": {}},  # control tensors int8, the rest int8_rowwise
}
SERIALIZERS: dict[str, dict[str, Any]] = {
    "torch_save": {},
    "bitpack": {"bitpack": {}},
    "bitpack_planes": {"bitpack": {"codes": "planes", "floats": "planes"}},
    "bitpack_bytes_shuffled": {"bitpack": {"codes": "bytes"}, "byte_shuffle": {"stride": 2}},
}
CODECS: dict[str, dict[str, Any]] = {
    "zlib": {"zlib": {"level": 6}},
    "zstd": {"zstd": {"level": 3, "long": True}},
    "lzma": {"lzma": {"preset": 6, "delta": 2}},
    "brotli": {"brotli": {"quality": 5, "lgwin": 18}},
}


def export_stack(techniques: dict[str, Any]) -> Any:
    # every tensor goes to a quantizer (no small-tensor passthrough), the tied embedding included
    return tiny_stack(techniques, export={"passthrough_max_numel": 0})


def trained_like_build(techniques: dict[str, Any]) -> tuple[Any, Any]:
    """A build of the tiny stack with every weight drawn N(0, 0.3) (a fixed seed: every
    combination sees the same weights), calibrated the way the size estimate calibrates."""
    rs = export_stack(techniques)
    b = build(rs, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    surrogate_calibration(b, rs)
    return rs, b


def assert_reads_back_bit_exactly(path: Path, rs: Any, b: Any) -> dict[str, Any]:
    """Write, read back from disk, decompress, unpack: every tensor equals the quantizers' own
    output (dequantized in memory), or with post-quantization steps, their output."""
    ex = export_model(b.model, b.sites, rs.stack.export)
    size = write_artifact(path, b.model, b.sites, rs.stack.export)  # also verifies on read-back
    assert size == len(ex.blob) == path.stat().st_size
    got = load_artifact(path, b.sites, ex.infos)
    assert set(got) == set(ex.state)
    post = bool(b.sites.implementers("post_quantize"))
    expected = dequantize_state(ex.packed, ex.infos, b.sites) if post else ex.quantized
    assert set(expected) == set(got)
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert torch.equal(have, want), name
    return ex.packed


@pytest.mark.parametrize(
    ("quantizer", "serializer", "codec"), list(itertools.product(QUANTIZERS, SERIALIZERS, CODECS))
)
def test_every_combination_reloads_bit_exactly(
    quantizer: str, serializer: str, codec: str, tmp_path: Path
) -> None:
    rs, b = trained_like_build({**QUANTIZERS[quantizer], **SERIALIZERS[serializer], **CODECS[codec]})
    packed = assert_reads_back_bit_exactly(tmp_path / "m.ptz", rs, b)
    stored_by = {e["q"] for e in packed["tensors"].values()}
    want = next(iter(QUANTIZERS[quantizer]), "int8_rowwise")
    assert want in stored_by  # the combination really used its quantizer
    assert stored_by <= {want, "int8_rowwise", "float", "raw"}


@pytest.mark.parametrize("quantizer", [q for q in QUANTIZERS if q != "passthrough_bf16"])
@pytest.mark.parametrize(
    "post",
    [
        {"lqer": {"rank": 2, "top_k": 2, "group": 8}},
        {"lqer": {"rank": 3, "top_k": 3, "asym": False, "factor_bits": 3, "select": "gain"}},
        {"magnitude_pruning": {"fraction": 0.1, "min_numel": 0}, "selective_pruning": {"target_bytes": 1}},
    ],
    ids=["lqer_asym", "lqer_sym_gain", "pruning"],
)
def test_post_quantization_steps_reload_bit_exactly_on_every_quantizer(
    quantizer: str, post: dict[str, Any], tmp_path: Path
) -> None:
    rs, b = trained_like_build({**QUANTIZERS[quantizer], **post, "bitpack": {}, "brotli": {"quality": 5}})
    packed = assert_reads_back_bit_exactly(tmp_path / "m.ptz", rs, b)
    if "lqer" in post:
        assert packed["extra"]["lqer"]  # some tensor was corrected, and reads back corrected
    else:
        codes = [
            e["data"]["q"]
            for e in packed["tensors"].values()
            if isinstance(e["data"], dict) and is_rowwise(e["data"])  # selective pruning's candidates
        ]
        assert codes and all(int((c.abs() == 1).sum()) == 0 for c in codes)  # every ±1 code pruned


# -- the size estimate against the real artifact of a trained model ------------------------------

ESTIMATE_QUANTIZERS: dict[str, dict[str, Any]] = {
    "int8_rowwise": {},
    "rtn5_sdclip": {"rtn": {"bits": 5}},
    "rtn6_percentile": {"rtn": {"bits": 6, "clip": "percentile"}},
    "rtn8_absmax": {"rtn": {"bits": 8, "clip": "absmax"}},
    "gptq5": {"gptq": {"bits": 5, "calibration_batches": 4}},
    "gptq6": {"gptq": {"bits": 6, "calibration_batches": 4}},
    "gptq7_awq": {"gptq": {"bits": 7, "calibration_batches": 4, "awq_groups": 2, "awq_group_size": 8}},
    "passthrough_fp16": {"passthrough": {"scope": "all"}},
}
ESTIMATE_CODECS: dict[str, dict[str, Any]] = {
    "zlib": {},
    "zstd": {"zstd": {"level": 19}},
    "lzma": {"lzma": {}},
    "brotli": {"brotli": {"quality": 9}},
}
TRAINED = {"model": {"model_dim": 64},
           "train": {"iterations": 50, "train_seq_len": 64, "train_batch_tokens": 512, "micro_batch_tokens": 512},
           "export": {"passthrough_max_numel": 0}}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 2 × 64 model after 50 CPU steps on a 65,536-token shard (its state and the shard)."""
    shard = token_shard(tmp_path_factory.mktemp("shard"), n=65_536)
    b, trainer = tiny_trainer(tiny_stack({}, **TRAINED), shard)
    trainer.run()
    return shard, {k: v.clone() for k, v in b.model.state_dict().items()}


@pytest.mark.usefixtures("code_counted_from_files")  # compares model bytes only
@pytest.mark.parametrize(
    ("quantizer", "codec"), list(itertools.product(ESTIMATE_QUANTIZERS, ESTIMATE_CODECS))
)
def test_the_size_estimate_is_within_one_percent_or_errs_high_and_says_so(
    quantizer: str, codec: str, trained: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    shard, state = trained
    rs = tiny_stack({**ESTIMATE_QUANTIZERS[quantizer], **ESTIMATE_CODECS[codec]}, **TRAINED)
    b, trainer = tiny_trainer(rs, shard)
    b.model.load_state_dict(state)
    trainer.calibrate()  # GPTQ's Hessians from the training stream, as a run does
    real = write_artifact(tmp_path / "m.ptz", b.model, b.sites, rs.stack.export)
    est = estimate_artifact_bytes(rs)
    ratio = est.model_bytes / real
    print(f"{quantizer} {codec}: real {real:,} estimated {est.model_bytes:,} ({100 * (ratio - 1):+.2f} %)")
    assert ratio >= 0.99  # never more than 1 % low
    if ratio > 1.01:  # errs high: the estimate says so, and by how much
        used = {t.name for t in b.techniques if t.size_estimate_note}
        stated = [n for n in used if f"{n}: " in est.method]
        assert stated, f"{quantizer} + {codec} estimated {100 * (ratio - 1):+.1f} % high without saying so"
        bound = max(t.size_estimate_high for t in b.techniques if t.name in stated)
        assert ratio <= 1 + bound, (
            f"{quantizer} + {codec}: {100 * (ratio - 1):+.1f} % high, above the stated bound"
        )


def test_heavy_tailed_stand_ins_have_heavy_tails_and_the_gaussian_ones_bound_their_estimate() -> None:
    """export.size_estimate: the default stand-ins are N(0, 1) draws; heavy_tails gives unit-variance
    Student-t draws (ν = SURROGATE_TAIL_DOF), which take fewer bits on a grid scaled by a row's
    largest values; the estimate says which it used."""
    from pgolf.registry.run.pipeline import SURROGATE_TAIL_DOF, surrogate_weights_

    rs = tiny_stack({}, model={"model_dim": 64})
    b = build(rs, torch.device("cpu"))
    surrogate_weights_(b.model, 0, "heavy_tails")
    w = b.model.blocks[0].mlp.fc.weight.detach().double()
    kurtosis = float(((w - w.mean()) ** 4).mean() / w.var() ** 2)
    assert abs(float(w.std()) - 1) < 0.15 and kurtosis > 5, kurtosis  # N(0, 1): 3
    surrogate_weights_(b.model, 0)
    g = b.model.blocks[0].mlp.fc.weight.detach().double()
    assert (
        abs(float(g.std()) - 1) < 0.05 and abs(float(((g - g.mean()) ** 4).mean() / g.var() ** 2) - 3) < 0.5
    )
    techniques = {"rtn": {"bits": 6, "clip": "percentile"}}
    gaussian = estimate_artifact_bytes(tiny_stack(techniques, model={"model_dim": 64}))
    heavy = estimate_artifact_bytes(tiny_stack(techniques, model={"model_dim": 64},
                                               export={"size_estimate": "heavy_tails"}))  # fmt: skip
    assert heavy.model_bytes < 0.98 * gaussian.model_bytes, (heavy.model_bytes, gaussian.model_bytes)
    assert f"ν = {SURROGATE_TAIL_DOF:g}" in heavy.method and "N(0,1) draws" in gaussian.method
