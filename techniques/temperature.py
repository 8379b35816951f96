"""Temperature scaling at evaluation: p_T(y) ∝ p(y)^{1/T}, fixed or fitted on already-scored tokens.

What: every evaluated distribution becomes log_softmax(log p / T) over the whole vocabulary.
``mode: fixed`` uses ``temperature`` throughout. ``mode: fitted`` starts at ``temperature`` and,
once ``min_tokens`` positions have been scored, uses for each new batch the T of ``grid`` with
the lowest summed NLL over the positions scored **before** it (the runner calls ``observe`` only
after a position's NLL is recorded, so a token never influences its own temperature).

Why: a model trained with a softcap and quantized afterwards is slightly mis-calibrated; one
scalar recovers part of that for free.

Source: the ternary record (T grid {0.90 … 1.10} fitted on training tokens, T = 0.90); the
published T = 0.98; the post-TTT temperature fitted on re-scored validation tokens (PR #991) was
ruled illegal and removed (PR #1004) — the fitted mode here only ever looks at tokens already
scored, which the rules allow.

Interactions: a ``logprobs`` chain element: runs after the scorer (sliding window, TTT) and before
or after other transforms in stack order (n-gram mixing should usually see the calibrated
distribution, so list temperature first).

Evidence: the ternary record reports T = 0.90 chosen on its training tokens; not yet measured
with pgolf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from pgolf.registry import Params, Technique, hook, register


class TemperatureParams(Params):
    mode: Literal["fixed", "fitted"] = Field("fixed", description="fixed T, or fitted on scored tokens")
    temperature: float = Field(0.98, gt=0.05, le=20.0, description="T (fixed), or the starting T (fitted)")
    grid: tuple[float, ...] = Field(
        (0.85, 0.9, 0.925, 0.95, 0.975, 1.0, 1.025, 1.05, 1.1, 1.15),
        min_length=1,
        description="candidate temperatures (fitted mode)",
    )
    min_tokens: int = Field(2048, ge=1, description="scored positions before the fitted T is used")


def apply_temperature(logprobs: Tensor, temperature: float) -> Tensor:
    """log_softmax(logprobs / T) along the vocabulary (N,V) -> (N,V)."""
    return F.log_softmax(logprobs / temperature, dim=-1)


def nll_per_temperature(logprobs: Tensor, targets: Tensor, grid: tuple[float, ...]) -> Tensor:
    """Summed NLL (nats, float64) of ``targets`` under each temperature of ``grid`` -> (len(grid),)."""
    out = torch.empty(len(grid), dtype=torch.float64)
    for i, t in enumerate(grid):
        lp = apply_temperature(logprobs.float(), t)
        out[i] = -lp.gather(1, targets[:, None].long()).double().sum().cpu()
    return out


@register("temperature")
class Temperature(Technique):
    """Temperature scaling at evaluation: p_T(y) ∝ p(y)^{1/T}, fixed or fitted on already-scored tokens."""

    Params = TemperatureParams
    params: TemperatureParams
    legality = ("score_first",)

    def __init__(self, params: TemperatureParams, spec: Any):
        super().__init__(params, spec)
        self.current = params.temperature
        self.totals = torch.zeros(len(params.grid), dtype=torch.float64)
        self.seen = 0
        self._pending: Tensor | None = None  # base log-probs of the positions not yet observed

    @hook
    def transform_logprobs(self, logprobs: Tensor) -> Tensor:
        if self.params.mode == "fitted":
            self._pending = logprobs.detach()
        return apply_temperature(logprobs, self.current)

    @hook
    def observe(self, targets: Tensor) -> None:
        if self.params.mode != "fitted" or self._pending is None:
            return
        self.totals += nll_per_temperature(self._pending, targets, self.params.grid)
        self.seen += int(targets.numel())
        self._pending = None
        if self.seen >= self.params.min_tokens:
            self.current = float(self.params.grid[int(torch.argmin(self.totals))])

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "totals": self.totals.clone(), "seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current = float(state.get("current", self.params.temperature))
        self.totals = state.get("totals", torch.zeros(len(self.params.grid), dtype=torch.float64)).clone()
        self.seen = int(state.get("seen", 0))
