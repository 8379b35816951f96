"""Where a run executes: device, processes (torchrun), precision, compile, versions.

The CLI reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and passes a
:class:`DistEnv` down; nothing below the CLI reads environment variables.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..api.config import TrainConfig
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


def make_runtime(train: TrainConfig, env: DistEnv | None = None) -> Runtime:
    env = env or DistEnv()
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
    if train.threads:
        torch.set_num_threads(train.threads)
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
    return Runtime(
        device=device,
        autocast_dtype=autocast,
        compile=compile_on,
        attention=train.attention,
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
    )


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
