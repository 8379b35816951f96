"""Parallel residuals: the block output against x + A(x) + M(x) written out, sequential blocks
before the start layer, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_build

from pgolf.registry import Ctx, PgolfError
from pgolf.registry.run.model import SequentialResidual, rms_norm
from pgolf.techniques.parallel_residuals import ParallelResidual


def test_both_branches_read_the_block_input_from_the_start_layer_on() -> None:
    model = tiny_build({"parallel_residuals": {"start_layer": 1}}, num_layers=3).model
    assert [type(b.wiring) for b in model.blocks] == [SequentialResidual, ParallelResidual, ParallelResidual]
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 16))
    x, x0 = torch.randn(2, 16, 32), rms_norm(torch.randn(2, 16, 32))

    def ctx_for(layer: int) -> Ctx:
        ctx = Ctx(idx)
        ctx.x0, ctx.rotary, ctx.layer, ctx.virtual = x0, model.rotary, layer, layer
        ctx.rope = model.rotary.tables(16, idx.device)
        return ctx

    with torch.no_grad():
        for layer in range(3):
            block = model.blocks[layer]
            mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0

            def attn(h: torch.Tensor, block=block, layer=layer) -> torch.Tensor:
                return block.attn_scale * block.attn(rms_norm(h), ctx_for(layer))

            def mlp(h: torch.Tensor, block=block, layer=layer) -> torch.Tensor:
                return block.mlp_scale * block.mlp(rms_norm(h), ctx_for(layer))

            if layer >= 1:
                expected = mixed + attn(mixed) + mlp(mixed)
            else:
                h = mixed + attn(mixed)
                expected = h + mlp(h)
            assert torch.allclose(block(x, ctx_for(layer)), expected, atol=1e-5)
        sequential = mixed + attn(mixed)
        assert not torch.allclose(block(x, ctx_for(2)), sequential + mlp(sequential), atol=1e-3)


def test_a_start_layer_past_the_model_is_an_error() -> None:
    with pytest.raises(
        PgolfError, match=r"parallel_residuals.start_layer=7 leaves no layer of model.num_layers=2"
    ):
        tiny_build({"parallel_residuals": {}})
