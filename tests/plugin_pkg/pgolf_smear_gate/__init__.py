"""SmearGate (v2, input-dependent, with the BOS fix): blend each token's embedding with the
previous token's.

What: for t ≥ 1, x̃_t = x_t + λ·σ(w·x_t[:W])·x_{t−1}·1[x_t ≠ BOS]; x̃_0 = x_0. w ∈ R^W and the
scalar λ start at zero, so the technique is the identity at initialisation.
Why: a cheap path for the previous token's identity, complementary to BigramHash.
Source: modded-nanogpt; parameter-golf PR #1667, BOS fix from ``R/2026-04-27_*``.
Interactions: without the BOS mask the last token of one document leaks into the next
document's BOS position in packed streams (PR #1797 was held back for it).

This package lives outside pgolf and registers through the ``pgolf.techniques`` entry point
(see its pyproject.toml); pgolf's tests install it to prove that path.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Params, PgolfError, Role, Technique, hook, set_role

BOS_ID = 1


class SmearGateParams(Params):
    window: int = Field(12, ge=1, le=4096, description="leading channels of x_t that drive the gate")


def smear(x: Tensor, idx: Tensor, w: Tensor, lam: Tensor, window: int) -> Tensor:
    """x (B,T,D), idx (B,T): x_t + λ·σ(w·x_t[:W])·x_{t-1}·[idx_t != BOS] for t >= 1."""
    gate = torch.sigmoid(x[..., :window] @ w)[..., None]  # (B,T,1)
    prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
    keep = (idx != BOS_ID).to(x.dtype)[..., None]
    return x + lam * gate * prev * keep


class SmearGateModule(nn.Module):
    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.w = set_role(nn.Parameter(torch.zeros(window)), Role.SCALAR)
        self.lam = set_role(nn.Parameter(torch.zeros(())), Role.SCALAR)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        return smear(x, idx, self.w.to(x.dtype), self.lam.to(x.dtype), self.window)


class SmearGate(Technique):
    """SmearGate (v2, input-dependent, with the BOS fix): blend each token's embedding with the
    previous token's."""

    Params = SmearGateParams
    params: SmearGateParams

    @hook
    def embed(self) -> nn.Module:
        if self.params.window > self.spec.model_dim:
            raise PgolfError(
                f"smear_gate.window={self.params.window} exceeds model_dim={self.spec.model_dim}"
            )
        return SmearGateModule(self.params.window)
