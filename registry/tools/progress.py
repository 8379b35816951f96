"""What a run shows and logs: ``run.log`` lines, live progress (a bar on a terminal, plain lines
otherwise), a slow-down hint, and a ticker for slow steps without their own progress."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..run.train import Progress as StepProgress


def format_seconds(s: float) -> str:
    s = max(0, round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


class RunLog:
    """Appends timestamped lines to a log file and echoes them to a console."""

    def __init__(self, path: Path | None, console: Console | None):
        self.console = console
        self._file: IO[str] | None = path.open("a", encoding="utf-8") if path else None
        self._t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        stamp = f"[{format_seconds(time.perf_counter() - self._t0)}]"
        if self._file:
            self._file.write(f"{stamp} {line}\n")
            self._file.flush()
        if self.console:
            self.console.print(Text.assemble((stamp, "dim"), " ", line), highlight=False)

    def echo(self, line: str) -> None:
        """A timestamped line on the console only (live progress), not in the log file."""
        if self.console:
            stamp = f"[{format_seconds(time.perf_counter() - self._t0)}]"
            self.console.print(Text.assemble((stamp, "dim"), " ", line), highlight=False)

    def block(self, title: str, text: str, echo: bool = False) -> None:
        """A multi-line section (resolved stack, role table) written to the log file only,
        unless ``echo``."""
        if self._file:
            self._file.write(f"==== {title} ====\n{text.rstrip()}\n")
            self._file.flush()
        if echo and self.console:
            self.console.print(f"[bold]{title}[/bold]")
            self.console.print(text.rstrip(), highlight=False, markup=False)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


class SpeedWatch:
    """Notices when training slows far below what the machine did a moment earlier.

    Step rates are measured over windows of at least ``window`` training seconds; when a window
    runs below ``1 / factor`` of the fastest earlier window, :meth:`observe` returns a message
    (once per slow spell: it re-arms when the rate recovers to half the best).
    """

    def __init__(self, hint: str, *, window: float = 5.0, factor: float = 2.5):
        self.hint, self.window, self.factor = hint, window, factor
        self.best = 0.0
        self._mark: tuple[int, float] | None = None
        self._warned = False

    def observe(self, step: int, elapsed: float, tokens_per_step: int) -> str | None:
        if self._mark is None:
            self._mark = (step, elapsed)
            return None
        step0, t0 = self._mark
        if elapsed - t0 < self.window or step <= step0:
            return None
        rate = (step - step0) * tokens_per_step / (elapsed - t0)
        self._mark = (step, elapsed)
        msg = None
        if self.best > 0 and rate < self.best / self.factor and not self._warned:
            self._warned = True
            msg = (
                f"training slowed to {rate:,.0f} tokens/s from {self.best:,.0f} a moment ago "
                f"({self.best / rate:.1f}× slower): {self.hint}"
            )
        elif self._warned and rate > self.best / 2:
            self._warned = False
        self.best = max(self.best, rate)
        return msg


def slowdown_hint(device_type: str, threads: int) -> str:
    """What to try when a run slows down on this device."""
    if device_type == "cuda":
        return "another process may be using the GPU (nvidia-smi lists them), or it is throttling"
    if threads > 1:
        return (
            f"this run uses {threads} CPU threads and another process is probably using some of the "
            "cores; stop it, or rerun with --set train.threads=1 (a thread that waits for a busy "
            "core stalls every step)"
        )
    return "another process is probably using this CPU core; stop it or let it finish"


class LiveProgress:
    """Training progress: step, train loss, tokens/s and time left.

    On a terminal a live bar; otherwise (a log file, CI, nohup) a plain line at least every
    ``interval`` seconds of wall-clock. It also records the train-loss curve (``points``) and
    logs a hint when training slows far below its earlier speed (:class:`SpeedWatch`).
    """

    def __init__(
        self,
        console: Console | None,
        iterations: int,
        cap_seconds: float,
        *,
        log: RunLog | None = None,
        tokens_per_step: int = 0,
        slow_hint: str = "",
        interval: float = 10.0,
    ):
        self.enabled = console is not None and console.is_terminal
        self.plain = console is not None and not console.is_terminal
        self.console = console
        self.iterations = iterations
        self.cap = cap_seconds
        self.log = log
        self.tokens_per_step = tokens_per_step
        self.interval = interval
        self.points: list[dict[str, float]] = []
        self.watch = SpeedWatch(slow_hint) if slow_hint and tokens_per_step else None
        self._last_line = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]train[/bold]"),
                BarColumn(),
                TextColumn("{task.fields[text]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )

    def __enter__(self) -> LiveProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.iterations or 1, text="compiling / warming up"
            )
        self._last_line = time.monotonic()
        return self

    def update(self, p: StepProgress) -> None:
        self.points.append(
            {"step": p.step, "train_loss": p.train_loss, "train_seconds": p.elapsed, "lr_mult": p.lr_mult}
        )
        if self.watch is not None:
            msg = self.watch.observe(p.step, p.elapsed, self.tokens_per_step)
            if msg and self.log is not None:
                self.log(msg)
        text = (
            f"step {p.step}  loss {p.train_loss:.4f}  {p.tokens_per_second:,.0f} tok/s  "
            f"left {format_seconds(p.seconds_left)}"
        )
        if self.plain and self.console is not None:
            now = time.monotonic()
            if now - self._last_line >= self.interval:
                self._last_line = now
                line = f"train: step {p.step}/{p.iterations}" + text.removeprefix(f"step {p.step}")
                if self.log is not None:
                    self.log.echo(line)
                else:
                    self.console.print(line, highlight=False, markup=False)
            return
        if self._progress is None or self._task is None:
            return
        if self.cap > 0:  # the bar tracks whichever limit ends the run first
            frac = max(p.step / max(p.iterations, 1), p.elapsed / self.cap)
        else:
            frac = p.step / max(p.iterations, 1)
        self._progress.update(self._task, completed=min(frac, 1.0) * (self.iterations or 1), text=text)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


TICKER_DELAY = 2.0
"""Seconds of silence a :class:`Ticker` allows before it shows anything."""


class Ticker:
    """Shows that a slow step without its own progress (the size estimate, a codec at a high
    quality) is still working: nothing for the first ``delay`` seconds, then a spinner with the
    elapsed time on a terminal, or a plain line every ``interval`` seconds otherwise."""

    def __init__(
        self, console: Console | None, label: str, *, delay: float | None = None, interval: float = 10.0
    ):
        self.console, self.label, self.interval = console, label, interval
        self.delay = TICKER_DELAY if delay is None else delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self.shown = False

    def __enter__(self) -> Ticker:
        self._t0 = time.monotonic()
        if self.console is not None:
            self._thread = threading.Thread(target=self._run, name="pgolf-ticker", daemon=True)
            self._thread.start()
        return self

    def _elapsed(self) -> str:
        return format_seconds(time.monotonic() - self._t0)

    def _run(self) -> None:
        assert self.console is not None
        if self._stop.wait(self.delay):
            return
        self.shown = True
        if self.console.is_terminal:
            with self.console.status(f"{self.label} … {self._elapsed()}") as status:
                while not self._stop.wait(0.5):
                    status.update(f"{self.label} … {self._elapsed()}")
            return
        while True:
            self.console.print(f"{self.label} … {self._elapsed()}", highlight=False, markup=False)
            if self._stop.wait(self.interval):
                return

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.shown and self.console is not None and et is None:
            self.console.print(f"{self.label}: done in {self._elapsed()}", highlight=False, markup=False)
