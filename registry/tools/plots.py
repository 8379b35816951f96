"""The training-curve plot every run writes (``training_curve.png`` in the run folder).

Two panels share their y axes: train loss (nats/token, left axis) and validation val_bpb
(right axis) against optimizer steps, and the same against training seconds (validation time
excluded). The final score, taken from the reloaded artifact, is drawn as a star at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CURVE_FILE = "training_curve.png"


def _finite(rows: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        xv, yv = r.get(x), r.get(y)
        if isinstance(xv, (int, float)) and isinstance(yv, (int, float)) and math.isfinite(yv):
            xs.append(float(xv))
            ys.append(float(yv))
    return xs, ys


def plot_training_curve(
    path: Path,
    train: Sequence[Mapping[str, Any]],
    val: Sequence[Mapping[str, Any]],
    *,
    title: str,
    final: Mapping[str, Any] | None = None,
) -> Path:
    """Write the curve PNG to ``path`` (atomically) and return it.

    ``train``: rows with ``step``, ``train_seconds`` and ``train_loss`` (nats/token);
    ``val``: rows with ``step``, ``train_seconds`` and ``val_bpb``; ``final``: ``steps``,
    ``train_seconds`` and ``val_bpb`` of the scored artifact.
    """
    import io

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    from ..run.export import atomic_write

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    twins = []
    for ax, x, label in ((axes[0], "step", "step"), (axes[1], "train_seconds", "training seconds")):
        xs, ys = _finite(train, x, "train_loss")
        ax.plot(xs, ys, color="tab:blue", lw=1.2, label="train loss")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        tw = ax.twinx()
        twins.append(tw)
        vx, vy = _finite(val, x, "val_bpb")
        if vx:
            tw.plot(vx, vy, "o-", color="tab:orange", ms=4, lw=1.2, label="val_bpb (periodic)")
        if final is not None:
            fx = final.get("steps" if x == "step" else "train_seconds")
            fy = final.get("val_bpb")
            if isinstance(fx, (int, float)) and isinstance(fy, (int, float)) and math.isfinite(fy):
                tw.plot([fx], [fy], "*", color="tab:red", ms=12, label=f"val_bpb from the artifact {fy:.4f}")
        tw.tick_params(axis="y", colors="tab:orange")
    axes[0].set_ylabel("train loss (nats/token)", color="tab:blue")
    twins[1].set_ylabel("val_bpb (bits/byte)", color="tab:orange")
    lo, hi = math.inf, -math.inf
    for tw in twins:
        a, b = tw.get_ylim()
        lo, hi = min(lo, a), max(hi, b)
    for tw in twins:
        tw.set_ylim(lo, hi)
    handles = [*axes[0].get_legend_handles_labels()[0], *twins[0].get_legend_handles_labels()[0]]
    if handles:
        axes[1].legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())
    return path
