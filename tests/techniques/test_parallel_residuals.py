"""Parallel residuals: the block output against x + A(x) + M(x) written out, sequential blocks
before the start layer, errors."""

from __future__ import annotations

import numpy as np
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


def manual_hidden(model: torch.nn.Module, idx: torch.Tensor, variant: str, start: int) -> torch.Tensor:
    """The whole forward written out with the lane formulas (3 layers: encoder [0], decoder [1, 2])."""
    x = rms_norm(model.tok_emb(idx))
    ctx = Ctx(idx)
    ctx.x0, ctx.rotary, ctx.rope = x, model.rotary, model.rotary.tables(idx.size(1), idx.device)
    lane = None
    skips = []
    for v, i in enumerate((0, 1, 2)):
        ctx.layer, ctx.virtual = i, v
        block = model.blocks[i]
        if i == 1:
            x = x + model.skip_merge.skip_weights[0] * skips.pop()
        x = block.resid_mix[0] * x + block.resid_mix[1] * ctx.x0
        if i < start:
            x = x + block.attn_branch(x, ctx)
            x = x + block.mlp_branch(x, ctx)
        elif variant == "lanes":
            lane = x if lane is None else lane
            lane = lane + block.mlp_branch(lane, ctx)
            x = x + block.attn_branch(x, ctx)
        else:
            lane = x if lane is None else lane
            a, m = block.attn_branch(x, ctx), block.mlp_branch(lane, ctx)
            (r_a, r_m), P = block.wiring.rho, block.wiring.route
            x, lane = r_a * x + P[0, 0] * a + P[1, 0] * m, r_m * lane + P[0, 1] * a + P[1, 1] * m
        if v == 0:
            skips.append(x)
    if variant == "lanes":
        mu = model.final[0].mu
        x = mu * x + (1 - mu) * lane
    else:
        x = (x + lane) / 2
    return rms_norm(x)


@pytest.mark.parametrize("variant", ["lanes", "routed"])
def test_lane_variants_match_the_forward_written_out(variant: str) -> None:
    model = tiny_build({"parallel_residuals": {"variant": variant, "start_layer": 1}}, num_layers=3).model
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
        idx = torch.randint(0, 64, (2, 12))
        h, _ = model.hidden(idx)
        assert torch.allclose(h, manual_hidden(model, idx, variant, 1), atol=1e-5)
    want = {"lanes": ["SequentialResidual", "SeparateLanes", "SeparateLanes"],
            "routed": ["SequentialResidual", "RoutedLanes", "RoutedLanes"]}[variant]  # fmt: skip
    assert [type(b.wiring).__name__ for b in model.blocks] == want
    extra = {n: p.numel() for n, p in model.named_parameters() if "wiring" in n or n.startswith("final")}
    assert sum(extra.values()) == (1 if variant == "lanes" else 12)


def test_routed_lanes_start_with_the_records_values() -> None:
    model = tiny_build({"parallel_residuals": {"variant": "routed", "start_layer": 1}}).model
    wiring = model.blocks[1].wiring
    assert wiring.rho.tolist() == pytest.approx([1.1, 1.1]) and wiring.route.tolist() == [
        [1.0, 1.0],
        [1.0, 1.0],
    ]


@pytest.mark.parametrize("variant", ["lanes", "routed"])
def test_lane_variants_train_and_stay_causal_on_a_looped_stack(variant: str, tmp_path) -> None:
    from runs import tiny_stack, tiny_trainer, token_shard

    loop = {"loop_start": 0, "loop_end": 1, "num_loops": 1, "start_fraction": 0.5}
    rs = tiny_stack({"parallel_residuals": {"variant": variant, "start_layer": 1}, "depth_recurrence": loop})
    b, trainer = tiny_trainer(rs, token_shard(tmp_path))
    result = trainer.run()
    assert np.isfinite(result.final_train_loss) and "depth_recurrence" in result.switches
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = torch.randint(0, 64, (6,))
    with torch.no_grad():
        a, c = b.model.logits(idx, result.switches), b.model.logits(changed, result.switches)
    assert torch.allclose(a[0, :10], c[0, :10], atol=1e-6)
