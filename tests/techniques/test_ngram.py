"""N-gram evaluation techniques against plain references (dict counting, explicit formulas)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
import torch
import torch.nn.functional as F
from conftest import small_spec

from pgolf.techniques.hashed_ngram_cache import HashedNgramCache, HashedNgramCacheParams
from pgolf.techniques.ngram_cache import (
    NgramCache,
    NgramCacheParams,
    context_hashes,
    entropy_weight,
)
from pgolf.techniques.ngram_gated_expert import NgramGatedExpert, NgramGatedExpertParams
from pgolf.techniques.ngram_tilt import NgramTilt, NgramTiltParams, tilt

V = 16
SPEC = small_spec(vocab_size=V)
BIG = 1 << 20  # no collisions among the few contexts below


def stream(n: int = 120, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, V, (9,), generator=g)
    noise = torch.randint(0, V, (n,), generator=g)
    s = base.repeat(n // 9 + 1)[:n]
    keep = torch.rand(n, generator=g) < 0.8
    return torch.where(keep, s, noise)


def run(t: object, s: torch.Tensor, emit: int = 10, model_lp: torch.Tensor | None = None) -> torch.Tensor:
    """Drive a logprobs technique like the runner: transform each emit, then observe its targets."""
    n = s.numel() - 1
    lp = (
        model_lp
        if model_lp is not None
        else F.log_softmax(torch.randn(n, V, generator=torch.Generator().manual_seed(1)), -1)
    )
    out = torch.empty(n, V)
    for a in range(0, n, emit):
        b = min(a + emit, n)
        pos = torch.arange(a, b)
        out[a:b] = t.transform_logprobs(lp[a:b], pos, s[:b])  # type: ignore[attr-defined]
        t.observe(s[a + 1 : b + 1])  # type: ignore[attr-defined]
    return out


def test_context_hashes_depend_exactly_on_the_context_tokens() -> None:
    s = torch.tensor([3, 4, 5, 3, 4, 5, 3, 9])
    h, valid = context_hashes(s, torch.arange(8), 3)  # context = 2 tokens ending at p
    assert valid.tolist() == [False, True, True, True, True, True, True, True]
    assert h[2] == h[5]  # (4, 5) both
    assert h[1] == h[4] and h[1] != h[2]  # (3, 4)
    h1, v1 = context_hashes(s, torch.arange(8), 1)
    assert bool(v1.all()) and len(set(h1.tolist())) == 1  # the unigram's empty context


def reference_ngram(s: torch.Tensor, orders: range, min_count: int = 1) -> list[dict[int, float] | None]:
    """p_ng per position by exact counting of the tokens scored before each emit of 10."""
    n = s.numel() - 1
    ctx_n: dict[tuple[int, ...], int] = Counter()
    pair_n: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
    out: list[dict[int, float] | None] = []
    toks = s.tolist()
    for a in range(0, n, 10):
        b = min(a + 10, n)
        for p in range(a, b):
            got = None
            for o in sorted(orders, reverse=True):
                if p < o - 2:
                    continue
                ctx = tuple(toks[p - o + 2 : p + 1]) if o > 1 else ()
                if ctx_n[(o, *ctx)] >= min_count:
                    c = pair_n[(o, *ctx)]
                    tot = sum(c.values())
                    got = {k: v / tot for k, v in c.items()}
                    break
            out.append(got)
        for p in range(a, b):
            for o in orders:
                if p < o - 2:
                    continue
                ctx = tuple(toks[p - o + 2 : p + 1]) if o > 1 else ()
                ctx_n[(o, *ctx)] += 1
                pair_n[(o, *ctx)][toks[p + 1]] += 1
    return out


def reference_count(s: torch.Tensor, p: int) -> int:
    """How often position p's backoff context (orders 4, 3, 2) was seen before p's emit of 10."""
    toks = s.tolist()
    seen = toks[: (p // 10) * 10 + 1]
    for o in (4, 3, 2):
        ctx = toks[p - o + 2 : p + 1]
        if p < o - 2:
            continue
        n = sum(1 for i in range(o - 2, len(seen) - 1) if seen[i - o + 2 : i + 1] == ctx)
        if n:
            return n
    return 0


@pytest.mark.parametrize("kappa", [0.0, 4.0])
def test_cache_mixture_matches_exact_counting_and_is_normalised(kappa: float) -> None:
    s = stream()
    lp = F.log_softmax(torch.randn(s.numel() - 1, V, generator=torch.Generator().manual_seed(1)), -1)
    t = NgramCache(NgramCacheParams(min_order=2, max_order=4, buckets=BIG, concentration=kappa), SPEC)
    out = run(t, s, model_lp=lp)
    ref = reference_ngram(s, range(2, 5))
    alpha = entropy_weight(lp, 0.05, 0.55, 4.0, 2.0)
    h = -(lp.exp() * lp).sum(-1)
    assert torch.allclose(alpha, 0.05 + 0.55 / (1 + torch.exp(-2 * (h - 4.0))))
    hits = 0
    for p, q in enumerate(ref):
        want = lp[p].exp()
        if q is not None:
            hits += 1
            counts = torch.zeros(V)
            for k, v in q.items():
                counts[k] = v  # relative frequencies: scaled back to counts below
            n = reference_count(s, p)
            qv = (counts * n + kappa * lp[p].exp()) / (n + kappa)
            want = (1 - alpha[p]) * want + alpha[p] * qv
        assert torch.allclose(out[p].exp(), want, atol=1e-5), p
    assert hits > 50
    assert torch.allclose(out.logsumexp(-1), torch.zeros(len(ref)), atol=1e-5)


def test_hashed_cache_scores_the_published_ratio_and_is_not_a_distribution() -> None:
    s = stream()
    lp = F.log_softmax(torch.zeros(s.numel() - 1, V), -1)
    t = HashedNgramCache(HashedNgramCacheParams(min_order=2, max_order=3, buckets=BIG), SPEC)
    out = run(t, s, model_lp=lp)
    toks = s.tolist()
    # the gold token at position p: the highest order whose (context, target) was seen
    p = 100
    seen = toks[: (p // 10) * 10 + 1]  # tokens observed before p's emit (targets up to its start)
    ratio = 0.0
    for o in (3, 2):
        ctx = tuple(toks[p - o + 2 : p + 1])
        ctx_c = sum(1 for i in range(o - 2, len(seen) - 1) if tuple(seen[i - o + 2 : i + 1]) == ctx)
        pair_c = sum(
            1
            for i in range(o - 2, len(seen) - 1)
            if tuple(seen[i - o + 2 : i + 1]) == ctx and seen[i + 1] == toks[p + 1]
        )
        if ctx_c and pair_c:
            ratio = min(1.0, pair_c / ctx_c)
            break
    alpha = float(entropy_weight(lp[p : p + 1], 0.05, 0.55, 4.0, 2.0))
    assert math.isclose(float(out[p, toks[p + 1]].exp()), (1 - alpha) / V + alpha * ratio, rel_tol=1e-5)
    assert float(out.logsumexp(-1).exp().max()) > 1.04  # every order with a hit adds mass (α ≈ 0.09 here)


def test_gated_expert_distributions_sum_to_one_but_follow_the_realised_token() -> None:
    s = stream()
    t = NgramGatedExpert(NgramGatedExpertParams(min_order=1, max_order=3, buckets=BIG), SPEC)
    out = run(t, s)
    assert torch.allclose(out.logsumexp(-1), torch.zeros(out.size(0)), atol=1e-5)
    # the same position, the same prefix, another realised token: another distribution
    t2 = NgramGatedExpert(NgramGatedExpertParams(min_order=1, max_order=3, buckets=BIG), SPEC)
    changed = s.clone()
    changed[96] = (s[96] + 7) % V  # the target of position 95 (inside an emit, not its last)
    out2 = run(t2, changed)
    assert torch.allclose(out[:95], out2[:95])
    assert not torch.allclose(out[95], out2[95], atol=1e-4)


def test_tilt_matches_its_formula_and_sums_to_one() -> None:
    lp = F.log_softmax(torch.randn(4, V), -1)
    hint = torch.tensor([0, 3, 3, 15])
    beta = torch.tensor([2.625, 1.0, 0.0, 5.0])
    got = tilt(lp, hint, beta)
    for i in range(4):
        p = lp[i].exp()
        w = torch.ones(V)
        w[hint[i]] = math.exp(float(beta[i]))
        want = p * w / (1 + p[hint[i]] * (math.exp(float(beta[i])) - 1))
        assert torch.allclose(got[i].exp(), want, atol=1e-6)
        assert math.isclose(float(got[i].exp().sum()), 1.0, rel_tol=1e-6)


def test_tilt_hints_the_most_frequent_follower_of_the_prefix_context_once_confident() -> None:
    s = stream(200)
    lp = F.log_softmax(torch.zeros(s.numel() - 1, V), -1)
    t = NgramTilt(NgramTiltParams(order=2, buckets=BIG, min_confidence=0.6, beta=2.0), SPEC)
    out = run(t, s, model_lp=lp)
    toks = s.tolist()
    follow: dict[tuple[int, int], Counter[int]] = defaultdict(Counter)
    best: dict[tuple[int, int], int] = {}  # a context's hint: replaced only by a strictly larger count
    tilted = 0
    for a in range(0, len(toks) - 1, 10):
        end = min(a + 10, len(toks) - 1)
        for p in range(a, end):
            ctx = tuple(toks[p - 1 : p + 1])
            h = best.get(ctx) if p >= 1 else None  # type: ignore[call-overload]
            if h is not None and follow[ctx][h] / sum(follow[ctx].values()) >= 0.6:
                tilted += 1
                assert int(out[p].argmax()) == h, p
                assert math.isclose(float(out[p, h].exp()), math.e**2 / (V - 1 + math.e**2), rel_tol=1e-4)
            else:
                assert torch.allclose(out[p], lp[p]), p
        batch: dict[tuple[int, int], list[int]] = defaultdict(list)
        for p in range(max(a, 1), end):
            ctx = tuple(toks[p - 1 : p + 1])
            follow[ctx][toks[p + 1]] += 1
            batch[ctx].append(toks[p + 1])
        for ctx, ts in batch.items():
            top = max((follow[ctx][x], x) for x in ts)
            if ctx not in best or top[0] > follow[ctx][best[ctx]]:
                best[ctx] = top[1]
    assert tilted > 40 and t.hinted == tilted


@pytest.mark.parametrize("cls", [NgramCache, NgramTilt, NgramGatedExpert, HashedNgramCache])
def test_state_holds_the_tables(cls: type) -> None:
    params = cls.Params(buckets=4096)
    t = cls(params, SPEC)
    run(t, stream(60))
    again = cls(params, SPEC)
    again.load_state_dict(t.state_dict())
    s = stream(60, seed=5)
    lp = F.log_softmax(torch.randn(20, V), -1)
    pos = torch.arange(40, 60)
    assert torch.allclose(t.transform_logprobs(lp, pos, s[:60]), again.transform_logprobs(lp, pos, s[:60]))
