"""The training loop of the challenge baseline, with technique hooks.

* global batch of ``train_batch_tokens`` per step, gradient accumulation so the global batch is
  the same on 1 … N GPUs;
* compile warm-up: ``warmup_steps`` real steps, then model, optimizers and data loader are
  restored to their initial state (the baseline's WARMUP_STEPS; no LR warm-up);
* wall-clock-aware linear warmdown and a wall-clock cap (validation time excluded);
* Muon momentum warm-up; optional global gradient clipping;
* technique hooks ``on_train_start`` (after warm-up), ``on_step_end``, ``finalize``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..api.config import Stack
from ..api.errors import PgolfError, RunFailed
from ..api.technique import Technique, call_hooks
from .data import DistributedTokenLoader, PrefetchingLoader
from .optim import OptimizerSet, build_optimizers, lr_multiplier, muon_momentum_at
from .runtime import Runtime


class TrainingDiverged(RunFailed):
    """The training loss became NaN or infinite."""


@dataclass
class Progress:
    step: int
    iterations: int
    train_loss: float
    elapsed: float  # training seconds so far (validation excluded)
    tokens_per_second: float
    seconds_left: float
    lr_mult: float


@dataclass
class TrainResult:
    steps: int
    train_tokens: int
    train_seconds: float
    final_train_loss: float
    stopped_by: str  # "iterations" | "wallclock"
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0


Validator = Callable[[int], tuple[float, float]]  # step -> (val_loss, val_bpb)


def grad_accum_steps(stack: Stack, world_size: int) -> int:
    t = stack.train
    per_step = world_size * t.micro_batch_tokens
    if t.train_batch_tokens % per_step:
        raise PgolfError(
            f"train.train_batch_tokens={t.train_batch_tokens} must be a multiple of "
            f"{world_size} GPU(s) × train.micro_batch_tokens={t.micro_batch_tokens} = {per_step}"
        )
    return t.train_batch_tokens // per_step


def make_optimizers(model: nn.Module, stack: Stack, runtime: Runtime) -> OptimizerSet:
    o = stack.optim
    return build_optimizers(
        model,
        matrix_lr=o.matrix_lr,
        scalar_lr=o.scalar_lr,
        embed_lr=o.tied_embed_lr if stack.model.tie_embeddings else o.embed_lr,
        head_lr=o.head_lr,
        muon_momentum=o.muon_momentum,
        muon_backend_steps=o.muon_backend_steps,
        beta1=o.beta1,
        beta2=o.beta2,
        adam_eps=o.adam_eps,
        rank=runtime.rank,
        world_size=runtime.world_size,
        compile_ns=runtime.compile,
    )


def wrap_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """torch.compile and/or DDP around the model; the returned module computes the loss."""
    wrapped: nn.Module = model
    if runtime.compile:
        wrapped = torch.compile(model, dynamic=False, fullgraph=True)  # type: ignore[assignment]
    if runtime.distributed:
        ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        wrapped = DDP(wrapped, device_ids=ids)  # the model has no buffers to broadcast
    return wrapped


class Stopwatch:
    """Accumulates running time across start/stop pairs, synchronising the device first."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.total = sync, 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self.sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.sync()
        if self._t0 is not None:
            self.total += time.perf_counter() - self._t0
        self._t0 = None

    def elapsed(self) -> float:
        return self.total + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        techniques: Sequence[Technique],
        stack: Stack,
        runtime: Runtime,
        loader: DistributedTokenLoader,
    ):
        self.model, self.techniques, self.stack, self.runtime = model, techniques, stack, runtime
        self.cfg = stack.train
        cuda = runtime.device.type == "cuda"  # on a GPU, batches are read ahead into pinned memory
        self.loader: DistributedTokenLoader | PrefetchingLoader = (
            PrefetchingLoader(loader, self.cfg.micro_batch_tokens, self.cfg.train_seq_len, pin=True)
            if cuda else loader)  # fmt: skip
        self.accum = grad_accum_steps(stack, runtime.world_size)
        self.opt = make_optimizers(model, stack, runtime)
        self.wrapped = wrap_model(model, runtime)

    def step(self, step: int, elapsed: float) -> tuple[Tensor, float]:
        """One optimizer step over the global batch; returns (mean loss tensor, lr multiplier)."""
        cfg, o = self.cfg, self.stack.optim
        mult = lr_multiplier(
            step,
            elapsed,
            iterations=cfg.iterations,
            warmdown_iters=cfg.warmdown_iters,
            max_wallclock_seconds=cfg.max_wallclock_seconds,
        )
        self.opt.set_lr_multiplier(mult)
        self.opt.set_muon_momentum(
            muon_momentum_at(
                step,
                start=o.muon_momentum_warmup_start,
                end=o.muon_momentum,
                warmup_steps=o.muon_momentum_warmup_steps,
            )
        )
        total = torch.zeros((), device=self.runtime.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch(cfg.micro_batch_tokens, cfg.train_seq_len)
            x = x.to(self.runtime.device, non_blocking=True)
            y = y.to(self.runtime.device, non_blocking=True)
            if isinstance(self.wrapped, DDP):
                self.wrapped.require_backward_grad_sync = micro == self.accum - 1
            with self.runtime.autocast():
                loss = self.wrapped(x, y)
            (loss / self.accum).backward()
            total += loss.detach().float()
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        self.opt.step()
        self.opt.zero_grad()
        return total / self.accum, mult

    def warm_up(self) -> None:
        """Run the compile warm-up steps, then restore every piece of state they touched."""
        if self.cfg.warmup_steps <= 0:
            return
        model_state = copy.deepcopy(self.model.state_dict())
        opt_states = copy.deepcopy(self.opt.state_dicts())
        for i in range(self.cfg.warmup_steps):
            self.step(i, 0.0)
        self.runtime.synchronize()
        self.model.load_state_dict(model_state)
        self.opt.load_state_dicts(opt_states)
        self.opt.zero_grad()
        self.loader.reset()

    def run(
        self,
        validate: Validator | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        log: Callable[[str], None] = lambda s: None,
    ) -> TrainResult:
        cfg, rt = self.cfg, self.runtime
        self.warm_up()
        call_hooks(self.techniques, "on_train_start", model=self.model)
        history: list[dict[str, float]] = []
        clock = Stopwatch(rt.synchronize)
        step, loss, mult, stopped_by = 0, torch.full((), float("nan")), 1.0, "iterations"
        stop, reported = False, 0.0
        clock.start()
        while True:
            if (
                validate is not None
                and step > 0
                and cfg.val_loss_every > 0
                and step % cfg.val_loss_every == 0
            ):
                clock.stop()
                val_loss, val_bpb = validate(step)
                history.append(
                    {"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "train_seconds": clock.total}
                )
                log(
                    f"step {step}: val_loss {val_loss:.4f} val_bpb {val_bpb:.4f} train_time {clock.total:.1f}s"
                )
                clock.start()
            if step >= cfg.iterations or stop:
                break
            loss, mult = self.step(step, clock.elapsed())
            step += 1
            call_hooks(self.techniques, "on_step_end", model=self.model, step=step)
            elapsed = clock.elapsed()
            # the live display updates ten times per log interval and at least every second of
            # training (one loss sync each time)
            if (
                step % max(1, cfg.train_log_every // 10) == 0
                or step == cfg.iterations
                or step <= 10
                or elapsed - reported >= 1.0
            ):
                self._report(step, loss, mult, elapsed, on_progress, log)
                reported = elapsed
            if cfg.max_wallclock_seconds > 0 and rt.any_rank(elapsed >= cfg.max_wallclock_seconds):
                stop, stopped_by = True, "wallclock"
        clock.stop()
        if isinstance(self.loader, PrefetchingLoader):
            self.loader.close()
        last_loss = self._check_finite(loss, step) if step > 0 else float("nan")
        call_hooks(self.techniques, "finalize", model=self.model)
        return TrainResult(step, step * cfg.train_batch_tokens, clock.total, last_loss, stopped_by, history)

    @staticmethod
    def _check_finite(loss: Tensor, step: int) -> float:
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged: loss is {value} at step {step}")
        return value

    def _report(
        self,
        step: int,
        loss: Tensor,
        mult: float,
        elapsed: float,
        on_progress: Callable[[Progress], None] | None,
        log: Callable[[str], None],
    ) -> None:
        cfg = self.cfg
        value = self._check_finite(loss, step)
        tps = step * cfg.train_batch_tokens / max(elapsed, 1e-9)
        if on_progress is not None:
            on_progress(
                Progress(step, cfg.iterations, value, elapsed, tps, self._seconds_left(step, elapsed), mult)
            )
        if step % cfg.train_log_every == 0 or step == cfg.iterations:
            log(
                f"step {step}/{cfg.iterations} train_loss {value:.4f} lr_mult {mult:.3f} "
                f"train_time {elapsed:.1f}s tokens/s {tps:,.0f}"
            )

    def _seconds_left(self, step: int, elapsed: float) -> float:
        cfg = self.cfg
        by_steps = (cfg.iterations - step) * elapsed / max(step, 1)
        if cfg.max_wallclock_seconds > 0:
            return max(0.0, min(by_steps, cfg.max_wallclock_seconds - elapsed))
        return by_steps
