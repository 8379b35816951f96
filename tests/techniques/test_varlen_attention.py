"""Document-masked attention: the SDPA reference and the FlexAttention kernel against attention
computed document by document, and document isolation of a whole model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import tiny_build

from pgolf.techniques.varlen_attention import (
    DocumentAttention,
    document_ids,
    flex_document_attention,
    sdpa_document_attention,
)

BOS = 1


def per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain attention run separately on every document of every row (explicit softmax)."""
    B, T, H, D = q.shape
    group = H // k.size(2)
    out = torch.zeros_like(q)
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if int(idx[b, t]) == BOS] + [T]
        for s, e in itertools.pairwise(starts):
            for h in range(H):
                qq, kk, vv = q[b, s:e, h], k[b, s:e, h // group], v[b, s:e, h // group]
                scores = qq @ kk.T / math.sqrt(D)
                scores = scores.masked_fill(~torch.ones(e - s, e - s, dtype=torch.bool).tril(), float("-inf"))
                out[b, s:e, h] = torch.softmax(scores, -1) @ vv
    return out


def batch() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    B, T, H, KV, D = 2, 24, 4, 2, 8
    idx = torch.randint(2, 50, (B, T))
    idx[0, [0, 7, 8, 19]] = BOS  # a one-token document at 7
    idx[1, 13] = BOS  # row 1 starts inside a document
    return torch.randn(B, T, H, D), torch.randn(B, T, KV, D), torch.randn(B, T, KV, D), idx


def test_document_ids_count_the_bos_tokens_so_far() -> None:
    idx = torch.tensor([[5, 1, 4, 1, 1, 9]])
    assert document_ids(idx).tolist() == [[0, 1, 1, 2, 3, 3]]


@pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile"
)  # the unfused path, on purpose
def test_sdpa_reference_and_flex_kernel_match_attention_run_document_by_document() -> None:
    q, k, v, idx = batch()
    expected = per_document(q, k, v, idx)
    assert torch.allclose(sdpa_document_attention(q, k, v, idx), expected, atol=1e-5)
    assert torch.allclose(flex_document_attention(q, k, v, idx), expected, atol=1e-5)


def test_a_model_with_the_bos_fixes_keeps_documents_independent() -> None:
    """With document-masked attention, SmearGate and BigramHash, changing the first document of a
    row changes nothing in the second; without the mask it does."""
    techs = {"smear_gate": {}, "bigram_hash": {"buckets": 64, "dim": 8}}
    for masked in (True, False):
        b = tiny_build({**techs, "varlen_attention": {}} if masked else techs)
        with torch.no_grad():
            for p in b.model.parameters():
                p.normal_(std=0.2)
            idx = torch.randint(2, 64, (1, 16))
            idx[0, [0, 9]] = BOS
            other = idx.clone()
            other[0, 1:9] = torch.randint(2, 64, (8,))
            a, c = b.model.logits(idx), b.model.logits(other)
        assert torch.allclose(a[0, 9:], c[0, 9:], atol=1e-6) == masked


def test_placed_in_the_attention_slot_of_the_selected_layers() -> None:
    b = tiny_build({"varlen_attention": {"layers": "last(1)", "kernel": "sdpa"}})
    kernels = [type(blk.attn.kernel).__name__ for blk in b.model.blocks]
    assert kernels == ["SDPAttention", "DocumentAttention"]
    assert isinstance(b.model.blocks[1].attn.kernel, DocumentAttention)


@pytest.mark.gpu
def test_compiled_flex_kernel_matches_the_reference_on_gpu() -> None:
    q, k, v, idx = (t.cuda() for t in batch())
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    fast = torch.compile(DocumentAttention("auto"), fullgraph=True)
    from pgolf.registry import Ctx

    y = fast(q, k, v, Ctx(idx))
    ref = sdpa_document_attention(q.float(), k.float(), v.float(), idx)
    assert torch.allclose(y.float(), ref, atol=3e-2)
