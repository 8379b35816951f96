"""The study ledger: ``trials.jsonl``, one JSON event per line, appended (and fsync'd) by the
driver only. It is what ``pgolf results`` reads and what ``--resume`` trusts: a trial whose
end is in the ledger is never run again.

Every event carries the trial ``number`` (the Optuna trial number, unique in the study) and
a ``state``; folding the events of a number in order gives the trial's record.

States: ``invalid`` (the sampled stack does not validate), ``infeasible`` (too large: rejected
before training), ``running``, then ``complete``, ``stopped`` (cut early by ASHA), ``error``
(raised, ran out of memory, diverged, a non-finite final score, a dead worker: ``error_kind``
says which), ``timeout`` (killed by the driver after ``trial.timeout_seconds``), or
``interrupted`` (the driver stopped; re-run under a new number on resume). ``unused``: sized but
never launched (the budget was spent or the study stopped; sampled first on resume);
``imported``: a finished trial of an earlier study added by ``search.warm_start``.

Paths (``run_dir``) are relative to the study folder, so a copied study still finds its runs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

LEDGER_NAME = "trials.jsonl"
TRAINED = ("complete", "stopped", "error", "timeout")  # count toward search.num_samples
REJECTED = ("infeasible", "invalid")
FINAL = (*TRAINED, *REJECTED, "interrupted", "unused", "imported")


def rel_path(path: Path, study_dir: Path) -> str:
    """``path`` relative to the study folder when it is inside it (else absolute)."""
    try:
        return str(path.resolve().relative_to(study_dir.resolve()))
    except ValueError:
        return str(path.resolve())


def run_path(stored: str | Path, study_dir: Path) -> Path:
    """A ledger path back to a real one: relative paths are inside the study folder (older
    ledgers stored absolute paths, which are kept)."""
    p = Path(stored)
    return p if p.is_absolute() else study_dir / p


def finite_json(v: Any) -> Any:
    """JSON without NaN/inf (they become null), in nested mappings and sequences too: the ledger and
    the trials' results are strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_json(x) for x in v]
    return v


class Ledger:
    def __init__(self, path: Path):
        self.path = path

    def append(self, event: Mapping[str, Any]) -> None:
        ev = {"time": round(time.time(), 3), **finite_json(dict(event))}
        line = json.dumps(ev, sort_keys=False, default=str) + "\n"
        if self._torn_tail():  # a line cut by a crash: end it, so that this event stays whole
            line = "\n" + line
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _torn_tail(self) -> bool:
        try:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except OSError:  # missing or empty
            return False

    def events(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write: ignore it
                    continue

    def records(self) -> dict[int, dict[str, Any]]:
        return fold(self.events())


def fold(events: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Merge the events of each trial number, later keys winning; ``finished_events`` counts
    how many times a trial reached a final state (exactly once, unless something is wrong)."""
    out: dict[int, dict[str, Any]] = {}
    for ev in events:
        n = int(ev["number"])
        rec = out.setdefault(n, {"finished_events": 0})
        rec.update(ev)
        if ev.get("state") in FINAL:
            rec["finished_events"] += 1
    return dict(sorted(out.items()))
