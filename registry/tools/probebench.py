"""The evaluation library and the legality probes on a tiny model trained on CPU: scores, verdicts
and what the probes cost.

One training run of the library file's ``base`` stack (``bench/eval_library.yaml``) on the
embedded default corpus, through :func:`pgolf.registry.run.pipeline.run` (so its data probe and
provenance are the real ones); then its artifact is scored with every ``variants`` entry (merged
into the base stack) by :func:`~pgolf.registry.run.pipeline.score_artifact` and probed by
:func:`~pgolf.registry.run.pipeline.check_legality` — the functions a run uses — and a variant
marked ``train: true`` runs the whole pipeline. Per variant: val_bpb and its change against
``plain``, evaluation seconds and probe seconds (wall clock and process CPU time; the probes' share
of the evaluation is taken on CPU time, which other processes on a shared machine disturb less),
the verdict, each probe's message, and whether the variant met its ``expect``ation.

Used by ``bench/legality_probes.py`` (figures into ``bench/legality_probes.json``) and by
``tests/test_eval_library.py``. Tooling: not part of a stack's counted code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from ..api.config import ResolvedStack, _merge_stack, stack_from_dict
from ..api.errors import PgolfError
from ..run.pipeline import (
    DataSource,
    artifact_builds,
    check_legality,
    prepare_data,
    probe_recorder,
    run,
    score_artifact,
)
from ..run.runtime import make_runtime, shutdown

LIBRARY = Path(__file__).resolve().parents[2] / "bench" / "eval_library.yaml"
TOLERANCE_BPB = 2e-4
"""A legal variant may be this much worse than plain windows and still count as keeping val_bpb."""


@dataclass
class VariantResult:
    name: str
    val_bpb: float
    val_loss: float
    delta_bpb: float  # against plain windows
    eval_seconds: float
    eval_cpu_seconds: float
    probe_seconds: float
    probe_cpu_seconds: float
    legal: bool
    reasons: list[str]
    probes: dict[str, Any]
    expected_legal: bool
    expected_probe: str | None
    met: bool  # the verdict (and for legal variants val_bpb) is what ``expect`` says
    note: str = ""

    @property
    def probe_share(self) -> float:
        return self.probe_cpu_seconds / max(self.eval_cpu_seconds, 1e-9)


@dataclass
class Library:
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    folder: Path
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> keys, on every stack

    def stack(self, name: str) -> ResolvedStack:
        v = {k: x for k, x in self.variants[name].items() if k not in ("expect", "train")}
        data = _merge_stack(self.base, v)
        for section, values in self.overrides.items():
            data[section] = {**data.get(section, {}), **values}
        return stack_from_dict({**data, "name": f"{self.base.get('name', 'tiny')}-{name}"},
                               source=f"{self.folder / 'eval_library.yaml'}:{name}", base_dir=self.folder)  # fmt: skip


def load_library(path: Path = LIBRARY) -> Library:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("variants"), dict)
        or "plain" not in raw["variants"]
    ):
        raise PgolfError(f"{path}: needs `base` and `variants` (with a `plain` entry)")
    return Library(dict(raw.get("base") or {}), {k: dict(v or {}) for k, v in raw["variants"].items()},
                   Path(path).resolve().parent)  # fmt: skip


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


@dataclass
class Trained:
    """The base run: its folder, data and recorded legality."""

    out: Path
    source: DataSource
    result: dict[str, Any]
    seconds: float


def train_base(lib: Library, out: Path) -> Trained:
    """Train, export and score the base stack once (its ``plain`` variant)."""
    rs = lib.stack("plain")
    source = prepare_data(rs.stack)
    out.mkdir(parents=True, exist_ok=True)
    res, wall, _ = _timed(lambda: run(rs, out, source=source, estimate=False))
    return Trained(out, source, res.to_dict(), wall)


def score_variant(
    lib: Library, name: str, trained: Trained, plain_bpb: float | None, repeats: int = 1
) -> VariantResult:
    """Score the base run's artifact with variant ``name`` and probe it (``train: true``: a full
    run); seconds are the median of ``repeats``."""
    spec = lib.variants[name]
    expect = spec.get("expect") or {}
    rs = lib.stack(name)
    artifact = trained.out / "model.ptz"
    if spec.get("train"):
        out = trained.out.parent / f"{trained.out.name}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        res, wall, _ = _timed(lambda: run(rs, out, source=trained.source, estimate=False))
        r = res.to_dict()
        return _result(name, r["val_bpb"], r["val_loss"], plain_bpb, r["eval_seconds"], r["eval_seconds"],
                       r["legality"]["seconds"], r["legality"]["seconds"], bool(r["legal"]), list(r["legal_reasons"]),
                       r["legality"]["probes"], expect, note=f"a full run with training ({wall:.1f}s)")  # fmt: skip
    runtime = make_runtime(rs.stack.train)
    try:
        val, lut = trained.source.validation(rs.stack.model.vocab_size)
        evals: list[tuple[float, float]] = []
        probes_t: list[tuple[float, float]] = []
        for _ in range(max(1, repeats)):
            # as a run does: the artifact is read once, for the evaluation and the probes
            (fresh, rec, ev), w, c = _timed(
                partial(_evaluation, rs, artifact, runtime, trained.source, val, lut)
            )
            evals.append((w, c))
            # every probe, the data probe as the base run recorded it
            recorded = trained.result.get("legality", {}).get("probes", {})
            data_probe, prov = recorded.get("data"), trained.source.provenance
            verdict, pw, pc = _timed(
                partial(check_legality, rs, artifact, runtime, val, ev, data_probe, prov, fresh, rec)
            )
            probes_t.append((pw, pc))
    finally:
        shutdown(runtime)

    def med(xs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(x[i] for x in xs)

    return _result(name, ev.val_bpb, ev.val_loss, plain_bpb, med(evals, 0), med(evals, 1), med(probes_t, 0),
                   med(probes_t, 1), verdict.legal, verdict.reasons, verdict.to_dict()["probes"], expect)  # fmt: skip


def _evaluation(
    rs: ResolvedStack, artifact: Path, runtime: Any, source: DataSource, val: Any, lut: Any
) -> Any:
    """The run's evaluation phase: the artifact read once, scored, the probes' base recorded."""
    fresh = artifact_builds(rs, artifact, runtime, rs.stack.seed)
    recorder = probe_recorder(rs, val)
    ev = score_artifact(rs, artifact, runtime, source, validation=(val, lut), fresh=fresh, inspect=recorder)
    return fresh, recorder, ev


def _result(name: str, bpb: float, loss: float, plain: float | None, ew: float, ec: float, pw: float,
            pc: float, legal: bool, reasons: list[str], probes: dict[str, Any], expect: Mapping[str, Any],
            note: str = "") -> VariantResult:  # fmt: skip
    want_legal = bool(expect.get("legal", True))
    want_probe = expect.get("probe")
    delta = bpb - plain if plain is not None else 0.0
    if want_legal:
        met = legal and (delta <= TOLERANCE_BPB or not expect.get("keeps_bpb", True))
    else:  # the expected probe failed, naming itself and where (a position, or the phase and step)
        p = probes.get(str(want_probe)) or {}
        msg = str(p.get("message", ""))
        met = (
            not legal
            and p.get("passed") is False
            and str(want_probe) in msg
            and ("position" in msg or "(at " in msg)
        )
    return VariantResult(name, bpb, loss, delta, ew, ec, pw, pc, legal, reasons, probes, want_legal,
                         want_probe, bool(met), note)  # fmt: skip


@dataclass
class Report:
    train_seconds: float
    variants: list[VariantResult] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_seconds": round(self.train_seconds, 2),
            "provenance": self.provenance,
            "variants": [{**asdict(v), "probe_share": round(v.probe_share, 4)} for v in self.variants],
        }


def provenance_cost(tokens: int, folder: Path, doc_tokens: int = 1000) -> dict[str, Any]:
    """Seconds to fingerprint and hash the documents of a synthetic shard of ``tokens`` tokens
    (a document every ``doc_tokens``) on this machine: what checking a dataset costs per token."""
    import numpy as np

    from ..run import data, provenance

    rng = np.random.default_rng(0)
    toks = rng.integers(2, 1024, tokens, dtype=np.uint16)
    toks[::doc_tokens] = 1
    path = folder / "fineweb_train_000000.bin"
    data.write_shard(path, toks)
    provenance._shard.cache_clear()
    _, wall, cpu = _timed(lambda: provenance.shard_documents(path, 1))
    path.unlink()
    return {"tokens": tokens, "documents": -(-tokens // doc_tokens), "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3), "seconds_per_100M_tokens": round(wall * 1e8 / tokens, 2)}  # fmt: skip
