"""MuonEq-R: divide each row of the Muon update by its L2 norm before orthogonalization.

What: for every matrix update U (rows = outputs, cols = inputs) after Nesterov momentum, each row
u_i becomes u_i / max(‖u_i‖₂, ε) with ε = 1e-7, then the orthogonalizer (Newton–Schulz or Polar
Express) runs on the row-equilibrated matrix. Updates arrive batched, shape (N, rows, cols); the
norm is taken over the last dim in fp32 and the result keeps U's dtype. Zero parameters, zero bytes.

Why: Newton–Schulz converges fastest when the singular values are alike; rows with very different
norms (a few output units receiving large gradients) spread them, so after five iterations those
rows dominate the orthogonalised update. Equilibrating the rows first gives every output unit an
update of comparable size (arXiv:2603.28254).

Source: arXiv:2603.28254; parameter-golf PR #1217 / #1260, ``MUON_ROW_NORMALIZE=1`` from
``R/2026-04-03_MuonEqR_DepthRecurrence_WD090_AllInt6`` on (every later record).

Sites: the ``muon_update`` chain (runs on the stacked Nesterov updates, before the
``orthogonalize`` slot).

Interactions: composes with any orthogonalizer (``polar_express`` in the 04-23+ records) and with
a matrix optimizer that honours the update chain (the default Muon does). A chain element placed
after it in the stack sees row-normalised updates. Row scaling is undone by neither the Frobenius
normalisation nor the orthogonalization, so it changes the update direction, not only its size.

Evidence (records, 8×H100): "zero-byte cost, ~0.001 BPB" (``R/2026-04-03``, bundled with depth
recurrence and WD 0.090). Not yet measured with pgolf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor

from pgolf.registry import Params, Technique, hook, register


class MuonEqRParams(Params):
    eps: float = Field(1e-7, gt=0, le=1e-2, description="ε: row norms are clamped to at least this")


def row_normalize(u: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row of every matrix in u (..., rows, cols) divided by max(its L2 norm, eps); same
    shape and dtype as u."""
    norms = torch.linalg.vector_norm(u.float(), dim=-1, keepdim=True).clamp_min(eps)
    return (u.float() / norms).to(u.dtype)


@register("muon_eq_r")
class MuonEqR(Technique):
    """MuonEq-R: divide each row of the Muon update by its L2 norm before orthogonalization."""

    Params = MuonEqRParams
    params: MuonEqRParams

    @hook
    def muon_update(self) -> Callable[[Tensor], Tensor]:
        eps = self.params.eps

        def fn(u: Tensor) -> Tensor:
            return row_normalize(u, eps)

        return fn
