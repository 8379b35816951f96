"""rtn and the shared row-wise grid (``_rowquant``): each scale rule against a plain per-row
reference, the fp16 rounding of scales (also under torch.compile), the stored form, the worst-case
bound, and QAT (``qat``, ``late_qat``) reproducing rtn's export bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runs import technique, tiny_stack, tiny_trainer, token_shard

from pgolf.registry import Ctx, Kind, ParamInfo, PgolfError, Role
from pgolf.registry.run.export import export_model
from pgolf.registry.run.model import Linear
from pgolf.registry.run.pipeline import build
from pgolf.techniques._rowquant import (
    Grid,
    code_steps,
    dequantize_codes,
    fake_quantize,
    fp16_round,
    hessian_row_adjust,
    pack_codes,
    qmax_of,
)
from pgolf.techniques.rtn import RTN, RTNParams


def f16(x: float) -> float:
    return float(np.float16(max(x, 2.0**-24)))


def reference_scale(row: np.ndarray, qmax: int, clip: str, k: float, percentiles: tuple[float, ...]) -> float:
    """One row's stored scale, written out with numpy."""
    a = np.abs(row.astype(np.float64))
    if clip == "absmax":
        return f16(a.max() / qmax)
    if clip == "sdclip":
        std = row.astype(np.float64).std()  # population std
        return f16((k * std if std > 0 else a.max()) / qmax)
    best = None
    for p in percentiles:
        s = f16(np.quantile(a, p / 100) / qmax)
        err = ((row - np.clip(np.round(row / s), -qmax, qmax) * s) ** 2).sum()
        if best is None or err < best[0]:
            best = (err, s)
    assert best is not None
    return best[1]


def rtn(**kw: object) -> RTN:
    return RTN(RTNParams(**kw), None)  # type: ignore[arg-type]


def info(kind: Kind = Kind.MLP_UP, shape: tuple[int, int] = (6, 40)) -> ParamInfo:
    return ParamInfo("w", Role.MATRIX, kind, 0, shape)


@pytest.mark.parametrize("clip", ["absmax", "sdclip", "percentile"])
@pytest.mark.parametrize("bits", [5, 6, 8])
def test_rtn_codes_and_scales_match_a_row_by_row_reference(clip: str, bits: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(6, 40) * torch.logspace(-2, 1, 6)[:, None]
    w[2] = 0.0
    w[4] = 0.3  # constant row
    w[5, 7] = 40.0  # an outlier SDClip clips
    tech = rtn(bits=bits, clip=clip, sdclip_k=10.0)
    data = tech.quantize("w", w, info())
    qmax = 2 ** (bits - 1) - 1
    assert data["q"].dtype == torch.int8 and data["scale"].dtype == torch.float16
    for r in range(6):
        row = w[r].numpy()
        s = reference_scale(row, qmax, clip, 10.0, (99.9, 99.95, 99.99, 99.999, 100.0))
        assert float(data["scale"][r]) == s, (r, clip)
        want = np.clip(np.round(row.astype(np.float32) / np.float32(s)), -qmax, qmax)
        assert data["q"][r].numpy().tolist() == want.astype(np.int8).tolist()
    back = tech.dequantize(data)
    assert torch.equal(back, data["q"].float() * data["scale"].float()[:, None])
    err = float((back - w).norm() / w.norm())
    assert err <= tech.error_bound(info(), w)


def test_bits_per_kind_and_the_scale_floor() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.003  # rows far below 1: the floor decides the step
    tech = rtn(bits={"default": 6, "mlp_up": 5, "embed": 8}, clip="absmax", scale_floor=True, scope="all")
    assert tech.grid(Kind.MLP_UP).qmax == 15 and tech.grid(Kind.ATTN_Q).qmax == 31
    assert tech.grid(Kind.EMBED).qmax == 127
    data = tech.quantize("w", w, info(Kind.ATTN_Q, (8, 64)))
    assert bool((data["scale"].float() == f16(1 / 31)).all())
    assert int(data["q"].abs().max()) == 0  # |w| < 1/62 everywhere: all round to zero
    with pytest.raises(PgolfError, match="unknown kind 'bogus'"):
        tiny_stack({"rtn": {"bits": {"default": 6, "bogus": 5}}})


def test_gptq_lite_can_pick_one_percentile_per_tensor() -> None:
    torch.manual_seed(1)
    w = torch.randn(10, 50)
    w[3, 3] = 30.0
    per_tensor = rtn(clip="percentile", percentile_search="tensor").quantize("w", w, info(shape=(10, 50)))
    a = np.abs(w.numpy().astype(np.float64)).reshape(-1)
    best = None
    for p in (99.9, 99.95, 99.99, 99.999, 100.0):
        s = f16(np.quantile(a, p / 100) / 31)
        err = ((w.numpy() - np.clip(np.round(w.numpy() / s), -31, 31) * s) ** 2).sum()
        if best is None or err < best[0]:
            best = (err, s)
    assert best is not None
    assert bool((per_tensor["scale"].float() == best[1]).all())


def test_fp16_round_equals_the_cast_also_when_compiled() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(20000, generator=g) * 65504, torch.rand(20000, generator=g) * 2**-13,
                   torch.tensor([2.0**-24, 2.0**-14, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 65504.0])])  # fmt: skip
    assert torch.equal(fp16_round(x), x.half().float())
    compiled = torch.compile(fp16_round, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), x.half().float())


def test_stored_form_with_higher_precision_columns() -> None:
    q = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=torch.float32)
    data = pack_codes(q, torch.tensor([0.5, 0.25]), torch.tensor([1]), torch.tensor([0.125, 0.0625]))
    assert code_steps(data).tolist() == [[0.5, 0.125, 0.5], [0.25, 0.0625, 0.25]]
    assert dequantize_codes(data).tolist() == [[0.5, -0.25, 1.5], [1.0, 0.3125, -1.5]]


def test_hessian_row_adjust_follows_the_records_formula() -> None:
    w = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 4.0]])
    d = torch.tensor([1.0, 3.0, 2.0])
    col = d / d.mean()
    rho = [(abs(w[r]) * col).mean().item() for r in range(2)]
    rho = [v / (sum(rho) / 2) for v in rho]
    got = hessian_row_adjust(w, d, 0.175)
    assert got.tolist() == pytest.approx([1 + 0.175 * (v - 1) for v in rho])


@pytest.mark.parametrize("clip", ["absmax", "sdclip", "percentile"])
def test_qat_forward_is_exactly_the_rtn_export(clip: str) -> None:
    """With the same bits and scale rule, the weights QAT trains through are the weights rtn
    stores: fake quantization in training and the export share one grid, bit for bit."""
    torch.manual_seed(2)
    w = torch.randn(12, 48) * 0.05
    grid = Grid(qmax_of(5), clip=clip, k=11.5)
    tech = rtn(bits=5, clip=clip, sdclip_k=11.5)
    exported = tech.dequantize(tech.quantize("w", w, info(shape=(12, 48))))
    assert torch.equal(fake_quantize(w, grid), exported)


def test_qat_is_on_from_the_start_on_the_kinds_it_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rs = tiny_stack({"qat": {"bits": 4, "clip": "sdclip", "kinds": ["mlp_up", "attn_q"]}})
    b, trainer = tiny_trainer(rs, token_shard(tmp_path))
    linears = [m for m in b.model.modules() if isinstance(m, Linear)]
    placed = {m.kind for m in linears if m.weight_transform is not None}
    assert placed == {Kind.MLP_UP, Kind.ATTN_Q}
    result = trainer.run()
    assert result.switches == ("qat",) and trainer.eval_switches == ()
    m = next(m for m in linears if m.kind == Kind.MLP_UP)
    idx = torch.zeros(1, 2, dtype=torch.long)
    w = m.weight.detach()
    assert torch.equal(m.weight_transform(w, Ctx(idx, ("qat",))), fake_quantize(w, Grid(7, clip="sdclip")))
    assert technique(b, "qat").params.start_fraction == 0.0


def test_qat_and_late_qat_conflict() -> None:
    with pytest.raises(PgolfError, match="conflicts with technique"):
        tiny_stack({"qat": {}, "late_qat": {}})


def test_rtn_and_gptq_on_disjoint_scopes_share_one_model() -> None:
    b = build(tiny_stack({"rtn": {"scope": ["embed"], "bits": 8}, "gptq": {}}, export={"passthrough_max_numel": 0}),
              torch.device("cpu"))  # fmt: skip
    from pgolf.registry.run.export import export_model

    packed = export_model(b.model, b.sites, tiny_stack({}).stack.export).packed["tensors"]
    assert packed["tok_emb.weight"]["q"] == "rtn" and packed["blocks.0.mlp.fc.weight"]["q"] == "gptq"


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_a_per_kind_entry_the_scope_never_claims_is_refused(quantizer: str) -> None:
    """`bits: {default: 6, embed: 8}` under the default scope (the block matrices) left the embedding
    to int8_rowwise without a word (three reference stacks did so): refused, naming the entry;
    `scope: [matrices, embed]` claims both, and the embedding is then stored on its 8-bit grid."""
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.api.errors import ConfigError
    from pgolf.registry.api.selectors import TensorScope

    for key, value in (("bits", {"default": 6, "embed": 8}), ("sdclip_k", {"default": 12.85, "embed": 20.0})):
        with pytest.raises(
            ConfigError, match=rf"{key}\.embed: the scope matrices never claims embed tensors"
        ):
            stack_from_dict({"techniques": {quantizer: {key: value}}})
    with pytest.raises(ConfigError, match=r"bits\.mlp_up: the scope \['embed'\] never claims"):
        stack_from_dict(
            {"techniques": {quantizer: {"scope": ["embed"], "bits": {"default": 6, "mlp_up": 5}}}}
        )
    with pytest.raises(ConfigError, match=r"late_qat: Value error, bits\.embed: kinds \['attn_q'"):
        stack_from_dict({"techniques": {"late_qat": {"bits": {"default": 6, "embed": 8}}}})  # QAT's kinds too
    scope = TensorScope.parse(["matrices", "embed"])
    assert scope.may_claim_kind(Kind.EMBED) and scope.may_claim_kind(Kind.MLP_UP)
    assert not scope.may_claim_kind(Kind.CONTROL)
    assert TensorScope.parse(["matrices", "embedding"]).may_claim_kind(Kind.CONTROL)  # a role: any kind
    emb = ParamInfo("tok_emb.weight", Role.EMBEDDING, Kind.EMBED, None, (64, 32))
    mlp = ParamInfo("blocks.0.mlp.fc.weight", Role.MATRIX, Kind.MLP_UP, 0, (128, 32))
    assert scope.contains(emb) and scope.contains(mlp) and not TensorScope.parse("matrices").contains(emb)
    rs = stack_from_dict({"model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1},
                          "techniques": {quantizer: {"scope": ["matrices", "embed"], "bits": {"default": 6, "embed": 8}}}})  # fmt: skip
    b = build(rs, torch.device("cpu"))
    ex = export_model(b.model, b.sites, rs.stack.export)
    assert ex.packed["tensors"]["tok_emb.weight"]["q"] == quantizer
    assert ex.packed["tensors"]["blocks.0.mlp.fc.weight"]["q"] == quantizer
