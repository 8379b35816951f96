"""SmearGate: blend each token's embedding with the previous token's, never across a document
boundary.

What: on the token embedding x (B,T,D) before the input RMSNorm, with m_t = 1[x_t ≠ BOS] (the BOS
fix: the first token of a document takes nothing from the previous document) and x_{−1} = 0:

* ``variant: input`` (v2, the default): x̃_t = x_t + λ·σ(w·x_t[:W])·m_t·x_{t−1}, W = ``width``
  leading channels of the current token's embedding; w ∈ R^W and the scalar λ start at zero, so
  the technique is the identity at initialisation (W + 1 parameters).
* ``variant: static`` (v1): x̃_t = (1 − σ(g))⊙x_t + σ(g)⊙m_t⊙x_{t−1} per channel, g ∈ R^D starting at
  ``gate_init`` (σ(0) = 0.5) (D parameters).

Why: a direct, almost free path for the previous token's identity (bigram context) at the input,
complementary to BigramHash; the BOS mask keeps a packed stream's documents independent.

Source: ``R/2026-03-19_smeargate_orthoinit_muonwd`` and ``R/2026-03-20_Int6…`` (v1, g = 0 in the
03-20/03-23 code); modded-nanogpt / PR #1667, ``R/2026-04-16_SmearGate_AttentionOutputGate…`` (v2,
W = 12); the BOS fix from ``R/2026-04-27_*`` / PR #1851 (PR #1797, without it, was held back).

Sites: the ``embed`` chain (it reads the token ids for the BOS mask).

Interactions: runs after ``bigram_hash`` when both are in the stack (smear of embedding + bigram,
as the 03-20 code). v1 is applied before the input RMSNorm here (the 03-19 README's placement;
the 03-20 code applied it after). With document-masked attention it is the only other path
between documents, which the BOS mask closes. Lost its value at SP4096 (removed in 04-01) and came
back as v2 in 04-16. Parameters are control tensors (role ``scalar``: Adam at the scalar lr, fp32 in
the artifact).

Evidence (records, 8×H100): never isolated in the records. Measured with pgolf on CPU (the baseline
shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus, seeds 1337 / 1338;
``python bench/technique_effects.py --only smear_gate 'smear_gate (static)'``): Δval_bpb −0.0094
(−0.0085, −0.0102) (input gate), −0.0149 (−0.0137, −0.0161) (static blend).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Params, PgolfError, Role, Technique, hook, register, set_role
from pgolf.registry.run.data import BOS_ID


class SmearGateParams(Params):
    variant: Literal["input", "static"] = Field(
        "input", description="input: λ·σ(w·x_t[:W]) gate (v2); static: per-channel σ(g) blend (v1)"
    )
    width: int = Field(12, ge=1, le=4096, description="input variant: leading channels of x_t the gate reads")
    gate_init: float = Field(0.0, description="static variant: initial g (σ(0) = 0.5)")
    bos_fix: bool = Field(True, description="take nothing from the previous token at a BOS position")


def previous_tokens(x: Tensor) -> Tensor:
    """x_{t−1} for every t (B,T,D), zero at t = 0."""
    return torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)


def not_bos(idx: Tensor, dtype: torch.dtype) -> Tensor:
    """1[x_t ≠ BOS] as (B,T,1)."""
    return (idx != BOS_ID).to(dtype)[..., None]


def smear_input(x: Tensor, mask: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """v2: x_t + λ·σ(x_t[:W]·w)·mask_t·x_{t−1} for x (B,T,D), mask (B,T,1), w (W,), λ ()."""
    gate = torch.sigmoid(x[..., : w.numel()] @ w)[..., None]
    return x + lam * gate * mask * previous_tokens(x)


def smear_static(x: Tensor, mask: Tensor, g: Tensor) -> Tensor:
    """v1: (1 − σ(g))⊙x_t + σ(g)⊙mask_t⊙x_{t−1} for x (B,T,D), mask (B,T,1), g (D,)."""
    s = torch.sigmoid(g)
    return (1 - s) * x + s * mask * previous_tokens(x)


class SmearGateModule(nn.Module):
    def __init__(self, p: SmearGateParams, model_dim: int):
        super().__init__()
        self.variant, self.bos_fix = p.variant, p.bos_fix
        if p.variant == "input":
            self.w = set_role(nn.Parameter(torch.zeros(p.width)), Role.SCALAR)
            self.lam = set_role(nn.Parameter(torch.zeros(())), Role.SCALAR)
        else:
            self.g = set_role(nn.Parameter(torch.full((model_dim,), p.gate_init)), Role.SCALAR)

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        mask = not_bos(ctx.idx, x.dtype) if self.bos_fix else torch.ones_like(x[..., :1])
        if self.variant == "input":
            return smear_input(x, mask, self.w.to(x.dtype), self.lam.to(x.dtype))
        return smear_static(x, mask, self.g.to(x.dtype))

    def extra_repr(self) -> str:
        return f"variant={self.variant}, bos_fix={self.bos_fix}"


@register("smear_gate")
class SmearGate(Technique):
    """SmearGate: blend each token's embedding with the previous token's, never across a document
    boundary."""

    Params = SmearGateParams
    params: SmearGateParams
    after = ("bigram_hash",)

    @hook
    def embed(self) -> SmearGateModule:
        p = self.params
        if p.variant == "input" and p.width > self.spec.model_dim:
            raise PgolfError(
                f"techniques.smear_gate.width={p.width} is more than model.model_dim={self.spec.model_dim}"
            )
        return SmearGateModule(p, self.spec.model_dim)
