"""BigramHash: the hash and the embedding against plain references."""

from __future__ import annotations

import torch

from pgolf.registry import Ctx
from pgolf.techniques.bigram_hash import BigramHashEmbedding, BigramHashParams, bigram_hash


def test_hash_matches_the_records_formula() -> None:
    tokens = torch.tensor([[5, 900, 17, 1023, 1], [0, 0, 3, 2, 1]])
    buckets = 3072
    out = bigram_hash(tokens, buckets)
    for b in range(2):
        assert out[b, 0] == buckets - 1  # reserved bucket for position 0
        for t in range(1, 5):
            cur, prev = int(tokens[b, t]), int(tokens[b, t - 1])
            assert out[b, t] == ((36313 * cur) ^ (27191 * prev)) % (buckets - 1)
    assert int(out[:, 1:].max()) < buckets - 1


def test_embedding_adds_scaled_projection_of_the_table_row() -> None:
    torch.manual_seed(0)
    mod = BigramHashEmbedding(BigramHashParams(buckets=64, dim=8, scale_init=0.3), model_dim=16)
    torch.nn.init.normal_(mod.table.weight)
    idx = torch.randint(0, 100, (2, 6))
    x = torch.randn(2, 6, 16)
    h = bigram_hash(idx, 64)
    expected = x + 0.3 * (mod.table.weight[h] @ mod.proj.weight.T)
    assert torch.allclose(mod(x, Ctx(idx)), expected, atol=1e-6)


def test_starts_silent_but_learns() -> None:
    torch.manual_seed(0)
    mod = BigramHashEmbedding(BigramHashParams(buckets=64, dim=8), model_dim=16)
    idx = torch.randint(0, 100, (2, 6))
    x = torch.randn(2, 6, 16)
    out = mod(x, Ctx(idx))
    assert torch.equal(out, x)  # zero table: no contribution at init
    out.square().sum().backward()
    grad = mod.table.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the projection is not zero, so the table trains
