"""Export: the baseline int8 policy, artifact bytes on disk, reload, counted code, size estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BASELINE

from pgolf.registry import PgolfError, Role
from pgolf.registry.api.config import load_stack, stack_from_dict
from pgolf.registry.run.export import export_bytes, load_artifact, write_artifact
from pgolf.registry.run.pipeline import build, estimate_artifact_bytes
from pgolf.techniques.int8_rowwise import Int8Rowwise, Int8RowwiseParams, quantize_rows

TINY = {"model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 128}}


def test_rowwise_int8_follows_the_baseline_formula() -> None:
    w = torch.tensor([[2.54, -1.26, 0.5, 0.0], [0.5, -0.25, 0.004, 0.0]])
    q, scale = quantize_rows(w, 100.0)
    # row 0: clip = 2.54, scale = 2.54/127 = 0.02; row 1: 0.5/127 < 1/127, so scale = 1/127
    assert torch.allclose(scale, torch.tensor([0.02, 1 / 127]))
    assert q.tolist() == [[127, -63, 25, 0], [64, -32, 1, 0]]


def test_quantizer_policy_by_role_and_size() -> None:
    t = Int8Rowwise(Int8RowwiseParams(keep_float_max_numel=100), None)  # type: ignore[arg-type]
    state = {
        "big": torch.randn(20, 10),
        "small": torch.randn(4, 4),
        "ctrl": torch.randn(4, 4),
        "ids": torch.arange(5),
        "vec": torch.randn(300),
    }
    roles = {"big": Role.MATRIX, "small": Role.MATRIX, "ctrl": Role.SCALAR, "vec": Role.GATE}
    packed = t.quantize(state, roles)
    assert packed["quantized"]["big"].dtype == torch.int8 and packed["scales"]["big"].dtype == torch.float16
    assert packed["passthrough"]["small"].dtype == torch.float16
    assert packed["passthrough"]["ctrl"].dtype == torch.float32
    assert torch.equal(packed["passthrough"]["ids"], state["ids"])
    assert packed["quantized"]["vec"].dtype == torch.int8 and packed["scales"]["vec"].numel() == 1
    back = t.dequantize(packed)
    assert torch.equal(back["ctrl"], state["ctrl"]) and torch.equal(back["ids"], state["ids"])
    err = (back["big"] - state["big"]).abs()
    scale = packed["scales"]["big"].float()[:, None]
    assert bool((err <= scale * 0.5 + 1e-3).all())  # round-to-nearest, fp16 scale


@pytest.mark.parametrize("codec", ["zlib", "brotli"])
def test_artifact_on_disk_round_trips(tmp_path: Path, codec: str) -> None:
    rs = stack_from_dict({**TINY, "techniques": {codec: {}}})
    techs = [r.instantiate(rs.spec) for r in rs.techniques]
    torch.manual_seed(0)
    model = build(rs, techs, torch.device("cpu"))
    path = tmp_path / "model.ptz"
    size = write_artifact(path, model, techs)
    assert size == path.stat().st_size == len(export_bytes(model, techs))
    state = load_artifact(path, techs)
    for name, p in model.state_dict().items():
        assert state[name].shape == p.shape
        assert torch.allclose(state[name].float(), p.float(), atol=0.02), name


def test_reading_with_the_wrong_codec_is_a_clear_error(tmp_path: Path) -> None:
    z = stack_from_dict(TINY)
    b = stack_from_dict({**TINY, "techniques": {"brotli": {}}})
    zt = [r.instantiate(z.spec) for r in z.techniques]
    model = build(z, zt, torch.device("cpu"))
    write_artifact(tmp_path / "m.ptz", model, zt)
    with pytest.raises(PgolfError, match="could not be decoded with this stack's codec"):
        load_artifact(tmp_path / "m.ptz", [r.instantiate(b.spec) for r in b.techniques])


def test_size_estimate_of_the_baseline_is_close_to_the_real_artifact() -> None:
    est = estimate_artifact_bytes(load_stack(BASELINE))
    # the challenge's trained baseline compressed to 15,815,847 bytes with this export
    assert est.model_bytes == pytest.approx(15_815_847, rel=0.01)
    assert est.total == est.model_bytes + est.code_bytes  # fits or not depends on the stand-in code count
