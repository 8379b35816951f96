"""Value embeddings: the added values against an explicit per-token formula, one lookup per
forward, placement on the selected layers and order after value_residual."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_build

from pgolf.registry import PgolfError
from pgolf.techniques.value_embeddings import (
    AddValueEmbedding,
    ValueEmbeddingTable,
    add_value_embedding,
    value_embedding,
)


def test_the_maths_against_a_per_token_loop() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 50, (2, 5))
    table, proj, scale, lam = torch.randn(50, 8), torch.randn(16, 8), torch.tensor(0.3), torch.tensor(-1.7)
    v = torch.randn(2, 5, 2, 8)
    u = value_embedding(idx, table, proj, scale)
    out = add_value_embedding(v, u, lam)
    for b in range(2):
        for t in range(5):
            row = [sum(float(proj[j, i]) * float(table[idx[b, t], i]) for i in range(8)) for j in range(16)]
            expected = v[b, t].reshape(-1) + float(lam) * 0.3 * torch.tensor(row)
            assert torch.allclose(out[b, t].reshape(-1), expected, atol=1e-4)


def test_in_the_model_each_selected_layer_adds_lambda_times_one_shared_lookup() -> None:
    model = tiny_build({"value_embeddings": {"dim": 8, "layers": "all"}}).model
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    table: ValueEmbeddingTable = model.embed[0]
    calls: list[int] = []
    table.register_forward_hook(lambda *a: calls.append(1))
    seen: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        blk.attn.kernel.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(i, a[2].detach().clone())
        )
    idx = torch.randint(0, 64, (2, 5))
    lam0 = model.blocks[0].attn.qkv[0].lam
    with torch.no_grad():
        lam0.fill_(0.0)
        model.logits(idx)
        raw = seen[0]
        lam0.fill_(0.7)
        model.logits(idx)
    assert len(calls) == 2  # one table lookup per forward, shared by every layer
    u = value_embedding(idx, table.table.weight, table.proj.weight, table.scale).detach()
    assert torch.allclose(seen[0] - raw, 0.7 * u.view(2, 5, 2, 8), atol=1e-5)


def test_placed_on_the_selected_layers_after_value_residual() -> None:
    b = tiny_build({"value_embeddings": {"layers": "last(1)"}, "value_residual": {}}, num_layers=3)
    assert [t.name for t in b.techniques][:2] == ["value_residual", "value_embeddings"]
    placed = [[type(m).__name__ for m in blk.attn.qkv] for blk in b.model.blocks]
    assert placed == [["ValueResidual"], ["ValueResidual"], ["ValueResidual", "AddValueEmbedding"]]
    assert isinstance(b.model.blocks[2].attn.qkv[1], AddValueEmbedding)
    t = b.model.embed[0]
    assert t.table.weight.shape == (64, 128) and t.proj.weight.shape == (16, 128)
    assert not t.proj.weight.any()  # zero projection: the technique starts silent


def test_no_selected_layer_is_an_error() -> None:
    with pytest.raises(PgolfError, match="value_embeddings.layers=none selects no layer"):
        tiny_build({"value_embeddings": {"layers": "none"}})
