"""The driver side of ``pgolf ablate``: a :class:`StudyRunner` that launches the full stack first.

Everything else is the search harness's (``search.points_only``): the size gate decides each
variant before it trains, one trial per GPU, the ledger, ``--resume`` after a kill. What this
adds:

* the full stack is launched before any other variant (variants sized earlier wait for it);
* with ``step_matched``, a variant is launched once the full stack has finished its first seed,
  and each of its seeds stops at the full stack's step count on that seed (the trainable's
  ``match_steps``); when the full stack ends without a result, or does not fit, the remaining
  variants are not launched (there is no step count to match) and the study says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .ablate import Plan, read_plan
from .harness import Sample, StudyRunner, run_search
from .ledger import LEDGER_NAME, run_path
from .spec import LoadedSearch

ENDED_WITHOUT_RESULT = ("error", "timeout", "stopped", "infeasible", "invalid")


class AblationRunner(StudyRunner):
    def __init__(self, loaded: LoadedSearch, study_dir: Path, **kw: Any):
        self.plan: Plan = read_plan(study_dir)
        self.full_key = json.dumps(self.plan.full.point, sort_keys=True)
        self.halt: str | None = None
        super().__init__(loaded, study_dir, **kw)

    def point_text(self, point: Mapping[str, Any]) -> str:
        return " = ".join(self.plan.names_of(point)) or super().point_text(point)

    def _is_full(self, point: Mapping[str, Any]) -> bool:
        return json.dumps(dict(point), sort_keys=True) == self.full_key

    def _is_reference(self, point: Mapping[str, Any]) -> bool:
        return self._is_full(point)

    def full_record(self) -> tuple[int, dict[str, Any]] | None:
        """The full stack's latest trial (number, record), if it was ever sized."""
        found = [(n, r) for n, r in self.records.items() if self._is_full(r.get("point") or {})]
        return max(found, key=lambda x: x[0]) if found else None

    def _first_seed_done(self, rec: Mapping[str, Any]) -> bool:
        d = run_path(str(rec.get("run_dir", "")), self.dir)
        return (d / f"seed_{self.seeds[0]}" / "result.json").is_file()

    def _next_ready(self) -> Sample | None:
        full = next((s for s in self.ready if self._is_full(s.point)), None)
        if full is not None:
            self.ready.remove(full)
            return full
        found = self.full_record()
        state = found[1].get("state") if found else None
        if state in (None, "interrupted", "unused"):
            return None  # the full stack is still to be sized or launched: it goes first
        if self.plan.step_matched and found is not None:
            rec = found[1]
            if state in ENDED_WITHOUT_RESULT:
                self._stop(
                    f"the full stack (t{found[0]:04d}) ended {state}"
                    + (f" ({rec.get('error')})" if rec.get("error") else "")
                    + ": there is no step count to match, so the remaining variants are not trained"
                )
                return None
            if state == "running" and not self._first_seed_done(rec):
                return None  # wait for its first seed's step count
        return super()._next_ready()

    def _stop(self, why: str) -> None:
        if self.halt is None:
            self.halt = why
            self.display.note(why)

    def next_config(self, wait: float = 0.0) -> dict[str, Any] | None:
        if self.halt:
            return None
        cfg = super().next_config(wait)
        return None if self.halt else cfg

    def summary_extras(self) -> dict[str, Any]:
        return {"halt": self.halt}

    def launch_extras(self, smp: Sample) -> dict[str, Any]:
        if not self.plan.step_matched or self._is_full(smp.point):
            return {}
        found = self.full_record()
        assert found is not None  # _next_ready launches nothing before the full stack
        n, rec = found
        return {
            "match_steps": {
                "number": n,
                "run_dir": str(run_path(str(rec["run_dir"]), self.dir).resolve()),
                "ledger": str((self.dir / LEDGER_NAME).resolve()),
            }
        }


def run_ablation(loaded: LoadedSearch, study_dir: Path, plan: Plan | None, **kw: Any) -> dict[str, Any]:
    """Run the ablation study in ``study_dir`` through :func:`run_search` (``kw``: its options): a new
    one with its ``plan`` (written into the folder, and gone with it if the study fails before its
    first variant), or a resumed one (``resume=True``, ``plan`` None: the folder holds it)."""
    return run_search(
        loaded, study_dir, runner_cls=AblationRunner, prepare=None if plan is None else plan.write, **kw
    )
