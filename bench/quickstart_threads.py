"""Benchmark: quickstart training steps in a fixed time on a loaded CPU, old thread default vs new.

The old default was torch's own (one thread per core); the new one is ``train.threads: auto``
(never more threads than cores no other process is using). Each setting trains
``stacks/quickstart.yaml`` for ``--seconds`` of training time while ``--load`` busy-looping
processes compete for the cores (on top of whatever else the machine runs), and the steps it
completes are counted. Figures are printed and written to ``--out`` (JSON)::

    python bench/quickstart_threads.py                       # 120 s each, one competing process
    python bench/quickstart_threads.py --seconds 30 --load 0 # quick, no extra load
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def _spin() -> None:
    while True:
        pass


def torch_default_threads() -> int:
    """What torch picks in a fresh process (the old pgolf default)."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def train_for(seconds: float, threads: str, load: int, workdir: Path) -> dict[str, Any]:
    """Run the quickstart for ``seconds`` of training with ``train.threads=threads`` under ``load``
    spinning processes; its result figures."""
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
    for p in spinners:
        p.start()
    try:
        time.sleep(2.0 if load else 0.0)  # let the load settle before pgolf samples the cores
        out = workdir / f"run-threads-{threads}"
        cmd = [sys.executable, "-m", "pgolf.registry.tools.cli", "run", str(REPO / "stacks" / "quickstart.yaml"),
               "--set", f"train.threads={threads}", "--set", "train.iterations=1000000",
               "--set", f"train.max_wallclock_seconds={seconds}", "--set", "train.val_loss_every=0",
               "--no-estimate", "--quiet", "--out", str(out)]  # fmt: skip
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
    finally:
        for p in spinners:
            p.terminate()
            p.join()
    result = json.loads((out / "result.json").read_text())
    stack = yaml.safe_load((out / "stack.yaml").read_text())
    return {
        "threads_setting": threads,
        "threads_used": stack["train"]["threads"],
        "steps": result["steps"],
        "train_seconds": result["train_seconds"],
        "tokens_per_second": result["tokens_per_second"],
        "val_bpb": result["val_bpb"],
        "wall_seconds": wall,
        "loadavg_1min_at_start": load_before,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="training seconds per setting")
    ap.add_argument("--load", type=int, default=1, help="busy-looping processes competing for the cores")
    ap.add_argument("--out", default=str(REPO / "bench" / "quickstart_threads.json"), help="results file")
    args = ap.parse_args()

    old = torch_default_threads()
    runs = []
    with tempfile.TemporaryDirectory(prefix="pgolf-threads-") as tmp:
        for label, setting in (
            ("old default (torch: one thread per core)", str(old)),
            ("new default (auto)", "auto"),
        ):
            r = train_for(args.seconds, setting, args.load, Path(tmp))
            r["label"] = label
            runs.append(r)
            print(
                f"{label}: threads {r['threads_used']}, {r['steps']} steps in {r['train_seconds']:.0f} s "
                f"({r['tokens_per_second']:,.0f} tokens/s; 1-min load average {r['loadavg_1min_at_start']:.1f})",
                flush=True,
            )
    doc = {
        "benchmark": "quickstart steps in a fixed training time, old thread default vs new",
        "date": dt.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "seconds": args.seconds,
        "extra_load_processes": args.load,
        "runs": runs,
        "speedup_new_over_old": runs[1]["steps"] / max(1, runs[0]["steps"]),
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"new/old steps: {doc['speedup_new_over_old']:.2f}x → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
