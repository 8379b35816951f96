"""Value embeddings: a second token table, looked up once per forward and projected to the values,
is added to the attention values of selected layers.

What: one shared table E_v (V × ``dim``, N(0, ``init_std``²)), a projection P_v (``dim`` → kv_dim,
zero-initialised) and a global scale s (init ``scale_init``) give, once per forward,
u_t = s·P_v E_v[x_t] (B,T,kv_dim). Every selected layer ℓ adds it to its values right after the V
projection: v_ℓ ← v_ℓ + λ_ℓ·u_t (viewed as (B,T,KV,Dh)), λ_ℓ a learned per-layer scalar (init
``lambda_init``). V·dim + dim·kv_dim + 1 + |layers| parameters (164 K at SP1024 with dim 128,
1.08 M at SP8192).

Why: gives the value path of late layers direct access to token identity, which attention
otherwise has to carry through the whole residual stream.

Source: PR #374 into ``R/2026-03-22_11L_EMA_GPTQ-lite…`` (VE128 on layers 9, 10 of 11), kept to
``R/2026-03-31``; removed in ``R/2026-04-05`` when the vocabulary grew to 8192 (the table grows
with V).

Sites: the ``embed`` chain (the table lookup, stored in the forward's cross-layer state; the
embedding itself passes unchanged) and the ``qkv`` chain of the selected layers.

Interactions: runs after ``value_residual`` in the ``qkv`` chain (v_first stays the raw
projection); XSA and the attention-output gates then see the enriched values. Layers are physical:
on a looped stack every pass of a selected layer adds it. Costs bytes that scale with the
vocabulary (the reason it was dropped at SP8192). Roles: E_v ``embedding`` (the embedding lr and
quantizer), P_v ``matrix`` (Muon), s and λ ``scalar``.

Evidence (records, 8×H100): no isolated number in the records. Measured with pgolf on CPU (the
baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337 /
1338; ``python bench/technique_effects.py --only value_embeddings``): Δval_bpb −0.0313 (−0.0320,
−0.0305) (dim 32).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import (
    Ctx,
    Kind,
    Layers,
    LayerSelector,
    Params,
    PgolfError,
    Role,
    Technique,
    hook,
    register,
    set_role,
)

STATE_KEY = "value_embeddings.u"


class ValueEmbeddingsParams(Params):
    dim: int = Field(128, ge=1, le=4096, description="width of the value-embedding table")
    layers: Layers = Field(LayerSelector.parse("last(2)"), description="layers whose values get it")
    init_std: float = Field(0.01, ge=0.0, description="std of the table's normal init")
    scale_init: float = Field(0.1, description="initial global scale s")
    lambda_init: float = Field(1.0, description="initial per-layer weight λ")


def value_embedding(idx: Tensor, table: Tensor, proj: Tensor, scale: Tensor) -> Tensor:
    """s·P_v E_v[idx]: (B,T) ids, table (V,dim), proj (kv_dim,dim), scale () -> (B,T,kv_dim)."""
    return scale * (table[idx] @ proj.T)


def add_value_embedding(v: Tensor, u: Tensor, lam: Tensor) -> Tensor:
    """v + λ·u for v (B,T,KV,Dh) and u (B,T,KV·Dh)."""
    return v + lam.to(v.dtype) * u.to(v.dtype).view_as(v)


class ValueEmbeddingTable(nn.Module):
    """The embed-chain part: computes u once per forward into ``ctx.state``; x passes unchanged."""

    def __init__(self, p: ValueEmbeddingsParams, vocab_size: int, kv_dim: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, p.dim)
        nn.init.normal_(self.table.weight, std=p.init_std)
        self.proj = nn.Linear(p.dim, kv_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(float(p.scale_init)))
        set_role(self.table.weight, Role.EMBEDDING, Kind.EMBED)
        set_role(self.proj.weight, Role.MATRIX, Kind.OTHER)
        set_role(self.scale, Role.SCALAR)

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        ctx.state[STATE_KEY] = value_embedding(ctx.idx, self.table.weight, self.proj.weight, self.scale)
        return x


class AddValueEmbedding(nn.Module):
    """The qkv-chain part of one layer: v ← v + λ·u."""

    def __init__(self, lambda_init: float):
        super().__init__()
        self.lam = set_role(nn.Parameter(torch.tensor(float(lambda_init))), Role.SCALAR)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx) -> tuple[Tensor, Tensor, Tensor]:
        return q, k, add_value_embedding(v, ctx.state[STATE_KEY], self.lam)


@register("value_embeddings")
class ValueEmbeddings(Technique):
    """Value embeddings: a second token table, looked up once per forward and projected to the values,
    is added to the attention values of selected layers."""

    Params = ValueEmbeddingsParams
    params: ValueEmbeddingsParams
    after = ("value_residual",)

    def _layers(self) -> list[int]:
        picked = self.params.layers.resolve(self.spec.num_layers)
        if not picked:
            raise PgolfError(
                f"techniques.value_embeddings.layers={self.params.layers} selects no layer of "
                f"model.num_layers={self.spec.num_layers}"
            )
        return list(picked)

    @hook
    def embed(self) -> ValueEmbeddingTable:
        self._layers()
        return ValueEmbeddingTable(self.params, self.spec.vocab_size, self.spec.kv_dim)

    @hook
    def qkv(self, layer: int) -> AddValueEmbedding | None:
        return AddValueEmbedding(self.params.lambda_init) if layer in self._layers() else None
