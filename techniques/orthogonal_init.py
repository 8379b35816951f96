"""Orthogonal init: every large, non-zero ``matrix`` weight starts as a (scaled) orthogonal
matrix; zero-initialised projections stay zero.

What: after the model is built (``init`` event), each parameter of role ``matrix`` whose last
two dims are both ≥ ``min_dim`` and that is not all zeros is replaced by
``torch.nn.init.orthogonal_(W, gain)`` (rows orthonormal for wide W, columns for tall W, times
gain; a stacked bank (N, r, c) gets one orthogonal matrix per slice). Zero-initialised
projections (attention output, MLP down, untied head, …) stay zero; embeddings, gates and
scalars are untouched. On the meta device (``pgolf check``'s dry build) nothing is computed.

Why: Muon's orthogonalised updates start from an orthogonal matrix, and every direction of the
input gets the same gain at init; faster early convergence.

Source: parameter-golf ``R/2026-03-19_smeargate_orthoinit_muonwd`` (OrthoInit, min dim 64,
gain 1) and every later record.

Sites: the ``init`` event.

Interactions: runs after the base init (tied embedding N(0, 0.005²) is not a matrix and is
kept); techniques that initialise their own matrices (BigramHash's projection) are
re-initialised only when those are role ``matrix``, at least ``min_dim`` in both dims and not
zero. Consumes the seeded RNG after the build, so runs stay deterministic.

Evidence (records, 8×H100): part of the 03-19 bundle (SmearGate + BigramHash + OrthoInit +
Muon WD, 1.1556 BPB); no isolated delta. Not yet measured with pgolf.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Params, Role, Technique, hook, register, role_of


class OrthogonalInitParams(Params):
    gain: float = Field(1.0, gt=0.0, description="scale of the orthogonal matrices")
    min_dim: int = Field(64, ge=1, description="both matrix dims must be at least this")


def orthogonal_init_(model: nn.Module, gain: float, min_dim: int) -> list[Tensor]:
    """Re-initialise in place every non-zero role-``matrix`` weight with both dims ≥ ``min_dim``;
    returns the tensors it changed (none on the meta device)."""
    changed = []
    with torch.no_grad():
        for p in model.parameters():
            if role_of(p) != Role.MATRIX or p.ndim < 2 or min(p.shape[-2:]) < min_dim or p.is_meta:
                continue
            for w in p.view(-1, *p.shape[-2:]):
                if bool(w.any()):
                    nn.init.orthogonal_(w, gain=gain)
                    changed.append(w)
    return changed


@register("orthogonal_init")
class OrthogonalInit(Technique):
    """Orthogonal init: every large, non-zero ``matrix`` weight starts as a (scaled) orthogonal
    matrix; zero-initialised projections stay zero."""

    Params = OrthogonalInitParams
    params: OrthogonalInitParams
    contract_params: ClassVar[dict[str, Any]] = {"min_dim": 16}  # the contract models are 32 and 48 wide

    @hook
    def init(self, model: nn.Module) -> None:
        orthogonal_init_(model, self.params.gain, self.params.min_dim)
