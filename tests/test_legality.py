"""Legality probes: each passes for causal, normalised evaluation and fails, naming the probe and
the position, for the known-invalid variants (and for hand-made cheats of each kind)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_build

from pgolf.registry import Dispatcher, Emit, Technique, hook
from pgolf.registry.api.technique import Registry
from pgolf.registry.run import data
from pgolf.registry.run.bpb import ByteLUT
from pgolf.registry.run.evaluate import evaluate, scored_stream
from pgolf.registry.run.legality import (
    Recorder,
    cut_points,
    data_probe,
    future_and_normalisation,
    perturb_after,
    probe_plan,
    provenance_probe,
    tags_probe,
)
from pgolf.registry.run.provenance import Provenance, document_hashes, fingerprint, overlap
from pgolf.registry.run.runtime import Runtime
from pgolf.techniques.lora_ttt import LoRATTT, document_spans

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
V = 64
BOS = 1
LUT = ByteLUT(
    torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool), V
)
SHORT = {"chunk_tokens": 8, "short_chunks": [[8, 4]], "rank": 4, "alpha": 6.0, "lr": 0.01, "beta1": 0.9}


def docs_stream(n_docs: int = 14, seed: int = 0) -> torch.Tensor:
    """Documents (BOS + 12–40 tokens) drawn from a few phrases, so caches and TTT have repeats."""
    g = torch.Generator().manual_seed(seed)
    phrases = [
        torch.randint(2, V, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g) for _ in range(6)
    ]
    out = []
    for _ in range(n_docs):
        out.append(torch.tensor([BOS]))
        for _ in range(int(torch.randint(3, 8, (1,), generator=g))):
            out.append(phrases[int(torch.randint(0, 6, (1,), generator=g))])
    out.append(torch.tensor([BOS]))
    return torch.cat(out)


def factory(techniques: dict[str, Any]) -> Callable[[], Any]:
    """Fresh identical tiny builds with random (seeded) weights."""

    def fresh() -> Any:
        b = tiny_build(techniques, seed=0)
        g = torch.Generator().manual_seed(1)
        infos = {id(p) for a in getattr(b.techniques[0], "adapters", []) for p in (a.A, a.B)}
        with torch.no_grad():
            for p in b.model.parameters():
                if id(p) not in infos:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return b

    return fresh


def run_probes(
    fresh: Callable[[], Any], stream: torch.Tensor, suggested: tuple[int, ...] = ()
) -> tuple[Any, Any]:
    """The probes over the first 90 targets (plus ``suggested`` cuts), with a base pass of their own."""
    plan = probe_plan(stream.numel() - 1, suggested, 3, span=90)
    return future_and_normalisation(fresh, stream, CPU, plan, seq_len=16, batch_tokens=64, switches=(),
                                    vocab_size=V, seed=3)  # fmt: skip


def probe(
    techniques: dict[str, Any], stream: torch.Tensor, suggested: tuple[int, ...] = ()
) -> tuple[Any, Any]:
    fresh = factory(techniques)
    b = fresh()
    scorer = b.sites.filler("scorer")
    if scorer is not None and "probe_points" in scorer.hooks:
        suggested = (*suggested, *scorer.call("probe_points", n_targets=stream.numel() - 1, seq_len=16,
                                              stream=stream))  # fmt: skip
    return run_probes(fresh, stream, suggested)


LEGAL = {
    "plain": {},
    "sliding_window": {"sliding_window": {"stride": 4}},
    "score_first_ttt": {
        "score_first_ttt": {"chunk_tokens": 40, "stride": 8, "epochs": 2, "lr": 0.05, "batch_rows": 2}
    },
    "lora_ttt": {"lora_ttt": {**SHORT, "docs_per_batch": 3}},
    "phased_ttt": {
        "phased_ttt": {**SHORT, "docs_per_batch": 2, "prefix_docs": 2, "phases": 1, "global_lr": 0.02}
    },
    "temperature": {"temperature": {"mode": "fitted", "min_tokens": 16}},
    "ngram_cache": {"ngram_cache": {"buckets": 4096}},
    "ngram_tilt": {"ngram_tilt": {"buckets": 4096, "order": 2, "min_confidence": 0.5}},
}


@pytest.mark.parametrize("name", list(LEGAL))
def test_causal_normalised_evaluation_passes_both_probes(name: str) -> None:
    future, norm = probe(LEGAL[name], docs_stream())
    assert future.passed is True, future.message
    assert norm.passed is True, norm.message
    assert len(future.details["cuts"]) >= 3 and norm.details["sampled_positions"] > 10


def test_ttt_scorers_ask_for_cuts_inside_a_chunk_they_train_on() -> None:
    fresh = factory(LEGAL["score_first_ttt"])
    scorer = fresh().sites.filler("scorer")
    assert scorer.call("probe_points", n_targets=400, seq_len=16, stream=docs_stream()) == [39, 40, 60]
    stream = docs_stream()
    lora = factory(LEGAL["lora_ttt"])().sites.filler("scorer")
    points = lora.call("probe_points", n_targets=stream.numel() - 1, seq_len=16, stream=stream)
    assert points and all(0 < k < stream.numel() - 1 for k in points)
    assert set(points) <= set(cut_points(stream.numel() - 1, points, seed=3, span=90))


def test_the_gated_expert_is_caught_by_the_future_probe_at_the_cut() -> None:
    future, norm = probe({"ngram_gated_expert": {"buckets": 4096}}, docs_stream())
    assert future.passed is False and norm.passed is True, (future.message, norm.message)
    k = future.details["cut"]
    assert future.details["position"] == k
    assert (
        f"future probe: changing the tokens after position {k} changed the distribution at position {k}"
        in (future.message)
    )


def test_the_hashed_cache_is_caught_by_the_normalisation_probe_with_its_position_and_sum() -> None:
    _, norm = probe({"hashed_ngram_cache": {"buckets": 256}}, docs_stream())
    assert norm.passed is False
    assert "normalisation probe: technique 'hashed_ngram_cache'" in norm.message
    assert f"at position {norm.details['position']}: they sum to" in norm.message


def _peeking_scorer() -> Technique:
    class Peek(Technique):
        """Scores each window with one extra token of lookahead (a scorer bug)."""

        @hook
        def score(self, model: Any, stream: torch.Tensor, runtime: Any) -> Iterator[Emit]:
            n = stream.numel() - 1
            for s in range(0, n, 16):
                e = min(s + 16, n)
                x = stream[s : min(e + 1, n)][None]  # one token too many: position e-1 sees x_e
                with torch.no_grad():
                    logits = model.logits(x)[0]
                # the bug: every row gets the window's mean logits, the lookahead row's included
                yield Emit(s, logits[: e - s] + logits.mean(0))

    Registry().add("peek", Peek)
    return Peek(Peek.Params(), None)  # type: ignore[arg-type]


def test_a_scorer_that_reads_ahead_is_caught_at_an_earlier_position() -> None:
    stream = docs_stream()
    base = factory({})

    def fresh() -> Any:
        b = base()
        b.sites = Dispatcher([_peeking_scorer()])
        return b

    future, _ = run_probes(fresh, stream)
    assert future.passed is False
    assert future.message.startswith(
        f"future probe: changing the tokens after position {future.details['cut']}"
    )
    assert f"position {future.details['position']}" in future.message


class BatchVariant(Technique):
    """Scores documents two at a time, each in 16-token windows, all windows of the pair in one
    forward: how many rows that forward has depends on where the pair's documents end, which may
    be after the cut. The forward rounds as a batch-variant kernel does (its products scaled by a
    factor of the row count and back, exact in real arithmetic), and the scorer adds ~1e-3 nats
    from the lowest bits of its logits, as test-time training amplifies rounding. ``leak``: each
    window's logits also lean by the token after it (a future token, ~1e-2 nats)."""

    leak = False
    runs = 0  # > 0: the rounding also changes from run to run (a kernel that is not deterministic)

    @hook
    def score(self, model: Any, stream: torch.Tensor, runtime: Any) -> Iterator[Emit]:
        docs = document_spans(stream, BOS)
        if self.runs:
            BatchVariant.runs += 1
        for i in range(0, len(docs), 2):
            rows = [(s, min(s + 16, b)) for a, b in docs[i : i + 2] for s in range(a, b, 16)]
            x = torch.zeros(len(rows), max(e - s for s, e in rows), dtype=torch.int64)
            for r, (s, e) in enumerate(rows):
                x[r, : e - s] = stream[s:e]
            with torch.no_grad():
                logits = model.logits(x).float()
            scale = 1.0 + (len(rows) + self.runs) / 7  # the rounding of a kernel chosen by the batch shape
            logits = logits * scale / scale
            logits = logits + 2e-3 * torch.frac(logits * 2.0**22)  # the lowest bits, amplified
            for r, (s, e) in enumerate(rows):
                bonus = 0.1 * float(stream[e]) / V if self.leak else 0.0  # the token after the window
                yield Emit(s, logits[r, : e - s] + bonus * torch.arange(V) / V)


def _batch_variant(leak: bool, runs: bool = False) -> Callable[[], Any]:
    Registry().add("batch_variant", BatchVariant)
    BatchVariant.runs = int(runs)
    base = factory({})

    def fresh() -> Any:
        b = base()
        scorer = BatchVariant(BatchVariant.Params(), None)  # type: ignore[arg-type]
        scorer.leak = leak
        b.sites = Dispatcher([scorer])
        return b

    return fresh


def test_rounding_that_follows_the_batch_shape_is_noise_and_a_leak_is_not() -> None:
    """A causal scorer whose batches hold documents after the cut computes in other shapes when
    the tokens after the cut change, and rounds differently (here ~1e-3 nats): a rerun of the
    unchanged stream is bitwise the same (noise 0), the nudged weights show the rounding noise, and
    the probe passes; the same scorer reading the future (~1e-2 nats) is still caught."""
    stream = docs_stream()
    future, _ = run_probes(_batch_variant(leak=False), stream)
    assert future.passed is True, future.message
    assert future.details["rerun_noise"] == 0.0 < future.details["rounding_noise"] < 0.01
    assert "beyond 4 × the float noise of the unchanged stream" in future.message
    leaky, _ = run_probes(_batch_variant(leak=True), stream)
    assert leaky.passed is False, leaky.message
    assert leaky.details["change"] > 4 * leaky.details["noise"]


def test_run_to_run_noise_is_its_largest_change_and_a_leak_above_it_is_caught() -> None:
    """A kernel that rounds differently on every run moves every window a little (~2e-3 nats): the
    noise is the largest change of a rerun, not its first (7e-5 here, which flagged this causal
    scorer); the leak, in the window that holds the cut, is still weighed by its largest change."""
    future, _ = run_probes(_batch_variant(leak=False, runs=True), docs_stream())
    leaky, _ = run_probes(_batch_variant(leak=True, runs=True), docs_stream())
    BatchVariant.runs = 0
    assert future.passed is True, future.message
    assert future.details["rerun_noise"] > 1e-3
    assert leaky.passed is False, leaky.message
    assert leaky.details["change"] > 4 * leaky.details["noise"] > 0


class ChunksByLength(LoRATTT):
    """The records' short-document rule: the chunk size from the document's total length."""

    def chunks(self, a: int, b: int) -> list[tuple[int, int]]:
        size = 4 if b - a <= 30 else 8
        return [(s, min(b, s + size)) for s in range(a, b, size)]


def test_chunk_sizes_from_the_total_document_length_read_the_future() -> None:
    Registry().add("lora_by_length", ChunksByLength)
    stream = docs_stream(n_docs=6)
    legal = factory({"lora_ttt": {**SHORT, "docs_per_batch": 1}})

    def fresh() -> Any:
        b = legal()
        old = b.techniques[0]
        cheat = ChunksByLength(old.params, old.spec)
        cheat.adapters, cheat.kinds = old.adapters, old.kinds
        b.sites = Dispatcher([cheat])
        return b

    starts = (stream[:-1] == BOS).nonzero().flatten().tolist()
    # in each document's second chunk (after one step): where it ends is the future, and it sets the chunk size
    cuts = tuple(s + 5 for s in starts[:4])
    future, _ = run_probes(fresh, stream, cuts)
    assert future.passed is False, future.message


def test_a_documents_last_chunk_gets_the_context_of_a_full_chunk_whatever_its_end() -> None:
    """A document's last chunk ends at the next BOS, a future token: its window must not start
    L tokens before that end (it would move with the BOS; pr2135 scaled down on the embedded
    corpus was flagged for it, 1.0e-4 nats at position 142 of its first document), but where a
    full chunk's would: the probe cut just before the BOS sees no change."""
    stream = docs_stream()
    fresh = factory(LEGAL["lora_ttt"])
    lora = fresh().techniques[0]
    # a document longer than the window whose last chunk the BOS cuts short: its window start
    # moved with the BOS before the fix
    a, b = next((a, b) for a, b in document_spans(stream, BOS)
                if b - a > 16 and lora.chunk_window_end(a, lora.chunks(a, b)[-1][0]) > b)  # fmt: skip
    s, _ = lora.chunks(a, b)[-1]
    assert max(a, b - 16) < lora.chunk_window_end(a, s) - 16  # the old window started where b says
    future, _ = run_probes(fresh, stream, (b - 1,))
    assert b - 1 in future.details["cuts"]
    assert future.passed is True, future.message
    assert lora.call("probe_points", n_targets=stream.numel() - 1, seq_len=16, stream=stream)


def test_the_runner_records_every_unnormalised_emit_without_stopping() -> None:
    b = tiny_build({"hashed_ngram_cache": {"buckets": 64}})
    res = evaluate(b.model, docs_stream(), LUT, seq_len=16, batch_tokens=32, runtime=CPU, sites=b.sites)
    assert res.tokens == docs_stream().numel() - 1  # scored to the end
    (v,) = res.violations
    assert v.technique == "hashed_ngram_cache" and v.probe == "normalisation" and v.position > 0
    assert f"at position {v.position}" in v.message


def test_perturbation_changes_every_token_after_the_cut_and_nothing_before() -> None:
    s = docs_stream()
    p = perturb_after(s, 20, V, 0)
    assert torch.equal(p[:21], s[:21]) and bool((p[21:] != s[21:]).all())


def test_a_pass_stops_after_the_emit_holding_its_cut() -> None:
    b = tiny_build({})
    seen = []
    for sc in scored_stream(b.model, docs_stream(), CPU, seq_len=16, batch_tokens=32, sites=b.sites):
        seen.append(sc.start)
        if sc.start + sc.nll.numel() > 40:
            break
    assert seen == [0, 32]


# ---- data -------------------------------------------------------------------------------------


def test_the_file_watch_sees_a_validation_shard_opened_by_any_code(tmp_path: Path) -> None:
    val = tmp_path / "fineweb_val_000000.bin"
    train = tmp_path / "fineweb_train_000000.bin"
    data.write_shard(val, [1, 2, 3])
    data.write_shard(train, [1, 2, 3])
    other = tmp_path / "copy" / "renamed.bin"
    other.parent.mkdir()
    other.write_bytes(val.read_bytes())
    step = [0]
    with data.watch_opens([val, other], where=lambda: f"step {step[0]}") as w:
        w.phase = "training"
        data.load_shard(train)
        step[0] = 7
        np.fromfile(val, dtype="<u2")
        w.phase = "finalize"
        other.read_bytes()
        w.stop()
        data.load_shard(val)  # after the watch stopped: not recorded again
    np.fromfile(val, dtype="<u2")  # outside
    assert w.validation_opened == {str(val): "training, step 7", str(other): "finalize, step 7"}
    assert set(w.shards) == {str(train), str(val), str(other)}
    res = data_probe(w)
    assert res.passed is False
    assert res.message.startswith(
        "data probe: validation shard fineweb_val_000000.bin was opened during training"
    )
    assert "(at training, step 7) and 1 more" in res.message
    again = data_probe(res.to_dict())  # as recorded in result.json
    assert again.passed is False and again.message == res.message


def test_no_validation_open_passes_the_data_probe(tmp_path: Path) -> None:
    train = tmp_path / "fineweb_train_000000.bin"
    data.write_shard(train, [1, 2, 3])
    with data.watch_opens([tmp_path / "fineweb_val_000000.bin"]) as w:
        data.load_shard(train)
    assert data_probe(w).passed is True
    assert data_probe(None).passed is None


# ---- provenance and tags -----------------------------------------------------------------------


def test_documents_are_hashed_between_bos_tokens() -> None:
    t = np.array([7, 7, 1, 5, 6, 1, 5, 6, 1], dtype="<u2")
    h, n = document_hashes(t, 1)
    assert n.tolist() == [2, 3, 3, 1]  # a prefix without BOS is a document of its own
    assert h[1] == h[2] and h[0] != h[1]


def _shards(
    folder: Path, val_docs: list[list[int]], train_docs: list[list[int]]
) -> tuple[list[Path], list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    v, t = folder / "fineweb_val_000000.bin", folder / "fineweb_train_000000.bin"
    data.write_shard(v, [x for d in val_docs for x in [BOS, *d]])
    data.write_shard(t, [x for d in train_docs for x in [BOS, *d]])
    return [t], [v]


def test_overlap_counts_validation_documents_found_in_training(tmp_path: Path) -> None:
    val = [[5, 6, 7], [8, 9], [10, 11, 12, 13], []]
    train, vals = _shards(tmp_path / "a", val, [[8, 9], [3, 3], [10, 11, 12, 13], [10, 11, 12]])
    ov = overlap(train, vals, BOS)
    assert (ov.val_documents, ov.train_documents, ov.overlapping, ov.overlapping_tokens, ov.first) == (
        3,
        4,
        2,
        8,
        1,
    )
    assert not ov.acceptable
    prov = Provenance(fingerprint(train, vals, BOS), ov, 0.0)
    res = provenance_probe(prov)
    assert res.passed is False
    assert res.message.startswith(
        "provenance: 2 of 3 validation documents (66.67%, 8 tokens; the first is validation document 1)"
    )
    clean, cvals = _shards(tmp_path / "b", val, [[3, 3]])
    assert provenance_probe(
        Provenance(fingerprint(clean, cvals, BOS), overlap(clean, cvals, BOS), 0.0)
    ).passed


def test_the_fingerprint_tells_two_datasets_apart(tmp_path: Path) -> None:
    a = fingerprint(*_shards(tmp_path / "a", [[5, 6]], [[7, 8]]), BOS)
    b = fingerprint(*_shards(tmp_path / "b", [[5, 6]], [[7, 9]]), BOS)
    c = fingerprint(*_shards(tmp_path / "c", [[5, 6]], [[7, 8]]), BOS)
    assert a["sha256"] == c["sha256"] != b["sha256"]
    assert a["train"]["files"][0]["name"] == "fineweb_train_000000.bin" and a["train"]["tokens"] == 3
    assert a["val"]["documents"] == 1


def test_tags_name_every_illegal_or_unreviewed_technique() -> None:
    from pgolf.registry import REGISTRY

    ok = tags_probe([REGISTRY.get("sliding_window"), REGISTRY.get("temperature")])
    bad = tags_probe([REGISTRY.get("sliding_window"), REGISTRY.get("hashed_ngram_cache")])
    assert ok.passed is True and bad.passed is False
    assert bad.message.startswith("tags: technique 'hashed_ngram_cache' is tagged illegal")


def test_the_probes_are_not_counted_code() -> None:
    from pgolf.registry.run.code import counted_files

    names = {f.name for f in counted_files([])}
    assert "pgolf/registry/run/pipeline.py" in names and "pgolf/registry/run/evaluate.py" in names
    assert not names & {"pgolf/registry/run/legality.py", "pgolf/registry/run/provenance.py"}


def test_a_stack_without_evaluation_techniques_reuses_the_runs_own_evaluation() -> None:
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import probe_recorder

    stream = docs_stream()
    model = {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": V}
    train = {"train_seq_len": 16, "train_batch_tokens": 64, "micro_batch_tokens": 32}
    with_chain = stack_from_dict({"model": model, "train": train, "techniques": {"temperature": {}}})
    assert probe_recorder(with_chain, stream) is None  # transforms may depend on the batching
    fresh = factory({})
    plan = probe_plan(stream.numel() - 1, (), 3, span=90)
    assert plan is not None
    rec = Recorder(plan)
    b = fresh()
    evaluate(b.model, stream, LUT, seq_len=16, batch_tokens=64, runtime=CPU, sites=b.sites, inspect=rec)
    base = rec.result()
    assert base is not None and set(base.rows) == {*plan.cuts, *plan.samples}
    own = run_probes(fresh, stream)[0]
    future, norm = future_and_normalisation(fresh, stream, CPU, plan, seq_len=16, batch_tokens=64, switches=(),
                                            vocab_size=V, seed=3, base=base)  # fmt: skip
    assert future.passed is True and own.passed is True and norm.passed is True
    assert future.details["positions_scored"] < own.details["positions_scored"]
    assert Recorder(plan).result() is None  # nothing recorded: the probes make their own pass
