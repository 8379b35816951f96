"""Gated skips: the merge against a per-channel reference, its init, sizing from the schedule and
labels."""

from __future__ import annotations

import math

import torch
from conftest import tiny_build

from pgolf.registry import Ctx, Role
from pgolf.registry.api.roles import role_of
from pgolf.techniques.gated_skips import GatedSkipMerge, gated_skip


def test_matches_the_per_channel_reference() -> None:
    torch.manual_seed(0)
    x, skip, gate, scale = torch.randn(2, 3, 6), torch.randn(2, 3, 6), torch.randn(6), torch.randn(6)
    out = gated_skip(x, skip, gate, scale)
    for c in range(6):
        s = 1 / (1 + math.exp(-float(gate[c])))
        assert torch.allclose(
            out[..., c], s * x[..., c] + (1 - s) * float(scale[c]) * skip[..., c], atol=1e-6
        )


def test_starts_as_an_even_mix_and_is_sized_by_the_schedule() -> None:
    b = tiny_build({"gated_skips": {}}, num_layers=5)
    merge = b.model.skip_merge
    assert isinstance(merge, GatedSkipMerge) and merge.gates.shape == (2, 32) == merge.scales.shape
    assert role_of(merge.gates) == Role.SCALAR and role_of(merge.scales) == Role.SCALAR
    x, skip = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    assert torch.allclose(merge(x, skip, 1, Ctx(torch.zeros(1, 4, dtype=torch.long))), 0.5 * (x + skip))
    looped = tiny_build(
        {"gated_skips": {}, "depth_recurrence": {"loop_start": 1, "loop_end": 3}}, num_layers=5
    )
    assert looped.model.skip_merge.gates.shape == (5, 32)  # 11 virtual layers: 5 encoder, 6 decoder


def test_decoder_layers_merge_through_the_gate() -> None:
    model = tiny_build({"gated_skips": {}}, num_layers=4).model
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    calls: list[int] = []
    model.skip_merge.register_forward_hook(lambda m, args, out: calls.append(args[2]))
    with torch.no_grad():
        model.logits(torch.randint(0, 64, (1, 8)))
    assert calls == [0, 1]
