"""Evaluation techniques: sliding windows, score-first TTT and temperature against references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_spec
from runs import CPU, one_byte_lut

from pgolf.registry import Dispatcher, PgolfError
from pgolf.registry.run.evaluate import evaluate
from pgolf.registry.run.model import GPT
from pgolf.techniques.score_first_ttt import (
    ScoreFirstTTT,
    ScoreFirstTTTParams,
    chunk_lr,
    chunk_windows,
)
from pgolf.techniques.sliding_window import SlidingWindow, SlidingWindowParams, scored_range, window_starts
from pgolf.techniques.temperature import Temperature, TemperatureParams, apply_temperature

V = 64
LUT = one_byte_lut(V)


def model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(small_spec(vocab_size=V))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


def score(
    m: GPT, stream: torch.Tensor, *techniques: object, seq_len: int = 16, batch: int = 48
) -> torch.Tensor:
    res = evaluate(m, stream, LUT, seq_len=seq_len, batch_tokens=batch, runtime=CPU,
                   sites=Dispatcher(list(techniques)), want_nll=True)  # type: ignore[arg-type]  # fmt: skip
    assert res.nll is not None
    return torch.from_numpy(res.nll)


@pytest.mark.parametrize(("n", "L", "S"), [(100, 16, 4), (16, 16, 4), (17, 16, 16), (5, 16, 8), (333, 32, 7)])
def test_windows_score_every_target_once_with_at_least_L_minus_S_context(n: int, L: int, S: int) -> None:
    seen: list[int] = []
    for ws in window_starts(n, L, S):
        a, b = scored_range(ws, n, L, S)
        assert ws == 0 or a - ws >= L - S  # context before the first scored position
        seen.extend(range(a, b))
    assert seen == list(range(n))


def sliding(stride: int) -> SlidingWindow:
    return SlidingWindow(SlidingWindowParams(stride=stride), None)  # type: ignore[arg-type]


def test_sliding_window_matches_scoring_each_window_alone() -> None:
    m = model()
    stream = torch.randint(0, V, (101,))
    got = score(m, stream, sliding(4))
    want = torch.empty(100)
    for ws in window_starts(100, 16, 4):
        a, b = scored_range(ws, 100, 16, 4)
        x = stream[ws : min(ws + 16, 100)][None]
        y = stream[ws + 1 : ws + 1 + x.size(1)][None]
        with torch.no_grad():
            nll = m(x, y, reduction="none")[0]
        want[a:b] = nll[a - ws : b - ws]
    assert torch.allclose(got, want, atol=1e-5)


def test_stride_equal_to_the_window_is_the_plain_non_overlapping_evaluation() -> None:
    m = model(1)
    stream = torch.randint(0, V, (77,))
    assert torch.allclose(score(m, stream, sliding(16)), score(m, stream), atol=1e-6)


def test_a_stride_longer_than_the_window_is_refused() -> None:
    with pytest.raises(PgolfError, match="sliding_window.stride=32 is longer than the evaluation window"):
        score(model(), torch.randint(0, V, (50,)), sliding(32))


def test_temperature_fixed_matches_the_definition_and_stays_normalised() -> None:
    lp = F.log_softmax(torch.randn(5, V) * 3, dim=-1)
    t = Temperature(TemperatureParams(temperature=0.8), None)  # type: ignore[arg-type]
    out = t.transform_logprobs(lp)
    assert torch.allclose(out, F.log_softmax(lp / 0.8, dim=-1))
    assert torch.allclose(out.logsumexp(-1), torch.zeros(5), atol=1e-5)


def test_fitted_temperature_learns_only_from_scored_tokens() -> None:
    torch.manual_seed(0)
    t = Temperature(TemperatureParams(mode="fitted", temperature=1.0, min_tokens=1000), None)  # type: ignore[arg-type]
    true_t = 1.1
    for i in range(8):
        logits = torch.randn(500, V) * 3
        lp = F.log_softmax(logits, dim=-1)
        targets = torch.multinomial(F.softmax(logits / true_t, dim=-1), 1)[:, 0]
        out = t.transform_logprobs(lp)
        # the temperature used for a batch was chosen before its targets were observed
        expected_t = 1.0 if i < 2 else t.current
        assert torch.allclose(out, apply_temperature(lp, expected_t))
        t.observe(targets)
    assert t.current == 1.1


def test_ttt_learning_rate_is_cosine_over_chunks() -> None:
    assert chunk_lr(0.01, 0, 5) == pytest.approx(0.01)
    assert chunk_lr(0.01, 2, 5) == pytest.approx(0.005)
    assert chunk_lr(0.01, 4, 5) == pytest.approx(0.0, abs=1e-12)


def test_ttt_groups_windows_by_the_chunk_of_their_first_scored_position() -> None:
    starts = window_starts(100, 16, 4)
    groups = chunk_windows(starts, 100, 16, 4, 32)
    assert [i for g in groups for i in g] == list(range(len(starts)))
    for c, g in enumerate(groups):
        assert all(scored_range(starts[i], 100, 16, 4)[0] // 32 == c for i in g)


def ttt(**kw: object) -> ScoreFirstTTT:
    p = {"chunk_tokens": 48, "epochs": 4, "lr": 0.05, "stride": 8, "batch_rows": 4, **kw}
    return ScoreFirstTTT(ScoreFirstTTTParams(**p), None)  # type: ignore[arg-type]


def test_ttt_without_training_is_the_sliding_window_score() -> None:
    stream = torch.randint(0, V, (150,))
    assert torch.allclose(
        score(model(), stream, ttt(epochs=0)), score(model(), stream, sliding(8)), atol=1e-6
    )


def test_ttt_scores_each_chunk_before_it_learns_from_it() -> None:
    """Changing tokens of a later chunk never moves the score of an earlier chunk's positions."""
    stream = torch.randint(0, V, (150,))
    changed = stream.clone()
    changed[100:] = torch.randint(0, V, (50,))
    a, b = score(model(), stream, ttt()), score(model(), changed, ttt())
    assert torch.allclose(a[:99], b[:99], atol=1e-6)  # positions < 99 predict tokens ≤ 99
    assert not torch.allclose(a[99:], b[99:])


def test_ttt_learns_a_repeated_text() -> None:
    block = torch.randint(0, V, (48,))
    stream = torch.cat([block, block, block, block[:1]])  # chunk 1 and 2 repeat chunk 0
    plain, adapted = score(model(), stream, ttt(epochs=0)), score(model(), stream, ttt())
    assert math.isclose(float(plain[:48].sum()), float(adapted[:48].sum()), rel_tol=1e-6)
    assert adapted[48:].mean() < plain[48:].mean() - 0.1


def test_ttt_adapts_the_selected_blocks_beyond_the_frozen_ones_and_everything_outside_blocks() -> None:
    from pgolf.registry import LayerSelector
    from pgolf.techniques.score_first_ttt import adapted_parameters

    m = GPT(small_spec(num_layers=3, vocab_size=V))
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    block = [ids(b.parameters()) for b in m.blocks]
    outside = ids(m.parameters()) - set().union(*block)
    got = ids(adapted_parameters(m, LayerSelector.parse([1, 2]), freeze_blocks=2))
    assert got == block[2] | outside
    assert ids(adapted_parameters(m, LayerSelector.parse("all"), 0)) == ids(m.parameters())


def test_ttt_with_adamw_learns_and_differs_from_sgd() -> None:
    block = torch.randint(0, V, (48,))
    stream = torch.cat([block, block, block, block[:1]])
    plain = score(model(), stream, ttt(epochs=0))
    adam = score(model(), stream, ttt(optimizer="adamw", lr=0.01, momentum=0.9))
    sgd = score(model(), stream, ttt())
    assert adam[48:].mean() < plain[48:].mean() - 0.1
    assert not torch.allclose(adam[48:], sgd[48:])
    assert ttt().probe_points(n_targets=200) == [47, 48, 72]
