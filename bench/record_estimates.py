"""Benchmark: the size estimate of every reference stack (``stacks/pr*.yaml``) against the
challenge's 16,000,000-byte limit and, where the record's lineage published one, its artifact.

Runs ``estimate_artifact_bytes`` (what ``pgolf check`` and ``pgolf run`` gate on: the stack's real
quantizer, calibration and codec on surrogate weights, plus the submission script) for each stack
on the CPU and writes the figures to ``--out`` (JSON): model, code and total bytes, whether it
fits, the surrogate (``export.size_estimate``), the parameter count, the seconds it took and, for
a stack whose lineage has a published artifact (``../shared/reference/techniques.md`` §5, or the
record's own README for pr1716), that record's model bytes per parameter and the estimate's::

    python bench/record_estimates.py                       # every stacks/pr*.yaml
    python bench/record_estimates.py --only pr754 pr1539   # some, merged into the file

Each estimate took 1-20 minutes on the 2-core development machine (2026-12-01): the codec at its
record setting dominates (brotli-11, lzma-9, zstd-22 on ~27 MB of codes), and a stack with
selective pruning compresses the whole model once per probe (pr1539: 19 min).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from pgolf.registry.api.config import load_stack
from pgolf.registry.run.pipeline import dry_build, estimate_artifact_bytes

REPO = Path(__file__).resolve().parent.parent
# The published artifact (techniques.md §5, or the record's own README): model bytes and parameters
# of the record each stack builds on, where the stack's recipe is that record's export (quantizer,
# clip rule, codec).
PUBLISHED = {
    "pr754": {"record": "03-23 LeakyReLU + LegalTTT + ParallelMuon", "model_bytes": 15_887_928,
              "params": 26_928_220},
    "pr1539": {"record": "04-09 SP8192 3-layer recur + ParResid", "model_bytes": 15_975_300,
               "params": 35_944_536},
    "pr2135": {"record": "04-29 compliance rerun of #1851", "model_bytes": 15_918_316, "params": 35_945_671},
    # PR #1716's own README: 15,993,825-byte mean artifact of 3 seeds less its 18,097 code bytes; it
    # publishes no parameter count, so the comparison per parameter uses the stack's own count
    "pr1716": {"record": "PR #1716 itself (3-seed mean)", "model_bytes": 15_975_728, "params": None},
}  # fmt: skip


def measure(path: Path) -> dict[str, object]:
    rs = load_stack(path)
    t0 = time.perf_counter()
    est = estimate_artifact_bytes(rs)
    seconds = time.perf_counter() - t0
    params = dry_build(rs).params
    row: dict[str, object] = {
        "stack": str(path.relative_to(REPO)),
        "size_estimate": rs.stack.export.size_estimate,
        "params": params,
        "model_bytes": est.model_bytes,
        "code_bytes": est.code_bytes,
        "total": est.total,
        "limit": est.limit,
        "fits": est.fits,
        "allowance": est.allowance,
        "seconds": round(seconds, 1),
        "bits_per_param": round(8 * est.model_bytes / params, 3),
        "method": est.method,
    }
    ref = PUBLISHED.get(path.stem)
    if ref is not None:
        ref_params = int(ref["params"] or params)  # type: ignore[call-overload]
        ref_bits = 8 * int(ref["model_bytes"]) / ref_params  # type: ignore[call-overload]
        row["published"] = {**ref, "bits_per_param": round(ref_bits, 3)}
        row["bits_vs_published"] = round(8 * est.model_bytes / params / ref_bits - 1, 4)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="stack names (stacks/NAME.yaml); default: every pr*.yaml")
    ap.add_argument("--out", default=str(REPO / "bench" / "record_estimates.json"))
    args = ap.parse_args(argv)
    names = args.only or sorted(
        p.stem for p in (REPO / "stacks").glob("pr*.yaml") if "_as_published" not in p.stem
    )
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    rows = dict(old.get("stacks", {}))
    for name in names:
        row = measure(REPO / "stacks" / f"{name}.yaml")
        rows[name] = row
        vs = (
            f", {100 * float(row['bits_vs_published']):+.1f} % bits/param vs the record"
            if "published" in row
            else ""
        )  # type: ignore[arg-type]
        print(f"{name}: {row['total']:,} bytes ({row['model_bytes']:,} model + {row['code_bytes']:,} code), "
              f"{'fits' if row['fits'] else 'OVER'} the {row['limit']:,}-byte limit; {row['bits_per_param']} bits/param"
              f"{vs}; {row['size_estimate']} stand-ins; {row['seconds']} s", flush=True)  # fmt: skip
    doc = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "command": "python bench/record_estimates.py"
        + (f" --only {' '.join(args.only)}" if args.only else ""),
        "stacks": dict(sorted(rows.items())),
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(bool(r["fits"]) for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
