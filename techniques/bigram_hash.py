"""BigramHash embedding: add a hashed (previous, current) token-pair embedding to the input.

What: a second table T (buckets × dim). Position t ≥ 1 looks up bucket
h_t = (36313·x_t XOR 27191·x_{t−1}) mod (buckets − 1); position 0 and every BOS position
(x_t = BOS, the first token of a document) use the reserved bucket buckets − 1, so the pair
(last token of the previous document, BOS) is never hashed: nothing crosses a document boundary,
as with SmearGate's BOS fix (``bos_fix: false`` hashes it, as the records did). The row is projected to model_dim by P (dim → model_dim, no bias), scaled by a
learned scalar s, and added to the token embedding before the input RMSNorm:
x ← E[x_t] + s·P·T[h_t].

Why: cheap explicit local context for a tiny vocabulary (1024 tokens is about 2.4 bytes per
token), at buckets·dim + dim·model_dim parameters.

Source: modded-nanogpt bigram hash; parameter-golf PR #135 and the records from
``R/2026-03-19_smeargate_orthoinit_muonwd`` to ``R/2026-04-03``. Initialisation as those
records ran it: T zero, s = 0.05, and P orthogonal (their OrthoInit pass re-initialised the
projection after zeroing it; with both T and P zero no gradient would ever reach either).

Interactions: complementary to SmearGate (both inject x_{t−1}); loses its value when the
vocabulary grows (dropped at SP4096) and on depth-recurrent stacks; competes for artifact bytes
with width and MLP size. A trained input feature, not an evaluation-time cache: legal.

Evidence (records, 8×H100): buckets 4096→8192 −0.0012 BPB, 8192→10240 −0.0008
(``R/2026-03-20_10L_Int5MLP…``); 2048→3072 −0.0009 (``R/2026-03-23…``). Measured with pgolf on CPU
(the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337
/ 1338; ``python bench/technique_effects.py --only bigram_hash``): Δval_bpb −0.0685 (−0.0673,
−0.0697) (1,024 buckets, dim 32).

Roles (kinds): T ``embedding`` (embed; Adam at the embedding lr), P ``matrix`` (other; Muon),
s ``scalar`` (control).

Site: the ``embed`` chain.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Kind, Params, Role, Technique, hook, register, set_role
from pgolf.registry.run.data import BOS_ID


class BigramHashParams(Params):
    buckets: int = Field(
        3072, ge=2, le=1 << 20, description="table rows; the last is reserved for position 0"
    )
    dim: int = Field(128, ge=1, le=4096, description="table width, projected up to model_dim")
    scale_init: float = Field(0.05, ge=0, description="initial value of the learned output scale s")
    bos_fix: bool = Field(True, description="BOS positions take the reserved row (no cross-document pair)")


def bigram_hash(tokens: Tensor, buckets: int, bos: int | None = BOS_ID) -> Tensor:
    """Bucket ids (same shape as tokens (..., T)): XOR hash of (x_{t-1}, x_t); position 0 and, unless
    ``bos`` is None, every position holding ``bos`` -> buckets-1 (the reserved row)."""
    t = tokens.to(torch.int64)
    mod = buckets - 1
    out = torch.empty_like(t)
    out[..., 0] = mod
    out[..., 1:] = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % mod
    return out if bos is None else out.masked_fill(t == bos, mod)


class BigramHashEmbedding(nn.Module):
    def __init__(self, p: BigramHashParams, model_dim: int):
        super().__init__()
        self.buckets, self.bos = p.buckets, (BOS_ID if p.bos_fix else None)
        self.table = nn.Embedding(p.buckets, p.dim)
        self.proj = nn.Linear(p.dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(float(p.scale_init)))
        nn.init.zeros_(self.table.weight)
        nn.init.orthogonal_(self.proj.weight)
        set_role(self.table.weight, Role.EMBEDDING, Kind.EMBED)
        set_role(self.proj.weight, Role.MATRIX, Kind.OTHER)
        set_role(self.scale, Role.SCALAR)

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        extra = self.proj(self.table(bigram_hash(ctx.idx, self.buckets, self.bos)))
        return x + self.scale.to(extra.dtype) * extra.to(x.dtype)


@register("bigram_hash")
class BigramHash(Technique):
    """BigramHash embedding: add a hashed (previous, current) token-pair embedding to the input."""

    Params = BigramHashParams
    params: BigramHashParams

    @hook
    def embed(self) -> nn.Module:
        return BigramHashEmbedding(self.params, self.spec.model_dim)
