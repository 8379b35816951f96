"""Welch's t-test, one-sided, with the Student t CDF computed here (no scipy at runtime).

The challenge's significance rule: a new record must improve val_loss by at least 0.005 nats
with p < 0.01. ``welch_less(a, b)`` tests H1: mean(a) < mean(b) (a is better: lower loss).

The t CDF uses the regularized incomplete beta function,
``P(T ≤ t) = 1 − ½·I_{ν/(ν+t²)}(ν/2, ½)`` for t > 0 (and ½·I for t ≤ 0), with I evaluated by
its continued fraction (modified Lentz; Numerical Recipes §6.4).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

BAR_NATS = 0.005
BAR_P = 0.01


def _betacf(a: float, b: float, x: float, max_iter: int = 1000, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0 (got a={a}, b={b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 ≤ x ≤ 1 (got {x})")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0 (got {df})")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2.0, 0.5, x)  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


@dataclass(frozen=True)
class Welch:
    """One-sided Welch test of H1: mean(a) < mean(b)."""

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    std_a: float  # sample standard deviation (ddof=1)
    std_b: float
    diff: float  # mean_a − mean_b (negative: a is lower)
    t: float
    df: float
    p: float


def welch_less(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Welch's unequal-variance t-test, one-sided (alternative: mean(a) < mean(b)); the same
    numbers as ``scipy.stats.ttest_ind(a, b, equal_var=False, alternative='less')``."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"each group needs at least 2 values (got {len(a)} and {len(b)}); run more seeds")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a), statistics.variance(b)
    na, nb = len(a), len(b)
    sa, sb = va / na, vb / nb
    se2 = sa + sb
    diff = ma - mb
    if se2 == 0.0:
        t = -math.inf if diff < 0 else (math.inf if diff > 0 else math.nan)
        df = float(na + nb - 2)
        p = 0.0 if diff < 0 else (1.0 if diff > 0 else math.nan)
    else:
        t = diff / math.sqrt(se2)
        df = se2 * se2 / (sa * sa / (na - 1) + sb * sb / (nb - 1))
        p = t_cdf(t, df)
    return Welch(na, nb, ma, mb, math.sqrt(va), math.sqrt(vb), diff, t, df, p)


def meets_bar(w: Welch, bar_nats: float = BAR_NATS, bar_p: float = BAR_P) -> bool:
    """The challenge bar: val_loss lower by at least ``bar_nats`` and p < ``bar_p``."""
    return -w.diff >= bar_nats and w.p < bar_p


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (0 < q < 1): the t with
    ``t_cdf(t, df) = q``, found by bisection on :func:`t_cdf` (monotone), to 1e-12."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf needs 0 < q < 1 (got {q})")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def welch_interval(w: Welch, level: float = 1.0 - 2.0 * BAR_P) -> tuple[float, float]:
    """Two-sided ``level`` confidence interval of mean(a) − mean(b) (Welch: the difference ±
    the t quantile with Welch–Satterthwaite df × the standard error). The default level, 98 %,
    matches the bar's one-sided test: the interval lies wholly below 0 exactly when p < 0.01."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1) (got {level})")
    se = math.sqrt(w.std_a**2 / w.n_a + w.std_b**2 / w.n_b)
    if se == 0.0:
        return (w.diff, w.diff)
    half = t_ppf(0.5 + level / 2.0, w.df) * se
    return (w.diff - half, w.diff + half)
