"""passthrough_int8: its codes and scales against a plain reference, the stated error bound, what it
claims; an export round trip in which the control tensors and small matrices really are int8 after
the artifact is read back; the framework's rule that control tensors go only to a quantizer that
declares ``quantizes_control`` (scope ``all`` never reaches them); the generated submission script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from runs import technique, tiny_stack

from pgolf.registry import Kind, ParamInfo, PgolfError, Role
from pgolf.registry.api.config import ExportConfig
from pgolf.registry.api.sites import Dispatcher
from pgolf.registry.run.export import (
    export_model,
    load_artifact,
    quantize_state,
    quantizer_of,
    relative_rms_error,
    write_artifact,
)
from pgolf.registry.run.pipeline import build, dry_build
from pgolf.techniques.passthrough_int8 import (
    PassthroughInt8,
    PassthroughInt8Params,
    error_bound,
    quantize_per_row,
    quantize_per_tensor,
)

SMALL = {  # the record's kinds of small tensors, at test size
    "bigram_hash": {"buckets": 64, "dim": 16},  # proj: kind other (32 x 16)
    "smear_gate": {"variant": "input", "width": 12},  # w: control (12 elements), lam: control ()
    "gated_skips": {},  # gates, scales: control
    "gated_attention": {},  # per-head gate weights: kind gate (4 x 12)
}


def info(name: str, shape: tuple[int, ...], role: Role = Role.MATRIX, kind: Kind | None = None) -> ParamInfo:
    kinds = {Role.SCALAR: Kind.CONTROL, Role.GATE: Kind.GATE, Role.EMBEDDING: Kind.EMBED}
    return ParamInfo(name, role, kind or kinds.get(role, Kind.OTHER), None, shape)


def quantizer(**params: Any) -> PassthroughInt8:
    from pgolf.registry.run.model import ModelSpec

    return PassthroughInt8(PassthroughInt8Params(**params), ModelSpec(64, 2, 32, 4, 2, 64, 16))


def perturbed_build(rs: Any) -> Any:
    """A build whose every weight is moved off its initial value (trained-like low bits)."""
    b = build(rs, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return b


# -- the maths ---------------------------------------------------------------------------------


def test_per_row_codes_are_absmax_int8_with_fp16_scales_and_no_floor() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=gen) * torch.logspace(-4, 1, 8)[:, None]  # rows from 1e-4 to 10
    data = quantize_per_row(w)
    q, s = data["q"], data["scale"]
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (8,)
    a = w.double().numpy()
    want_s = np.maximum(np.abs(a).max(axis=1) / 127, 2.0**-24).astype(np.float16)
    assert np.array_equal(s.numpy(), want_s)
    want_q = np.clip(np.round(a / want_s.astype(np.float64)[:, None]), -127, 127)
    assert np.array_equal(q.numpy().astype(np.float64), want_q)
    assert int(q.abs().amax(dim=1).min()) >= 126  # every row uses the whole range: no 1/127 floor
    assert float(s[0]) < 1e-5  # a row of values ~1e-4 keeps a step of its own size


def test_per_tensor_codes_share_one_fp32_scale() -> None:
    w = torch.tensor([[1.0, 0.97, 1.03, 0.5], [0.0, 0.01, -0.02, 0.3]])  # resid_mix-like: two rows
    data = quantize_per_tensor(w)
    q, s = data["q"], data["scale"]
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.ndim == 0 and float(s) == pytest.approx(1.03 / 127, rel=1e-7)
    assert torch.equal(q.float(), torch.clamp(torch.round(w / s), -127, 127))
    assert int(q.abs().max()) == 127
    scalar = quantize_per_tensor(torch.tensor(0.37))
    assert scalar["q"].shape == () and float(scalar["q"].float() * scalar["scale"]) == pytest.approx(0.37)


@pytest.mark.parametrize("per_row", [True, False])
def test_the_round_trip_error_is_within_the_stated_bound(per_row: bool) -> None:
    t = quantizer()
    gen = torch.Generator().manual_seed(1)
    for w in (torch.randn(16, 48, generator=gen), 1 + 0.01 * torch.randn(2, 64, generator=gen),
              torch.randn(64, generator=gen) * 1e-3, torch.zeros(4, 8)):  # fmt: skip
        if per_row and w.ndim != 2:
            continue
        data = quantize_per_row(w) if per_row else quantize_per_tensor(w)
        back = t.dequantize(data)
        assert back.shape == w.shape and bool(torch.isfinite(back).all())
        bound = error_bound(w, per_row)
        err = relative_rms_error(back, w) if float(w.norm()) > 0 else float(back.abs().max())
        assert err <= bound * (1 + 1e-6) + 1e-12
        assert (
            bound <= 0.5 / 127 * float(w.abs().max()) * w.numel() ** 0.5 / max(float(w.norm()), 1e-30) + 1e-9
        )


def test_it_claims_control_tensors_and_small_matrices_of_its_scope_only() -> None:
    t = quantizer()
    assert t.quantizes_control
    assert t.claims(info("attn_scale", (512,), Role.SCALAR))
    assert t.claims(info("resid_mix", (2, 512), Role.SCALAR))
    assert t.claims(info("bigram.proj", (512, 32)))  # kind other
    assert t.claims(info("attn_gate", (8, 12), Role.GATE))
    assert t.claims(info("q_gain", (8,), Role.SCALAR)) and t.claims(info("lam", (), Role.SCALAR))
    assert not t.claims(info("big_other", (512, 256)))  # above max_numel: the main quantizer's
    assert not t.claims(info("c_q", (64, 64), kind=Kind.ATTN_Q))  # not in its scope
    assert not t.claims(info("tok_emb", (64, 32), Role.EMBEDDING))
    assert not t.claims(info("lora", (4, 32), Role.ADAPTER, Kind.OTHER))
    assert not quantizer(control=False).claims(info("attn_scale", (512,), Role.SCALAR))
    assert not quantizer(scope="none").claims(info("bigram.proj", (512, 32)))
    assert not quantizer(max_numel=1000).claims(info("bigram.proj", (512, 32)))


# -- the framework's rule ----------------------------------------------------------------------


def test_control_tensors_go_only_to_a_quantizer_that_declares_it() -> None:
    rs = tiny_stack({"rtn": {"scope": "all"}})
    b = build(rs, torch.device("cpu"))
    ctrl = info("resid_mix", (2, 32), Role.SCALAR)  # 2-D: rtn's scope all would claim it
    cfg = ExportConfig(passthrough_max_numel=0)
    assert quantizer_of(ctrl, b.sites, cfg) is None  # fp32, as before
    both = Dispatcher([*b.sites.techniques, quantizer()])
    assert quantizer_of(ctrl, both, cfg).name == "passthrough_int8"  # type: ignore[union-attr]
    # any other tensor both claim is a conflict naming both
    with pytest.raises(PgolfError, match="'rtn' and 'passthrough_int8'"):
        quantizer_of(info("bigram.proj", (32, 16)), both, cfg)


@pytest.mark.parametrize(
    "techniques",
    [
        {},
        {"rtn": {"scope": "all", "bits": 6}},
        {"int8_rowwise": {"scope": "all"}, "passthrough": {"scope": "all"}},
    ],
    ids=["default", "rtn_all", "int8_and_passthrough_all"],
)
def test_scope_all_quantizers_keep_control_tensors_in_fp32(techniques: dict[str, Any]) -> None:
    rs = tiny_stack({**techniques, **SMALL}, export={"passthrough_max_numel": 0})
    b = perturbed_build(rs)
    ex = export_model(b.model, b.sites, rs.stack.export)
    controls = [n for n, i in ex.infos.items() if i.role == Role.SCALAR]
    assert len(controls) >= 8
    for name in controls:
        entry = ex.packed["tensors"][name]
        assert entry["q"] == "float" and entry["data"]["t"].dtype == torch.float32, name
        assert torch.equal(entry["data"]["t"], ex.state[name].float())
    assert dry_build(rs).quantizers == {n: e["q"] for n, e in ex.packed["tensors"].items()}


# -- an export round trip ----------------------------------------------------------------------


def test_export_round_trip_stores_control_tensors_and_small_matrices_in_int8(tmp_path: Path) -> None:
    rs = tiny_stack({**SMALL, "passthrough_int8": {}})
    b = perturbed_build(rs)
    path = tmp_path / "model.ptz"
    size = write_artifact(path, b.model, b.sites, rs.stack.export)  # verified against error_bound
    ex = export_model(b.model, b.sites, rs.stack.export)
    state = load_artifact(path, b.sites, ex.infos)
    t = technique(b, "passthrough_int8")
    claimed = {n for n, i in ex.infos.items() if t.claims(i)}
    kinds = {ex.infos[n].kind for n in claimed}
    assert {Kind.CONTROL, Kind.OTHER, Kind.GATE} <= kinds
    assert {"blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix", "skip_merge.gates",
            "skip_merge.scales", "embed.0.proj.weight", "blocks.0.attn.out.0.weight"} <= claimed  # fmt: skip
    for name in claimed:
        entry = ex.packed["tensors"][name]
        assert entry["q"] == "passthrough_int8" and entry["data"]["q"].dtype == torch.int8, name
        per_row = ex.infos[name].role != Role.SCALAR
        assert entry["data"]["scale"].dtype == (torch.float16 if per_row else torch.float32)
        w = ex.state[name].float()
        assert w.numel() == 1 or not torch.equal(state[name], w)  # really quantized (one value: exact) ...
        assert relative_rms_error(state[name], w) <= error_bound(w, per_row) * 1.001  # ... within its bound
        assert relative_rms_error(state[name], w) < 0.01
    dry = dry_build(rs).quantizers
    assert {n for n, q in dry.items() if q == "passthrough_int8"} == claimed  # pgolf check: the same rule
    without = tiny_stack(dict(SMALL))
    plain = perturbed_build(without)
    assert size < write_artifact(tmp_path / "plain.ptz", plain.model, plain.sites, without.stack.export)


def test_quantize_state_of_a_control_tensor_beside_scope_all_rtn() -> None:
    """The 2-D control tensor goes to passthrough_int8 and nowhere else: no conflict with rtn."""
    state = {"resid_mix": 1 + 0.1 * torch.randn(2, 64), "big": torch.randn(96, 64)}
    infos = {
        "resid_mix": info("resid_mix", (2, 64), Role.SCALAR),
        "big": info("big", (96, 64), kind=Kind.MLP_UP),
    }
    rs = tiny_stack({"rtn": {"scope": "all"}})
    sites = Dispatcher([*build(rs, torch.device("meta")).sites.techniques, quantizer()])
    packed = quantize_state(state, infos, sites, ExportConfig())
    assert packed["tensors"]["resid_mix"]["q"] == "passthrough_int8"
    assert packed["tensors"]["big"]["q"] == "rtn"


# -- the submission script ---------------------------------------------------------------------


def test_the_generated_submission_script_reproduces_the_run(tmp_path: Path, cache_dir: Path) -> None:
    from conftest import tiny_stack as challenge_stack

    from pgolf.registry.tools.cli import main
    from pgolf.registry.tools.submission import check_submission

    stack = challenge_stack(cache_dir, techniques={"gated_skips": {}, "passthrough_int8": {}})
    f = tmp_path / "stack.yaml"
    f.write_text(yaml.safe_dump(stack, sort_keys=False))
    assert main(["run", str(f), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    out = tmp_path / "submission"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "quantizes_control" in (out / "train_gpt_readable.py").read_text()
    res = check_submission(out)  # the script alone, without pgolf, trains, exports and scores
    assert res.ok, res.problems
    assert abs(res.got["val_bpb"] - result["val_bpb"]) <= 1e-6
    assert res.got["model_bytes"] == result["model_bytes"]
