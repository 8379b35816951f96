"""Phased test-time training: per-document LoRA TTT, paused after a prefix of documents for a full-parameter SGD pass over every document already scored.

What: ``lora_ttt`` (its parameters, documents in stream order, ``docs_per_batch`` at a time), and
``phases`` pauses: pause k (k = 1 … K) comes after the batch that brings the documents scored
(over all processes) to ⌈k·P/K⌉, P = ``prefix_docs``. At a pause every process trains the base
weights — all of them, adapters switched off — with SGD (``lr``, ``momentum``, global clip
``grad_clip``) for ``epochs`` passes over **every document scored so far** (each process's first
documents, so the union is the same everywhere), cut into rows of ``eval.seq_len`` tokens,
``batch_rows`` rows per step split across processes, the learning rate cosine-decayed over
``chunk_tokens``-token chunks (η_c = η0·½(1 + cos(π·c/(n−1)))); gradients are summed across
processes. The adapters then start afresh (A drawn again, B = 0) and the documents that follow
are scored by the updated model. Nothing is trained on a token before it is scored.

Why: the document LoRA forgets everything between documents; a few global passes over what was
already read let the base model keep what the validation text has in common (topic, register).
Multi-phase (K = 3) trains on the growing prefix; more than ~6 phases overfit.

Source: PR #1610 / #1626 (single phase, P = 2000 documents, SGD lr 0.001, momentum 0.9, 1 epoch,
32 K-token chunks, cosine over chunks, clip 1.0; 04-13: lr 0.005, 3 epochs), PR #1626 follow-ups
(K = 3 cumulative phases at P/3, 2P/3, P: −0.0008 vs one phase), ``R/2026-04-27`` (P = 2500), PR #2135
(one phase). The records pause when the first P documents of a length-sorted queue are scored; here
the queue is the stream order (what stream-order scoring allows), and doc-masked (varlen) attention
in the global pass is not reproduced: rows may span a document boundary.

Interactions: fills the ``scorer`` slot (as ``lora_ttt``); the global pass trains every parameter
the model trains (those of ``asymmetric``-style head techniques included). Distributed: every
process joins every pause (collective gradient sums), also one that has run out of documents.

Evidence (records): single phase −0.00056 BPB (04-13), three phases −0.0008 vs one (04-14); total TTT
gain vs the quantized non-sliding evaluation ≈ −0.0124 … −0.0130 (CaseOps stacks); evaluation 390–525 s
on 8×H100. Measured with pgolf on the tiny CPU model in ``bench/legality_probes.json``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from pgolf.registry import hook, register
from pgolf.registry.run.runtime import Runtime
from pgolf.techniques.lora_ttt import LoRATTT, LoRATTTParams, document_spans
from pgolf.techniques.score_first_ttt import chunk_lr, make_optimizer, train_rows, training_rows


class PhasedTTTParams(LoRATTTParams):
    phases: int = Field(3, ge=1, le=64, description="K: global pauses at P/K, 2P/K, …, P documents")
    prefix_docs: int = Field(2000, ge=1, description="P: documents scored by the last pause")
    global_lr: float = Field(0.001, ge=0, description="η0 of the global SGD pass")
    global_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the global pass")
    global_epochs: int = Field(1, ge=0, le=100, description="passes over the scored documents per pause")
    global_chunk_tokens: int = Field(
        32_768, ge=1, description="tokens per cosine-LR chunk of the global pass"
    )
    global_batch_rows: int = Field(
        32, ge=1, description="rows of eval.seq_len tokens per SGD step (all processes)"
    )
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip of the global pass; 0 = none")


def pause_batches(prefix_docs: int, phases: int, world_size: int, docs_per_batch: int) -> list[int]:
    """Batch indices (0-based) after which the pauses happen: pause k once ⌈k·P/K⌉ documents are
    scored over all processes, each process having scored ``docs_per_batch`` per batch."""
    out = []
    for k in range(1, phases + 1):
        docs = math.ceil(k * prefix_docs / phases)
        out.append(max(0, math.ceil(docs / (world_size * docs_per_batch)) - 1))
    return sorted(set(out))


@register("phased_ttt")
class PhasedTTT(LoRATTT):
    """Phased test-time training: per-document LoRA TTT, paused after a prefix of documents for a full-parameter SGD pass over every document already scored."""

    Params = PhasedTTTParams
    params: PhasedTTTParams
    legality = ("score_first",)
    contract_params: ClassVar[dict[str, Any]] = {
        "rank": 4,
        "docs_per_batch": 2,
        "prefix_docs": 2,
        "phases": 1,
    }

    @hook
    def probe_points(self, stream: Tensor, seq_len: int) -> list[int]:
        """``lora_ttt``'s, and the first position scored after the first pause and one in the middle
        of that document (scored by the globally trained model)."""
        out = super().probe_points(stream, seq_len)
        docs = document_spans(stream, self.params.bos_id)
        first = pause_batches(self.params.prefix_docs, self.params.phases, 1, self.params.docs_per_batch)[0]
        after = (first + 1) * self.params.docs_per_batch
        if after < len(docs):
            a, b = docs[after]
            out += [a, (a + b) // 2]
        return out

    def after_batch(self, model: nn.Module, stream: Tensor, docs: list[tuple[int, int]], batch: int,
                    runtime: Runtime, seq_len: int, switches: tuple[str, ...]) -> None:  # fmt: skip
        p = self.params
        if batch not in pause_batches(p.prefix_docs, p.phases, runtime.world_size, p.docs_per_batch):
            return
        # every process's first (batch + 1)·D documents: the same union on every process
        x_parts, y_parts = [], []
        for r in range(runtime.world_size):
            lo, hi = len(docs) * r // runtime.world_size, len(docs) * (r + 1) // runtime.world_size
            last = min(hi, lo + (batch + 1) * p.docs_per_batch)
            if last > lo:
                x, y = training_rows(stream, docs[lo][0], docs[last - 1][1], seq_len)
                x_parts.append(x)
                y_parts.append(y)
        if not x_parts or p.global_epochs == 0:
            return
        x, y = torch.cat(x_parts), torch.cat(y_parts)
        self.global_pass(model, x, y, runtime, seq_len, switches)
        for a in self.adapters:
            a.reset(keep_a=False)
        self.log(f"pause after batch {batch}: global SGD on {x.numel():,} scored tokens")

    def global_pass(self, model: nn.Module, x: Tensor, y: Tensor, runtime: Runtime, seq_len: int,
                    switches: tuple[str, ...]) -> None:  # fmt: skip
        """SGD over rows (x, y) (cosine LR over chunks) on the parameters the model trains, with
        the adapters off; the scorer's state (frozen base, trainable adapters) is restored after."""
        p = self.params
        lora = [q for a in self.adapters for q in (a.A, a.B) if q is not None]
        slots = [a.slots for a in self.adapters]
        params = self.trainable_base
        try:
            for a in self.adapters:
                a.slots = None
            for q in lora:
                q.requires_grad_(False)
            for q in params:
                q.requires_grad_(True)
            opt = make_optimizer(params, "sgd", p.global_lr, p.global_momentum)
            rows = max(1, p.global_chunk_tokens // seq_len)
            n_chunks = math.ceil(x.size(0) / rows)
            for c in range(n_chunks):
                for g in opt.param_groups:
                    g["lr"] = chunk_lr(p.global_lr, c, n_chunks)
                train_rows(model, x[c * rows : (c + 1) * rows], y[c * rows : (c + 1) * rows], opt, params,
                           runtime, switches, epochs=p.global_epochs, batch_rows=p.global_batch_rows,
                           grad_clip=p.grad_clip)  # fmt: skip
        finally:
            for q in params:
                q.requires_grad_(False)
                q.grad = None
            for q in lora:
                q.requires_grad_(True)
            for a, s in zip(self.adapters, slots):
                a.slots = s
