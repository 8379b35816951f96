"""SWA, stochastic weight averaging: export the uniform average of weight snapshots taken during
the warmdown.

What: after every optimizer step whose LR multiplier was below ``start_lr_scale`` (τ) and whose
step number is a multiple of ``interval`` (K), a snapshot of every parameter is added to an fp32
running sum; at the end of training the weights become sum / n (n snapshots), before
calibration, export and every score. With no snapshot taken (τ never reached) the trained weights
are kept as they are. The compile warm-up's steps are undone and never snapshotted. "Tight SWA"
is K = 50, τ = 0.2.

With ``ema`` in the stack (the declared rule for the pair): each snapshot is of the EMA weights at
that step (``state.shared["ema"]``) instead of the live weights, and the exported weights are the
average of those snapshots ("SWA over EMA"); with no snapshot taken the EMA weights are exported
(``ema`` loads them first; SWA runs after it).

Why: late in the warmdown the iterates wander around a basin; their average sits nearer its
centre, which is flatter and loses less to quantization.

Source: Izmailov et al. 2018 (arXiv:1803.05407); parameter-golf
``R/2026-03-20_Int6_MLP3x_SmearGate_BigramHash_MuonWD_SWA`` (K = 50, τ = 0.5, ≈30 snapshots),
``R/2026-03-20_10L_Int5MLP_MuonWD04_SWA50`` (K = 50, τ = 0.4, 24 snapshots; the defaults),
``R/2026-03-20_11L_EfficientPartialXSA_FA3_SWA120`` (K = 120, τ = 0.5).

Sites: the ``on_train_start`` (reset), ``on_step`` (snapshot) and ``finalize`` (load the
average) events.

Interactions: with ``ema``, SWA averages EMA snapshots as above (the 03-22…03-25 "tight SWA" code
accumulated snapshots of the live weights but exported the EMA, so SWA had no effect there; for
that behaviour use ``ema`` alone). τ is compared with
the LR multiplier of the ``lr_schedule`` slot (linear warmdown by default, ``warmdown_fraction``,
``cosine_lr``): a schedule that never goes below τ takes no snapshot. SWA on a depth-recurrent
model inverted the quantization gap in ``N/2026-03-21``. Its gain only shows at the end of
training (``gain_at_end``).

Evidence (records, 8×H100): τ 0.4 vs 0.5: −0.0006 BPB (``R/2026-03-20_10L…``); replaced by EMA from
``R/2026-03-20_11L_XSA4_EMA…`` on. Measured with pgolf on CPU (the baseline shrunk to 4 layers × 64,
120 steps of 2,048 tokens on the embedded corpus, seeds 1337 / 1338; ``python
bench/technique_effects.py --only swa 'ema + swa'``): K = 5: Δval_bpb +0.0106 (+0.0100, +0.0112)
(about 3 snapshots in the last 16 steps, which the tiny model still descends through: their average
lags behind); with ``ema`` (decay 0.95) +0.0023 (+0.0032, +0.0014).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Params, Technique, TrainState, hook, register

EMA_KEY = "ema"  # ema.SHARED_KEY (not imported: a stack with swa alone does not count ema's code)


class SWAParams(Params):
    interval: int = Field(50, ge=1, description="K: snapshot every K optimizer steps")
    start_lr_scale: float = Field(
        0.4, gt=0.0, le=1.0, description="τ: snapshot only while the LR multiplier is below this"
    )


def should_snapshot(state: TrainState, interval: int, start_lr_scale: float) -> bool:
    """Whether the step just taken is snapshotted: lr_mult < τ and step ≡ 0 (mod K)."""
    return state.lr_mult < start_lr_scale and state.step % interval == 0


def accumulate_(total: dict[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """total[n] += params[n] in fp32, in place (missing entries start at zero)."""
    with torch.no_grad():
        for n, p in params.items():
            if n in total:
                total[n].add_(p.detach().float())
            else:
                total[n] = p.detach().float().clone()


@register("swa")
class SWA(Technique):
    """SWA, stochastic weight averaging: export the uniform average of weight snapshots taken during
    the warmdown."""

    Params = SWAParams
    params: SWAParams
    after = ("ema",)
    gain_at_end = True

    def __init__(self, params: SWAParams, spec: Any):
        super().__init__(params, spec)
        self.total: dict[str, Tensor] = {}
        self.snapshots = 0
        self.steps: list[int] = []  # the steps snapshotted (for the run log and tests)
        self.source = "weights"  # or "ema": what the snapshots were taken of

    @hook
    def on_train_start(self) -> None:
        self.total, self.snapshots, self.steps = {}, 0, []

    @hook
    def on_step(self, model: nn.Module, state: TrainState) -> None:
        if should_snapshot(state, self.params.interval, self.params.start_lr_scale):
            ema = state.shared.get(EMA_KEY)
            self.source = "ema" if ema is not None else "weights"
            accumulate_(self.total, ema if ema is not None else dict(model.named_parameters()))
            self.snapshots += 1
            self.steps.append(state.step)

    @hook
    def finalize(self, model: nn.Module) -> None:
        if self.snapshots == 0:
            self.log("no snapshot was taken (the LR multiplier never fell below start_lr_scale): "
                     "the weights as they are (the EMA's, with ema) are exported")  # fmt: skip
            return
        of = "the EMA weights" if self.source == "ema" else "the weights"
        self.log(
            f"exporting the average of {self.snapshots} snapshot(s) of {of}, steps {self.steps[0]}–{self.steps[-1]}"
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_((self.total[n] / self.snapshots).to(p.dtype))

    def average(self) -> dict[str, Tensor]:
        """The current average (fp32), or {} before the first snapshot."""
        return {n: t / self.snapshots for n, t in self.total.items()} if self.snapshots else {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "total": {k: v.clone() for k, v in self.total.items()},
            "snapshots": self.snapshots,
            "steps": list(self.steps),
            "source": self.source,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = {k: v.clone() for k, v in state.get("total", {}).items()}
        self.snapshots = int(state.get("snapshots", 0))
        self.steps = [int(s) for s in state.get("steps", [])]
        self.source = str(state.get("source", "weights"))
        if self.snapshots and not self.total:
            raise ValueError("swa state has snapshots but no sums")
