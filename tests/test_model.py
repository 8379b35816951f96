"""The base GPT: the baseline's shape and parameter count, roles, maths against references."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import BASELINE, small_spec

from pgolf.registry import Ctx, Kind, Params, PgolfError, Role, Technique, hook
from pgolf.registry.api.config import load_stack, stack_from_dict
from pgolf.registry.api.roles import param_infos, role_table
from pgolf.registry.api.sites import SiteConflict
from pgolf.registry.api.technique import Registry
from pgolf.registry.run.model import (
    GPT,
    FlashAttention,
    SDPAttention,
    apply_rotary,
    build_model,
    count_params,
    model_flops_per_token,
)

SMALL = small_spec(num_layers=3)


def test_baseline_has_the_challenge_parameter_count() -> None:
    rs = load_stack(BASELINE)
    with torch.device("meta"):
        model = build_model(rs.spec, [])
    assert count_params(model) == 17_059_912  # R/2026-03-17_NaiveBaseline/train.log
    roles = role_table(model)
    assert sum(1 for r in roles.values() if r == Role.MATRIX) == 9 * 6
    assert roles["tok_emb.weight"] == Role.EMBEDDING
    assert all(roles[n] == Role.SCALAR for n in roles if n.split(".")[-1] in
               ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights"))  # fmt: skip
    assert model.schedule.order(()) == ((0, 1, 2, 3), (4, 5, 6, 7, 8))
    assert tuple(model.skip_merge.skip_weights.shape) == (4, 512)


def test_every_parameter_carries_its_kind_and_layer() -> None:
    with torch.device("meta"):
        infos = param_infos(build_model(load_stack(BASELINE).spec, []))
    kinds = [i.kind for i in infos.values()]
    for k in (Kind.ATTN_Q, Kind.ATTN_K, Kind.ATTN_V, Kind.ATTN_O, Kind.MLP_UP, Kind.MLP_DOWN):
        assert kinds.count(k) == 9
    assert infos["tok_emb.weight"].kind == Kind.EMBED and infos["tok_emb.weight"].layer is None
    assert infos["blocks.3.attn.c_k.weight"].kind == Kind.ATTN_K
    assert infos["blocks.3.attn.c_k.weight"].layer == 3 and infos["blocks.8.resid_mix"].layer == 8
    assert infos["blocks.0.attn.q_gain"].kind == Kind.CONTROL


def test_zero_initialised_projections_make_blocks_start_as_identity() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 64, (2, 16))
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
        x = torch.randn(2, 16, 32)
        ctx = Ctx(idx)
        ctx.x0, ctx.rotary, ctx.rope = torch.randn_like(x), model.rotary, model.rotary.tables(16, x.device)
        assert torch.equal(block(x, ctx), x)
    tgt = torch.randint(0, 64, (2, 16))
    assert model(idx, tgt).item() == pytest.approx(math.log(64), abs=0.05)  # tiny logits: ~uniform


def test_logits_are_soft_capped() -> None:
    model = GPT(dataclasses.replace(SMALL, logit_softcap=2.0))
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000)
    assert model.logits(torch.randint(0, 64, (1, 8))).abs().max() <= 2.0


def test_future_tokens_never_change_past_predictions() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL)
    for p in model.parameters():  # leave the zero init so every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, b = model.logits(idx), model.logits(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_rotary_matches_complex_rotation_of_half_split_pairs() -> None:
    T, D = 5, 8
    x = torch.randn(1, T, 2, D)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(T).float(), inv)
    out = apply_rotary(x, ang.cos(), ang.sin())
    z = (
        torch.complex(x[..., : D // 2], x[..., D // 2 :])
        * torch.polar(torch.ones_like(ang), -ang)[None, :, None]
    )
    assert torch.allclose(out, torch.cat((z.real, z.imag), dim=-1), atol=1e-6)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal softmax attention with K/V repeated per query group; (B,T,H,D) layout."""
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.size(-1))
    T = q.size(1)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def test_sdpa_kernel_matches_plain_attention() -> None:
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    assert torch.allclose(SDPAttention()(q, k, v), reference_attention(q, k, v), atol=1e-5)


@pytest.mark.gpu
def test_flash_kernel_matches_sdpa_on_gpu() -> None:
    pytest.importorskip("flash_attn")
    q, k, v = (torch.randn(2, 64, h, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 4, 4))
    assert torch.allclose(FlashAttention()(q, k, v).float(), SDPAttention()(q, k, v).float(), atol=2e-2)


def test_two_techniques_replacing_one_activation_is_an_error() -> None:
    rs = stack_from_dict({"model": {"num_layers": 3, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2},
                          "techniques": {"leaky_relu_sq": {"layers": [0, 1]}}})  # fmt: skip
    a = rs.techniques[0].instantiate(rs.spec)
    b = rs.techniques[0].cls(rs.techniques[0].params.model_copy(update={}), rs.spec)
    with pytest.raises(SiteConflict, match="'leaky_relu_sq' and 'leaky_relu_sq' both fill the slot per layer "
                                           "'mlp_act' at layer 0"):  # fmt: skip
        build_model(rs.spec, [a, b])


def test_a_module_with_the_wrong_signature_names_the_technique_and_the_site() -> None:
    class TwoArgs(torch.nn.Module):
        def forward(self, y: torch.Tensor, v: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            return y

    def attn_out(self: Any, layer: int) -> torch.nn.Module:
        return TwoArgs()

    cls = type("WrongSig", (Technique,), {"Params": Params, "attn_out": hook(attn_out)})
    Registry().add("wrong_sig", cls)
    with pytest.raises(PgolfError, match=r"'wrong_sig': the module its 'attn_out' hook returns .* the "
                                         r"'attn_out' site calls forward\(self, y, ctx\)"):  # fmt: skip
        build_model(SMALL, [cls(Params(), SMALL)])


def test_unlabelled_parameter_is_rejected() -> None:
    class Adds(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
            return x

    model = GPT(SMALL)
    model.embed.append(Adds())
    with pytest.raises(PgolfError, match=r"parameters without a role: embed.0.w"):
        role_table(model)


def test_per_token_loss_matches_mean() -> None:
    torch.manual_seed(1)
    model = GPT(SMALL)
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    per = model(idx, tgt, reduction="none")
    assert per.shape == (2, 16)
    assert torch.allclose(per.mean(), model(idx, tgt))
    assert torch.allclose(per, F.cross_entropy(model.logits(idx).transpose(1, 2), tgt, reduction="none"))


def test_flops_per_token_counts_the_dense_matmuls() -> None:
    spec = load_stack(BASELINE).spec
    dense = 6 * (17_059_912 - 9 * 2056 - 4 * 512)  # 6 FLOPs per weight per token, tied head counted once
    attn = 3 * 2 * 2 * 1024 * 512 / 2 * 9
    assert model_flops_per_token(spec, 1024) == pytest.approx(dense + attn, rel=1e-9)


def _random_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(SMALL)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_compiled_model_agrees_with_eager_on_cpu() -> None:
    """torch.compile (fullgraph, as the trainer runs it) against the eager reference: loss to
    1e-5 relative and logits to 1e-4 absolute in fp32 on CPU."""
    model = _random_model()
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    eager_loss = model(idx, tgt)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    loss = compiled(idx, tgt)
    loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)  # type: ignore[arg-type]


def test_bf16_autocast_agrees_with_fp32() -> None:
    """bf16 autocast (the CUDA default) against fp32: per-token loss within 0.05 nats, mean loss
    within 1 %, on CPU autocast."""
    model = _random_model(1)
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = model(idx, tgt, reduction="none")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx, tgt, reduction="none")
    assert low.dtype == torch.float32  # the head computes logits in fp32
    assert (low - ref).abs().max() < 0.05
    assert float(low.mean()) == pytest.approx(float(ref.mean()), rel=0.01)


def test_non_integer_mlp_multipliers_up_to_4x_are_sized_by_the_size_gate() -> None:
    """MLP hidden = int(mult·d) for non-integer multipliers (2.625·512 = 1344 as the records), and
    the artifact estimate `pgolf check` and `pgolf run` refuse over-limit stacks with grows with it."""
    from pgolf.registry.run.pipeline import estimate_artifact_bytes

    assert stack_from_dict({"model": {"mlp_mult": 2.625}}).spec.mlp_hidden == 1344
    shape = {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 64}
    sizes = {}
    for mult in (2.0, 2.625, 3.5, 4.0):
        rs = stack_from_dict({"model": {**shape, "mlp_mult": mult}})
        hidden = rs.spec.mlp_hidden
        assert hidden == int(mult * 64)
        with torch.device("meta"):
            model = build_model(rs.spec, [])
        assert model.blocks[0].mlp.fc.weight.shape == (hidden, 64)
        sizes[mult] = estimate_artifact_bytes(rs).model_bytes
    assert sizes[2.0] < sizes[2.625] < sizes[3.5] < sizes[4.0]
    limit = (sizes[3.5] + sizes[4.0]) // 2
    code = estimate_artifact_bytes(stack_from_dict({"model": shape}), model_bytes=0).code_bytes
    for mult, fits in ((3.5, True), (4.0, False)):
        rs = stack_from_dict(
            {"model": {**shape, "mlp_mult": mult}, "export": {"artifact_limit": limit + code}}
        )
        assert estimate_artifact_bytes(rs).fits == fits
