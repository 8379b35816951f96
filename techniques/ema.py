"""EMA of weights: keep an fp32 exponential moving average of every parameter during training
and export the average instead of the last weights.

What: after every optimizer step θ̄ ← β·θ̄ + (1 − β)·θ (from the first step on); at the end of
training θ̄ replaces θ before export, so the artifact and every score use the averaged weights.
Why: averaging over the warmdown smooths the last updates' noise and lands in a flatter point,
which also quantizes better.
Source: parameter-golf ``R/2026-03-20_11L_XSA4_EMA_Int6_MLP3x_WD04`` (β = 0.997, replacing
SWA), β = 0.9965 from ``R/2026-04-09``.
Sites: the ``on_train_start``, ``on_step`` and ``finalize`` events.

Interactions: with ``swa`` in the same stack the exported weights are SWA's average of snapshots
of these EMA weights ("SWA over EMA"; the EMA itself when SWA took none): the EMA is handed to SWA
as ``state.shared["ema"]``. Without ``swa`` the EMA is exported. Its gain only shows at the end of
training (``gain_at_end``), so a search must not stop such trials early on intermediate scores.
Evidence (records, 8×H100): −0.0006 BPB (``R/2026-03-22``); with XSA-4 1.1318 → 1.1271. Measured
with pgolf on CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded
corpus, seeds 1337 / 1338; ``python bench/technique_effects.py --only 'ema + swa'``): with ``swa``
(K = 5, decay 0.95): Δval_bpb +0.0023 (+0.0032, +0.0014).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Params, Technique, TrainState, hook, register

SHARED_KEY = "ema"
"""``state.shared["ema"]``: the EMA weights (name -> fp32 tensor), for techniques that average them."""


class EMAParams(Params):
    decay: float = Field(0.997, ge=0.0, lt=1.0, description="β: weight of the running average per step")


def ema_update_(avg: list[Tensor], params: list[Tensor], decay: float) -> None:
    """avg ← decay·avg + (1 − decay)·params, in place (fp32 averages)."""
    if avg:
        torch._foreach_lerp_(avg, [p.detach().float() for p in params], 1.0 - decay)


@register("ema")
class EMA(Technique):
    """EMA of weights: keep an fp32 exponential moving average of every parameter during training
    and export the average instead of the last weights."""

    Params = EMAParams
    params: EMAParams
    gain_at_end = True

    def __init__(self, params: EMAParams, spec: Any):
        super().__init__(params, spec)
        self.shadow: dict[str, Tensor] = {}
        self.updates = 0

    @hook
    def on_train_start(self, model: nn.Module, state: TrainState) -> None:
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.updates = 0
        state.shared[SHARED_KEY] = self.shadow

    @hook
    def on_step(self, model: nn.Module, state: TrainState) -> None:
        named = dict(model.named_parameters())
        names = list(self.shadow)
        ema_update_([self.shadow[n] for n in names], [named[n] for n in names], self.params.decay)
        self.updates += 1
        state.shared[SHARED_KEY] = self.shadow  # updated in place: what SWA snapshots

    @hook
    def finalize(self, model: nn.Module) -> None:
        if not self.shadow:
            return
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.clone() for k, v in self.shadow.items()}, "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state.get("shadow", {}).items()}
        self.updates = int(state.get("updates", 0))
