"""Document-masked (varlen) attention: a token attends only to earlier tokens of its own document.

What: documents are delimited by BOS: the document index of position t in a row is
d_t = #{s ≤ t : x_s = BOS} (a row that starts inside a document counts that part as document 0).
Attention is causal and block-diagonal over documents: query t sees key s iff s ≤ t and d_s = d_t,
i.e. softmax over those keys of q_t·k_s/√D, GQA as in the base kernel. A document longer than the
row is cut at the row boundary, as the records cut them at 2048.

Two kernels compute it, chosen by ``kernel``: ``sdpa`` is the reference,
``F.scaled_dot_product_attention`` with the dense (B,1,T,T) boolean mask; ``flex`` is FlexAttention
with a block mask built from the same document ids, a block-sparse kernel that skips the
cross-document blocks (what the records' ``flash_attn_varlen_func`` with ``cu_seqlens`` skips).
``auto`` uses ``flex`` inside ``torch.compile`` on CUDA (one graph: the block mask is built in the
compiled forward from the token ids, no host sync, no recompile per document count) and the
reference otherwise (FlexAttention outside ``torch.compile`` is a slow debugging path).

Why: in a packed stream every token otherwise attends into the previous, unrelated documents; the
mask removes that noise and matches evaluation on single documents, and the kernel skips the
masked blocks.

Source: ``R/2026-04-10_VarLenAttn`` (PR #1530; cu_seqlens from BOS positions, documents split at
2048) and every later record to PR #2135.

Sites: the ``attention`` slot of the selected layers (all by default).

Interactions: the other paths between documents are SmearGate (closed by its BOS fix) and
BigramHash (closed by its reserved BOS row); value embeddings and value residual stay within a
token. Any other ``attention`` filler on the same layer is a conflict. The records' loader emitted
``cu_seqlens``; here the boundaries come from the BOS tokens of the batch itself, so every loader
works (``document_packing`` starts every row at a document).

Evidence (records, 8×H100): ≈2 % faster and ≈0.001 nats better (``R/2026-04-10``). Measured with
pgolf on CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded
corpus, seeds 1337 / 1338; ``python bench/technique_effects.py --only varlen_attention``): Δval_bpb
−0.0081 (−0.0068, −0.0093).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Layers, LayerSelector, Params, Technique, hook, register
from pgolf.registry.run.data import BOS_ID


class VarlenAttentionParams(Params):
    layers: Layers = Field(
        LayerSelector.parse("all"), description="layers whose attention is document-masked"
    )
    kernel: Literal["auto", "flex", "sdpa"] = Field(
        "auto",
        description="flex: FlexAttention block mask; sdpa: dense-mask reference; auto: flex when compiled on CUDA",
    )


def document_ids(idx: Tensor) -> Tensor:
    """d_t = number of BOS tokens at positions ≤ t, per row: (B,T) int64."""
    return (idx == BOS_ID).to(torch.int64).cumsum(-1)


def document_mask(idx: Tensor) -> Tensor:
    """(B,T,T) bool: query t may attend key s (s ≤ t and the same document)."""
    d = document_ids(idx)
    T = idx.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return (d[:, :, None] == d[:, None, :]) & causal


def sdpa_document_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> Tensor:
    """Reference: q (B,T,H,D), k/v (B,T,KV,D) -> (B,T,H,D) through SDPA with the dense mask."""
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=document_mask(idx)[:, None],
        enable_gqa=q.size(2) != k.size(2),
    )
    return y.transpose(1, 2)


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor) -> Tensor:
    """The same through FlexAttention with a block mask (cross-document blocks skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    d = document_ids(idx)
    B, T = idx.shape

    def same_document(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        return (qi >= ki) & (d[b, qi] == d[b, ki])

    mask = create_block_mask(same_document, B, None, T, T, device=idx.device)
    y = flex_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        block_mask=mask,
        enable_gqa=q.size(2) != k.size(2),
    )
    assert isinstance(y, Tensor)
    return y.transpose(1, 2)


class DocumentAttention(nn.Module):
    def __init__(self, kernel: str):
        super().__init__()
        self.kernel = kernel

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx) -> Tensor:
        use_flex = self.kernel == "flex" or (
            self.kernel == "auto" and q.is_cuda and torch.compiler.is_compiling()
        )
        if use_flex:
            return flex_document_attention(q, k, v, ctx.idx)
        return sdpa_document_attention(q, k, v, ctx.idx)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


@register("varlen_attention")
class VarlenAttention(Technique):
    """Document-masked (varlen) attention: a token attends only to earlier tokens of its own document."""

    Params = VarlenAttentionParams
    params: VarlenAttentionParams

    @hook
    def attention(self, layer: int) -> DocumentAttention | None:
        picked = self.params.layers.resolve(self.spec.num_layers)
        return DocumentAttention(self.params.kernel) if layer in picked else None
