"""The base GPT: the baseline's shape and parameter count, roles, maths against references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BASELINE, small_spec

from pgolf.registry import PgolfError, Role
from pgolf.registry.api.config import load_stack, stack_from_dict
from pgolf.registry.api.roles import role_table
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
    assert model.num_encoder_layers == 4 and tuple(model.skip_weights.shape) == (4, 512)


def test_zero_initialised_projections_make_blocks_start_as_identity() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 64, (2, 16))
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
        x = torch.randn(2, 16, 32)
        cos, sin = model.rotary(16, x.device)
        assert torch.equal(block(x, torch.randn_like(x), cos, sin), x)
    tgt = torch.randint(0, 64, (2, 16))
    assert model(idx, tgt).item() == pytest.approx(math.log(64), abs=0.05)  # tiny logits: ~uniform


def test_logits_are_soft_capped() -> None:
    model = GPT(SMALL, logit_softcap=2.0)
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
    with pytest.raises(PgolfError, match="both replace the MLP activation of layer 0"):
        build_model(rs.spec, [a, b])


def test_unlabelled_parameter_is_rejected() -> None:
    class Adds(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return x

    model = GPT(SMALL)
    model.embed_transforms.append(Adds())
    with pytest.raises(PgolfError, match=r"parameters without a role: embed_transforms.0.w"):
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
