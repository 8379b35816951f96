"""What ``pgolf search`` shows: one live table of trials and one progress line.

On a terminal the table redraws in place (rich Live); elsewhere (a log file, CI) each trial's
start and end is printed as one line. Nothing else is printed: Ray and Optuna are silenced.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pgolf.registry.tools.progress import format_seconds

STATE_STYLE = {
    "pending": "dim",
    "running": "cyan",
    "complete": "green",
    "stopped": "yellow",
    "error": "red",
    "infeasible": "magenta",
    "invalid": "magenta",
    "interrupted": "yellow",
    "timeout": "red",
    "unused": "dim",
    "imported": "dim",
}
DONE = ("complete", "stopped", "error", "timeout")


@dataclass
class Row:
    number: int
    state: str = "pending"
    point: str = ""
    step: int | None = None
    val_bpb: float | None = None
    bytes: int | None = None  # estimated until the trial ends, then the real artifact
    bytes_real: bool = False
    note: str = ""
    t0: float = field(default_factory=time.time)


def _fmt_bpb(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.4f}"


class Display:
    MAX_ROWS = 24

    def __init__(self, console: Console | None, *, total: int, limit: int, quiet: bool = False):
        self.console = console
        self.quiet = quiet or console is None
        self.total = total
        self.limit = limit
        self.rows: dict[int, Row] = {}
        self.done_before = 0
        self.best: tuple[float, int] | None = None
        self.t0 = time.time()
        self._live: Live | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self.quiet and self.console is not None and self.console.is_terminal:
            self._live = Live(
                console=self.console, get_renderable=self.render, refresh_per_second=2, transient=False
            )
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.stop()
            self._live = None

    def note(self, text: str) -> None:
        self._line(text)

    def resume_from(self, records: dict[int, dict[str, Any]]) -> None:
        """Count the trials an earlier session finished (including those a resume just
        adopted, which then leave this session's rows: each trial is counted once), and its best."""
        self.done_before = 0
        for n, r in records.items():
            if r.get("state") in DONE:
                self.done_before += 1
                self.rows.pop(n, None)
            v = r.get("val_bpb")
            if r.get("state") != "complete" or not r.get("fits", True) or not isinstance(v, float):
                continue
            if math.isfinite(v) and (self.best is None or v < self.best[0]):
                self.best = (v, n)

    def _line(self, text: str) -> None:
        if self._live is not None:
            self._live.update(self.render())
        elif not self.quiet and self.console is not None:
            self.console.print(text, highlight=False, markup=False)

    # -- events ---------------------------------------------------------------------------------
    def rejected(self, number: int, state: str, point: str, est_bytes: int | None, note: str) -> None:
        self.rows[number] = Row(number, state, point, bytes=est_bytes, note=note)
        size = (
            f" {est_bytes:,} bytes > {self.limit:,}"
            if est_bytes is not None and state == "infeasible"
            else ""
        )
        self._line(f"t{number:04d} {state}{size}: {point}" + (f" ({note})" if note and not size else ""))

    def started(self, number: int, point: str, est_bytes: int | None) -> None:
        self.rows[number] = Row(number, "pending", point, bytes=est_bytes)
        what = f" (estimate {est_bytes:,} bytes)" if est_bytes is not None else ""
        self._line(f"t{number:04d} queued{what}: {point}")

    def running(self, number: int) -> None:
        row = self.rows.setdefault(number, Row(number))
        row.state = "running"
        if self._live is not None:
            self._live.update(self.render())

    def progress(self, number: int, step: int, val_bpb: float) -> None:
        row = self.rows.setdefault(number, Row(number))
        row.state, row.step, row.val_bpb = "running", step, val_bpb
        if self._live is not None:
            self._live.update(self.render())

    def finished(
        self,
        number: int,
        state: str,
        val_bpb: float | None,
        bytes_: int | None,
        note: str = "",
        legal: bool | None = None,
    ) -> None:
        """A trial's end; ``legal`` False (a legality probe failed): never the best so far."""
        row = self.rows.setdefault(number, Row(number))
        row.state, row.note = state, note
        if state not in ("complete", "stopped"):
            row.val_bpb = None  # an intermediate score is not this trial's result
        if val_bpb is not None and math.isfinite(val_bpb):
            row.val_bpb = val_bpb
        if bytes_ is not None:
            row.bytes, row.bytes_real = bytes_, state == "complete"
        fits = bytes_ is None or bytes_ <= self.limit
        v = row.val_bpb
        ok = fits and legal is not False
        if state == "complete" and v is not None and ok and (self.best is None or v < self.best[0]):
            self.best = (v, number)
        what = f"val_bpb {_fmt_bpb(row.val_bpb)}" if row.val_bpb is not None else ""
        size = f" {row.bytes:,} bytes" if row.bytes is not None and state == "complete" else ""
        self._line(
            f"t{number:04d} {state} {what}{size}" + (f" ({note})" if note else "") + f"  [{self.status()}]"
        )

    # -- rendering ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows.values():
            out[r.state] = out.get(r.state, 0) + 1
        return out

    def status(self) -> str:
        c = self.counts()
        done = self.done_before + sum(c.get(s, 0) for s in DONE)
        parts = [f"{done}/{self.total} trained"]
        for s in ("running", "pending", "error", "timeout", "stopped", "infeasible", "invalid"):
            if c.get(s):
                parts.append(f"{c[s]} {s}")
        if self.best is not None:
            parts.append(f"best val_bpb {self.best[0]:.4f} (t{self.best[1]:04d})")
        parts.append(f"elapsed {format_seconds(time.time() - self.t0)}")
        return " · ".join(parts)

    def render(self) -> Any:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col, just in (
            ("trial", "left"),
            ("state", "left"),
            ("step", "right"),
            ("val_bpb", "right"),
            ("bytes", "right"),
            ("point", "left"),
        ):
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        rows = sorted(self.rows.values(), key=lambda r: r.number)[-self.MAX_ROWS :]
        for r in rows:
            size = "" if r.bytes is None else f"{r.bytes:,}" + ("" if r.bytes_real else "~")
            table.add_row(
                f"t{r.number:04d}",
                Text(r.state, style=STATE_STYLE.get(r.state, "")),
                "" if r.step is None else str(r.step),
                _fmt_bpb(r.val_bpb),
                size,
                Text(r.point + (f"  [{r.note}]" if r.note else ""), overflow="ellipsis", no_wrap=True),
            )
        return Group(table, Text(self.status(), style="bold"))
