"""Training checkpoints: what a killed run needs to continue bit for bit, and how it is written.

A run writes a checkpoint into its (still ``.partial``) folder every
``train.checkpoint_minutes`` of wall-clock: one file per process, ``checkpoint.pt`` for rank 0 and
``checkpoint.rank<r>.pt`` for the others, each replaced atomically (written beside, then
renamed), so a kill at any moment leaves the previous complete checkpoint. Each holds

* the model's and every optimizer's ``state_dict``;
* every technique's ``state_dict`` (EMA weights, calibrated values, cursors …);
* the training state (step, training seconds, LR multiplier, switches on, sequence length) and
  the validation and train-loss history so far;
* the data loader's position in the token stream;
* the random number generators (torch CPU and CUDA, Python, NumPy);
* the hash of the resolved stack it belongs to, and the world size.

``pgolf run --resume DIR`` rebuilds the run from its ``stack.yaml``, loads the checkpoint after the
compile warm-up and continues: on CPU the resumed run ends with exactly the weights and score of
an uninterrupted one (tested). A wall-clock-capped run resumes with its training seconds so far,
so it stops at the same budget, though not at the same step.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api.errors import PgolfError, os_error_text
from .dataset import file_sha256
from .record import STACK_FILE

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "pgolf-checkpoint/1"


class ResumeError(PgolfError):
    """A checkpoint that cannot be resumed (missing, corrupt, or of another stack)."""


def checkpoint_path(folder: Path, rank: int = 0) -> Path:
    return Path(folder) / (CHECKPOINT_FILE if rank == 0 else f"checkpoint.rank{rank}.pt")


def rng_state() -> dict[str, Any]:
    """Every random number generator a run may draw from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save(path: Path, payload: Mapping[str, Any]) -> int:
    """Write ``payload`` to ``path`` atomically (a temporary file beside it, fsync, rename);
    returns the file's size in bytes."""
    path = Path(path)
    buf = io.BytesIO()  # serialized first, so a failed write is an OSError (torch wraps its own)
    torch.save({"format": FORMAT, **payload}, buf)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with tmp.open("wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; :class:`ResumeError` naming the file if it
    cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(
            f"{path}: no checkpoint here (the run was killed before its first one; train.checkpoint_minutes "
            "sets how often they are written); start the run again"
        )
    try:
        with path.open("rb") as f:
            payload = torch.load(f, map_location="cpu", weights_only=False)  # our own file
    except Exception as e:  # a truncated or foreign file
        raise ResumeError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ResumeError(f"{path}: not a pgolf checkpoint (expected format {FORMAT})")
    return payload


def stack_sha256(folder: Path) -> str:
    """The SHA-256 of the run's ``stack.yaml`` (a checkpoint belongs to exactly that file)."""
    return file_sha256(Path(folder) / STACK_FILE)


def load_for(folder: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This process's checkpoint in ``folder``, checked against the folder's ``stack.yaml`` and
    the number of processes (:class:`ResumeError` naming what differs)."""
    payload = load(checkpoint_path(folder, rank))
    if payload.get("world_size") != world_size:
        raise ResumeError(
            f"{folder}: the checkpoint was written by {payload.get('world_size')} process(es); resume it "
            f"with the same number (this run has {world_size})"
        )
    if rank == 0 and payload.get("stack_sha256") != stack_sha256(folder):
        raise ResumeError(
            f"{Path(folder) / STACK_FILE}: stack.yaml changed since the checkpoint was written; a run "
            "resumes only with the stack it started with (start a new run for a changed stack)"
        )
    return payload


def remove(folder: Path, rank: int = 0) -> None:
    """Delete this process's checkpoint (a finished run does not keep it)."""
    checkpoint_path(folder, rank).unlink(missing_ok=True)


@dataclass
class Checkpointer:
    """Writes this process's checkpoint into ``folder`` every ``minutes`` of wall-clock (0 =
    never). ``extra()`` adds what the caller keeps outside the trainer (the train-loss curve);
    ``stack_sha256`` ties the checkpoint to the run's ``stack.yaml``; ``resume``: the checkpoint
    this run continues from (:func:`load_for`), which the trainer restores through
    :meth:`restore_weights` and :meth:`restore_state`."""

    folder: Path
    rank: int
    world_size: int
    stack_sha256: str
    minutes: float
    extra: Callable[[], Mapping[str, Any]] = dict
    log: Callable[[str], None] = lambda s: None
    last: float = field(default_factory=time.monotonic)
    written: int = 0
    resume: Mapping[str, Any] | None = None

    def restore_weights(self, trainer: Any) -> None:
        """Model, optimizers and data position of :attr:`resume` (:func:`restore_weights`)."""
        assert self.resume is not None
        restore_weights(trainer, self.resume)

    def restore_state(self, trainer: Any, state: Any) -> tuple[list[dict[str, float]], float, bool, str]:
        """Technique states, training state and random generators of :attr:`resume`
        (:func:`restore_state`); returns the history, the last train loss, whether training had
        finished and what stopped it."""
        assert self.resume is not None
        history = restore_state(trainer, state, self.resume)
        r = self.resume
        return history, float(r["last_train_loss"]), bool(r["finished"]), str(r["stopped_by"] or "")

    def due(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self.last >= self.minutes * 60.0

    def save(self, trainer: Any, state: Any, history: list[dict[str, float]], loss: float, *,
             finished: bool = False, stopped_by: str = "") -> None:  # fmt: skip
        """Write the checkpoint of ``trainer`` at ``state`` (after a whole optimizer step)."""
        payload = {
            "stack_sha256": self.stack_sha256,
            "world_size": self.world_size,
            "rank": self.rank,
            "model": trainer.model.state_dict(),
            "optimizers": trainer.opt.state_dicts(),
            "techniques": {t.name: t.state_dict() for t in trainer.sites.techniques},
            "loader": trainer.loader.state_dict(),
            "train_state": dataclasses.asdict(state),
            "history": list(history),
            "last_train_loss": loss,
            "finished": finished,
            "stopped_by": stopped_by,
            "rng": rng_state(),
            **self.extra(),
        }
        self.last = time.monotonic()
        try:
            save(checkpoint_path(self.folder, self.rank), payload)
        except OSError as e:  # the run goes on; only its resumability suffers
            self.log(
                f"warning: could not write a checkpoint at step {state.step} ({os_error_text(e)}); "
                "training goes on, and a resume would start from the previous checkpoint, if any"
            )
            return
        self.written += 1


def restore_weights(trainer: Any, payload: Mapping[str, Any]) -> None:
    """Model, optimizers and data position (before the ``on_train_start`` event)."""
    trainer.model.load_state_dict(payload["model"])
    trainer.opt.load_state_dicts(payload["optimizers"])
    loader = trainer.loader
    if not hasattr(loader, "load_state_dict"):
        raise ResumeError(
            f"the training loader ({type(loader).__name__}) cannot restore its position "
            "(no load_state_dict); this stack's runs cannot be resumed"
        )
    loader.load_state_dict(payload["loader"])


def restore_state(trainer: Any, state: Any, payload: Mapping[str, Any]) -> list[dict[str, float]]:
    """Technique states, the training state and the random generators (after the
    ``on_train_start`` event, which may reset a technique's state); returns the history."""
    saved = payload["techniques"]
    mine = {t.name: t for t in trainer.sites.techniques}
    if set(saved) != set(mine):
        raise ResumeError(f"the checkpoint holds techniques {sorted(saved)}, the stack has {sorted(mine)}")
    for name, t in mine.items():
        t.load_state_dict(saved[name])
    for key, value in payload["train_state"].items():
        setattr(state, key, tuple(value) if key == "switches" else value)
    set_rng_state(payload["rng"])
    return list(payload["history"])
