"""Value residual (ResFormer): later layers mix the first layer's raw values into their own,
v ← λ0·v_first + λ1·v, with (λ0, λ1) learned per layer.

What: the block run first (virtual layer 0) stores its raw values v_first (B,T,KV,Dh), right
after the V projection, in the forward's cross-layer state; every selected layer that runs later
replaces its values by λ0·v_first + λ1·v before QK-norm, RoPE and attention, so XSA and output
gates see the mixed values too. (λ0, λ1) is one learned pair per physical layer, init
(0.5, 0.5). A layer gets λ only if it runs after the first block in every block order the
schedule can produce (so each λ gets a gradient in every training step, which DDP needs); the
block that provides v_first never mixes.

Why: a direct path from the first layer's values to every later layer keeps token identity
available deep in the stack and eases optimisation of small, deep models.

Source: ResFormer (Zhou et al., "Value Residual Learning", arXiv:2410.17897); parameter-golf
PRs #486/#490; code in ``R/2026-03-23`` and ``R/2026-03-25`` with ``VALUE_RESIDUAL=0`` (off in
every merged record; 04-01 lists "removed value residuals").

Sites: the ``qkv`` chain of every layer (a parameter-free store on the layer that runs first)
and the ``init`` event (places λ once the block schedule is known).

Interactions: harmful on looped stacks (depth recurrence: +0.14 BPB in ``N/2026-03-21``); the
stored values are those that reach this technique in the ``qkv`` chain, so put value-changing
techniques (value embeddings) after it in the stack to mix raw projections; λ are ``scalar``
(fp32 in the artifact).

Evidence: −0.015 BPB quoted on flat models (PRs #486/#490, per ``N/2026-03-21…/README.md``);
unvalidated in the record lineage. Not yet measured with pgolf.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import (
    Ctx,
    Layers,
    LayerSelector,
    Params,
    PgolfError,
    Role,
    Technique,
    hook,
    register,
    set_layer,
    set_role,
)

STATE_KEY = "value_residual.v_first"


class ValueResidualParams(Params):
    layers: Layers = Field(
        LayerSelector.parse("all"), description="layers that mix v_first into their values"
    )
    lambda_first_init: float = Field(0.5, description="initial λ0, the weight of v_first")
    lambda_own_init: float = Field(0.5, description="initial λ1, the weight of the layer's own v")


def value_residual(v: Tensor, v_first: Tensor, lambdas: Tensor) -> Tensor:
    """λ0·v_first + λ1·v for v, v_first (B,T,KV,Dh) and lambdas (2,)."""
    lam = lambdas.to(v.dtype)
    return lam[0] * v_first + lam[1] * v


class ValueResidual(nn.Module):
    """Stores v at virtual layer 0; elsewhere mixes it in when this layer has λ."""

    lambdas: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("lambdas", None)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx) -> tuple[Tensor, Tensor, Tensor]:
        if ctx.virtual == 0:
            ctx.state[STATE_KEY] = v
        elif self.lambdas is not None:
            v = value_residual(v, ctx.state[STATE_KEY], self.lambdas)
        return q, k, v


@register("value_residual")
class ValueResidualTechnique(Technique):
    """Value residual (ResFormer): later layers mix the first layer's raw values into their own,
    v ← λ0·v_first + λ1·v, with (λ0, λ1) learned per layer."""

    Params = ValueResidualParams
    params: ValueResidualParams

    def __init__(self, params: ValueResidualParams, spec: Any):
        super().__init__(params, spec)
        self.placed: dict[int, ValueResidual] = {}

    @hook
    def qkv(self, layer: int) -> ValueResidual:
        self.placed[layer] = ValueResidual()  # every layer: any of them may run first
        return self.placed[layer]

    @hook
    def init(self, model: nn.Module) -> None:
        orders = model.schedule.orders()  # type: ignore[operator]
        later = set.intersection(*({*(enc + dec)[1:]} for enc, dec in orders))
        selected = set(self.params.layers.resolve(self.spec.num_layers))
        if not selected & later:
            raise PgolfError(
                f"techniques.value_residual.layers={self.params.layers} selects no layer that runs after the "
                f"first block (which provides v_first); layers that can mix: {sorted(later)}"
            )
        p = self.params
        for layer in sorted(selected & later):
            mod = self.placed[layer]
            mod.lambdas = set_role(
                nn.Parameter(torch.tensor([p.lambda_first_init, p.lambda_own_init])), Role.SCALAR
            )
            set_layer(mod, layer)
