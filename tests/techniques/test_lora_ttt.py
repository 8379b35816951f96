"""LoRA TTT and phased TTT: documents, chunks, adapter maths, independence, learning, pauses."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_build
from runs import CPU, one_byte_lut

from pgolf.registry import Ctx, Kind, Role
from pgolf.registry.api.roles import param_infos
from pgolf.registry.run.evaluate import evaluate
from pgolf.techniques.lora_ttt import LoRAAdapter, chunk_size, document_chunks, document_spans
from pgolf.techniques.phased_ttt import pause_batches

V = 64
LUT = one_byte_lut(V)
SMALL = {"chunk_tokens": 8, "short_chunks": [[8, 4]], "rank": 4, "alpha": 6.0}


def build(techniques: dict[str, Any], **model: Any) -> Any:
    b = tiny_build(techniques, seed=0, **model)
    g = torch.Generator().manual_seed(1)
    adapters = {n for n, i in param_infos(b.model).items() if i.role == Role.ADAPTER}
    with torch.no_grad():
        for n, p in b.model.named_parameters():
            if n not in adapters:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return b


def score(b: Any, stream: torch.Tensor, seq_len: int = 16) -> torch.Tensor:
    res = evaluate(
        b.model, stream, LUT, seq_len=seq_len, batch_tokens=64, runtime=CPU, sites=b.sites, want_nll=True
    )
    assert res.nll is not None
    return torch.from_numpy(res.nll)


def docs(*lengths: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.cat([torch.tensor([1]), torch.randint(2, V, (n,), generator=g)]) for n in lengths]
        + [torch.tensor([1])]
    )


def test_documents_start_at_bos_and_chunks_grow_with_the_position_in_the_document() -> None:
    s = torch.tensor([5, 1, 4, 4, 1, 3, 1])
    assert document_spans(s, 1) == [(0, 1), (1, 4), (4, 6)]
    assert document_chunks(10, 40, 8, [(8, 4)]) == [(10, 14), (14, 18), (18, 26), (26, 34), (34, 40)]
    assert document_chunks(0, 300, 48, [(256, 8), (2000, 24)])[31:34] == [(248, 256), (256, 280), (280, 300)]


def test_adapter_adds_a_scaled_low_rank_update_per_row_slot() -> None:
    a = LoRAAdapter(Kind.ATTN_Q, 0, 6, 5, rank=3, alpha=4.5)
    a.allocate(sets=2, slots=4, device=torch.device("cpu"))
    with torch.no_grad():
        a.B.normal_()  # type: ignore[union-attr]
    x, y = torch.randn(2, 3, 6), torch.randn(2, 3, 5)
    assert torch.equal(a(x, y, None), y)  # inactive
    a.slots = torch.tensor([3, 1])
    ctx = Ctx(torch.zeros(2, 3, dtype=torch.long))
    first, second = a(x, y, ctx), a(x, y, ctx)  # the second call is the layer's second virtual run
    for out, i in ((first, 0), (second, 1)):
        for row, slot in enumerate([3, 1]):
            A, B = a.A[i, slot], a.B[i, slot]  # type: ignore[index]
            want = y[row] + 1.5 * (x[row] @ A.T) @ B.T
            assert torch.allclose(out[row], want, atol=1e-5)
    assert a.A.shape == (2, 4, 3, 6) and a.B.shape == (2, 4, 5, 3)  # type: ignore[union-attr]
    assert float(a.A.detach().abs().max()) <= 1 / 6**0.5  # type: ignore[union-attr]


def test_adapters_take_role_adapter_on_the_targets_and_one_set_per_virtual_layer() -> None:
    b = build({"lora_ttt": {**SMALL, "targets": ["q", "mlp", "head"], "docs_per_batch": 2},
               "depth_recurrence": {"loop_start": 0, "loop_end": 0, "num_loops": 2}})  # fmt: skip
    kinds = {i.kind for i in param_infos(b.model).values() if i.role == Role.ADAPTER}
    assert kinds == {Kind.ATTN_Q, Kind.MLP_UP, Kind.MLP_DOWN, Kind.HEAD}
    lora = next(t for t in b.techniques if t.name == "lora_ttt")
    sets = {(a.kind, a.layer): a.A.size(0) for a in lora.adapters}
    assert sets[(Kind.ATTN_Q, 0)] == 3 and sets[(Kind.ATTN_Q, 1)] == 1 and sets[(Kind.HEAD, None)] == 1


def test_without_learning_it_is_document_isolated_chunked_scoring() -> None:
    stream = docs(20, 9, 30)
    b = build({"lora_ttt": {**SMALL, "lr": 0.0, "docs_per_batch": 2}})
    got = score(b, stream)
    plain = build({})
    want = torch.empty(stream.numel() - 1)
    for a, e_doc in document_spans(stream, 1):
        for s, e in document_chunks(a, e_doc, 8, [(8, 4)]):
            w0 = max(a, s + chunk_size(s - a, 8, [(8, 4)]) - 16)  # a full chunk's window, whatever e
            with torch.no_grad():
                logits = plain.model.logits(stream[w0:e][None])[0]
            want[s:e] = F.cross_entropy(logits[s - w0 : e - w0], stream[s + 1 : e + 1], reduction="none")
    assert torch.allclose(got, want, atol=1e-5)


def test_documents_of_one_batch_do_not_influence_each_other() -> None:
    a, b_ = docs(25, 30, seed=0), docs(25, 30, seed=0)
    b_[30:56] = torch.randint(2, V, (26,), generator=torch.Generator().manual_seed(9))  # the second document
    one = score(build({"lora_ttt": {**SMALL, "lr": 0.05, "docs_per_batch": 2}}), a)
    two = score(build({"lora_ttt": {**SMALL, "lr": 0.05, "docs_per_batch": 2}}), b_)
    assert torch.allclose(one[:26], two[:26], atol=1e-6)
    assert not torch.allclose(one[26:], two[26:])


def test_it_learns_a_document_that_repeats_itself() -> None:
    g = torch.Generator().manual_seed(3)
    phrase = torch.randint(2, V, (12,), generator=g)
    stream = torch.cat([torch.tensor([1]), phrase.repeat(5), torch.tensor([1])])
    frozen = score(build({"lora_ttt": {**SMALL, "lr": 0.0}}), stream)
    adapted = score(build({"lora_ttt": {**SMALL, "lr": 0.03, "beta1": 0.9}}), stream)
    assert torch.allclose(frozen[:4], adapted[:4], atol=1e-6)  # the first chunk: nothing learnt yet
    assert adapted[24:].mean() < frozen[24:].mean() - 0.2


def test_scoring_leaves_the_model_as_it_found_it() -> None:
    b = build({"lora_ttt": {**SMALL, "lr": 0.05}})
    before = {n: p.requires_grad for n, p in b.model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in b.model.named_parameters() if not n.endswith((".A", ".B"))}
    score(b, docs(12, 20))
    assert before == {n: p.requires_grad for n, p in b.model.named_parameters()}
    assert all(torch.equal(p, weights[n]) for n, p in b.model.named_parameters() if n in weights)
    lora = b.techniques[0]
    assert all(a.slots is None for a in lora.adapters)


def test_a_chunk_longer_than_the_window_is_refused() -> None:
    from pgolf.registry import PgolfError

    with pytest.raises(
        PgolfError, match=r"lora_ttt: a chunk of 48 tokens does not fit the evaluation window eval.seq_len=16"
    ):
        score(build({"lora_ttt": {"rank": 2}}), docs(10))


def test_pauses_come_after_the_batch_that_completes_each_share_of_the_prefix() -> None:
    assert pause_batches(2000, 3, 1, 64) == [10, 20, 31]  # 667, 1334, 2000 documents: 11, 21, 32 batches
    assert pause_batches(2000, 1, 8, 64) == [3]  # 2000 documents over 8 processes: 4 batches each
    assert pause_batches(4, 2, 1, 2) == [0, 1]


def test_phased_ttt_trains_the_base_only_on_documents_already_scored() -> None:
    stream = docs(15, 15, 15, 15, seed=4)
    kw = {**SMALL, "lr": 0.02, "docs_per_batch": 2}
    lora = score(build({"lora_ttt": kw}), stream)
    b = build({"phased_ttt": {**kw, "prefix_docs": 2, "phases": 1, "global_lr": 0.05}})
    phased = score(b, stream)
    first_two = 32  # documents 0 and 1 (positions 0..31) are scored before the pause
    assert torch.allclose(lora[:first_two], phased[:first_two], atol=1e-6)
    assert not torch.allclose(lora[first_two:], phased[first_two:], atol=1e-4)
    assert all(p.requires_grad for n, p in b.model.named_parameters() if not n.endswith((".A", ".B")))
