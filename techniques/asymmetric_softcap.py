"""Asymmetric logit softcap: positive and negative logits are soft-capped with separate caps,
c₊·tanh(z/c₊) for z > 0 and c₋·tanh(z/c₋) for z ≤ 0.

What: the head's raw logits z = h·Wᵀ (fp32) become s(z) = c₊·tanh(z/c₊) where z > 0 and
c₋·tanh(z/c₋) where z ≤ 0; s is continuous and has slope 1 at 0 on both sides. With
``trainable`` the caps are learned scalars (role ``scalar``: Adam at the scalar lr, fp32 in the
artifact, 8 bytes) starting at ``positive`` and ``negative``; otherwise they are fixed. It
replaces the baseline's symmetric c·tanh(z/c) (``model.logit_softcap`` is then unused); the
training loss is cross-entropy on s(z).

Why: the symmetric cap bounds how confident a prediction can be and how strongly a token can be
ruled out by the same number; the model's useful range differs on the two sides (a few large
positive logits, many moderately negative ones), so two caps fit the calibration better.

Source: PR #1945 (AWQ-lite GPTQ + asymmetric logit rescale, −0.0014 BPB together) and the current
record PR #2135 (c₊, c₋ start at 30, trained only in the TTT global step there).

Sites: the ``head`` slot (the output projection's ``linear_weight`` and ``linear_adapter``
transforms still apply, tied or untied).

Interactions: another ``head`` filler is a conflict. Evaluation-time logit transforms
(temperature) act on its output. The records trained the caps only during test-time training;
here they train with the model unless ``trainable: false`` (then only a TTT technique that adapts
scalars would move them).

Evidence (records, 8×H100): −0.0014 BPB together with AWQ-lite GPTQ (PR #1945). Measured with pgolf
on CPU (the baseline shrunk to 4 layers × 64, 120 steps of 2,048 tokens on the embedded corpus,
seeds 1337 / 1338; ``python bench/technique_effects.py --only asymmetric_softcap``): Δval_bpb
−0.0006 (−0.0007, −0.0006).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Ctx, Params, Role, Technique, hook, register, set_role
from pgolf.registry.run.model import Head


class AsymmetricSoftcapParams(Params):
    positive: float = Field(30.0, gt=0.0, le=1000.0, description="c₊: cap of positive logits")
    negative: float = Field(30.0, gt=0.0, le=1000.0, description="c₋: cap of negative logits")
    trainable: bool = Field(True, description="learn c₊ and c₋ with the model (else fixed)")


def asymmetric_softcap(z: Tensor, positive: Tensor | float, negative: Tensor | float) -> Tensor:
    """c₊·tanh(z/c₊) where z > 0, c₋·tanh(z/c₋) where z ≤ 0 (elementwise, any shape)."""
    return torch.where(z > 0, positive * torch.tanh(z / positive), negative * torch.tanh(z / negative))


class AsymmetricSoftcapHead(Head):
    def __init__(self, p: AsymmetricSoftcapParams):
        super().__init__()
        self.trainable = p.trainable
        caps = torch.tensor([p.positive, p.negative])
        if p.trainable:
            self.caps = set_role(nn.Parameter(caps), Role.SCALAR)
        else:
            self.register_buffer("caps", caps, persistent=False)

    def forward(self, h: Tensor, out: nn.Module, ctx: Ctx) -> Tensor:
        caps = self.caps.float()
        return asymmetric_softcap(out(h, ctx).float(), caps[0], caps[1])

    def extra_repr(self) -> str:
        return f"trainable={self.trainable}"


@register("asymmetric_softcap")
class AsymmetricSoftcap(Technique):
    """Asymmetric logit softcap: positive and negative logits are soft-capped with separate caps,
    c₊·tanh(z/c₊) for z > 0 and c₋·tanh(z/c₋) for z ≤ 0."""

    Params = AsymmetricSoftcapParams
    params: AsymmetricSoftcapParams

    @hook
    def head(self) -> AsymmetricSoftcapHead:
        return AsymmetricSoftcapHead(self.params)
