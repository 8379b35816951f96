"""Polar Express: orthogonalize Muon updates with per-iteration minimax coefficients instead of
Newton–Schulz's one fixed quintic.

What: for every update G (batched (N, rows, cols)): X = bf16(G) / ((1 + safety)·‖G‖_F + 1e-7),
transposed when rows > cols; then iteration i = 1 … steps computes A = XXᵀ and
X ← a_i·X + (b_i·A + c_i·A²)·X with its own (a_i, b_i, c_i):

    (8.156554524902461, −22.48329292557795, 15.878769915207462)
    (4.042929935166739, −2.808917465908714, 0.5000178451051316)
    (3.8916678022926607, −2.772484153217685, 0.5060648178503393)
    (3.285753657755655, −2.3681294933425376, 0.46449024233003106)
    (2.3465413258596377, −1.7097828382687081, 0.42323551169305323)

Each quintic p_i(σ) = a_i·σ + b_i·σ³ + c_i·σ⁵ acts on every singular value; the sequence is the
minimax-optimal composition that maps [ℓ, 1] closest to 1 in five steps. With ``steps`` < 5 the
first ``steps`` polynomials run; with more, the last polynomial repeats (the Polar Express
reference's rule for extra iterations). ``safety`` = 0 is the parameter-golf form; modded-nanogpt
divides by 1.02·‖G‖_F.

Why: the baseline's fixed coefficients (3.4445, −4.7750, 2.0315) leave the singular values
anywhere in roughly [0.7, 1.2] after five steps; per-step coefficients push small singular values
up much faster early and land all of them closer to 1 at the same cost (five batched matmul pairs).

Source: Amsel, Persson, Musco, Gower, "The Polar Express" (arXiv:2505.16932) via modded-nanogpt;
parameter-golf PR #1344 → PR #1787, ``R/2026-04-23_…_PolarNS_MinLR_FusedCE`` and every later record.

Sites: the ``orthogonalize`` slot (used by the default Muon and by any matrix optimizer that takes
the slot's function). Under ``torch.compile`` on CUDA it is compiled like the default.

Interactions: composes with ``muon_eq_r`` (row normalisation before it, as in the 04-23+ records);
``optim.muon_backend_steps`` is the number of iterations (5 in every record).

Evidence (records, 8×H100): part of the 04-23 bundle (with MIN_LR 0.1, sparse gate, fused CE, TTT
tweaks): −0.00214 BPB vs PR #1736. Not yet measured with pgolf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import Params, Technique, hook, register

COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
"""(a_i, b_i, c_i) of iterations 1–5 (PR #1344 / #1787)."""


class PolarExpressParams(Params):
    safety: float = Field(
        0.0, ge=0.0, le=0.1, description="normalise by (1 + safety)·‖G‖_F (modded-nanogpt: 0.02)"
    )


def coefficients(steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of ``steps`` iterations: the first ``steps`` of the table, the last
    one repeated beyond five."""
    if steps < 1:
        raise ValueError(f"polar_express needs at least one iteration, got steps={steps}")
    return [COEFFICIENTS[min(i, len(COEFFICIENTS) - 1)] for i in range(steps)]


def polar_express(
    g: Tensor, steps: int = 5, safety: float = 0.0, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Orthogonalize every matrix of g (N, rows, cols) -> (N, rows, cols) in ``dtype``."""
    x = g.to(dtype)
    x = x / (x.flatten(1).norm(dim=1)[:, None, None] * (1.0 + safety) + eps)
    tall = g.size(1) > g.size(2)
    if tall:
        x = x.transpose(1, 2)
    for a, b, c in coefficients(steps):
        gram = x @ x.transpose(1, 2)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.transpose(1, 2) if tall else x


@register("polar_express")
class PolarExpress(Technique):
    """Polar Express: orthogonalize Muon updates with per-iteration minimax coefficients instead of
    Newton–Schulz's one fixed quintic."""

    Params = PolarExpressParams
    params: PolarExpressParams

    @hook
    def orthogonalize(self) -> Callable[[Tensor, int], Tensor]:
        return orthogonalizer(self.params.safety)


@functools.cache
def orthogonalizer(safety: float) -> Callable[[Tensor, int], Tensor]:
    """The slot's function fn(G (N,rows,cols), steps); one object per ``safety`` so the trainer's
    compiled copy (CUDA) is reused across builds."""

    def fn(g: Tensor, steps: int) -> Tensor:
        return polar_express(g, steps, safety)

    return fn
