"""Scoring covers every validation target, the last partial window included."""

from __future__ import annotations

import math

import pytest
import sentencepiece as spm
import torch
from conftest import SP1024, small_spec

from pgolf.registry.run.bpb import build_byte_lut, target_bytes
from pgolf.registry.run.evaluate import evaluate, windows
from pgolf.registry.run.model import GPT
from pgolf.registry.run.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")


@pytest.mark.parametrize("n_tokens", [49, 50, 51, 17])  # 48 = 3 windows of 16 (+1); partial tails
def test_every_target_is_scored_once_in_order(n_tokens: int) -> None:
    torch.manual_seed(0)
    model = GPT(small_spec(vocab_size=1024))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    lut = build_byte_lut(spm.SentencePieceProcessor(model_file=str(SP1024)))
    tokens = torch.randint(4, 1024, (n_tokens,), dtype=torch.int32)
    tokens[0] = 1
    res = evaluate(model, tokens, lut, seq_len=16, batch_tokens=32, runtime=CPU, want_nll=True)
    # reference: each window scored on its own, without padding
    nll, nbytes = [], 0
    for s in range(0, n_tokens - 1, 16):
        x = tokens[s : min(s + 16, n_tokens - 1)].long()[None]
        y = tokens[s + 1 : s + 1 + x.size(1)].long()[None]
        with torch.no_grad():
            nll.append(model(x, y, reduction="none")[0])
        nbytes += int(target_bytes(x, y, lut).sum())
    ref = torch.cat(nll)
    assert res.tokens == n_tokens - 1 == ref.numel() and windows(n_tokens, 16) == math.ceil(
        (n_tokens - 1) / 16
    )
    assert res.nll is not None and torch.allclose(torch.from_numpy(res.nll), ref, atol=1e-5)
    assert res.loss_sum == pytest.approx(float(ref.double().sum()), rel=1e-6)
    assert res.bytes == nbytes
    assert res.val_bpb == pytest.approx(res.val_loss / math.log(2) * res.tokens / res.bytes)
