"""LoRA test-time training per document: score each chunk of a document, then take one step on low-rank adapters that start afresh for every document.

What: the stream is cut into documents at BOS (``bos_id``; a document's target positions run from
its BOS to the position before the next BOS). Each document [a, b) is scored in chunks: chunk
[s, e) of size n (``chunk_tokens`` / ``short_chunks``; the last one cut short at b) is predicted
by one forward over the document's tokens from max(a, s + n − L) to e, L = ``eval.seq_len`` (no
context from earlier documents): the context a full chunk gets, the last chunk's included — a
window of the L tokens before b would start where the next BOS, a future token, says (the future
probe caught that: 1.0e-4 nats in pr2135 scaled down). Its logits are emitted — the runner
records their NLL — and, unless it is the document's last chunk, one AdamW step is taken on the
chunk's mean loss. Only the adapters learn: y ← y + (α/r)·(x·Aᵀ)·Bᵀ on the Linears of the
``targets`` (q, k, v, o: attention projections; mlp: its up and down projections; head: the
output projection), A (r × in) ~ U(±1/√in), B (out × r) = 0, one set per **virtual** layer (a
block run twice by depth recurrence has two). The adapters sit on the model's ``linear_adapter``
chain, so the forward is the model's own, with every technique of the stack in it.

``docs_per_batch`` consecutive documents are processed together, in lockstep by chunk index,
each with its own adapters and optimizer moments (nothing couples two documents: no shared
normalisation, no global clipping), and their positions are emitted in stream order as soon as
every earlier position is. Between batches B ← 0, A is kept (``warm_start_a``) or drawn again,
and the optimizer starts afresh (``reset: document``); ``reset: never`` carries adapters and
moments from one document to the next (one document at a time).

Chunk sizes (short-document chunks): the first positions of a document are scored in smaller
chunks — ``short_chunks`` ((256, 8), (2000, 24)): chunks starting before document position 256
hold 8 tokens, before 2000 hold 24, later ones ``chunk_tokens`` (48). The records pick the size from
the document's *total* length, which depends on where the next BOS is — a future token; choosing
it from the position inside the document gives short documents the same small chunks and keeps
every score causal (the future probe catches the records' rule: a changed future moves the BOS).

Why: per-document adaptation captures a document's names and style within a few chunks; low-rank
adapters are cheap to train and to reset, and leave the quantized weights untouched (AdamW on the
full weights destroys GPTQ's minima).

Source: ``R/2026-03-17_LoRA_TTT`` (rank 8 on Q, V and the head; Adam lr 0.01, β (0.9, 0.95); 256-token
chunks in 1024-token windows; docs sorted by length, batches of 64); PR #1530 / ``R/2026-04-10``
(rank 96 on Q, K, V, O, MLP and head, one set per virtual layer, chunk 32 → 48, windows of 2048,
AdamW lr 1e-4, β1 0, β2 0.999), PR #1767 (α = 144, warm-start A, WD 0.5 → 1.0), PR #1953 (no Q/V
adapters), PR #2014 (short-document chunks). Documents are taken in stream order here (the
records sort them by length), which the runner's stream-order scoring requires.

Interactions: fills the ``scorer`` slot (conflicts with ``sliding_window`` and
``score_first_ttt``); ``phased_ttt`` extends it. logprobs transforms (temperature, n-gram) apply
to its emits. Forward-path techniques need nothing special (the adapters are in the model).
Evaluation cost: about L / chunk forwards per token plus one backward per chunk.

Evidence (records, 8×H100): doc-isolated −0.0110, + strided chunks −0.0337, + LoRA TTT −0.0368
total (03-17); ≈ −0.003 nats vs sliding (04-10); PR #1767 knobs −0.00043; short chunks −0.0010
with progressive context (PR #2014). Measured with pgolf on the tiny CPU model in
``bench/legality_probes.json``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from pgolf.registry import Ctx, Emit, Kind, Params, PgolfError, Role, Technique, hook, register, set_role
from pgolf.registry.run.evaluate import rank_range
from pgolf.registry.run.runtime import Runtime

Target = Literal["q", "k", "v", "o", "mlp", "head"]
KINDS: dict[str, tuple[Kind, ...]] = {
    "q": (Kind.ATTN_Q,),
    "k": (Kind.ATTN_K,),
    "v": (Kind.ATTN_V,),
    "o": (Kind.ATTN_O,),
    "mlp": (Kind.MLP_UP, Kind.MLP_DOWN),
    "head": (Kind.HEAD,),
}


class LoRATTTParams(Params):
    rank: int = Field(96, ge=1, le=4096, description="r: adapter rank")
    alpha: float = Field(144.0, gt=0, description="adapter output scaled by α / r")
    targets: tuple[Target, ...] = Field(("q", "k", "v", "o", "mlp", "head"), min_length=1,
                                        description="Linears that get adapters")  # fmt: skip
    lr: float = Field(1e-4, ge=0, description="AdamW learning rate")
    beta1: float = Field(0.0, ge=0, lt=1, description="AdamW β1")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW β2")
    weight_decay: float = Field(0.5, ge=0, description="AdamW decoupled weight decay")
    chunk_tokens: int = Field(48, ge=1, description="chunk size after the short-chunk positions")
    short_chunks: tuple[tuple[int, int], ...] = Field(
        ((256, 8), (2000, 24)),
        description="(document position, chunk size): chunks starting before that position hold that many tokens",
    )
    docs_per_batch: int = Field(
        64, ge=1, description="documents adapted together, each with its own adapters"
    )
    reset: Literal["document", "never"] = Field(
        "document", description="adapters start afresh per document, or never"
    )
    warm_start_a: bool = Field(True, description="keep A between documents (B is always zeroed on reset)")
    per_virtual: bool = Field(True, description="one adapter set per virtual layer (depth recurrence)")
    bos_id: int = Field(1, ge=0, description="the token that starts a document")

    @model_validator(mode="after")
    def _check(self) -> LoRATTTParams:
        if self.reset == "never" and self.docs_per_batch != 1:
            raise ValueError(
                "reset: never carries adapters from one document to the next: docs_per_batch must be 1"
            )
        limits = [p for p, _ in self.short_chunks]
        if limits != sorted(limits) or any(n < 1 for _, n in self.short_chunks):
            raise ValueError("short_chunks must be (position, size ≥ 1) pairs in increasing position order")
        return self


def document_spans(stream: Tensor, bos: int) -> list[tuple[int, int]]:
    """Target-position spans [a, b) of the documents of ``stream``: a document starts at position 0
    and at every BOS; its last position predicts the next document's BOS."""
    n = stream.numel() - 1
    if n < 1:
        return []
    starts = (stream[:n] == bos).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], n]))


def chunk_size(offset: int, chunk_tokens: int, short_chunks: Sequence[tuple[int, int]]) -> int:
    """Tokens of the chunk that starts ``offset`` positions into its document."""
    for limit, size in short_chunks:
        if offset < limit:
            return size
    return chunk_tokens


def document_chunks(
    a: int, b: int, chunk_tokens: int, short_chunks: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Chunks [s, e) of the document spanning positions [a, b), by position inside it."""
    out, s = [], a
    while s < b:
        e = min(b, s + chunk_size(s - a, chunk_tokens, short_chunks))
        out.append((s, e))
        s = e
    return out


class LoRAAdapter(nn.Module):
    """y + (α/r)·(x·A_iᵀ)·B_iᵀ with per-row adapter slots: batch row j uses slot ``slots[j]`` of
    set i (the i-th time this Linear runs in the forward). Inactive (``slots`` None) it returns y."""

    def __init__(
        self, kind: Kind, layer: int | None, in_features: int, out_features: int, rank: int, alpha: float
    ):
        super().__init__()
        self.kind, self.layer = kind, layer
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = alpha / rank
        self.slots: Tensor | None = None
        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None

    def allocate(self, sets: int, slots: int, device: torch.device) -> None:
        """(sets, slots, r, in) A and (sets, slots, out, r) B, role adapter (never trained with the
        model, never exported)."""
        self.A = set_role(nn.Parameter(torch.empty(sets, slots, self.rank, self.in_features, device=device)),
                          Role.ADAPTER, self.kind)  # fmt: skip
        self.B = set_role(nn.Parameter(torch.zeros(sets, slots, self.out_features, self.rank, device=device)),
                          Role.ADAPTER, self.kind)  # fmt: skip
        self.reset(keep_a=False)

    @torch.no_grad()
    def reset(self, keep_a: bool) -> None:
        assert self.A is not None and self.B is not None
        if not keep_a:
            bound = 1.0 / math.sqrt(self.in_features)
            self.A.uniform_(-bound, bound)
        self.B.zero_()

    def forward(self, x: Tensor, y: Tensor, ctx: Ctx | None) -> Tensor:
        if self.slots is None or self.A is None or self.B is None:
            return y
        i = 0
        if ctx is not None and self.A.size(0) > 1:
            key = ("lora_ttt", id(self))
            i = ctx.state.get(key, 0)
            ctx.state[key] = i + 1
        a = self.A[min(i, self.A.size(0) - 1)].index_select(0, self.slots).to(x.dtype)  # (B, r, in)
        b = self.B[min(i, self.B.size(0) - 1)].index_select(0, self.slots).to(x.dtype)  # (B, out, r)
        u = torch.einsum("bti,bri->btr", x, a)
        return y + self.scale * torch.einsum("btr,bor->bto", u, b).to(y.dtype)


@register("lora_ttt")
class LoRATTT(Technique):
    """LoRA test-time training per document: score each chunk of a document, then take one step on low-rank adapters that start afresh for every document."""

    Params = LoRATTTParams
    params: LoRATTTParams
    legality = ("score_first",)
    contract_params: ClassVar[dict[str, Any]] = {"rank": 4, "docs_per_batch": 4}

    def __init__(self, params: LoRATTTParams, spec: Any):
        super().__init__(params, spec)
        self.adapters: list[LoRAAdapter] = []
        self.trainable_base: list[nn.Parameter] = []
        self.kinds = {k for t in params.targets for k in KINDS[t]}

    # -- model side ---------------------------------------------------------------------------
    @hook
    def linear_adapter(
        self, kind: Kind, layer: int | None, in_features: int, out_features: int
    ) -> nn.Module | None:
        if kind not in self.kinds:
            return None
        a = LoRAAdapter(kind, layer, in_features, out_features, self.params.rank, self.params.alpha)
        self.adapters.append(a)
        return a

    @hook
    def init(self, model: nn.Module) -> None:
        device = model.tok_emb.weight.device  # type: ignore[union-attr]
        orders = model.schedule.orders()  # type: ignore[union-attr,operator]
        for a in self.adapters:
            sets = 1
            if self.params.per_virtual and a.layer is not None:
                sets = max(1, max((*enc, *dec).count(a.layer) for enc, dec in orders))
            a.allocate(sets, self.params.docs_per_batch, device)

    # -- the scorer ------------------------------------------------------------------------------
    @hook
    def probe_points(self, stream: Tensor, seq_len: int) -> list[int]:
        """Inside the first document long enough: the first position of its second chunk (after
        one step) and the middle of its third; the middle of the last chunk of the first document
        longer than the window (where the document ends is a future token: it must not set that
        chunk's context); and the first position of the second batch."""
        p = self.params
        docs = document_spans(stream, p.bos_id)
        out = []
        for a, b in docs:
            chunks = self.chunks(a, b)
            if len(chunks) >= 3:
                out += [chunks[1][0], (chunks[2][0] + chunks[2][1]) // 2]
                break
        for a, b in docs:
            s, e = self.chunks(a, b)[-1]
            if b - a > seq_len and e - s >= 2:
                out.append((s + e) // 2)
                break
        if len(docs) > p.docs_per_batch:
            out.append(docs[p.docs_per_batch][0])
        return out

    @hook
    def score(self, model: nn.Module, stream: Tensor, runtime: Runtime, seq_len: int,
              switches: tuple[str, ...]) -> Iterator[Emit]:  # fmt: skip
        p = self.params
        biggest = max([p.chunk_tokens, *(n for _, n in p.short_chunks)])
        if biggest > seq_len:
            raise PgolfError(
                f"{self.name}: a chunk of {biggest} tokens does not fit the evaluation window "
                f"eval.seq_len={seq_len}; lower {self.name}.chunk_tokens / short_chunks"
            )
        return self._run(model, stream.to(torch.int64), runtime, seq_len, switches)

    def _run(self, model: nn.Module, stream: Tensor, runtime: Runtime, seq_len: int,
             switches: tuple[str, ...]) -> Iterator[Emit]:  # fmt: skip
        docs = document_spans(stream, self.params.bos_id)
        lo, hi = rank_range(len(docs), runtime)
        per = self.params.docs_per_batch
        n_batches = self.batches_per_rank(len(docs), runtime.world_size)
        with self.adapting(model):
            for i in range(n_batches):
                batch = docs[lo + i * per : min(lo + (i + 1) * per, hi)]
                if batch:
                    yield from self.score_batch(
                        model, stream, batch, runtime, seq_len, switches, first=i == 0
                    )
                self.after_batch(model, stream, docs, i, runtime, seq_len, switches)

    def chunks(self, a: int, b: int) -> list[tuple[int, int]]:
        """The chunks [s, e) of the document spanning positions [a, b)."""
        return document_chunks(a, b, self.params.chunk_tokens, self.params.short_chunks)

    def chunk_window_end(self, a: int, s: int) -> int:
        """Where the chunk starting at ``s`` of the document starting at ``a`` would end if the
        document went on: its window is the L tokens up to there, whatever the document's end."""
        return s + chunk_size(s - a, self.params.chunk_tokens, self.params.short_chunks)

    def batches_per_rank(self, n_docs: int, world_size: int) -> int:
        """Batches of the rank with the most documents (every rank steps through as many)."""
        return math.ceil(math.ceil(n_docs / world_size) / self.params.docs_per_batch) if n_docs else 0

    def after_batch(self, model: nn.Module, stream: Tensor, docs: list[tuple[int, int]], batch: int,
                    runtime: Runtime, seq_len: int, switches: tuple[str, ...]) -> None:  # fmt: skip
        """Called on every rank after its ``batch``-th batch (``phased_ttt`` trains here)."""

    @contextlib.contextmanager
    def adapting(self, model: nn.Module) -> Iterator[list[nn.Parameter]]:
        """Base weights frozen, adapters trainable; every flag restored however scoring ends."""
        lora = [q for a in self.adapters for q in (a.A, a.B) if q is not None]
        ids = {id(q) for q in lora}
        base = [q for q in model.parameters() if id(q) not in ids and q.requires_grad]
        lora_flags = [q.requires_grad for q in lora]
        for q in base:
            q.requires_grad_(False)
        for q in lora:
            q.requires_grad_(True)
        self.trainable_base = base  # what the model trains (phased_ttt's global pass trains these)
        try:
            yield lora
        finally:
            for q in base:
                q.requires_grad_(True)
            for q, f in zip(lora, lora_flags):
                q.requires_grad_(f)
                q.grad = None
            for a in self.adapters:
                a.slots = None

    def score_batch(
        self,
        model: nn.Module,
        stream: Tensor,
        batch: list[tuple[int, int]],
        runtime: Runtime,
        seq_len: int,
        switches: tuple[str, ...],
        first: bool,
    ) -> Iterator[Emit]:
        """Score the documents of ``batch`` chunk by chunk (one adapter slot each), emitting their
        positions in stream order, one AdamW step after each chunk but a document's last."""
        p = self.params
        if p.reset == "document" or first:
            for a in self.adapters:
                a.reset(keep_a=p.warm_start_a and not first)
            lora = [q for a in self.adapters for q in (a.A, a.B) if q is not None]
            self._opt = torch.optim.AdamW(
                lora, lr=p.lr, betas=(p.beta1, p.beta2), weight_decay=p.weight_decay
            )
        opt = self._opt
        plans = [self.chunks(a, b) for a, b in batch]
        parts: list[list[Tensor]] = [[] for _ in batch]
        emitted = [a for a, _ in batch]  # next position of each document to emit
        ptr = 0
        dev = runtime.device
        for c in range(max(len(pl) for pl in plans)):
            act = [j for j in range(len(batch)) if c < len(plans[j])]
            spans = []
            for j in act:
                s, e = plans[j][c]
                # the window of the chunk's nominal end (≥ e), not of e: where a document's last
                # chunk ends is where the next BOS is, a future token
                w0 = max(batch[j][0], self.chunk_window_end(batch[j][0], s) - seq_len)
                spans.append((s, e, w0))
            width = max(e - w0 for _, e, w0 in spans)
            x = torch.zeros(len(act), width, dtype=torch.int64)
            for i, (_, e, w0) in enumerate(spans):
                x[i, : e - w0] = stream[w0:e]
            slots = torch.tensor(act, dtype=torch.int64, device=dev)
            for a in self.adapters:
                a.slots = slots
            with torch.enable_grad(), runtime.autocast():
                logits = model.logits(x.to(dev), switches)  # type: ignore[operator]
            losses = []
            for i, (j, (s, e, w0)) in enumerate(zip(act, spans)):
                lg = logits[i, s - w0 : e - w0]
                parts[j].append(lg.detach())
                if c < len(plans[j]) - 1:
                    losses.append(F.cross_entropy(lg.float(), stream[s + 1 : e + 1].to(dev)))
            # emit every position whose predecessors are all emitted (stream order)
            while ptr < len(batch):
                if parts[ptr]:
                    chunk = torch.cat(parts[ptr])
                    parts[ptr] = []
                    yield Emit(emitted[ptr], chunk)
                    emitted[ptr] += chunk.size(0)
                if emitted[ptr] < batch[ptr][1]:
                    break
                ptr += 1
            if losses and p.lr > 0:
                opt.zero_grad(set_to_none=True)
                torch.stack(losses).sum().backward()
                opt.step()
            del logits, losses
        for a in self.adapters:
            a.slots = None
