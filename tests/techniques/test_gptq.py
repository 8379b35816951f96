"""gptq: the blocked Cholesky GPTQ against the sequential OBS update, its output error against
round-to-nearest, the scales, the stored format, the Hessians the calibrate event gathers (every
pass of a looped layer, the head input for the tied embedding), and a calibrated export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from runs import technique, tiny_stack, tiny_trainer, token_shard

from pgolf.registry import BlockSchedule, CalibrationData, Kind, ParamInfo, PgolfError, Role
from pgolf.registry.api.roles import param_infos
from pgolf.registry.run.export import export_model, load_artifact, load_into, write_artifact
from pgolf.registry.run.pipeline import build, estimate_artifact_bytes
from pgolf.registry.run.runtime import seed_everything
from pgolf.techniques._rowquant import (
    dequantize,
    percentile_scales,
    round_to_nearest,
    rtn_error_bound,
    sdclip_scales,
    stored_scale,
)
from pgolf.techniques.gptq import GPTQ, GPTQParams, gptq_codes

SCOPE_WITH_EMBED = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down", "embed"]


def problem(
    seed: int, rows: int = 24, cols: int = 40, n: int = 300
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (rows, cols) and inputs X (n, cols) with correlated features, in float64; and H = XᵀX."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=g, dtype=torch.float64
    )
    x[:, 3] = 0.0  # a dead input
    return w, x, x.T @ x


def obs_reference(
    w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, qmax: int, damping: float, act_order: bool
) -> torch.Tensor:
    """GPTQ as the sequential optimal-brain-surgeon update: quantize one column, spread its error
    over the remaining columns through the inverse Hessian, eliminate the column from H⁻¹."""
    w, h = w.clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    order = (
        torch.argsort(h.diagonal(), descending=True, stable=True).tolist()
        if act_order
        else list(range(h.shape[0]))
    )
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for k, j in enumerate(order):
        q[:, j] = torch.clamp(torch.round(w[:, j] / s), -qmax, qmax)
        err = (w[:, j] - q[:, j] * s) / hinv[j, j]
        rest = order[k + 1 :]
        w[:, rest] -= err[:, None] * hinv[j, rest][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("block_size", [7, 16, 128])
def test_blocked_cholesky_gptq_equals_the_sequential_obs_update(act_order: bool, block_size: int) -> None:
    w, _, h = problem(0)
    qmax = 31
    s = stored_scale(w.abs().amax(dim=1) / qmax).double()
    got = gptq_codes(w, h, s, qmax, block_size=block_size, damping=0.01, act_order=act_order)
    assert got is not None
    codes, dead = got
    assert dead.tolist() == [i == 3 for i in range(40)]
    ref = obs_reference(w, h, s, qmax, 0.01, act_order)
    assert torch.equal(codes, ref)
    assert bool((codes[:, 3] == 0).all())  # dead columns are zeroed


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("clip", ["sdclip", "percentile"])
def test_output_error_is_below_round_to_nearest_at_the_same_bits(bits: int, clip: str) -> None:
    w, x, h = problem(1, rows=32, cols=64, n=512)
    info = ParamInfo("w", Role.MATRIX, Kind.MLP_UP, 0, tuple(w.shape))
    tech = GPTQ(GPTQParams(bits=bits, clip=clip, block_size=16), None)  # type: ignore[arg-type]
    rtn = tech.dequantize(tech.quantize("w", w.float(), info)).double()
    tech.hessians["w"] = h.float()
    data = tech.quantize("w", w.float(), info)
    assert tech.report["w"].method == "gptq"
    ours = tech.dequantize(data).double()
    live = torch.ones(64, dtype=torch.bool)
    live[3] = False
    out_gptq = float(((w - ours)[:, live] @ x[:, live].T).norm())
    out_rtn = float(((w - rtn)[:, live] @ x[:, live].T).norm())
    assert out_gptq < 0.85 * out_rtn


def test_dequantize_reproduces_codes_times_row_scales() -> None:
    w, _, h = problem(2, rows=5, cols=12, n=50)
    tech = GPTQ(GPTQParams(), None)  # type: ignore[arg-type]
    tech.hessians["w"] = h.float()
    data = tech.quantize("w", w.float(), ParamInfo("w", Role.MATRIX, Kind.ATTN_Q, 0, (5, 12)))
    assert data["q"].dtype == torch.int8 and data["scale"].dtype == torch.float16
    assert data["q"].shape == (5, 12) and data["scale"].shape == (5,)
    assert int(data["q"].abs().max()) <= 31
    out = tech.dequantize(data)
    for r in range(5):
        for c in range(12):
            assert float(out[r, c]) == int(data["q"][r, c]) * float(data["scale"][r])


def test_scales() -> None:
    torch.manual_seed(3)
    w = torch.randn(6, 50)
    w[2] = 0.0
    w[4] = 0.25  # constant row: std 0, falls back to its max
    s = sdclip_scales(w, 31, 12.85)
    std = w.std(dim=1, correction=0)
    for r in (0, 1, 3, 5):
        assert float(s[r]) == float(torch.tensor(12.85 * float(std[r]) / 31).half())
    assert float(s[4]) == float(torch.tensor(0.25 / 31).half())
    assert float(s[2]) == 2.0**-24  # a zero row keeps a positive fp16 scale
    cands = (90.0, 99.0, 100.0)
    got = percentile_scales(w, 7, cands)
    a = np.abs(w.numpy())
    for r in range(6):
        errs = []
        for p in cands:
            sr = float(np.float16(max(np.quantile(a[r], p / 100) / 7, 2.0**-24)))  # clip / q_max
            q = np.clip(np.round(w[r].numpy() / sr), -7, 7)
            errs.append((float(((w[r].numpy() - q * sr) ** 2).sum()), sr))
        assert float(got[r]) == min(errs, key=lambda e: e[0])[1]


def test_without_a_hessian_it_is_round_to_nearest_within_its_bound() -> None:
    torch.manual_seed(4)
    w = torch.randn(16, 300) * 0.1
    w[0, 0] = 5.0  # beyond 12.85 σ of its row: clipped by SDClip
    info = ParamInfo("w", Role.MATRIX, Kind.MLP_DOWN, 1, (16, 300))
    tech = GPTQ(GPTQParams(), None)  # type: ignore[arg-type]
    data = tech.quantize("w", w, info)
    s = sdclip_scales(w, 31, 12.85)
    assert torch.equal(data["q"].float(), round_to_nearest(w, s, 31)) and tech.report["w"].method == "rtn"
    assert float(tech.dequantize(data)[0, 0]) == pytest.approx(31 * float(s[0]))  # clipped
    err = float((tech.dequantize(data) - w).norm() / w.norm())
    assert err <= tech.error_bound(info, w) == pytest.approx(rtn_error_bound(w, s, 31) / float(w.norm()))


def test_round_to_nearest_bound_is_half_a_step_or_the_clipped_excess() -> None:
    w = torch.tensor([[0.1, -0.9, 3.0], [0.0, 0.2, -0.05]])
    s = torch.tensor([0.25, 0.1])  # q_max 3: row 0 clips at 0.75, row 1 at 0.3
    per = [[0.125, 0.9 - 0.75, 3.0 - 0.75], [0.05, 0.05, 0.05]]
    assert rtn_error_bound(w, s, 3) == pytest.approx(math.sqrt(sum(v * v for row in per for v in row)))
    err = (w - dequantize(round_to_nearest(w, s, 3), s)).abs()
    assert bool((err <= torch.tensor(per) + 1e-7).all())


def test_results_over_the_weight_space_bound_fall_back_to_round_to_nearest() -> None:
    """Inputs drawn from K distinct vectors (like a tiny vocabulary's embeddings) leave H of rank
    K: GPTQ then trades weight error for output error, above the round-to-nearest worst case for
    K = 16 at max_error_ratio 1, below it for K = 8."""
    methods = set()
    for k in (8, 16):
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            w = torch.randn(16, 32, generator=g)
            x = torch.randn(k, 32, generator=g)[torch.randint(0, k, (256,), generator=g)]
            tech = GPTQ(GPTQParams(max_error_ratio=1.0), None)  # type: ignore[arg-type]
            tech.hessians["w"] = x.T @ x
            info = ParamInfo("w", Role.MATRIX, Kind.ATTN_O, 0, (16, 32))
            data = tech.quantize("w", w, info)
            s = tech.scales(w, Kind.ATTN_O)
            full = gptq_codes(w, x.T @ x, s, 31)
            assert full is not None
            over = float((w - dequantize(full[0], s)).norm()) > rtn_error_bound(w, s, 31)
            method = tech.report["w"].method
            assert method == ("rtn-fallback" if over else "gptq")
            assert torch.equal(data["q"].float(), round_to_nearest(w, s, 31) if over else full[0])
            err = float((tech.dequantize(data) - w).norm() / w.norm())
            assert err <= tech.error_bound(info, w) * (1 + 1e-6)
            methods.add(method)
    assert methods == {"gptq", "rtn-fallback"}


def test_a_hessian_that_cannot_be_factorised_falls_back() -> None:
    tech = GPTQ(GPTQParams(), None)  # type: ignore[arg-type]
    tech.hessians["w"] = -torch.eye(8)
    w = torch.randn(4, 8)
    tech.quantize("w", w, ParamInfo("w", Role.MATRIX, Kind.ATTN_Q, 0, (4, 8)))
    assert tech.report["w"].method == "rtn-fallback"


def test_params_validate_per_kind_bits() -> None:
    p = GPTQParams(bits={"default": 6, "embed": 7}, scope=["matrices", "embed"])  # type: ignore[arg-type]
    tech = GPTQ(p, None)  # type: ignore[arg-type]
    assert tech.qmax(Kind.EMBED) == 63 and tech.qmax(Kind.MLP_UP) == 31
    for bad, msg in [({"embed": 7}, "needs a 'default'"), ({"default": 6, "bogus": 5}, "unknown kind 'bogus'"),
                     ({"default": 9}, "less than or equal to 8")]:  # fmt: skip
        with pytest.raises(PgolfError, match=msg):
            tiny_stack({"gptq": {"bits": bad}})
    with pytest.raises(PgolfError, match="greater than 50"):
        tiny_stack({"gptq": {"percentiles": [40]}})


def batches(n: int, seed: int = 0) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    return CalibrationData(iter([torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]))


def test_calibrate_accumulates_every_pass_of_a_looped_layer() -> None:
    seed_everything(0)
    b = build(tiny_stack({"gptq": {"calibration_batches": 3}}), torch.device("cpu"))
    model = b.model
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.schedule = BlockSchedule((0, 0), (1,))  # block 0 runs twice per forward
    seen: dict[str, list[torch.Tensor]] = {"blocks.0.attn.c_q": [], "blocks.1.mlp.proj": []}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
               for n in seen]  # fmt: skip
    gptq = technique(b, "gptq")
    gptq.calibrate(model, batches(3), ())
    for hd in handles:
        hd.remove()
    assert len(seen["blocks.0.attn.c_q"]) == 6 and len(seen["blocks.1.mlp.proj"]) == 3
    for name, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        assert torch.allclose(gptq.hessians[name + ".weight"].double(), x.T @ x, rtol=1e-5, atol=1e-4)
    assert gptq.rows["blocks.0.attn.c_q.weight"] == 2 * gptq.rows["blocks.1.attn.c_q.weight"] == 2 * 3 * 32
    assert set(gptq.hessians) == {
        n for n, i in param_infos(model).items() if i.layer is not None and i.role == Role.MATRIX
    }


def test_tied_embedding_hessian_comes_from_the_head_input() -> None:
    seed_everything(1)
    b = build(
        tiny_stack({"gptq": {"scope": SCOPE_WITH_EMBED, "calibration_batches": 2}}), torch.device("cpu")
    )
    gptq = technique(b, "gptq")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        gptq.calibrate(b.model, batches(2, seed=5), ())
    h = (
        torch.cat([b.model.hidden(x)[0].reshape(-1, 32) for x in batches(2, seed=5).take(2)])
        .detach()
        .double()
    )
    assert torch.allclose(gptq.hessians["tok_emb.weight"].double(), h.T @ h, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # calibration runs under the run's autocast
        gptq.calibrate(b.model, batches(2, seed=5), ())
    assert gptq.hessians["tok_emb.weight"].dtype == torch.float32
    assert bool(torch.isfinite(gptq.hessians["tok_emb.weight"]).all())


def test_calibrated_export_round_trips_through_the_artifact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = tiny_stack({"gptq": {"scope": SCOPE_WITH_EMBED, "bits": {"default": 6, "embed": 7}}},
                       train={"iterations": 2}, export={"passthrough_max_numel": 0})  # fmt: skip
    b, trainer = tiny_trainer(stack, token_shard(tmp_path))
    trainer.run()
    trainer.finalize()
    assert trainer.reserve == 8.0
    assert trainer.calibrate() == 16
    gptq = technique(b, "gptq")
    path = tmp_path / "model.ptz"
    write_artifact(path, b.model, b.sites, stack.stack.export)  # verifies each tensor against error_bound
    report = gptq.report
    claimed = {n for n, i in param_infos(b.model).items() if i.kind.value in SCOPE_WITH_EMBED}
    assert set(report) == claimed and len(claimed) == 13
    assert {r.method for r in report.values()} == {"gptq"}
    assert all(r.calibration_rows == 16 * 32 for r in report.values())
    packed = export_model(b.model, b.sites, stack.stack.export).packed["tensors"]
    assert (
        packed["tok_emb.weight"]["q"] == "gptq"
        and int(packed["tok_emb.weight"]["data"]["q"].abs().max()) <= 63
    )
    assert int(packed["blocks.0.mlp.fc.weight"]["data"]["q"].abs().max()) <= 31
    reloaded = build(stack, torch.device("cpu"))
    load_into(reloaded.model, load_artifact(path, reloaded.sites, param_infos(reloaded.model)))
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        a, c = b.model(x, x).item(), reloaded.model(x, x).item()
    assert math.isfinite(c) and abs(a - c) < 0.05
    fresh = GPTQ(gptq.params, None)  # type: ignore[arg-type]
    fresh.load_state_dict(gptq.state_dict())
    assert fresh.rows == gptq.rows and all(
        torch.equal(fresh.hessians[k], gptq.hessians[k].cpu()) for k in gptq.hessians
    )


def test_size_estimate_runs_without_calibration() -> None:
    rs = tiny_stack({"gptq": {}}, export={"passthrough_max_numel": 0})
    est = estimate_artifact_bytes(rs)
    assert est.model_bytes > 0


def test_non_finite_weights_are_refused_with_the_tensor_name() -> None:
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(PgolfError, match="tensor blocks.0.mlp.fc.weight holds NaN"):
        GPTQ(GPTQParams(), None).quantize(  # type: ignore[arg-type]
            "blocks.0.mlp.fc.weight",
            w,
            ParamInfo("blocks.0.mlp.fc.weight", Role.MATRIX, Kind.MLP_UP, 0, (4, 8)),
        )


def obs_mixed_reference(
    w: torch.Tensor,
    h: torch.Tensor,
    s: torch.Tensor,
    qmax: int,
    hi: set[int],
    s_hi: torch.Tensor,
    qmax_hi: int,
) -> torch.Tensor:
    """The sequential OBS update with AWQ-lite's second grid on the columns in ``hi``."""
    w, h = w.clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist()
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for k, j in enumerate(order):
        sc, qm = (s_hi, qmax_hi) if j in hi else (s, qmax)
        q[:, j] = torch.clamp(torch.round(w[:, j] / sc), -qm, qm)
        err = (w[:, j] - q[:, j] * sc) / hinv[j, j]
        rest = order[k + 1 :]
        w[:, rest] -= err[:, None] * hinv[j, rest][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


def test_awq_lite_columns_are_solved_on_their_own_grid_inside_the_same_gptq_pass() -> None:
    w, _, h = problem(5)
    s = sdclip_scales(w, 31, 12.85).double()
    s_hi = sdclip_scales(w, 127, 12.85).double()
    hi = [8, 9, 10, 11]
    got = gptq_codes(w, h, s, 31, block_size=16, hi_cols=torch.tensor(hi), hi_scale=s_hi, hi_qmax=127)
    assert got is not None
    ref = obs_mixed_reference(w, h, s, 31, set(hi), s_hi, 127)
    assert torch.equal(got[0], ref)
    rest = [j for j in range(40) if j not in hi]
    assert got[0][:, hi].abs().max() > 2 * got[0][:, rest].abs().max()  # a 4× finer grid there


def test_awq_lite_picks_the_most_salient_groups_over_the_whole_model() -> None:
    from pgolf.techniques.gptq import awq_salience, awq_select

    g = torch.Generator().manual_seed(0)
    cands = {n: torch.rand(c, generator=g, dtype=torch.float64) for n, c in (("a", 40), ("b", 24), ("c", 16))}
    cands["b"][8:16] += 5.0  # b's second group is the most salient
    cands["a"][32:40] += 2.0  # then a's last group
    picked = awq_select(cands, 8, 2)
    assert {k: v.tolist() for k, v in picked.items()} == {"b": list(range(8, 16)), "a": list(range(32, 40))}
    # salience = RMS(x_j) · mean_i |W_ij|, RMS from the Hessian's diagonal and the row count
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    want = [float(x[:, j].square().mean().sqrt() * w[:, j].abs().mean()) for j in range(6)]
    assert awq_salience(w, x.T @ x, 50).tolist() == pytest.approx(want)


def test_awq_lite_calibrated_export_stores_the_salient_columns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = tiny_stack({"gptq": {"awq_groups": 2, "awq_group_size": 8, "calibration_batches": 4}},
                       train={"iterations": 2}, export={"passthrough_max_numel": 0})  # fmt: skip
    b, trainer = tiny_trainer(stack, token_shard(tmp_path))
    trainer.run()
    trainer.calibrate()
    gptq = technique(b, "gptq")
    assert sum(c.numel() for c in gptq.awq.values()) == 16
    write_artifact(tmp_path / "m.ptz", b.model, b.sites, stack.stack.export)  # verified read-back
    packed = export_model(b.model, b.sites, stack.stack.export).packed["tensors"]
    stored = {n: e["data"]["hi_cols"].tolist() for n, e in packed.items() if "hi_cols" in e["data"]}
    assert stored == {n: c.tolist() for n, c in gptq.awq.items()}
    assert {r.awq_columns for r in gptq.report.values()} <= {0, 8, 16}
    fresh = GPTQ(gptq.params, None)  # type: ignore[arg-type]
    fresh.load_state_dict(gptq.state_dict())
    assert {k: v.tolist() for k, v in fresh.awq.items()} == {k: v.tolist() for k, v in gptq.awq.items()}


def test_hessian_aware_sdclip_scales_rows_by_their_importance() -> None:
    w, _, h = problem(6, rows=8, cols=20, n=100)
    info = ParamInfo("w", Role.MATRIX, Kind.MLP_UP, 0, (8, 20))
    plain = GPTQ(GPTQParams(), None)  # type: ignore[arg-type]
    aware = GPTQ(GPTQParams(hessian_clip_lambda=0.175), None)  # type: ignore[arg-type]
    aware.hessians["w"] = plain.hessians["w"] = h.float()
    d = h.diagonal().double().clone()
    d[d == 0] = 1.0
    d = d + 0.01 * d.mean()
    col = d / d.mean()
    rho = (w.abs() * col[None, :]).mean(dim=1)
    rho = rho / rho.mean()
    std = w.float().std(dim=1, correction=0).double()
    want = [
        float(np.float16(12.85 * float(std[r]) * (1 + 0.175 * (float(rho[r]) - 1)) / 31)) for r in range(8)
    ]
    got = aware.quantize("w", w.float(), info)["scale"].float().tolist()
    assert got == pytest.approx(want, rel=1e-3)
    assert got != plain.quantize("w", w.float(), info)["scale"].float().tolist()
