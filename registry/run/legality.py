"""Legality probes: is a run's score one the challenge would accept? Checked, not declared.

The challenge's conditions (README FAQ; Issue #1017): a position's distribution depends only on
the tokens before it (1), is normalised over the whole vocabulary (2), is fixed before any update
that learns from its token (3); every token is scored once (4, enforced by the runner); no
validation data during training; the validation documents are not training documents. Each
probe checks one of them on the run itself, with the stack's own scorer, logprobs chain and
reloaded artifact, and names the position where it fails:

* **future** — for several cut points k (spread over the first ``min(65,536, N/40)`` targets, plus
  any the scorer names with ``probe_points``, e.g. inside a test-time-training chunk), every token
  after position k's context (``stream[k+1:]``, k's own target included) is replaced, the stream is
  scored again up to k, and nothing may move: the NLL of every position < k (same targets) within
  :data:`FUTURE_TOLERANCE` nats, and position k's whole distribution within a total variation of
  :data:`FUTURE_TOLERANCE`. A transform or scorer that reads the token it predicts, or a later one,
  moves them. A largest change (over the positions ≤ k) of more than that but less than
  :data:`NOISE_CHECK_BELOW` is weighed against the largest change float noise makes
  (:data:`NOISE_FACTOR`): the unchanged stream is scored again as it was (run-to-run
  noise: GPU kernels that are not bitwise deterministic) and with every weight nudged by one machine
  epsilon (rounding noise, :func:`nudged`: a pass over the changed stream may compute in other
  shapes — a scorer batches by documents, and the changed tokens move document boundaries — and
  kernels may round differently per shape, deterministically, which the rerun cannot see).
* **normalisation** — every distribution of the run's evaluation passed the runner's check
  (|log Σp| ≤ 1e-3 at every position), and at :data:`NORMALISATION_SAMPLES` sampled positions the
  distribution sums to 1 within :data:`NORMALISATION_TOLERANCE` over the whole vocabulary (float64).
* **data** — no validation shard was opened between the size estimate and the artifact on disk
  (model build, training, finalize, calibration, export), by the files the process actually
  opened (:func:`pgolf.registry.run.data.watch_opens`).
* **provenance** — the validation documents are not training documents (document hashes,
  :mod:`.provenance`); the dataset's fingerprint is recorded with the result.
* **tags** — no technique of the stack is tagged ``illegal`` or ``needs_review``.

A run is legal when every probe passes. The probes run after the score, on the first process only,
and are timed apart from the evaluation (``legality.seconds``); their cost is measured by
``bench/legality_probes.py``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..api.technique import Technique
from .data import FileWatch
from .evaluate import Scored, Violation, scored_stream
from .provenance import MAX_OVERLAP_SHARE, Provenance
from .runtime import Runtime, seed_everything

FUTURE_TOLERANCE = 1e-4
"""Largest change (nats; total variation at the cut) the future probe accepts (float noise). It is
not the smallest leak caught: lora_ttt's last-chunk window, which read where the document ends
(now fixed), moved a score of pr2135 scaled down by 1.45e-4 nats in float64 — 5.2e-5 in float32
with docs_per_batch 1 (passed), 1.02e-4 with 4 (flagged); there causal scoring moves nothing in
float32 on CPU and a nudge of the weights (:func:`nudged`) about 5e-7."""
NORMALISATION_TOLERANCE = 1e-4
"""Largest |Σp − 1| the normalisation probe accepts at a sampled position."""
NORMALISATION_SAMPLES = 64
PROBE_MAX_TOKENS = 65_536
"""The future probe's cuts lie in the first min(PROBE_MAX_TOKENS, N / PROBE_SHARE) targets."""
PROBE_SHARE = 100
FUTURE_CUTS = 3
SUGGESTION_SPANS = 4
PROBE_BATCH_WINDOWS = 8
"""Most windows per forward in the probes' passes (a pass stops after the emit holding its cut)."""
NOISE_CHECK_BELOW = 0.05
"""A change (nats; total variation at the cut) this small is compared with the float noise of the
unchanged stream: the largest change of a second pass over it (run-to-run noise: GPU kernels such as
flash attention's backward are not bitwise deterministic) and of a pass with nudged weights
(rounding noise, :func:`nudged`), both of which test-time training amplifies; it is a violation only
if it is more than :data:`NOISE_FACTOR` times that noise. A larger change is a violation as it is."""
NOISE_FACTOR = 4.0
"""How many times the measured noise a change must exceed (below :data:`NOISE_CHECK_BELOW`) to count:
a change of another rounding is not the nudge's, only of its size."""
PROBES = ("future", "normalisation", "data", "provenance", "tags")


@dataclass
class ProbeResult:
    """One probe's verdict: ``passed`` None when it could not run (the run is then not legal)."""

    probe: str
    passed: bool | None
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "message": self.message, **self.details}


@dataclass
class Legality:
    """All probes of a run; ``reasons`` lists why it is not legal (empty when it is)."""

    probes: list[ProbeResult]
    seconds: float = 0.0

    @property
    def reasons(self) -> list[str]:
        return [p.message for p in self.probes if p.passed is not True]

    @property
    def legal(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "legal": self.legal,
            "reasons": self.reasons,
            "seconds": round(self.seconds, 3),
            "probes": {p.probe: p.to_dict() for p in self.probes},
        }

    def summary(self) -> str:
        if self.legal:
            return "legal: " + "; ".join(f"{p.probe} ok" for p in self.probes)
        return "NOT LEGAL: " + " | ".join(self.reasons)


# --------------------------------------------------------------------------------------------
# tags, data, provenance
# --------------------------------------------------------------------------------------------


def tags_probe(techniques: Iterable[Technique | type[Technique]]) -> ProbeResult:
    """Fails for a technique tagged ``illegal`` or ``needs_review`` (named with its tag)."""
    bad = [(t.name, tag) for t in techniques for tag in t.legality if tag in ("illegal", "needs_review")]
    if not bad:
        return ProbeResult("tags", True, "no technique is tagged illegal or needs_review")
    why = {"illegal": "a known-invalid method, kept to show that the probes catch it",
           "needs_review": "its legality is not settled"}  # fmt: skip
    msg = "; ".join(f"technique {n!r} is tagged {tag} ({why[tag]})" for n, tag in bad)
    return ProbeResult("tags", False, f"tags: {msg}", {"tagged": {n: tag for n, tag in bad}})


def data_probe(watch: FileWatch | Mapping[str, Any] | None) -> ProbeResult:
    """Fails if a validation shard was opened during training (a watch, or its recorded dict)."""
    if watch is None:
        return ProbeResult("data", None, "data probe: the files opened during training were not recorded")
    if isinstance(watch, FileWatch):
        opened = dict(watch.validation_opened)
        shards = len(watch.shards)
    else:
        opened = {str(d["file"]): str(d.get("where", "")) for d in watch.get("validation_opened", [])}
        shards = int(watch.get("shards_opened", 0))
    details = {
        "shards_opened": shards,
        "validation_opened": [{"file": f, "where": w} for f, w in opened.items()],
    }
    if not opened:
        return ProbeResult(
            "data",
            True,
            f"no validation shard was opened during training ({shards} shard file(s) opened)",
            details,
        )
    f, w = next(iter(opened.items()))
    more = f" and {len(opened) - 1} more" if len(opened) > 1 else ""
    return ProbeResult(
        "data",
        False,
        f"data probe: validation shard {f.rsplit('/', 1)[-1]} was opened during training "
        f"(at {w or 'an unknown point'}){more}: training must not read validation data",
        details,
    )


def provenance_probe(prov: Provenance | None) -> ProbeResult:
    """Fails if the validation documents overlap the training documents beyond natural duplicates."""
    if prov is None:
        return ProbeResult("provenance", None, "provenance: the data's documents were not checked")
    ov = prov.overlap
    details = {**dataclasses.asdict(ov), "share": ov.share, "max_share": MAX_OVERLAP_SHARE,
               "seconds": round(prov.seconds, 3)}  # fmt: skip
    if ov.acceptable:
        return ProbeResult("provenance", True, ov.describe(), details)
    return ProbeResult("provenance", False, f"provenance: {ov.describe()}", details)


# --------------------------------------------------------------------------------------------
# future and normalisation: passes of the stack's own scorer over a changed stream
# --------------------------------------------------------------------------------------------


@dataclass
class Pass:
    nll: Tensor  # (until + 1,) float64: positions 0..until
    rows: dict[int, Tensor]  # position -> evaluated log-distribution (V,) float64
    violations: list[Violation]


@dataclass(frozen=True)
class RandomState:
    """The CPU (and current CUDA device's) random state, to start several passes from the same
    numbers; restoring it is much cheaper than re-seeding (which records a stack trace for CUDA's
    lazy initialisation on every call)."""

    cpu: Tensor
    cuda: Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> RandomState:
        """The state right after ``seed_everything(seed)`` (the current state is left as it was)."""
        before = cls.capture(device)
        seed_everything(seed)
        out = cls.capture(device)
        before.restore()
        return out


Fresh = Callable[[], Any]
"""Returns a fresh build (``.model``, ``.sites``) holding the artifact's weights, made right after
``seed_everything(seed)`` so every pass starts from the same state."""


def scoring_pass(
    fresh: Fresh,
    stream: Tensor,
    runtime: Runtime,
    *,
    seq_len: int,
    batch_tokens: int,
    switches: tuple[str, ...],
    until: int,
    keep: Iterable[int],
    seed: RandomState,
    last: bool = False,
) -> Pass:
    """Score ``stream`` with a fresh build until position ``until`` has been scored; the random
    state is reset to ``seed`` before scoring, so every pass draws the same numbers. ``last``: the
    factory's last use (one with a ``last()`` method hands over its pristine build)."""
    b = fresh.last() if last and hasattr(fresh, "last") else fresh()
    seed.restore()
    nll = torch.full((until + 1,), math.nan, dtype=torch.float64)
    wanted = sorted(set(keep))
    rows: dict[int, Tensor] = {}
    violations: list[Violation] = []
    for sc in scored_stream(b.model, stream, runtime, seq_len=seq_len, batch_tokens=batch_tokens,
                            sites=b.sites, switches=switches, violations=violations):  # fmt: skip
        n = sc.nll.numel()
        hi = min(sc.start + n, until + 1)
        if hi > sc.start:
            nll[sc.start : hi] = sc.nll[: hi - sc.start].double().cpu()
        here = [p for p in wanted if sc.start <= p < sc.start + n]
        if here:
            r = sc.rows()
            for p in here:
                rows[p] = r[p - sc.start].double().cpu()
        if sc.start + n > until:
            break
    return Pass(nll, rows, violations)


def probe_span(n_targets: int) -> int:
    """The targets the spread cuts lie in: min(:data:`PROBE_MAX_TOKENS`, N / :data:`PROBE_SHARE`)."""
    return max(2, min(PROBE_MAX_TOKENS, n_targets // PROBE_SHARE))


def cut_points(n_targets: int, suggested: Sequence[int], seed: int, span: int | None = None) -> list[int]:
    """Positions k of the future probe: :data:`FUTURE_CUTS` spread over the first
    span = min(:data:`PROBE_MAX_TOKENS`, N / :data:`PROBE_SHARE`) targets, with a seeded jitter so
    they do not all sit on window edges, plus the scorer's own suggestions below
    :data:`SUGGESTION_SPANS` spans (a suggestion further on would cost more than it tells)."""
    if n_targets < 1:
        return []
    span = span or probe_span(n_targets)
    rng = np.random.default_rng(seed)
    jitter = max(1, span // (4 * FUTURE_CUTS))
    cuts = {
        max(0, span * j // FUTURE_CUTS - 1 - int(rng.integers(0, jitter))) for j in range(1, FUTURE_CUTS + 1)
    }
    cuts |= {int(k) for k in suggested if int(k) < SUGGESTION_SPANS * span}
    return sorted(k for k in cuts if 0 <= k < n_targets)


def perturb_after(stream: Tensor, k: int, vocab_size: int, seed: int) -> Tensor:
    """``stream`` with every token after index k changed (to another id), the first k + 1 kept."""
    out = stream.clone()
    n = out.numel() - (k + 1)
    if n > 0:
        g = torch.Generator().manual_seed(seed + k)
        shift = torch.randint(1, vocab_size, (n,), generator=g, dtype=out.dtype)
        out[k + 1 :] = (out[k + 1 :] + shift) % vocab_size
    return out


def nudged(fresh: Fresh, seed: int) -> Fresh:
    """``fresh`` with every floating-point weight moved by one machine epsilon of its own dtype
    (relative: one or two units in the last place), up or down at random (seeded): a control for
    rounding noise. It carries no token information; like another batch shape or kernel, it changes
    the last bits of the products (float32: every product; under bf16 autocast: the few weights
    the nudge carries across a bf16 rounding boundary, about as sparse as the outputs another
    accumulation order flips), and its change of the scores measures how much the scorer (test-time
    training) amplifies that. Measured on pr2135 scaled down (tiny model, CPU, float32): 4.8e-7
    nats, where a real dependency on the next BOS moved a score by 1.0e-4."""

    def make() -> Any:
        b = fresh()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for q in b.model.parameters():
                if q.is_floating_point() and q.numel():
                    eps = torch.finfo(q.dtype).eps
                    sign = torch.randint(0, 2, q.shape, generator=g).to(q.device, q.dtype) * 2 - 1
                    q.add_(q * (eps * sign))
        return b

    return make


def total_variation(a: Tensor, b: Tensor) -> float:
    """½ Σ |p − q| of two log-distributions."""
    return float(0.5 * (a.exp() - b.exp()).abs().sum())


@dataclass(frozen=True)
class Plan:
    """Where the probes look: the future probe's cuts and the normalisation probe's samples."""

    cuts: list[int]
    samples: list[int]

    @property
    def until(self) -> int:
        return max(self.cuts)


def probe_plan(n_targets: int, suggested: Sequence[int], seed: int, span: int | None = None) -> Plan | None:
    """The cuts (:func:`cut_points`) and :data:`NORMALISATION_SAMPLES` positions drawn up to the
    last cut; None when the stream is too short to cut."""
    cuts = cut_points(n_targets, suggested, seed, span)
    if not cuts:
        return None
    rng = np.random.default_rng(seed + 1)
    return Plan(cuts, sorted({int(p) for p in rng.integers(0, max(cuts) + 1, NORMALISATION_SAMPLES)}))


class Recorder:
    """An ``inspect`` hook for :func:`~pgolf.registry.run.evaluate.evaluate`: keeps, from the
    run's own evaluation of the unchanged stream, what the probes compare against (the NLL of
    every position up to the last cut, the distributions at the cuts and samples), so the probes
    need no pass of their own over it."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.nll = torch.full((plan.until + 1,), math.nan, dtype=torch.float64)
        self.rows: dict[int, Tensor] = {}
        self._keep = sorted({*plan.cuts, *plan.samples})

    def __call__(self, sc: Scored) -> None:
        n = sc.nll.numel()
        hi = min(sc.start + n, self.plan.until + 1)
        if hi <= sc.start:
            return
        self.nll[sc.start : hi] = sc.nll[: hi - sc.start].double().cpu()
        here = [p for p in self._keep if sc.start <= p < sc.start + n]
        if here:
            r = sc.rows()
            for p in here:
                self.rows[p] = r[p - sc.start].double().cpu()

    def result(self) -> Pass | None:
        """The recorded base pass; None if some position was not seen (scored on another rank)."""
        if bool(self.nll.isnan().any()) or len(self.rows) < len(self._keep):
            return None
        return Pass(self.nll, self.rows, [])


def future_and_normalisation(
    fresh: Fresh,
    stream: Tensor,
    runtime: Runtime,
    plan: Plan | None,
    *,
    seq_len: int,
    batch_tokens: int,
    switches: tuple[str, ...],
    vocab_size: int,
    seed: int,
    base: Pass | None = None,
    eval_violations: Sequence[Violation] | None = None,
) -> tuple[ProbeResult, ProbeResult]:
    """The future and normalisation probes (see the module docstring) at ``plan``'s positions.
    ``fresh`` builds the stack's model with the artifact's weights; ``runtime`` must be a
    single-process runtime; ``base``: the unchanged stream's scores as the run's evaluation
    recorded them (:class:`Recorder`; None: a pass of its own); ``eval_violations``: what the
    runner found in that evaluation (None: not run here)."""
    if plan is None:
        skipped = ProbeResult("future", None, "future probe: the stream is too short to cut")
        return skipped, ProbeResult("normalisation", None, "normalisation probe: nothing was scored")
    stream = stream.to(torch.int64).cpu()
    until = plan.until
    start = RandomState.seeded(seed, runtime.device)
    kw = {"seq_len": seq_len, "batch_tokens": batch_tokens, "switches": switches, "seed": start}
    t0 = time.perf_counter()
    scored = 0
    if base is None:
        # every pass cut at the same emit boundaries, so transforms that learn after each emit see
        # the same prefix at every position in every pass
        kw = _batching(kw, min(plan.cuts))
        base = scoring_pass(fresh, stream, runtime, until=until, keep=[*plan.cuts, *plan.samples], **kw)  # type: ignore[arg-type]
        scored = until + 1
    else:  # the run's evaluation of a stack with no evaluation technique: nothing depends on batching
        kw = {**kw, "per_cut": True}
    future = _future(fresh, stream, runtime, base, plan.cuts, vocab_size, seed, kw)
    future.details["positions_scored"] += scored
    future.details["seconds"] = round(time.perf_counter() - t0, 3)
    norm = _normalisation(base, plan.samples, [*(eval_violations or ()), *base.violations], vocab_size,
                          eval_violations is not None)  # fmt: skip
    return future, norm


def _future(
    fresh: Fresh, stream: Tensor, runtime: Runtime, base: Pass, cuts: list[int], vocab_size: int,
    seed: int, kw: Mapping[str, Any],
) -> ProbeResult:  # fmt: skip
    details: dict[str, Any] = {"cuts": cuts, "tolerance": FUTURE_TOLERANCE, "positions_scored": 0}
    per_cut = bool(kw.get("per_cut"))
    kw = {k: v for k, v in kw.items() if k != "per_cut"}
    for k in cuts:
        changed = perturb_after(stream, k, vocab_size, seed)
        kw_k = _batching(kw, k) if per_cut else kw
        got = scoring_pass(fresh, changed, runtime, until=k, keep=[k], last=k == cuts[-1], **kw_k)
        details["positions_scored"] += k + 1
        changes = _changes(got, base, k)
        largest = _largest(changes)
        if largest <= FUTURE_TOLERANCE:
            continue
        allowed = FUTURE_TOLERANCE
        if largest < NOISE_CHECK_BELOW:  # the unchanged stream again, as it was and nudged
            again = scoring_pass(fresh, stream, runtime, until=k, keep=[k], **kw_k)
            nudge = scoring_pass(nudged(fresh, seed + k), stream, runtime, until=k, keep=[k], **kw_k)
            details["positions_scored"] += 2 * (k + 1)
            rerun, rounding = _largest(_changes(again, base, k)), _largest(_changes(nudge, base, k))
            details["rerun_noise"] = max(details.get("rerun_noise", 0.0), rerun)
            details["rounding_noise"] = max(details.get("rounding_noise", 0.0), rounding)
            details["noise"] = max(details.get("noise", 0.0), rerun, rounding)
            allowed = max(allowed, NOISE_FACTOR * max(rerun, rounding))
            if largest <= allowed:
                continue
        p = int(torch.nonzero(~(changes <= allowed))[0])  # the first that moved (a NaN did)
        change = float(changes[p])
        if p < k:
            return ProbeResult(
                "future",
                False,
                f"future probe: changing the tokens after position {k} (from token {k + 1} on) changed "
                f"the score of position {p} by {change:.3g} nats (tolerance {_allowed(allowed)}): a "
                "score depends on tokens after the position it predicts",
                {**details, "cut": k, "position": p, "change": change},
            )
        return ProbeResult(
            "future",
            False,
            f"future probe: changing the tokens after position {k} changed the distribution at "
            f"position {k} itself (total variation {change:.3g}, tolerance {_allowed(allowed)}): its "
            "scoring read the token it predicts (or a later one)",
            {**details, "cut": k, "position": k, "change": change},
        )
    return ProbeResult(
        "future",
        True,
        f"future probe: no score at or before cuts {', '.join(map(str, cuts))} moved when the "
        "tokens after them changed"
        + (
            f" (beyond {NOISE_FACTOR:g} × the float noise of the unchanged stream, up to {details['noise']:.3g})"
            if "noise" in details
            else ""
        ),
        details,
    )


def _batching(kw: Mapping[str, Any], until: int) -> dict[str, Any]:
    """``kw`` with batches of about the pass's length: a pass stops after the emit that holds its
    cut, and one forward of up to :data:`PROBE_BATCH_WINDOWS` windows covers it."""
    seq_len = int(kw["seq_len"])
    windows = max(1, min(PROBE_BATCH_WINDOWS, int(kw["batch_tokens"]) // seq_len, -(-(until + 1) // seq_len)))
    return {**kw, "batch_tokens": windows * seq_len}


def _allowed(allowed: float) -> str:
    """The tolerance a change was held to, and why when the noise set it."""
    if allowed <= FUTURE_TOLERANCE:
        return f"{FUTURE_TOLERANCE:g}"
    return f"{allowed:.3g}: {NOISE_FACTOR:g} × the float noise of the unchanged stream"


def _changes(got: Pass, base: Pass, k: int) -> Tensor:
    """The change at each position ≤ k between two passes (k + 1 values): |ΔNLL| in nats before k,
    the total variation at k; NaN where a pass has one."""
    diff = (got.nll[:k] - base.nll[:k]).abs()
    return torch.cat([diff, diff.new_tensor([total_variation(got.rows[k], base.rows[k])])])


def _largest(changes: Tensor) -> float:
    """The largest of :func:`_changes` (inf for a NaN)."""
    return float(changes.nan_to_num(nan=math.inf).max())


def _normalisation(
    base: Pass, samples: list[int], violations: Sequence[Violation], vocab_size: int, full: bool
) -> ProbeResult:
    details: dict[str, Any] = {"sampled_positions": len(samples), "tolerance": NORMALISATION_TOLERANCE}
    if violations:
        v = min(violations, key=lambda v: (v.position < 0, v.position))
        return ProbeResult(
            "normalisation",
            False,
            f"normalisation probe: {v.message.removeprefix('normalisation: ')}",
            {**details, "position": v.position, "technique": v.technique},
        )
    worst = 0.0
    for p in samples:
        row = base.rows[p]
        total = float(torch.logsumexp(row, dim=0).exp())
        err = abs(total - 1.0) if math.isfinite(total) and row.numel() == vocab_size else math.inf
        if not err <= NORMALISATION_TOLERANCE:
            return ProbeResult(
                "normalisation",
                False,
                f"normalisation probe: the distribution at position {p} sums to "
                f"{total:.6g} over its {row.numel()} entries (vocabulary {vocab_size}), not 1 within "
                f"{NORMALISATION_TOLERANCE:g}",
                {**details, "position": p, "sum": total if math.isfinite(total) else None},
            )
        worst = max(worst, err)
    details["largest_error"] = worst
    return ProbeResult(
        "normalisation",
        True,
        f"normalisation probe: {len(samples)} sampled distributions sum to 1 within "
        f"{NORMALISATION_TOLERANCE:g} (largest error {worst:.1e})"
        + ("; every distribution of the evaluation passed the runner's check" if full else ""),
        details,
    )


def single_process(runtime: Runtime) -> Runtime:
    """The same device and precision as one process (the probes run on the first rank only)."""
    return dataclasses.replace(runtime, rank=0, world_size=1, local_rank=runtime.local_rank)


def assess(probes: Sequence[ProbeResult], seconds: float = 0.0) -> Legality:
    """The run's legality from its probes (in :data:`PROBES` order)."""
    order = {name: i for i, name in enumerate(PROBES)}
    return Legality(sorted(probes, key=lambda p: order.get(p.probe, len(order))), seconds)
