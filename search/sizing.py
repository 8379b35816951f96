"""The size gate: decide, before a sample gets a GPU, whether its artifact can fit — fast.

A search over a GPU-scale space samples far more stacks than it trains (most of
``searches/baseline_h100.yaml`` cannot fit in 16,000,000 bytes). A real estimate quantizes and
compresses the whole model (``estimate_artifact_bytes``: about 1.5 s with zlib and 40–120 s with
brotli-11 for the 17 M-parameter baseline on a 2-core CPU), so the gate works in layers,
cheapest first, and records which layer decided (``method``):

``cached``    the model's **layout** was sized before. The layout is what decides the compressed
              model's size: every state entry of the model built on the meta device (name,
              shape, dtype, role), the parameters of every technique that takes part in export
              (the quantizer, the codec, any hook this module does not know to be harmless) and
              the seed of the surrogate weights. Learning rates, EMA decay, an activation's slope
              or an attention variant without weights do not enter it. The code bytes are
              counted per stack (milliseconds). Exact: the same bytes the real estimate gives.
``analytic``  no estimate yet for this layout, but real estimates of the same export settings
              on layouts of the same make-up give bytes per parameter: a sample whose lower
              bound — the smallest such ratio × its parameter count × (1 − ``slack``) + code +
              margin — is over the limit is rejected in milliseconds. Never used to accept a
              sample. "Same make-up": the share of elements per (role, dtype, size class of the
              tensor: ⌊log2 numel⌋) differs by at most ``max_profile_distance`` (total
              variation), because a quantizer treats small and large tensors differently (fp16
              passthrough vs int8), so bytes per parameter of a width-64 model say nothing about
              a width-512 one.
``proxy``     the export's codec is slow (its real estimates took ≥ ``proxy_after_seconds``):
              the stack is estimated with the codec slot's default codec instead and scaled by
              the real/proxy ratio measured on earlier samples of the same export settings. Used
              only when the prediction is clear of the limit by ``proxy_band`` (or 3× the spread
              of the measured ratios, whichever is larger); a close call gets a real estimate.
``exact``     ``estimate_artifact_bytes``: the stack's real quantizer and codec on surrogate
              weights.

Estimates run as jobs: in the driver (``workers=0``; tests, ``--dry-run --workers 0``) or as Ray
tasks in parallel while the GPUs train (see :class:`RayRunner`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.registry import HOOKS, SITES
from pgolf.registry.api.config import ResolvedStack, stack_from_dict
from pgolf.registry.run.pipeline import build, estimate_artifact_bytes

# Hooks whose parameters cannot change the size *estimate*: the model plan's hooks act through
# the layout (which is in the key), the optimizer, schedule, data, training and evaluation hooks
# change weight values (which the estimate replaces by surrogate draws) or nothing stored. Every
# export hook, and any hook of a plan added later, puts its technique's parameters into the key:
# an unknown hook costs cache hits, never a wrong size.
LAYOUT_HOOKS = frozenset(h.name for s in SITES.values() if s.plan == "model" for h in s.hooks)
TRAINING_HOOKS = frozenset(
    h.name
    for s in SITES.values()
    if s.plan in ("optimizer", "schedule", "data", "train", "eval")
    for h in s.hooks
)
CODEC_SLOT = "codec"

METHODS = ("cached", "analytic", "proxy", "exact")


def size_relevant(cls: type) -> bool:
    """Whether a technique's parameters can change the artifact size estimate."""
    hooks = getattr(cls, "hooks", {}) or {}
    return any(h not in LAYOUT_HOOKS and h not in TRAINING_HOOKS for h in hooks)


def codec_technique(rs: ResolvedStack) -> str | None:
    """The technique the stack names explicitly for the codec slot (None: the slot default)."""
    for r in rs.techniques:
        if not r.implicit and any(getattr(HOOKS.get(h), "site", None) == CODEC_SLOT for h in r.cls.hooks):
            return r.name
    return None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Layout:
    """What decides the size of a stack's compressed model (see the module docstring)."""

    key: str  # layout + export settings + surrogate seed
    export_key: str  # export settings only: the group that shares bytes-per-parameter ratios
    params: int  # elements of every floating-point state entry
    seconds: float
    profile: tuple[tuple[str, float], ...] = ()  # share of elements per (role, dtype, log2 size)


def profile_distance(a: Iterable[tuple[str, float]], b: Iterable[tuple[str, float]]) -> float:
    """Total variation distance between two layouts' element shares (0 = same make-up, 1 = disjoint)."""
    da, db = dict(a), dict(b)
    return 0.5 * sum(abs(da.get(k, 0.0) - db.get(k, 0.0)) for k in set(da) | set(db))


def layout(rs: ResolvedStack) -> Layout:
    """The size key of a stack, from its model built on the meta device (milliseconds)."""
    import torch

    from pgolf.registry.api.roles import param_infos

    t0 = time.perf_counter()
    model = build(rs, torch.device("meta")).model
    roles = {k: f"{i.role.value}:{i.kind.value}" for k, i in param_infos(model).items()}
    entries = [
        (name, list(t.shape), str(t.dtype).removeprefix("torch."), roles.get(name, ""))
        for name, t in model.state_dict().items()
    ]
    n = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    shares: dict[str, float] = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel():
            cls = f"{roles.get(name, '-')}/{str(t.dtype).removeprefix('torch.')}/{t.numel().bit_length() - 1}"
            shares[cls] = shares.get(cls, 0.0) + t.numel() / max(n, 1)
    export = [
        rs.stack.export.model_dump(mode="json"),
        sorted((r.name, r.params.model_dump(mode="json")) for r in rs.techniques if size_relevant(r.cls)),
    ]
    return Layout(
        key=_digest([entries, export, rs.stack.seed]),
        export_key=_digest(export),
        params=int(n),
        seconds=time.perf_counter() - t0,
        profile=tuple(sorted((k, round(v, 6)) for k, v in shares.items())),
    )


@dataclass(frozen=True)
class Estimate:
    """A size decision for one sample. ``total`` = model + code + margin bytes."""

    model_bytes: int
    code_bytes: int
    margin: int
    limit: int
    seconds: float  # the estimate's own cost (the job's time; ms for cached/analytic)
    method: str
    key: str = ""
    export_key: str = ""
    params: int = 0
    detail: str = ""
    bound: bool = False  # model_bytes is a lower bound (analytic), not an estimate
    profile: tuple[tuple[str, float], ...] = ()

    @property
    def total(self) -> int:
        return self.model_bytes + self.code_bytes + self.margin

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_bytes": self.model_bytes,
            "code_bytes": self.code_bytes,
            "margin": self.margin,
            "total": self.total,
            "limit": self.limit,
            "seconds": round(self.seconds, 3),
            "method": self.method,
            "key": self.key,
            "export_key": self.export_key,
            "params": self.params,
            "profile": [list(x) for x in self.profile],
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass
class Job:
    """An estimate to compute: the stack (or its proxy) as plain data."""

    kind: str  # "exact" | "proxy"
    stack: dict[str, Any]
    base_dir: str
    layout: Layout
    rs: ResolvedStack = field(repr=False)
    started: float = field(default_factory=time.perf_counter)


def compute(stack: Mapping[str, Any], base_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Run one estimate (in a Ray task or the driver): model bytes, code bytes and seconds."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    rs = stack_from_dict(stack, source="size estimate", base_dir=Path(base_dir))
    est = estimate_artifact_bytes(rs)
    return {"model_bytes": est.model_bytes, "code_bytes": est.code_bytes, "seconds": est.seconds}


@dataclass
class _Group:
    """What real estimates taught about one export configuration."""

    ratios: list[tuple[tuple[tuple[str, float], ...], float]] = field(
        default_factory=list
    )  # (profile, bytes/param)
    proxy: list[float] = field(default_factory=list)  # real / proxy model bytes
    seconds: list[float] = field(default_factory=list)  # real estimate times


class SizeGate:
    """The layered size decision (module docstring); the caller runs the jobs it asks for."""

    def __init__(
        self,
        limit: int,
        margin: int = 0,
        *,
        slack: float = 0.10,
        max_profile_distance: float = 0.15,
        proxy_after_seconds: float = 5.0,
        proxy_band: float = 0.01,
        min_proxy_pairs: int = 2,
    ):
        self.limit, self.margin = limit, margin
        self.slack, self.proxy_after_seconds = slack, proxy_after_seconds
        self.max_profile_distance = max_profile_distance
        self.proxy_band, self.min_proxy_pairs = proxy_band, min_proxy_pairs
        self.cache: dict[str, int] = {}  # layout key -> real model bytes
        self.groups: dict[str, _Group] = {}
        self.counts: dict[str, int] = dict.fromkeys(METHODS, 0)

    # -- learning ---------------------------------------------------------------------------
    def learn(self, lay: Layout, model_bytes: int, seconds: float | None = None) -> None:
        """Record a real estimate (also used to seed the gate from a resumed study's ledger)."""
        self.cache[lay.key] = model_bytes
        g = self.groups.setdefault(lay.export_key, _Group())
        if lay.params > 0 and lay.profile:
            g.ratios.append((lay.profile, model_bytes / lay.params))
        if seconds is not None:
            g.seconds.append(seconds)

    def seed_from(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Re-learn the exact estimates a study's ledger holds; returns how many."""
        n = 0
        for rec in records:
            est = rec.get("estimate") or {}
            if est.get("method", "exact") == "exact" and est.get("key") and est.get("params"):
                prof = tuple((str(k), float(v)) for k, v in est.get("profile") or [])
                lay = Layout(str(est["key"]), str(est.get("export_key", "")), int(est["params"]), 0.0, prof)
                self.learn(lay, int(est["model_bytes"]), est.get("seconds"))
                n += 1
        return n

    # -- deciding --------------------------------------------------------------------------
    def code_bytes(self, rs: ResolvedStack, model_bytes: int) -> int:
        return estimate_artifact_bytes(rs, model_bytes=model_bytes).code_bytes

    def _est(self, lay: Layout, model: int, code: int, seconds: float, method: str, **kw: Any) -> Estimate:
        self.counts[method] = self.counts.get(method, 0) + 1
        return Estimate(
            model,
            code,
            self.margin,
            self.limit,
            seconds,
            method,
            lay.key,
            lay.export_key,
            lay.params,
            profile=lay.profile,
            **kw,
        )

    def fast(self, rs: ResolvedStack, lay: Layout) -> Estimate | None:
        """A decision without any export: cached (exact) or an analytic rejection; else None."""
        t0 = time.perf_counter()
        if lay.key in self.cache:
            model = self.cache[lay.key]
            code = self.code_bytes(rs, model)
            return self._est(lay, model, code, time.perf_counter() - t0 + lay.seconds, "cached")
        g = self.groups.get(lay.export_key)
        near = [
            r
            for prof, r in (g.ratios if g else [])
            if profile_distance(prof, lay.profile) <= self.max_profile_distance
        ]
        if near and lay.params > 0:
            bound = int(min(near) * lay.params * (1.0 - self.slack))
            code = self.code_bytes(rs, bound)
            if bound + code + self.margin > self.limit:
                return self._est(
                    lay,
                    bound,
                    code,
                    time.perf_counter() - t0 + lay.seconds,
                    "analytic",
                    bound=True,
                    detail=f"≥ {min(near):.4f} bytes/parameter × {lay.params:,} × (1 − {self.slack:g})",
                )
        return None

    def job(self, rs: ResolvedStack, lay: Layout) -> Job:
        """The estimate to run for a sample the fast path could not decide."""
        data = rs.to_dict()
        g = self.groups.get(lay.export_key)
        codec = codec_technique(rs)
        slow = g is not None and g.seconds and statistics.median(g.seconds) >= self.proxy_after_seconds
        if codec is not None and slow and len(g.proxy if g else []) >= self.min_proxy_pairs:
            proxy = copy.deepcopy(data)
            proxy["techniques"].pop(codec)
            return Job("proxy", proxy, str(rs.base_dir), lay, rs)
        return Job("exact", data, str(rs.base_dir), lay, rs)

    def calibration_job(self, job: Job) -> Job | None:
        """After a slow real estimate of a stack with its own codec: the same stack with the
        default codec, to measure the real/proxy ratio (None when not needed)."""
        g = self.groups.get(job.layout.export_key)
        codec = codec_technique(job.rs)
        if job.kind != "exact" or codec is None or g is None or not g.seconds:
            return None
        if statistics.median(g.seconds) < self.proxy_after_seconds or len(g.proxy) >= self.min_proxy_pairs:
            return None
        proxy = copy.deepcopy(job.stack)
        proxy["techniques"].pop(codec)
        return Job("calibrate", proxy, job.base_dir, job.layout, job.rs)

    def absorb(self, job: Job, result: Mapping[str, Any]) -> Estimate | Job | None:
        """Turn a finished job into a decision, or the next job (a proxy too close to call);
        None for a calibration job (it decides nothing)."""
        seconds = float(result["seconds"])
        model = int(result["model_bytes"])
        if job.kind == "exact":
            self.learn(job.layout, model, seconds)
            return self._est(job.layout, model, int(result["code_bytes"]), seconds, "exact")
        g = self.groups.setdefault(job.layout.export_key, _Group())
        if job.kind == "calibrate":
            real = self.cache.get(job.layout.key)
            if real:
                g.proxy.append(real / max(model, 1))
            return None
        ratio = statistics.fmean(g.proxy)
        spread = (max(g.proxy) - min(g.proxy)) / ratio if len(g.proxy) > 1 else 0.0
        band = max(self.proxy_band, 3.0 * spread)
        predicted = int(model * ratio)
        code = self.code_bytes(job.rs, predicted)
        lo = predicted * (1 - band) + code + self.margin
        hi = predicted * (1 + band) + code + self.margin
        if lo > self.limit or hi <= self.limit:
            return self._est(
                job.layout,
                predicted,
                code,
                seconds,
                "proxy",
                detail=f"default codec {model:,} bytes × {ratio:.5f} (± {band:.2%})",
            )
        return Job("exact", job.rs.to_dict(), job.base_dir, job.layout, job.rs)


# --------------------------------------------------------------------------------------------
# Running jobs
# --------------------------------------------------------------------------------------------


class InlineRunner:
    """Runs each job in the calling process, at once (``workers: 0``)."""

    parallel = False  # the driver sizes one sample ahead, not several

    def __init__(self) -> None:
        self._done: list[tuple[Job, dict[str, Any] | BaseException]] = []

    @property
    def busy(self) -> int:
        return 0

    def capacity(self) -> int:
        return 1

    def submit(self, job: Job) -> None:
        try:
            self._done.append((job, compute(job.stack, job.base_dir)))
        except Exception as e:
            self._done.append((job, e))

    def poll(self, timeout: float = 0.0) -> list[tuple[Job, dict[str, Any] | BaseException]]:
        out, self._done = self._done, []
        return out

    def cancel_all(self) -> list[Job]:
        return []


class RayRunner:
    """Runs jobs as Ray tasks, at most ``workers`` at once. A task reserves no CPU (it uses one
    torch thread), so estimates never queue behind trials that hold every CPU of a node."""

    parallel = True

    def __init__(self, workers: int):
        import ray

        self.workers = max(1, workers)
        self._remote = ray.remote(num_cpus=0, max_retries=0)(compute)
        self._pending: dict[Any, Job] = {}

    @property
    def busy(self) -> int:
        return len(self._pending)

    def capacity(self) -> int:
        return self.workers - len(self._pending)

    def submit(self, job: Job) -> None:
        ref = self._remote.remote(job.stack, job.base_dir, 1)
        self._pending[ref] = job

    def poll(self, timeout: float = 0.0) -> list[tuple[Job, dict[str, Any] | BaseException]]:
        import ray

        if not self._pending:
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout)
        out: list[tuple[Job, dict[str, Any] | BaseException]] = []
        for ref in ready:
            job = self._pending.pop(ref)
            try:
                out.append((job, ray.get(ref)))
            except Exception as e:  # the task raised: the stack cannot be built or exported
                cause = getattr(e, "cause", None)
                out.append((job, cause if isinstance(cause, BaseException) else e))
        return out

    def cancel_all(self) -> list[Job]:
        import ray

        jobs = list(self._pending.values())
        for ref in self._pending:
            ray.cancel(ref, force=True)
        self._pending.clear()
        return jobs


Runner = InlineRunner | RayRunner


def make_runner(workers: int) -> Runner:
    return RayRunner(workers) if workers > 0 else InlineRunner()


def describe(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{counts[m]} {m}" for m in METHODS if counts.get(m))
