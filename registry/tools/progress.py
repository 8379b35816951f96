"""What a run shows and logs: ``run.log`` lines and a live progress line on a terminal."""

from __future__ import annotations

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


class LiveProgress:
    """A progress bar with step, train loss, tokens/s and time left (terminals only)."""

    def __init__(self, console: Console | None, iterations: int, cap_seconds: float):
        self.enabled = console is not None and console.is_terminal
        self.iterations = iterations
        self.cap = cap_seconds
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
        return self

    def update(self, p: StepProgress) -> None:
        if self._progress is None or self._task is None:
            return
        if self.cap > 0:  # the bar tracks whichever limit ends the run first
            frac = max(p.step / max(p.iterations, 1), p.elapsed / self.cap)
        else:
            frac = p.step / max(p.iterations, 1)
        text = (
            f"step {p.step}  loss {p.train_loss:.4f}  {p.tokens_per_second:,.0f} tok/s  "
            f"left {format_seconds(p.seconds_left)}"
        )
        self._progress.update(self._task, completed=min(frac, 1.0) * (self.iterations or 1), text=text)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
