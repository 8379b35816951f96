"""BigramHash: the hash and the embedding against plain references."""

from __future__ import annotations

import torch

from pgolf.registry import Ctx
from pgolf.techniques.bigram_hash import BigramHashEmbedding, BigramHashParams, bigram_hash


def test_hash_matches_the_records_formula() -> None:
    tokens = torch.tensor([[5, 900, 17, 1023, 6], [0, 0, 3, 2, 7]])
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


def test_a_bos_position_takes_the_reserved_row_so_nothing_crosses_documents() -> None:
    """The pair (last token of document 1, BOS of document 2) is never hashed (SmearGate's BOS fix)."""
    tokens = torch.tensor([[1, 40, 41, 1, 50, 51], [1, 42, 41, 1, 50, 51]])  # documents differ only in 1
    out = bigram_hash(tokens, 64)
    assert out[0, 0] == out[0, 3] == 63 and out[1, 3] == 63
    assert torch.equal(out[0, 3:], out[1, 3:])  # the second document's buckets ignore the first's tail
    plain = bigram_hash(tokens, 64, bos=None)  # the records' form: (41, BOS) was hashed at position 3
    assert plain[0, 3] == ((36313 * 1) ^ (27191 * 41)) % 63 and torch.equal(plain[:, 4:], out[:, 4:])
    mod = BigramHashEmbedding(BigramHashParams(buckets=64, dim=8), model_dim=16)
    torch.nn.init.normal_(mod.table.weight)
    x = torch.zeros(2, 6, 16)
    y = mod(x, Ctx(tokens))
    assert torch.equal(y[0, 3:], y[1, 3:])
