"""SmearGate (v2, input-dependent, with the BOS fix): blend each token's embedding with the
previous token's.

What: for t ≥ 1, x̃_t = x_t + λ·σ(w·x_t[:W])·x_{t−1}·1[x_t ≠ BOS]; x̃_0 = x_0. w ∈ R^W and the
scalar λ start at zero, so the technique is the identity at initialisation.
Why: a cheap path for the previous token's identity, complementary to BigramHash.
Source: modded-nanogpt; parameter-golf PR #1667, BOS fix from ``R/2026-04-27_*``.
Interactions: without the BOS mask the last token of one document leaks into the next
document's BOS position in packed streams (PR #1797 was held back for it).

This package lives outside pgolf and registers two techniques through the ``pgolf.techniques``
entry point (see its pyproject.toml): ``ext_smear_gate`` on the model's ``embed`` chain and
``uniform_mix`` on the evaluation ``logprobs`` chain. pgolf's tests install it to prove that path.
(pgolf has SmearGate built in as ``smear_gate``; this copy stays as the third-party example, under
its own name.)
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Params, PgolfError, Role, Technique, hook, set_role

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

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        return smear(x, ctx.idx, self.w.to(x.dtype), self.lam.to(x.dtype), self.window)


class SmearGate(Technique):
    """SmearGate (v2, input-dependent, with the BOS fix): blend each token's embedding with the
    previous token's."""

    Params = SmearGateParams
    params: SmearGateParams

    @hook
    def embed(self) -> nn.Module:
        if self.params.window > self.spec.model_dim:
            raise PgolfError(
                f"ext_smear_gate.window={self.params.window} exceeds model_dim={self.spec.model_dim}"
            )
        return SmearGateModule(self.params.window)


class UniformMixParams(Params):
    epsilon: float = Field(0.01, ge=0.0, lt=1.0, description="weight of the uniform distribution")


def uniform_mix(logprobs: Tensor, epsilon: float) -> Tensor:
    """log((1 − ε)·p + ε/V) of log-probabilities (N,V): still a distribution over the vocabulary."""
    v = logprobs.size(-1)
    return torch.logaddexp(logprobs + torch.log1p(torch.tensor(-epsilon)), torch.tensor(epsilon / v).log())


class UniformMix(Technique):
    """Uniform mixing of the evaluated distribution: p' = (1 − ε)·p + ε/V at every position.

    What: an evaluation-time transform on the ``logprobs`` chain; it reads nothing but the model's
    own distribution, so it is causal and normalised by construction.
    Why: bounds the loss of a confidently wrong prediction (−log(ε/V) at worst).
    Source: a classic calibration baseline (additive smoothing of a predictive distribution).
    Interactions: runs after any other logprobs transform listed before it in the stack.
    Evidence: none measured; it exists to prove a third-party package can fill an evaluation chain.
    """

    Params = UniformMixParams
    params: UniformMixParams
    legality = ("score_first",)

    @hook
    def transform_logprobs(self, logprobs: Tensor) -> Tensor:
        return uniform_mix(logprobs, self.params.epsilon)
