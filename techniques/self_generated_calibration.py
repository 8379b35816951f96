"""Self-generated calibration: the batches the ``calibrate`` event sees (GPTQ's Hessians) are
sampled from the trained model itself instead of read from the training stream.

What: each batch is ``batch_size`` sequences of ``seq_len`` tokens (null: the training sequence
length). A sequence starts from a token drawn uniformly from the vocabulary with a generator
seeded by ``seed`` and the batch index; every next token is sampled from softmax(logits / T),
T = ``temperature``, given the whole prefix (or its last ``window`` tokens), with the model in
evaluation mode and no gradients. Batches are generated one at a time, as the calibrating
technique asks for them (``calibration_batches`` of ``gptq``). Neither training nor validation
data is read.

Why: the records' first full-GPTQ stack calibrated on 64 × 2048 self-generated tokens at T = 0.8,
legal after the 600 s because it reads no data (PR #1234 cites the organizers on PR #1019); data
from the model's own distribution is what its layers see at evaluation.

Source: parameter-golf ``R/2026-03-25_ValCalib_GPTQ…`` and ``R/2026-03-31`` (64 sequences × 2048
tokens, T = 0.8, batches of 8, seeded random first token).

Sites: the ``calibration_batches`` slot.

Interactions: pgolf counts calibration against the training side's wall clock (the
``calibration`` phase): generation is autoregressive and recomputes the prefix at every token (no
KV cache), so a 2048-token batch costs 2047 forward passes — the record's 64 × 2048 took 198 s on
8×H100 after training; PR #1234 found reserving that time inside the budget net negative. Use
``window`` and a shorter ``seq_len`` to make it affordable, and raise ``gptq.reserve_seconds``.

Evidence (records, 8×H100): part of ``R/2026-03-25`` (−0.0046 BPB together with full GPTQ, XSA-all,
a bigger bigram table and lzma). Not yet measured with pgolf.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import Params, Technique, hook, register


class SelfGeneratedCalibrationParams(Params):
    batch_size: int = Field(8, ge=1, le=4096, description="sequences per calibration batch")
    seq_len: int | None = Field(
        2048, ge=2, description="tokens per sequence; null = the training sequence length"
    )
    temperature: float = Field(0.8, gt=0, le=10, description="sampling temperature T")
    window: int | None = Field(None, ge=1, description="context tokens per step; null = the whole prefix")
    seed: int = Field(0, ge=0, description="seed of the first tokens and the sampling")


@torch.no_grad()
def generate(
    model: nn.Module, batch_size: int, seq_len: int, vocab_size: int, temperature: float,
    window: int | None, generator: torch.Generator, device: torch.device,
) -> Tensor:  # fmt: skip
    """(batch_size, seq_len) int64 tokens: a uniform first token, then samples from the model."""
    x = torch.randint(0, vocab_size, (batch_size, 1), generator=generator).to(device)
    for _ in range(seq_len - 1):
        ctx = x if window is None else x[:, -window:]
        logits = model.logits(ctx)[:, -1].float()  # type: ignore[operator]
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=generator).to(device)
        x = torch.cat([x, nxt], dim=1)
    return x


@register("self_generated_calibration")
class SelfGeneratedCalibration(Technique):
    """Self-generated calibration: the batches the ``calibrate`` event sees (GPTQ's Hessians) are
    sampled from the trained model itself instead of read from the training stream."""

    Params = SelfGeneratedCalibrationParams
    params: SelfGeneratedCalibrationParams
    requires = ("gptq",)
    contract_params: ClassVar[dict[str, Any]] = {"batch_size": 2, "seq_len": 8}

    @hook
    def calibration_batches(self, model: nn.Module, seq_len: int) -> Iterator[Tensor]:
        p = self.params
        length = p.seq_len or seq_len
        device = next(model.parameters()).device

        def batches() -> Iterator[Tensor]:
            i = 0
            while True:
                g = torch.Generator().manual_seed(p.seed * 1_000_003 + i)
                was = model.training
                model.eval()
                try:
                    x = generate(
                        model, p.batch_size, length, self.spec.vocab_size, p.temperature, p.window, g, device
                    )
                finally:
                    model.train(was)
                yield x
                i += 1

        return batches()
