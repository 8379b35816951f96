"""The training loop of the challenge baseline, with technique hooks.

* global batch of ``train_batch_tokens`` per step, gradient accumulation so the global batch is
  the same on 1 … N GPUs;
* compile warm-up: ``warmup_steps`` real steps, then model, optimizers and data loader are
  restored to their initial state (the baseline's WARMUP_STEPS; no LR warm-up);
* wall-clock-aware linear warmdown and a wall-clock cap (validation time excluded);
* Muon momentum warm-up; optional global gradient clipping;
* sites: the optimizer plan, ``lr_schedule`` / ``wd_schedule`` / ``batch_shape`` slots, switches
  flipped by progress (passed into the forward, each state compiled in the warm-up), a time
  reserve inside the cap, and the events ``on_train_start`` (after warm-up), ``on_step``,
  ``finalize``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..api.config import Stack, TrainConfig
from ..api.context import BatchShape, CalibrationData, Switch, TrainState
from ..api.errors import PgolfError, RunFailed
from ..api.sites import Dispatcher
from . import checkpoint
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
    switches: tuple[str, ...] = ()  # switches on at the end of training

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


def make_optimizers(model: nn.Module, stack: Stack, runtime: Runtime, sites: Dispatcher) -> OptimizerSet:
    return build_optimizers(model, stack.optim, tied=stack.model.tie_embeddings, sites=sites, runtime=runtime)


def wrap_model(model: nn.Module, runtime: Runtime, self_synced: Sequence[Tensor] = ()) -> nn.Module:
    """torch.compile and/or DDP around the model; the returned module computes the loss.
    ``self_synced``: parameters whose optimizer reduces their gradients itself (left out of DDP)."""
    wrapped: nn.Module = model
    if runtime.compile:
        wrapped = torch.compile(model, dynamic=False, fullgraph=True)  # type: ignore[assignment]
    if runtime.distributed:
        ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        if self_synced:
            mine = {id(p) for p in self_synced}
            names = [n for n, p in model.named_parameters() if id(p) in mine]
            DDP._set_params_and_buffers_to_ignore_for_model(wrapped, names)
        wrapped = DDP(wrapped, device_ids=ids)  # the model has no buffers to broadcast
    return wrapped


def default_lr_schedule(cfg: TrainConfig) -> Callable[[TrainState], float]:
    """The baseline's linear warmdown (wall-clock-aware when capped), the ``lr_schedule`` default."""

    def mult(s: TrainState) -> float:
        return lr_multiplier(
            s.step,
            s.elapsed,
            iterations=s.iterations,
            warmdown_iters=cfg.warmdown_iters,
            max_wallclock_seconds=s.max_seconds,
        )

    return mult


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
    """The training loop. Every technique-facing decision goes through the sites: the optimizer
    plan, the LR and weight-decay schedules, the batch shape, the switches, the time reserve and
    the training events."""

    def __init__(
        self,
        model: nn.Module,
        sites: Dispatcher,
        stack: Stack,
        runtime: Runtime,
        loader: DistributedTokenLoader,
    ):
        self.model, self.sites, self.stack, self.runtime = model, sites, stack, runtime
        self.cfg = cfg = stack.train
        cuda = runtime.device.type == "cuda"  # on a GPU, batches are read ahead into pinned memory
        self.loader: DistributedTokenLoader | PrefetchingLoader = (
            PrefetchingLoader(loader, cfg.micro_batch_tokens, cfg.train_seq_len, pin=True)
            if cuda else loader)  # fmt: skip
        self.base_loader = loader
        self.state = TrainState(iterations=cfg.iterations)
        self.accum = grad_accum_steps(stack, runtime.world_size)
        self.opt = make_optimizers(model, stack, runtime, sites)
        self.switches: list[Switch] = [s for group in sites.chain("switches") for s in group]
        names = [s.name for s in self.switches]
        if len(set(names)) != len(names):
            raise PgolfError(f"two techniques declare a switch of the same name: {sorted(names)}")
        self.reserve = float(sum(sites.chain("time_reserve")))
        if cfg.max_wallclock_seconds > 0 and self.reserve >= cfg.max_wallclock_seconds:
            raise PgolfError(
                f"the techniques' time reserve ({self.reserve:.1f}s) leaves nothing of "
                f"train.max_wallclock_seconds={cfg.max_wallclock_seconds:g}"
            )
        self.lr_schedule: Callable[[TrainState], float] = sites.slot(
            "lr_schedule", lambda: default_lr_schedule(cfg)
        )
        self.wd_schedule: Callable[[TrainState], float] = sites.slot("wd_schedule", lambda: lambda s: 1.0)
        self.shape: BatchShape = sites.slot(
            "batch_shape", lambda: BatchShape((cfg.train_seq_len,), lambda s: cfg.train_seq_len)
        )
        for n in self.shape.lengths:
            if cfg.micro_batch_tokens % n:
                raise PgolfError(
                    f"train.micro_batch_tokens={cfg.micro_batch_tokens} must be a multiple of every "
                    f"training sequence length the batch shape uses ({list(self.shape.lengths)})"
                )
        self.wrapped = wrap_model(model, runtime, self.opt.self_synced)

    def new_state(self) -> TrainState:
        cap = self.cfg.max_wallclock_seconds
        return TrainState(
            iterations=self.cfg.iterations,
            max_seconds=cap - self.reserve if cap > 0 else 0.0,
            seq_len=self.shape.seq_len(TrainState(iterations=self.cfg.iterations)),
        )

    @property
    def eval_switches(self) -> tuple[str, ...]:
        """The switches that stay on when the trained model is evaluated (structural ones)."""
        return tuple(s.name for s in self.switches if s.at_eval)

    def step(self, state: TrainState) -> Tensor:
        """One optimizer step over the global batch at ``state``; returns the mean loss tensor
        (``state.lr_mult`` and ``state.seq_len`` are updated)."""
        cfg, o = self.cfg, self.stack.optim
        state.lr_mult = self.lr_schedule(state)
        rewarm = self.shape.lr_scale(state) if self.shape.lr_scale is not None else 1.0
        self.opt.set_multipliers(state.lr_mult * rewarm, self.wd_schedule(state))
        self.opt.set_muon_momentum(
            muon_momentum_at(
                state.step,
                start=o.muon_momentum_warmup_start,
                end=o.muon_momentum,
                warmup_steps=o.muon_momentum_warmup_steps,
            )
        )
        state.seq_len = seq_len = self.shape.seq_len(state)
        if seq_len not in self.shape.lengths:
            raise PgolfError(f"the batch shape returned seq_len {seq_len}, not one of {self.shape.lengths}")
        total = torch.zeros((), device=self.runtime.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch(cfg.micro_batch_tokens, seq_len)
            x = x.to(self.runtime.device, non_blocking=True)
            y = y.to(self.runtime.device, non_blocking=True)
            if isinstance(self.wrapped, DDP):
                self.wrapped.require_backward_grad_sync = micro == self.accum - 1
            with self.runtime.autocast():
                loss = self.wrapped(x, y, switches=state.switches)
            (loss / self.accum).backward()
            total += loss.detach().float()
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        self.opt.step()
        self.opt.zero_grad()
        return total / self.accum

    def warm_up_states(self) -> list[tuple[tuple[str, ...], int]]:
        """(switches, seq_len) pairs the warm-up compiles: every switch state in the expected
        order of flipping, at every sequence length the batch shape uses."""
        order = sorted(self.switches, key=lambda s: s.expected)
        states = [self._canonical({s.name for s in order[:k]}) for k in range(len(order) + 1)]
        return [(sw, n) for sw in states for n in self.shape.lengths]

    def _canonical(self, on: set[str]) -> tuple[str, ...]:
        return tuple(s.name for s in self.switches if s.name in on)

    def warm_up(self) -> None:
        """Run the compile warm-up steps for every (switch state, sequence length), then restore
        every piece of state they touched."""
        if self.cfg.warmup_steps <= 0:
            return
        model_state = copy.deepcopy(self.model.state_dict())
        opt_states = copy.deepcopy(self.opt.state_dicts())
        base = self.new_state()
        for switches, seq_len in self.warm_up_states():
            shape = BatchShape((seq_len,), lambda s, n=seq_len: n)  # type: ignore[misc]
            saved, self.shape = self.shape, shape
            try:
                for i in range(self.cfg.warmup_steps):
                    self.step(TrainState(step=i, iterations=base.iterations, max_seconds=base.max_seconds,
                                         switches=switches))  # fmt: skip
            finally:
                self.shape = saved
        self.runtime.synchronize()
        self.model.load_state_dict(model_state)
        self.opt.load_state_dicts(opt_states)
        self.opt.zero_grad()
        self.loader.reset()

    def begin(self, log: Callable[[str], None] = lambda s: None) -> TrainState:
        """A fresh training state after the warm-up: switches already due at the start are on,
        and the ``on_train_start`` event has run."""
        self.state = state = self.new_state()
        self._flip_switches(state, log)
        self.sites.event("on_train_start", model=self.model, state=state)
        return state

    def advance(
        self, state: TrainState, clock: Callable[[], float], log: Callable[[str], None] = lambda s: None
    ) -> Tensor:
        """One real training step: the optimizer step, then the ``on_step`` event and the
        switches (``clock()``: training seconds so far). Returns the step's mean loss (a device
        tensor)."""
        state.elapsed = clock()
        loss = self.step(state)
        state.step += 1
        state.elapsed = clock()
        self.sites.event("on_step", model=self.model, state=state)
        self._flip_switches(state, log)
        return loss

    def run(
        self,
        validate: Validator | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        log: Callable[[str], None] = lambda s: None,
        checkpointer: checkpoint.Checkpointer | None = None,
    ) -> TrainResult:
        """Train to the step or time limit. ``checkpointer``: writes periodic checkpoints, and
        holds the checkpoint to continue from, if any (restored after the compile warm-up)."""
        cfg, rt = self.cfg, self.runtime
        self.warm_up()
        resume = checkpointer if checkpointer is not None and checkpointer.resume is not None else None
        if resume is not None:
            resume.restore_weights(self)
        state = self.begin(log)
        history: list[dict[str, float]] = []
        loss, stopped_by = torch.full((), float("nan")), "iterations"
        finished = False
        if resume is not None:
            history, last, finished, saved_by = resume.restore_state(self, state)
            loss, stopped_by = torch.tensor(last), saved_by or stopped_by
        clock = Stopwatch(rt.synchronize)
        clock.total = state.elapsed
        stop, reported = finished, state.elapsed
        clock.start()
        while not finished:
            if (
                validate is not None
                and state.step > 0
                and cfg.val_loss_every > 0
                and state.step % cfg.val_loss_every == 0
            ):
                clock.stop()
                val_loss, val_bpb = validate(state.step)
                history.append(
                    {
                        "step": state.step,
                        "val_loss": val_loss,
                        "val_bpb": val_bpb,
                        "train_seconds": clock.total,
                    }
                )
                log(
                    f"step {state.step}: val_loss {val_loss:.4f} val_bpb {val_bpb:.4f} "
                    f"train_time {clock.total:.1f}s"
                )
                clock.start()
            if state.step >= cfg.iterations or stop:
                break
            loss = self.advance(state, clock.elapsed, log)
            state.elapsed = elapsed = clock.elapsed()
            # the live display updates ten times per log interval and at least every second of
            # training (one loss sync each time)
            step = state.step
            if (
                step % max(1, cfg.train_log_every // 10) == 0
                or step == cfg.iterations
                or step <= 10
                or elapsed - reported >= 1.0
            ):
                self._report(step, loss, state.lr_mult, elapsed, on_progress, log)
                reported = elapsed
            if state.max_seconds > 0 and rt.any_rank(elapsed >= state.max_seconds):
                stop, stopped_by = True, "wallclock"
            if checkpointer is not None and rt.any_rank(checkpointer.due()):
                clock.stop()  # writing it is not training time
                checkpointer.save(self, state, history, loss.item())
                clock.start()
        clock.stop()
        if checkpointer is not None and checkpointer.minutes > 0 and not finished:
            # the trained state: a run killed during export or scoring resumes without retraining
            checkpointer.save(self, state, history, loss.item(), finished=True, stopped_by=stopped_by)
        if isinstance(self.loader, PrefetchingLoader):
            self.loader.close()
        last_loss = self._check_finite(loss, state.step) if state.step > 0 else float("nan")
        never = [s.name for s in self.switches if s.at_eval and s.name not in state.switches]
        if never:
            log(f"warning: switch(es) {never} never turned on during training, but stay on at evaluation")
        return TrainResult(
            state.step,
            state.step * cfg.train_batch_tokens,
            clock.total,
            last_loss,
            stopped_by,
            history,
            state.switches,
        )

    def finalize(self) -> None:
        """The ``finalize`` event (e.g. EMA weights replace the trained ones)."""
        self.sites.event("finalize", model=self.model, state=self.state)

    def calibrate(self) -> int:
        """The ``calibrate`` event on the real, uncompiled model with training batches from the
        ``calibration_batches`` slot (default: the training stream continues). Returns how many
        batches the techniques drew."""
        if not self.sites.implementers("calibrate"):
            return 0
        seq_len = self.state.seq_len or self.cfg.train_seq_len
        device = self.runtime.device

        def training_stream() -> Iterator[Tensor]:
            while True:
                x, _ = self.base_loader.next_batch(self.cfg.micro_batch_tokens, seq_len)
                yield x.to(device)

        source = self.sites.slot(
            "calibration_batches",
            training_stream,
            model=self.model,
            loader=self.base_loader,
            seq_len=seq_len,
            batch_tokens=self.cfg.micro_batch_tokens,
        )
        data = CalibrationData(iter(source))
        was_training = self.model.training
        self.model.eval()
        with self.runtime.autocast():
            self.sites.event("calibrate", model=self.model, batches=data, switches=self.eval_switches)
        self.model.train(was_training)
        return len(data.drawn)

    def _flip_switches(self, state: TrainState, log: Callable[[str], None]) -> None:
        turned = [s.name for s in self.switches if s.name not in state.switches and s.when(state)]
        if turned:
            state.switches = self._canonical({*state.switches, *turned})
            log(f"step {state.step}: switch(es) {', '.join(turned)} on (fraction {state.fraction:.3f})")

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
