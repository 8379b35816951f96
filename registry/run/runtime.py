"""Where a run executes: device, processes (torchrun), precision, compile, versions.

The CLI reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and passes a
:class:`DistEnv` down; nothing below the CLI reads environment variables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..api.config import ResolvedStack, TrainConfig
from ..api.errors import PgolfError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    attention: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    threads: int = 1
    threads_note: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                yield

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any_rank(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity set, capped by a cgroup CPU quota
    (containers started with ``--cpus``), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota() -> float | None:
    """Cores allowed by the cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) quota, or None."""
    try:
        fields = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _cpu_times() -> dict[str, tuple[int, int]] | None:
    """(busy, total) jiffies per CPU from /proc/stat (Linux), or None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    out: dict[str, tuple[int, int]] = {}
    for line in lines:
        name, *vals = line.split()
        if name.startswith("cpu") and name != "cpu" and len(vals) >= 5:
            v = [int(x) for x in vals[:8]]
            idle = v[3] + v[4]  # idle + iowait
            out[name] = (sum(v) - idle, sum(v))
    return out


def busy_cores(window: float = 0.15) -> float | None:
    """How many of this process's CPU cores other work keeps busy, sampled over ``window``
    seconds from /proc/stat while this process sleeps; None where that cannot be read."""
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except AttributeError:
        return None
    a = _cpu_times()
    if not a:
        return None
    time.sleep(window)
    b = _cpu_times()
    if not b:
        return None
    busy = 0.0
    for cpu in mine & a.keys() & b.keys():
        d_busy, d_total = b[cpu][0] - a[cpu][0], b[cpu][1] - a[cpu][1]
        if d_total > 0:
            busy += min(1.0, max(0.0, d_busy / d_total))
    return busy


def auto_threads(world_size: int = 1) -> tuple[int, str]:
    """The CPU thread count for ``train.threads: auto`` and why.

    Never more threads than free cores: torch's default (one thread per core) collapses when
    another process holds a core, because every parallel region then waits for a descheduled
    thread (measured in ``bench/quickstart_threads.py``). Free = usable cores (affinity and cgroup
    quota) minus the cores other processes keep busy right now, shared between the processes
    of a multi-process run; at least 1.
    """
    cores = usable_cores()
    share = max(1, cores // max(1, world_size))
    if world_size > 1:  # the other ranks start at the same moment: their load is ours
        return share, f"auto: {cores} usable core(s) / {world_size} processes"
    busy = busy_cores()
    if busy is None:
        return share, f"auto: {cores} usable core(s)"
    free = max(1, min(share, math.floor(cores - busy + 0.5)))
    return free, f"auto: {cores} usable core(s), {busy:.1f} busy with other processes"


def make_runtime(train: TrainConfig, env: DistEnv | None = None) -> Runtime:
    """The runtime ``train`` asks for (``auto`` settings resolved on this machine)."""
    env = env or DistEnv()
    if train.threads == "auto":
        threads, note = auto_threads(env.world_size)
    else:
        threads, note = train.threads, "set by train.threads"
    return start_runtime(train, env, threads, note)


def start_runtime(train: TrainConfig, env: DistEnv, threads: int | None, note: str = "") -> Runtime:
    """:func:`make_runtime` with the CPU thread count given (None: torch's default); starts the
    process group of a multi-process run."""
    want = train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise PgolfError("train.device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if threads is not None:
        torch.set_num_threads(threads)
    else:
        threads, note = torch.get_num_threads(), note or "torch's default"
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=30),
        )
    autocast = {"auto": torch.bfloat16 if use_cuda else None, "bf16": torch.bfloat16, "off": None}[
        train.autocast
    ]
    compile_on = {"auto": use_cuda, "on": True, "off": False}[train.compile]
    attention = train.attention
    if attention == "auto":
        from .model import flash_attention_function

        attention = "flash" if use_cuda and flash_attention_function() is not None else "sdpa"
    return Runtime(
        device=device,
        autocast_dtype=autocast,
        compile=compile_on,
        attention=attention,
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        threads=threads,
        threads_note=note,
    )


def runtime_settings(runtime: Runtime) -> dict[str, Any]:
    """The ``train`` keys that pick the runtime, as this runtime resolved them (no ``auto``)."""
    return {
        "device": runtime.device.type,
        "compile": "on" if runtime.compile else "off",
        "autocast": "bf16" if runtime.autocast_dtype is not None else "off",
        "attention": runtime.attention,
        "threads": runtime.threads,
    }


def pin_runtime(rs: ResolvedStack, runtime: Runtime) -> ResolvedStack:
    """``rs`` with every ``auto`` runtime setting replaced by what ``runtime`` uses, so the
    stack a run writes reruns the same way on the same kind of machine."""
    train = rs.stack.train.model_copy(update=runtime_settings(runtime))
    return dataclasses.replace(rs, stack=rs.stack.model_copy(update={"train": train}))


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def versions(runtime: Runtime | None = None) -> dict[str, Any]:
    """Python, torch, CUDA and device names, for logs and results."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pgolf_version = version("pgolf")
    except PackageNotFoundError:
        pgolf_version = "unknown"
    dev = runtime.device if runtime else torch.device("cpu")
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
        device_name = f"cpu ({device_name}, {torch.get_num_threads()} threads)"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device_name,
        "world_size": runtime.world_size if runtime else 1,
        "pgolf": pgolf_version,
    }
