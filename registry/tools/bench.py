"""``pgolf bench``: how fast a stack trains, evaluates and exports on one device.

The benchmark needs no full training. It resolves the stack, prepares the data, builds the
runtime, the model and the :class:`~pgolf.registry.train.Trainer` with the same core functions
:func:`pgolf.registry.run.run` uses, runs the trainer's compile warm-up, and then measures

* training: ``--steps`` real optimizer steps over the stack's global batch (gradient
  accumulation as on one GPU), timed per step with CUDA events (or ``perf_counter`` on CPU);
  tokens/s = ``train_batch_tokens`` / step time; ms/step mean, median, min, std;
* MFU = :func:`~pgolf.registry.model.model_flops_per_token` × tokens/s / the device's dense
  bf16 peak (null on CPU and unknown devices);
* peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (process max RSS on CPU);
* evaluation tokens/s: :func:`~pgolf.registry.evaluate.evaluate` on the first ``--eval-tokens``
  validation tokens, with the model ``run()`` evaluates (the uncompiled one);
* export seconds: quantize + pack (:func:`~pgolf.registry.export.pack`) and compress
  (:func:`~pgolf.registry.export.compress`), with their byte counts;
* a breakdown of the step into attention, MLP, optimizer, data and other (see
  :func:`breakdown_from_events` for the method and :data:`LINKAGE_ERROR` /
  :data:`ISOLATION_ERROR` for its known error);
* with ``--techniques``, the cost of each technique: the same stack with that one technique
  added (default params), tokens/s with and without it.

Every figure goes into ``OUT/results/<date>-<device>-<stack>.json`` and ``OUT/README.md`` is
regenerated from all the results files there (``--out OUT``, default ``pgolf-bench`` in the current
folder; the repository's own table is ``--out bench``). The profiler's native log lines are kept
off the console. This module is tooling: it is not part of a stack's counted code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import re
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api.config import ResolvedStack, stack_from_dict
from ..api.errors import PgolfError, did_you_mean, os_error_text
from ..api.technique import REGISTRY
from ..run.model import MLP, Attention, count_params, model_flops_per_token

SCHEMA = "pgolf-bench/1"
DEFAULT_OUT = "pgolf-bench"
REFERENCE_TOKENS_PER_SECOND = 1_505_000.0
"""The challenge baseline: 524,288 tokens per 43.54 ms step on 8×H100 SXM = 1.505 M tokens/s per GPU."""
TARGET_TOKENS_PER_SECOND = 2_000_000.0
"""pgolf's goal for the baseline stack on one H100 (issue 4)."""

REGIONS = ("attention", "mlp", "optimizer", "data", "other")
STEP_RANGE = "pgolf::step"
RANGES = {
    "pgolf::attention": "attention",
    "pgolf::mlp": "mlp",
    "pgolf::optimizer": "optimizer",
    "pgolf::data": "data",
}
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by device name; the first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("GH200", 989.0, "GH200 (H100/H200 SXM class)"),
    ("H200", 989.0, "H200 SXM"),
    ("H100 PCIE", 756.0, "H100 PCIe"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H100", 989.0, "H100 SXM"),
    ("A100", 312.0, "A100"),
)

LINKAGE_ERROR = (
    "Method 'linkage' (eager steps): forward ops inside the attention/MLP modules are found through "
    "record_function ranges opened by forward pre/post hooks on the real modules; each backward node "
    "('autograd::engine::evaluate_function: X') is given the region of the forward op that created it "
    "(same autograd sequence_nr on the same forward thread; the creating op is the last one recorded with "
    "that number). On CUDA every kernel goes to the region of the CPU op that launched it (profiler "
    "correlation id) and the device timeline of each profiled step is split between regions, the idle gap "
    "before a kernel going to that kernel's region (launch overhead is charged to whoever launches late). "
    "On CPU the regions are the CPU time of their ranges and backward nodes; the rest of the step is "
    "'other'. Known error: gradient accumulation into .grad (AccumulateGrad nodes, no sequence number) and "
    "the rms_norm/residual/scale ops around the sublayers (they live in Block.forward) count as 'other'; "
    "profiler overhead lengthens launch-bound (eager) steps, so profiled ms/step exceeds the timed one; a "
    "gap caused by host work of one region but followed by another region's kernel is charged to the "
    "latter."
)
ISOLATION_ERROR = (
    "Method 'isolation' (compiled steps, where torch.compile erases module boundaries and the whole "
    "backward is one CompiledFunctionBackward node): the optimizer and data regions come from "
    "record_function ranges around OptimizerSet.step/zero_grad and loader.next_batch in the real compiled "
    "step (device timeline as in 'linkage'); attention and MLP are the forward + backward (input and "
    "weight gradients, torch.autograd.grad, .grad untouched) of each layer's real Attention / MLP module, "
    "compiled on its own with the step's settings and timed with CUDA events on inputs of the real "
    "micro-batch shape and dtype, times the gradient-accumulation count; 'other' is the profiled step "
    "minus the four. Known error: fusions across the sublayer boundary inside the full graph, and overlap "
    "with neighbouring work, are not reproduced in isolation (typically a few percent of a sublayer); if "
    "the parts sum to more than the step, 'other' is clamped at 0 and the fractions are renormalised "
    "(flagged in 'notes')."
)


# --------------------------------------------------------------------------------------------
# devices and figures
# --------------------------------------------------------------------------------------------


def peak_bf16_flops(device_name: str, device_type: str) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, note) for a device name; (None, why) on CPU or an unknown GPU."""
    if device_type != "cuda":
        return None, "MFU is not computed on CPU (no meaningful bf16 tensor-core peak)"
    upper = device_name.upper()
    for key, tflops, label in PEAK_BF16_TFLOPS:
        if key in upper:
            return tflops * 1e12, f"peak {tflops:g} TFLOP/s dense bf16 ({label})"
    return None, f"unknown peak FLOP/s for device {device_name!r}; MFU not computed"


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "peak_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "kind": "torch.cuda.max_memory_allocated over the timed steps",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
    return {
        "peak_bytes": rss_bytes,
        "peak_reserved_bytes": None,
        "kind": "process max RSS (CPU; covers the whole process lifetime, not only the timed steps)",
    }


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------
# step-time breakdown: profiler events -> regions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """An interval (µs) of the timeline spent in one region."""

    start: float
    end: float
    region: str


def attribute_timeline(
    window: tuple[float, float], spans: Sequence[Span], *, gaps_to_next: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Split ``window`` (µs) between regions: (busy per region, gap per region).

    Spans are taken in start order; time covered by several spans counts once, for the first.
    An uncovered gap before a span goes to that span's region when ``gaps_to_next`` (a device
    waiting for the host to launch the next kernel) and to ``other`` otherwise (host code
    outside every region); the tail after the last span is ``other``. The busy and gap times of
    all regions add up to the window length exactly.
    """
    w0, w1 = window
    busy = dict.fromkeys(REGIONS, 0.0)
    gaps = dict.fromkeys(REGIONS, 0.0)
    cursor = w0
    for s in sorted(spans, key=lambda s: (s.start, s.end)):
        start, end = max(s.start, w0), min(s.end, w1)
        if end <= cursor:
            continue
        if start > cursor:
            gaps[s.region if gaps_to_next else "other"] += start - cursor
            cursor = start
        busy[s.region] += end - cursor
        cursor = end
    gaps["other"] += max(0.0, w1 - cursor)
    return busy, gaps


def _is_cpu(e: Any) -> bool:
    return getattr(e.device_type, "name", str(e.device_type)).upper().endswith("CPU")


def _is_annotation(e: Any) -> bool:
    """A profiler range mirrored on the device timeline (gpu_user_annotation), not a kernel."""
    return bool(
        getattr(e, "is_user_annotation", False)
        or "annotation" in str(getattr(e, "activity_type", "") or "").lower()
        or e.name in RANGES
        or e.name == STEP_RANGE
    )


def _range_region(e: Any) -> str | None:
    """The region of the innermost pgolf range around ``e`` (itself included), if any."""
    p = e
    while p is not None:
        r = RANGES.get(p.name)
        if r is not None:
            return r
        p = p.cpu_parent
    return None


def _backward_node(e: Any) -> Any | None:
    p = e
    while p is not None:
        if p.name.startswith(BACKWARD_PREFIX):
            return p
        p = p.cpu_parent
    return None


class RegionResolver:
    """Region of any CPU event: its innermost pgolf range, else (for backward work) the region
    of the forward op whose autograd node it runs."""

    def __init__(self, cpu_events: Iterable[Any]):
        last: dict[tuple[int, int], tuple[float, str | None]] = {}
        for e in cpu_events:
            if e.sequence_nr < 0 or e.name.startswith(BACKWARD_PREFIX) or _backward_node(e) is not None:
                continue
            key = (e.thread, e.sequence_nr)
            start = e.time_range.start
            # the op that created autograd node n is the last forward op recorded with number n
            if key not in last or start >= last[key][0]:
                last[key] = (start, _range_region(e))
        self.forward = {k: r for k, (_, r) in last.items() if r in ("attention", "mlp")}

    def backward_region(self, node: Any) -> str | None:
        return self.forward.get((node.fwd_thread, node.sequence_nr))

    def region(self, e: Any) -> str | None:
        r = _range_region(e)
        if r is not None:
            return r
        node = _backward_node(e)
        return self.backward_region(node) if node is not None else None


def breakdown_from_events(events: Sequence[Any], *, device: str) -> dict[str, Any]:
    """Per-step milliseconds of each region from ``torch.profiler`` events of steps wrapped in
    ``pgolf::step`` ranges (each ending with a device synchronisation).

    ``device="cuda"``: the device timeline (kernels, copies) of each step is split between
    regions (:func:`attribute_timeline` with gaps charged to the next kernel's region); a kernel
    belongs to the region of the CPU op that launched it. ``device="cpu"``: the CPU time of the
    regions' ranges and backward nodes; all other host time is ``other``.
    """
    cpu = [e for e in events if _is_cpu(e) and not e.is_async]
    windows = sorted((e.time_range.start, e.time_range.end) for e in cpu if e.name == STEP_RANGE)
    if not windows:
        raise PgolfError("profiler trace has no pgolf::step range; cannot attribute step time")
    resolver = RegionResolver(cpu)
    spans: list[Span] = []
    unlinked = 0
    n_kernels = 0
    if device == "cuda":
        by_id = {e.id: e for e in cpu if not getattr(e, "linked_correlation_id", 0)}
        # fallback for kernels whose op the profiler merged into its same-named parent
        # (EventList._remove_dup_nodes lifts the kernels, but the child's id is gone)
        by_kernel = {(kk.name, round(kk.duration, 3)): e for e in cpu for kk in getattr(e, "kernels", ())}
        for k in events:
            if _is_cpu(k) or _is_annotation(k):
                continue
            n_kernels += 1
            op = by_id.get(getattr(k, "linked_correlation_id", 0))
            if op is None:
                op = by_kernel.get((k.name, round(k.time_range.end - k.time_range.start, 3)))
            if op is None:
                unlinked += 1
            region = (resolver.region(op) if op is not None else None) or "other"
            spans.append(Span(k.time_range.start, k.time_range.end, region))
        gaps_to_next = True
    else:
        for e in cpu:
            region = None
            if e.name in RANGES:
                region = RANGES[e.name]
            elif e.name.startswith(BACKWARD_PREFIX):
                region = resolver.backward_region(e)
            if region is not None:
                spans.append(Span(e.time_range.start, e.time_range.end, region))
        gaps_to_next = False
    busy = dict.fromkeys(REGIONS, 0.0)
    gaps = dict.fromkeys(REGIONS, 0.0)
    for w in windows:
        inside = [s for s in spans if w[0] <= s.start < w[1]]
        b, g = attribute_timeline(w, inside, gaps_to_next=gaps_to_next)
        for r in REGIONS:
            busy[r] += b[r]
            gaps[r] += g[r]
    n = len(windows)
    step_ms = sum(w1 - w0 for w0, w1 in windows) / n / 1000.0
    ms = {r: (busy[r] + gaps[r]) / n / 1000.0 for r in REGIONS}
    detail: dict[str, Any] = {
        "profiled_steps": n,
        "busy_ms": {r: busy[r] / n / 1000.0 for r in REGIONS},
        "gap_ms": {r: gaps[r] / n / 1000.0 for r in REGIONS},
        "linked_backward_ops": len(resolver.forward),
    }
    if device == "cuda":
        detail["kernels_per_step"] = n_kernels / n
        detail["unlinked_kernels_per_step"] = unlinked / n
        detail["device_busy_fraction"] = sum(busy.values()) / max(
            sum(busy.values()) + sum(gaps.values()), 1e-9
        )
    return {"step_ms": step_ms, "ms": ms, "detail": detail}


def fractions(ms: Mapping[str, float]) -> dict[str, float]:
    total = sum(max(0.0, ms[r]) for r in REGIONS)
    return {r: (max(0.0, ms[r]) / total if total > 0 else 0.0) for r in REGIONS}


# --------------------------------------------------------------------------------------------
# instrumentation of the real trainer
# --------------------------------------------------------------------------------------------


def sublayers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(qualified name, region, module) of every Attention and MLP module of the model."""
    out: list[tuple[str, str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            out.append((name, "attention", m))
        elif isinstance(m, MLP):
            out.append((name, "mlp", m))
    return out


@contextlib.contextmanager
def instrument(trainer: Any, device: torch.device, *, modules: bool) -> Iterator[None]:
    """Open profiler ranges around the real step's parts, and remove them afterwards.

    * ``pgolf::attention`` / ``pgolf::mlp``: forward pre/post hooks on the model's own
      Attention / MLP modules (only with ``modules``; never on a compiled model's run, where the
      hooks would force a recompile and dynamo ignores the ranges anyway);
    * ``pgolf::data``: ``loader.next_batch`` plus the host-to-device copy of its batch (done here
      with the same ``.to(device, non_blocking=True)`` the trainer does, which then is a no-op);
    * ``pgolf::optimizer``: ``OptimizerSet.step`` and ``zero_grad``.
    """
    from torch.profiler import record_function

    handles: list[Any] = []
    if modules:
        for _, region, m in sublayers(trainer.model):
            opened: list[Any] = []

            def pre(
                mod: nn.Module, args: Any, _name: str = f"pgolf::{region}", _open: list[Any] = opened
            ) -> None:
                rf = record_function(_name)
                rf.__enter__()
                _open.append(rf)

            def post(mod: nn.Module, args: Any, out: Any, _open: list[Any] = opened) -> None:
                if _open:
                    _open.pop().__exit__(None, None, None)

            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))

    loader, opt = trainer.loader, trainer.opt
    next_batch, opt_step, opt_zero = loader.next_batch, opt.step, opt.zero_grad

    def timed_next_batch(local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        with record_function("pgolf::data"):
            x, y = next_batch(local_tokens, seq_len)
            if device.type == "cuda":
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def timed_step() -> None:
        with record_function("pgolf::optimizer"):
            opt_step()

    def timed_zero_grad() -> None:
        with record_function("pgolf::optimizer"):
            opt_zero()

    setattr(loader, "next_batch", timed_next_batch)  # noqa: B010  (instance attribute shadows the method)
    setattr(opt, "step", timed_step)  # noqa: B010
    setattr(opt, "zero_grad", timed_zero_grad)  # noqa: B010
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        vars(loader).pop("next_batch", None)
        vars(opt).pop("step", None)
        vars(opt).pop("zero_grad", None)


class _StepRunner:
    """Advances the real trainer one step at a time (``Trainer.advance``: the optimizer step, the
    ``on_step`` event and the switches), from the state ``Trainer.begin`` made."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.state = trainer.begin()
        self.last_loss: torch.Tensor | None = None

    def __call__(self, elapsed: float = 0.0) -> None:
        self.last_loss = self.trainer.advance(self.state, lambda: elapsed)


def profile_steps(runner: _StepRunner, runtime: Any, n: int, *, modules: bool, eager: bool) -> dict[str, Any]:
    """Profile ``n`` real steps (after one unprofiled step) and attribute their time to regions."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trainer = runner.trainer
    cuda = runtime.device.type == "cuda"
    saved = trainer.wrapped
    if eager:
        trainer.wrapped = trainer.model  # the same module, called without torch.compile
    try:
        with instrument(trainer, runtime.device, modules=modules):
            runner()
            runtime.synchronize()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with native_noise_filtered(), profile(activities=activities) as prof:
                for _ in range(n):
                    with record_function(STEP_RANGE):
                        runner()
                        runtime.synchronize()
    finally:
        trainer.wrapped = saved
    return breakdown_from_events(list(prof.events()), device="cuda" if cuda else "cpu")


PROFILER_NOISE = re.compile(r"^(STAGE|USDT|WARNING|INFO|ERROR):?\S* .*\.(cpp|h):\d+\]")
"""Kineto's native log lines (``USDT:... SyncActivityProfilerHandler.cpp:52] profiler_start``), which
it writes to file descriptor 2 whatever KINETO_LOG_LEVEL says."""


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Capture file descriptor 2 (where native code writes) for the block, then pass on every line
    except the profiler's own log lines (:data:`PROFILER_NOISE`)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [
                line
                for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                if not PROFILER_NOISE.match(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _probe_inputs(
    model: nn.Module, runtime: Any, batch: int, seq_len: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype, tuple[Any, ...]]]:
    """Shape and dtype of the input each Attention / MLP module gets in a training forward, and
    the module's other arguments (e.g. the RoPE tables of an attention layer), captured as is."""
    seen: dict[str, tuple[tuple[int, ...], torch.dtype, tuple[Any, ...]]] = {}
    handles = []
    for name, _, m in sublayers(model):

        def pre(mod: nn.Module, args: Any, _name: str = name) -> None:
            rest = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])
            seen.setdefault(_name, (tuple(args[0].shape), args[0].dtype, rest))

        handles.append(m.register_forward_pre_hook(pre))
    try:
        idx = torch.zeros(batch, seq_len, dtype=torch.int64, device=runtime.device)
        with torch.no_grad(), runtime.autocast():
            model(idx, idx)
    finally:
        for h in handles:
            h.remove()
    return seen


def isolated_sublayers(trainer: Any, runtime: Any, *, repeats: int = 5) -> dict[str, Any]:
    """Forward + backward time of the model's Attention / MLP modules alone, per optimizer step (ms).

    Modules of the same structure and input (``repr`` — which shows the techniques placed in
    them — shape and dtype) are timed once, through one representative, and counted as many
    times as they occur: the baseline needs two compiles, not one per layer.
    """
    cfg = trainer.stack.train
    batch, seq_len = cfg.micro_batch_tokens // cfg.train_seq_len, cfg.train_seq_len
    model = trainer.model
    metas = _probe_inputs(model, runtime, batch, seq_len)
    cuda = runtime.device.type == "cuda"
    groups: dict[tuple[str, str, tuple[int, ...], str], list[tuple[str, nn.Module]]] = {}
    for name, region, m in sublayers(model):
        shape, dtype, _ = metas[name]
        groups.setdefault((region, repr(m), shape, str(dtype)), []).append((name, m))
    totals = {"attention": 0.0, "mlp": 0.0}
    timed: list[dict[str, Any]] = []
    patch = (
        torch._dynamo.config.patch(recompile_limit=max(64, 4 * len(groups)))
        if runtime.compile
        else contextlib.nullcontext()
    )
    with patch:
        for (region, _, shape, _), members in groups.items():
            name, m = members[0]
            ms = _time_fwd_bwd(
                m,
                shape,
                metas[name][1],
                metas[name][2],
                runtime,
                repeats=repeats,
                compiled=runtime.compile,
                cuda=cuda,
            )
            totals[region] += ms * trainer.accum * len(members)
            timed.append({"region": region, "modules": [n for n, _ in members], "ms_per_micro_batch": ms})
    return {"ms": totals, "groups": timed, "micro_batches_per_step": trainer.accum, "repeats": repeats}


def _time_fwd_bwd(
    m: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    extra: tuple[Any, ...],
    runtime: Any,
    *,
    repeats: int,
    compiled: bool,
    cuda: bool,
) -> float:
    x = torch.randn(shape, device=runtime.device, dtype=dtype, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]
    fn: Callable[..., torch.Tensor] = torch.compile(m, dynamic=False, fullgraph=True) if compiled else m
    grad_out: torch.Tensor | None = None

    def once() -> None:
        nonlocal grad_out
        with runtime.autocast():
            out = fn(x, *extra)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)

    for _ in range(2):
        once()
    runtime.synchronize()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            once()
        end.record()
        torch.cuda.synchronize(runtime.device)
        return float(start.elapsed_time(end)) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - t0) * 1000.0 / repeats


# --------------------------------------------------------------------------------------------
# one measurement
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    steps: int = 20
    warmup: int | None = None  # None: the stack's train.warmup_steps, at least 1 (3 if compiled)
    profile: bool = True
    profile_steps: int = 2
    eval_tokens: int = 2_097_152
    breakdown_method: str = "auto"  # auto | linkage | isolation
    isolation_repeats: int = 5


def _with_warmup(rs: ResolvedStack, warmup: int) -> ResolvedStack:
    train = rs.stack.train.model_copy(update={"warmup_steps": warmup})
    return dataclasses.replace(rs, stack=rs.stack.model_copy(update={"train": train}))


def _compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


def _timed_steps(runner: _StepRunner, runtime: Any, steps: int) -> dict[str, Any]:
    cuda = runtime.device.type == "cuda"
    runtime.synchronize()
    t0 = time.perf_counter()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    marks = [t0]
    if cuda:
        events[0].record()
    for _ in range(steps):
        runner(time.perf_counter() - t0)
        if cuda:
            events[len(marks)].record()
        marks.append(time.perf_counter())
    runtime.synchronize()
    wall = time.perf_counter() - t0
    if cuda:
        step_ms = [float(events[i].elapsed_time(events[i + 1])) for i in range(steps)]
    else:
        step_ms = [(marks[i + 1] - marks[i]) * 1000.0 for i in range(steps)]
    loss = runner.last_loss.item() if runner.last_loss is not None else float("nan")
    return {"wall_s": wall, "step_ms": step_ms, "final_loss": loss}


def measure(
    rs: ResolvedStack, opts: BenchOptions, *, full: bool = True, log: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Bench one stack on this process's device; every figure as a JSON-able mapping."""
    from ..run.evaluate import evaluate
    from ..run.export import encode, export_state, quantize_state, serialize
    from ..run.pipeline import build, eval_switches, prepare_data, training_loader
    from ..run.runtime import make_runtime, seed_everything, shutdown, versions
    from ..run.train import Trainer

    if opts.steps < 1:
        raise PgolfError("--steps must be at least 1")
    stack = rs.stack
    source = prepare_data(stack)
    runtime = make_runtime(stack.train)
    # compiled steps need >= 2 calls before they stop recompiling (the model's RoPE cache is
    # Python state that dynamo guards on), hence at least 3 warm-up steps when compiling
    warm = (
        opts.warmup if opts.warmup is not None else max(stack.train.warmup_steps, 3 if runtime.compile else 1)
    )
    run_rs = _with_warmup(rs, warm)
    notes: list[str] = []
    try:
        vers = versions(runtime)
        seed_everything(stack.seed)
        b = build(rs, runtime.device, runtime.attention)
        model = b.model
        n_params = count_params(model)
        loader = training_loader(b.sites, source, runtime, stack.seed, stack.model.vocab_size)
        trainer = Trainer(model, b.sites, run_rs.stack, runtime, loader)
        log(f"  warm-up: {warm} step(s){' (includes torch.compile)' if runtime.compile else ''}")
        t0 = time.perf_counter()
        trainer.warm_up()
        runtime.synchronize()
        warmup_s = time.perf_counter() - t0
        runner = _StepRunner(trainer)

        _reset_peak_memory(runtime.device)
        log(f"  timing {opts.steps} step(s)")
        graphs = _compiled_graphs()
        timed = _timed_steps(runner, runtime, opts.steps)
        memory = _peak_memory(runtime.device)
        if _compiled_graphs() != graphs:
            notes.append(
                f"torch.compile compiled {_compiled_graphs() - graphs} new graph(s) during the timed steps, "
                "so they include compile time; raise --warmup"
            )
        if not math.isfinite(timed["final_loss"]):
            notes.append(f"the training loss was {timed['final_loss']} after the timed steps")

        tbt = stack.train.train_batch_tokens
        step_ms = timed["step_ms"]
        mean_ms = timed["wall_s"] * 1000.0 / opts.steps
        median_ms = statistics.median(step_ms)
        tps = tbt / (mean_ms / 1000.0)
        train = {
            "tokens_per_second": tps,
            "tokens_per_second_median": tbt / (median_ms / 1000.0),
            "ms_per_step_mean": mean_ms,
            "ms_per_step_median": median_ms,
            "ms_per_step_min": min(step_ms),
            "ms_per_step_std": statistics.stdev(step_ms) if len(step_ms) > 1 else 0.0,
            "step_ms": step_ms,
            "steps": opts.steps,
            "warmup_steps": warm,
            "warmup_seconds": warmup_s,
            "final_train_loss": timed["final_loss"],
        }

        breakdown: dict[str, Any] | None = None
        breakdown_eager: dict[str, Any] | None = None
        if full and opts.profile:
            log(f"  profiling {opts.profile_steps} step(s) for the breakdown")
            breakdown, breakdown_eager = _breakdown(runner, trainer, runtime, opts, notes)

        trainer.finalize()

        evaluation: dict[str, Any] | None = None
        if opts.eval_tokens > 0:
            val, lut = source.validation(stack.model.vocab_size)
            n = min(opts.eval_tokens, val.numel() - 1)
            if n < opts.eval_tokens:
                notes.append(f"the validation split has only {val.numel() - 1:,} targets; evaluated {n:,}")
            seq = stack.eval.seq_len or stack.train.train_seq_len
            kw = dict(seq_len=seq, batch_tokens=stack.eval.batch_tokens, runtime=runtime, sites=b.sites,
                      switches=eval_switches(b.sites))  # fmt: skip
            evaluate(model, val[: min(seq, n) + 1], lut, **kw)  # type: ignore[arg-type]  # warm-up
            log(f"  evaluating {n:,} tokens")
            res = evaluate(model, val[: n + 1], lut, **kw)  # type: ignore[arg-type]
            evaluation = {
                "tokens": res.tokens,
                "seconds": res.seconds,
                "tokens_per_second": res.tokens / res.seconds if res.seconds > 0 else None,
                "seq_len": seq,
                "batch_tokens": stack.eval.batch_tokens,
                "model": "uncompiled (as run() evaluates)",
            }

        log("  exporting")
        runtime.synchronize()
        t0 = time.perf_counter()
        state, infos = export_state(model)
        raw = serialize(quantize_state(state, infos, b.sites, stack.export), b.sites)
        t1 = time.perf_counter()
        blob = encode(raw, b.sites)
        t2 = time.perf_counter()
        export = {
            "seconds": t2 - t0,
            "quantize_pack_seconds": t1 - t0,
            "compress_seconds": t2 - t1,
            "packed_bytes": len(raw),
            "compressed_bytes": len(blob),
            "quantizers": [t.name for t in b.sites.implementers("quantize")],
            "codec": getattr(b.sites.filler("codec"), "name", None),
            "weights": "the model after the warm-up (restored) and the bench's real steps, not trained weights: compression of trained weights takes longer and gives more bytes",
        }
    finally:
        shutdown(runtime)

    device_type = runtime.device.type
    peak, peak_note = peak_bf16_flops(vers["device"], device_type)
    fpt = model_flops_per_token(rs.spec, stack.train.train_seq_len)
    if peak and runtime.autocast_dtype is None:
        peak_note += (
            "; autocast is off, so the matmuls do not run in bf16 and this MFU understates utilisation"
        )
    mfu = {
        "value": fpt * tps / peak if peak else None,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "note": peak_note
        + "; FLOPs per token = model_flops_per_token (3 × forward of the dense matmuls, causal attention "
        "counted as half of the T×T scores, tied head; technique-added FLOPs not counted)",
    }
    return {
        "params": n_params,
        "device_type": device_type,
        "versions": vers,
        "settings": {
            "compile": runtime.compile,
            "autocast": str(runtime.autocast_dtype).removeprefix("torch.")
            if runtime.autocast_dtype
            else None,
            "attention": runtime.attention,
            "attention_kernel": next(
                (type(m.kernel).__name__ for _, r, m in sublayers(model) if isinstance(m, Attention)), None
            ),
            "world_size": runtime.world_size,
            "grad_accum": trainer.accum,
            "train_batch_tokens": stack.train.train_batch_tokens,
            "micro_batch_tokens": stack.train.micro_batch_tokens,
            "train_seq_len": stack.train.train_seq_len,
            "threads": torch.get_num_threads() if device_type == "cpu" else None,
        },
        "train": train,
        "mfu": mfu,
        "memory": memory,
        "eval": evaluation,
        "export": export,
        "breakdown": breakdown,
        "breakdown_eager": breakdown_eager,
        "notes": notes,
    }


def _breakdown(
    runner: _StepRunner, trainer: Any, runtime: Any, opts: BenchOptions, notes: list[str]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    method = opts.breakdown_method
    if method == "auto":
        method = "isolation" if runtime.compile else "linkage"
    if method not in ("linkage", "isolation"):
        raise PgolfError(f"unknown breakdown method {method!r}; use auto, linkage or isolation")
    time_base = "device" if runtime.device.type == "cuda" else "cpu"
    if method == "linkage":
        prof = profile_steps(runner, runtime, opts.profile_steps, modules=True, eager=True)
        ms = prof["ms"]
        result = {
            "method": "linkage" + (" (eager steps of a compiled stack)" if runtime.compile else ""),
            "error": LINKAGE_ERROR,
            "time_base": time_base,
            "step_ms": prof["step_ms"],
            "ms": ms,
            "fraction": fractions(ms),
            "detail": prof["detail"],
        }
        return result, None
    # isolation: the real (compiled) step for optimizer/data; sublayers alone for attention/MLP
    prof = profile_steps(runner, runtime, opts.profile_steps, modules=False, eager=False)
    try:
        iso = isolated_sublayers(trainer, runtime, repeats=opts.isolation_repeats)
    except Exception as e:  # e.g. a kernel torch.compile cannot take alone: fall back to linkage
        notes.append(
            f"breakdown: timing the sublayers in isolation failed ({type(e).__name__}: {e}); "
            "the breakdown is the eager-step linkage one"
        )
        return _breakdown(
            runner, trainer, runtime, dataclasses.replace(opts, breakdown_method="linkage"), notes
        )
    step_ms = prof["step_ms"]
    ms = {
        "attention": iso["ms"]["attention"],
        "mlp": iso["ms"]["mlp"],
        "optimizer": prof["ms"]["optimizer"],
        "data": prof["ms"]["data"],
    }
    rest = step_ms - sum(ms.values())
    if rest < 0:
        notes.append(
            f"breakdown: the isolated parts sum to {sum(ms.values()):.2f} ms, more than the profiled step "
            f"({step_ms:.2f} ms); 'other' set to 0 and fractions renormalised"
        )
    ms["other"] = max(0.0, rest)
    ms = {r: ms[r] for r in REGIONS}
    result = {
        "method": "isolation" + (" (compiled)" if runtime.compile else " (eager)"),
        "error": ISOLATION_ERROR,
        "time_base": time_base,
        "step_ms": step_ms,
        "ms": ms,
        "fraction": fractions(ms),
        "detail": {"profile": prof["detail"], "isolated": iso},
    }
    eager = None
    if runtime.compile:
        ep = profile_steps(runner, runtime, opts.profile_steps, modules=True, eager=True)
        eager = {
            "method": "linkage (eager steps, for comparison)",
            "error": LINKAGE_ERROR,
            "time_base": time_base,
            "step_ms": ep["step_ms"],
            "ms": ep["ms"],
            "fraction": fractions(ep["ms"]),
            "detail": ep["detail"],
        }
    return result, eager


# --------------------------------------------------------------------------------------------
# techniques
# --------------------------------------------------------------------------------------------


def technique_variants(
    rs: ResolvedStack, which: str
) -> tuple[list[tuple[str, ResolvedStack]], list[dict[str, str]]]:
    """The stack with each technique added alone (default params, plus the techniques it
    requires): (name, stack) pairs and the skipped ones with a reason. ``which``: ``none``, ``all`` or a comma-separated list."""
    from ..api.sites import DEFAULT_FILLERS, SITES, SLOT

    which = which.strip()
    if which in ("", "none"):
        return [], []
    names = REGISTRY.names()
    if which == "all":
        wanted = names
    else:
        wanted = [w.strip() for w in which.split(",") if w.strip()]
        for w in wanted:
            if w not in names:
                raise PgolfError(f"--techniques: unknown technique {w!r}{did_you_mean(w, names)}")
    present = {r.name for r in rs.techniques if not r.implicit}
    defaults = set(DEFAULT_FILLERS.values())
    base = rs.to_dict()
    base["techniques"] = {r.name: r.params.model_dump(mode="json") for r in rs.techniques if not r.implicit}
    variants: list[tuple[str, ResolvedStack]] = []
    skipped: list[dict[str, str]] = []
    for name in wanted:
        if name in present:
            skipped.append({"technique": name, "reason": "already in the stack"})
            continue
        if name in defaults:
            skipped.append({"technique": name, "reason": "slot default (part of the baseline)"})
            continue
        cls = REGISTRY.get(name)
        techs = dict(base["techniques"])
        for site in SITES.values():  # a whole-model slot: the new filler replaces the old
            hook = site.required[0]
            if site.kind == SLOT and hook in cls.hooks:
                for other in list(techs):
                    if hook in REGISTRY.get(other).hooks:
                        del techs[other]
        for req in cls.requires:  # measured together with the siblings it needs
            techs.setdefault(req, {})
        techs[name] = {}
        try:
            v = stack_from_dict(
                {**base, "techniques": techs}, source=f"{rs.source} + {name}", base_dir=rs.base_dir
            )
        except PgolfError as e:
            skipped.append({"technique": name, "reason": f"does not build with default params: {e}"})
            continue
        variants.append((name, v))
    return variants, skipped


# --------------------------------------------------------------------------------------------
# the bench: measure, write the results file, regenerate the README
# --------------------------------------------------------------------------------------------


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # each model compiles anew; keeps dynamo's recompile limit out of the way


def _ratios(tps: float, device_type: str, device_name: str) -> dict[str, Any]:
    if device_type != "cuda":
        return {
            "tokens_per_second": REFERENCE_TOKENS_PER_SECOND,
            "target_tokens_per_second": TARGET_TOKENS_PER_SECOND,
            "ratio_to_reference": None,
            "ratio_to_target": None,
            "comparable": False,
            "note": "n/a on CPU: the reference is tokens/s per H100",
        }
    comparable = "H100" in device_name.upper()
    return {
        "tokens_per_second": REFERENCE_TOKENS_PER_SECOND,
        "target_tokens_per_second": TARGET_TOKENS_PER_SECOND,
        "ratio_to_reference": tps / REFERENCE_TOKENS_PER_SECOND,
        "ratio_to_target": tps / TARGET_TOKENS_PER_SECOND,
        "comparable": comparable,
        "note": (
            "reference: the challenge baseline, 524,288 tokens per 43.54 ms step on 8×H100 SXM = 1.505 M "
            "tokens/s per GPU; this bench runs one process on one GPU (no all-reduce), the same global batch "
            "by gradient accumulation"
            + ("" if comparable else f"; this device ({device_name}) is not an H100, compare with care")
        ),
    }


def bench(
    rs: ResolvedStack,
    opts: BenchOptions,
    *,
    techniques: str = "none",
    command: str = "",
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure a stack (and, with ``techniques``, its one-technique variants); the results document."""
    variants, skipped = technique_variants(rs, techniques)
    name = rs.stack.name or Path(rs.source).stem
    log(f"bench {name} ({rs.hash()})")
    main = measure(rs, opts, full=True, log=log)
    _free_memory()
    tps = main["train"]["tokens_per_second"]
    measured: list[tuple[str, ResolvedStack, dict[str, Any] | None, str | None]] = []
    for tname, v in variants:
        log(f"bench {name} + {tname}")
        try:
            m = measure(v, dataclasses.replace(opts, profile=False), full=False, log=log)
        except PgolfError as e:
            measured.append((tname, v, None, str(e)))
        else:
            measured.append((tname, v, m, None))
        _free_memory()
    without: dict[str, Any] = {"tokens_per_second": tps, "measurements": [tps], "drift_percent": None}
    if measured:
        # measured again after the variants: the mean of both is "without"; their gap shows drift
        log(f"bench {name} again (the 'without' figure of the technique table)")
        again = measure(rs, dataclasses.replace(opts, profile=False), full=False, log=log)
        _free_memory()
        tps2 = again["train"]["tokens_per_second"]
        without = {
            "tokens_per_second": (tps + tps2) / 2.0,
            "measurements": [tps, tps2],
            "drift_percent": (tps2 - tps) / tps * 100.0,
            "ms_per_step_median": statistics.median(
                [main["train"]["ms_per_step_median"], again["train"]["ms_per_step_median"]]
            ),
            "export_seconds": main["export"]["seconds"],
            "eval_tokens_per_second": (main["eval"] or {}).get("tokens_per_second"),
        }
    base_tps = without["tokens_per_second"]
    rows: list[dict[str, Any]] = []
    for tname, v, res, err in measured:
        row: dict[str, Any] = {
            "technique": tname,
            "params": v.to_dict()["techniques"].get(tname, {}),
            "stack_hash": v.hash(),
            "without_tokens_per_second": base_tps,
            "error": err,
        }
        if res is None:
            row.update({"tokens_per_second": None, "delta_percent": None})
        else:
            with_tps = res["train"]["tokens_per_second"]
            row.update(
                {
                    "tokens_per_second": with_tps,
                    "delta_percent": (with_tps - base_tps) / base_tps * 100.0,
                    "ms_per_step_median": res["train"]["ms_per_step_median"],
                    "ms_per_step_std": res["train"]["ms_per_step_std"],
                    "params_count": res["params"],
                    "peak_memory_bytes": res["memory"]["peak_bytes"],
                    "eval_tokens_per_second": (res["eval"] or {}).get("tokens_per_second"),
                    "export_seconds": res["export"]["seconds"],
                    "compressed_bytes": res["export"]["compressed_bytes"],
                    "notes": res["notes"],
                }
            )
        rows.append(row)
    now = _dt.datetime.now(_dt.timezone.utc)
    device_name = main["versions"]["device"]
    return {
        "schema": SCHEMA,
        "date": _dt.date.today().isoformat(),
        "timestamp": now.isoformat(timespec="seconds"),
        "command": command,
        "device": {
            "name": device_name,
            "type": main["device_type"],
            "slug": slug(device_name),
        },
        "versions": main["versions"],
        "stack": {
            "name": name,
            "source": rs.source,
            "hash": rs.hash(),
            "techniques": rs.technique_names(),
            "resolved": rs.to_dict(),
        },
        "params": main["params"],
        "settings": {
            **main["settings"],
            "steps": opts.steps,
            "profile_steps": opts.profile_steps if opts.profile else 0,
            "eval_tokens": opts.eval_tokens,
            "breakdown_method": opts.breakdown_method,
        },
        "train": main["train"],
        "reference": _ratios(tps, main["device_type"], device_name),
        "mfu": main["mfu"],
        "memory": main["memory"],
        "eval": main["eval"],
        "export": main["export"],
        "breakdown": main["breakdown"],
        "breakdown_eager": main["breakdown_eager"],
        "techniques": {
            "mode": techniques,
            "without": without,
            "rows": rows,
            "skipped": skipped,
        },
        "notes": main["notes"],
    }


def result_path(result: Mapping[str, Any], out_dir: Path) -> Path:
    return Path(out_dir) / f"{result['date']}-{result['device']['slug']}-{slug(result['stack']['name'])}.json"


def write_result(result: Mapping[str, Any], out_dir: Path) -> Path:
    from ..run.export import atomic_write
    from ..run.record import finite_or_none

    path = result_path(result, out_dir)
    atomic_write(
        path, (json.dumps(finite_or_none(result), indent=2, default=str, allow_nan=False) + "\n").encode()
    )
    return path


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------

BEGIN = "<!-- pgolf bench: generated from results/*.json by `pgolf bench`; do not edit below -->"
END = "<!-- pgolf bench: end of generated part -->"

DEFAULT_HEADER = """# pgolf benchmarks

Training speed of stacks on one device, measured by `pgolf bench` (issue 4). The reference is
the challenge baseline: 524,288 tokens per 43.54 ms step on 8×H100 SXM, i.e. **1.505 M tokens/s
per H100**; pgolf's baseline stack must reach it and aims at **2.0 M tokens/s**.

## How to run (on a GPU)

```bash
pgolf bench stacks/baseline_sp1024.yaml --techniques all
```

This runs the stack's compile warm-up, times 20 real optimizer steps at the stack's global batch
(gradient accumulation on one GPU), profiles the step, evaluates 2 M validation tokens, times
the export, then repeats the timing with every registered technique added alone. It writes
`OUT/results/<date>-<device>-<stack>.json` (device, torch/CUDA versions, the command, the
resolved stack and every figure) and regenerates the tables in `OUT/README.md` from all results
files there; `--out` defaults to `pgolf-bench` in the current folder (this page is `--out bench`
from the repository root). Options: `--set KEY=VALUE`, `--steps N`, `--warmup N`,
`--techniques all|none|a,b`, `--no-profile`, `--eval-tokens N`, `--out DIR`, `--quiet`;
`pgolf bench --readme-only` only rebuilds the README. CPU results are allowed but are labelled
CPU and never compared with the H100 reference.

Columns: tokens/s = `train_batch_tokens` / mean step time; *vs 1.505 M* and *vs 2.0 M* = ratio to
the reference and the target (GPU rows only); MFU against the dense bf16 peak of the device
(H100 SXM 989 TFLOP/s); peak memory = `torch.cuda.max_memory_allocated` (CPU: process max RSS);
export = quantize + pack + compress seconds; the breakdown splits the profiled step into
attention / MLP / optimizer / data / other (method and known error in each JSON file).
"""


def _fmt_tps(v: Any) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    return f"{v:{spec}}{suffix}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def _device_label(r: Mapping[str, Any]) -> str:
    d = r.get("device", {})
    name = str(d.get("name", "?"))
    return name if d.get("type") == "cuda" else f"CPU: {name}"


def _ratio_cell(r: Mapping[str, Any], key: str) -> str:
    ref = r.get("reference", {})
    if r.get("device", {}).get("type") != "cuda":
        return "n/a (CPU)"
    v = ref.get(key)
    cell = _fmt(v, ".2f", "×")
    return cell if ref.get("comparable") else f"{cell} (not H100)"


def _mem_cell(r: Mapping[str, Any]) -> str:
    mem = r.get("memory") or {}
    v = mem.get("peak_bytes")
    if not isinstance(v, (int, float)):
        return "—"
    cell = f"{v / 2**30:.2f} GiB"
    return cell if r.get("device", {}).get("type") == "cuda" else f"{cell} RSS"


def _breakdown_cell(r: Mapping[str, Any]) -> str:
    b = r.get("breakdown")
    if not b:
        return "—"
    f = b.get("fraction", {})
    return " / ".join(f"{100 * f.get(k, 0.0):.0f}" for k in REGIONS)


def _load_results(results_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
            out.append((p.name, doc))
    out.sort(
        key=lambda x: (
            str(x[1].get("date")),
            _device_label(x[1]),
            str(x[1].get("stack", {}).get("name")),
            x[0],
        )
    )
    return out


def render_tables(results: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    lines = [
        "## Results",
        "",
        "| date | device | stack | tokens/s | vs 1.505 M | vs 2.0 M | ms/step mean (median) | MFU | peak mem "
        "| eval tok/s | export s | attn / mlp / opt / data / other % | file |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    if not results:
        lines.append("| — | no results yet | | | | | | | | | | | |")
    for fname, r in results:
        t = r.get("train", {})
        mfu = (r.get("mfu") or {}).get("value")
        ev = (r.get("eval") or {}).get("tokens_per_second")
        ex = (r.get("export") or {}).get("seconds")
        lines.append(
            f"| {r.get('date', '?')} | {_device_label(r)} | {r.get('stack', {}).get('name', '?')} "
            f"| {_fmt_tps(t.get('tokens_per_second'))} | {_ratio_cell(r, 'ratio_to_reference')} "
            f"| {_ratio_cell(r, 'ratio_to_target')} "
            f"| {_fmt(t.get('ms_per_step_mean'), '.1f')} ({_fmt(t.get('ms_per_step_median'), '.1f')}) "
            f"| {_fmt(100 * mfu if isinstance(mfu, (int, float)) else None, '.1f', ' %')} | {_mem_cell(r)} "
            f"| {_fmt_tps(ev)} | {_fmt(ex, '.2f')} | {_breakdown_cell(r)} | [{fname}](results/{fname}) |"
        )
    lines += [
        "",
        "## Technique cost",
        "",
        "Tokens/s of the stack with one technique added (default params) and without it, same run, same device.",
        "",
        "| date | device | stack | technique | tokens/s with | without | Δ % | ms/step with, median "
        "| export s with / without | baseline drift % | note |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    n = 0
    for _, r in results:
        tech = r.get("techniques") or {}
        without = tech.get("without") or {}
        for row in tech.get("rows", []):
            n += 1
            note = (row.get("error") or "").replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {r.get('date', '?')} | {_device_label(r)} | {r.get('stack', {}).get('name', '?')} "
                f"| {row.get('technique')} | {_fmt_tps(row.get('tokens_per_second'))} "
                f"| {_fmt_tps(row.get('without_tokens_per_second'))} | {_fmt(row.get('delta_percent'), '+.1f')} "
                f"| {_fmt(row.get('ms_per_step_median'), '.1f')} "
                f"| {_fmt(row.get('export_seconds'), '.2f')} / {_fmt(without.get('export_seconds'), '.2f')} "
                f"| {_fmt(without.get('drift_percent'), '+.1f')} | {note} |"
            )
    if not n:
        lines.append("| — | no technique measurements yet | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def regenerate_readme(results_dir: Path, readme: Path) -> str:
    """Rewrite the generated part of ``readme`` from every results file; returns the new text."""
    from ..run.export import atomic_write

    head, tail = DEFAULT_HEADER, ""
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if BEGIN in text:
            head = text.split(BEGIN, 1)[0].rstrip("\n") + "\n"
            after = text.split(BEGIN, 1)[1]
            tail = after.split(END, 1)[1].lstrip("\n") if END in after else ""
        else:
            head = text.rstrip("\n") + "\n"
    body = render_tables(_load_results(results_dir))
    new = f"{head}\n{BEGIN}\n\n{body}\n{END}\n" + (f"\n{tail}" if tail else "")
    atomic_write(readme, new.encode("utf-8"))
    return new


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_command(subparsers: Any) -> None:
    """Register ``pgolf bench`` on the CLI's subparsers."""
    from .cli import add_set_argument

    p = subparsers.add_parser(
        "bench",
        help="measure a stack's training tokens/s, MFU, memory, eval and export time on one device",
        description="Time a stack on one device after its compile warm-up and write "
        "OUT/results/<date>-<device>-<stack>.json; regenerate the tables in OUT/README.md.",
    )
    p.add_argument("stack", nargs="?", help="stack YAML file")
    add_set_argument(p)
    p.add_argument("--steps", type=int, default=BenchOptions.steps, help="timed optimizer steps (default 20)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="compile warm-up steps (default: the stack's train.warmup_steps, at least 1)",
    )
    p.add_argument(
        "--techniques",
        default="none",
        metavar="all|none|A,B",
        help="also bench the stack with each of these techniques added alone (default none)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step-time breakdown")
    p.add_argument(
        "--profile-steps", type=int, default=BenchOptions.profile_steps, help="profiled steps (default 2)"
    )
    p.add_argument(
        "--breakdown-method",
        choices=["auto", "linkage", "isolation"],
        default="auto",
        help="auto: isolation when compiled, linkage otherwise",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=BenchOptions.eval_tokens,
        help="validation tokens to evaluate (default 2,097,152; 0 skips)",
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for results/*.json and the README.md table (default ./{DEFAULT_OUT})",
    )
    p.add_argument(
        "--readme-only", action="store_true", help="only regenerate OUT/README.md from OUT/results"
    )
    p.add_argument("--quiet", action="store_true", help="print only the summary and where it was written")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..api.config import load_stack
    from .cli import check_writable

    console = Console(highlight=False, soft_wrap=True)
    out_dir = Path(args.out) / "results"
    readme = Path(args.out) / "README.md"
    if args.readme_only:
        check_writable(readme, "--out")
        regenerate_readme(out_dir, readme)
        console.print(f"regenerated {readme} from {out_dir}")
        return 0
    if not args.stack:
        raise PgolfError("pgolf bench: give a stack file (or --readme-only)")
    if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        raise PgolfError("pgolf bench measures one process on one device; run it without torchrun")
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--profile-steps", args.profile_steps, 1),
        ("--eval-tokens", args.eval_tokens, 0),
    ):
        if value < low:
            raise PgolfError(f"{flag} must be at least {low}, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise PgolfError(f"--warmup must be at least 0, got {args.warmup}")
    rs = load_stack(args.stack, args.set)
    check_writable(out_dir, "--out", folder=True)  # before minutes of measuring, not after
    check_writable(readme, "--out")
    opts = BenchOptions(
        steps=args.steps,
        warmup=args.warmup,
        profile=not args.no_profile,
        profile_steps=args.profile_steps,
        eval_tokens=args.eval_tokens,
        breakdown_method=args.breakdown_method,
    )
    argv = getattr(args, "argv", None)
    command = "pgolf " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = bench(
        rs,
        opts,
        techniques=args.techniques,
        command=command,
        log=(lambda s: None) if args.quiet else (lambda s: console.print(s, markup=False)),
    )
    console.print(summary(result), markup=False)  # shown even if it cannot be saved below
    try:
        path = write_result(result, out_dir)
    except OSError as e:
        raise PgolfError(
            f"the measurements above could not be saved ({os_error_text(e)}); nothing was written to {out_dir}"
        ) from None
    try:
        regenerate_readme(out_dir, readme)
    except OSError as e:
        raise PgolfError(
            f"saved {path}, but {readme} could not be regenerated ({os_error_text(e)})"
        ) from None
    console.print(f"→ {path}; tables in {readme}")
    return 0


def summary(r: Mapping[str, Any]) -> str:
    t = r["train"]
    lines = [
        f"{r['stack']['name']} on {_device_label(r)}: {t['tokens_per_second']:,.0f} tokens/s "
        f"({t['ms_per_step_mean']:.1f} ms/step mean, {t['ms_per_step_median']:.1f} median)",
        f"  vs 1.505 M reference: {_ratio_cell(r, 'ratio_to_reference')}; vs 2.0 M target: "
        f"{_ratio_cell(r, 'ratio_to_target')}; MFU "
        f"{_fmt(100 * r['mfu']['value'] if r['mfu']['value'] is not None else None, '.1f', ' %')}; "
        f"peak memory {_mem_cell(r)}",
    ]
    if r.get("eval"):
        lines.append(
            f"  eval {_fmt_tps(r['eval']['tokens_per_second'])} tokens/s over {r['eval']['tokens']:,} tokens"
        )
    ex = r["export"]
    lines.append(
        f"  export {ex['seconds']:.2f}s (quantize+pack {ex['quantize_pack_seconds']:.2f}s, compress "
        f"{ex['compress_seconds']:.2f}s) → {ex['compressed_bytes']:,} bytes"
    )
    if r.get("breakdown"):
        b = r["breakdown"]
        parts = ", ".join(f"{k} {b['ms'][k]:.1f} ms ({100 * b['fraction'][k]:.0f}%)" for k in REGIONS)
        lines.append(
            f"  breakdown [{b['method']}, {b['time_base']} time, profiled step {b['step_ms']:.1f} ms]: {parts}"
        )
    for row in r["techniques"]["rows"]:
        lines.append(
            f"  + {row['technique']}: {_fmt_tps(row['tokens_per_second'])} tokens/s "
            f"({_fmt(row['delta_percent'], '+.1f', ' %')}){' ' + row['error'] if row.get('error') else ''}"
        )
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)
