"""Benchmark: the evaluation library and the legality probes on a tiny model trained on CPU.

Trains ``bench/eval_library.yaml``'s base stack once on the embedded default corpus, scores its
artifact with every variant (sliding window, long context, full / LoRA / phased TTT, temperature
fixed and fitted, the normalised n-gram cache, the token-only tilt, and the three known-invalid
variants), runs the legality probes on each, and reports val_bpb against plain windows, the
verdicts, and the probes' cost: their CPU time as a share of the evaluation's (the target is at most
10 % for the plain tiny run). It also times the provenance pass (document hashes and fingerprint)
on a synthetic shard. Figures are printed and written to ``--out`` (JSON)::

    python bench/legality_probes.py                  # writes bench/legality_probes.json
    python bench/legality_probes.py --repeats 5 --provenance-tokens 100000000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from pgolf.registry.run.record import finite_or_none
from pgolf.registry.tools.probebench import (
    LIBRARY,
    Report,
    load_library,
    provenance_cost,
    score_variant,
    train_base,
)

REPO = Path(__file__).resolve().parent.parent
TARGET_SHARE = 0.10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--library", type=Path, default=LIBRARY, help="variants file (default bench/eval_library.yaml)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timings per variant; the median is kept")
    ap.add_argument(
        "--provenance-tokens", type=int, default=20_000_000, help="synthetic shard size (0 = skip)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "legality_probes.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lib = load_library(args.library)
    with tempfile.TemporaryDirectory() as tmp:
        lib.overrides = {"data": {"cache_dir": str(Path(tmp) / "cache")}}
        trained = train_base(lib, Path(tmp) / "run")
        report = Report(trained.seconds)
        plain = None
        for name in lib.variants:
            r = score_variant(lib, name, trained, plain, repeats=args.repeats)
            plain = r.val_bpb if name == "plain" else plain
            report.variants.append(r)
            verdict = "legal" if r.legal else "NOT LEGAL"
            print(
                f"{name:<20} val_bpb {r.val_bpb:.4f} ({r.delta_bpb:+.4f})  eval {r.eval_cpu_seconds:6.2f}s cpu  "
                f"probes {r.probe_cpu_seconds:5.2f}s cpu ({r.probe_share:5.1%})  {verdict:<9} "
                f"{'ok' if r.met else 'UNEXPECTED'}  {r.reasons[0][:110] if r.reasons else ''}",
                flush=True,
            )
        if args.provenance_tokens:
            report.provenance = provenance_cost(args.provenance_tokens, Path(tmp))
            print(f"provenance: {report.provenance}")
    base = next(v for v in report.variants if v.name == "plain")
    out = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} torch thread)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(
            ["python", "bench/legality_probes.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "target": f"probes ≤ {TARGET_SHARE:.0%} of the plain tiny run's evaluation (CPU time)",
        "plain_probe_share": round(base.probe_share, 4),
        "plain_meets_target": base.probe_share <= TARGET_SHARE,
        "every_variant_as_expected": all(v.met for v in report.variants),
        **report.to_dict(),
    }
    args.out.write_text(json.dumps(finite_or_none(out), indent=2) + "\n")
    print(
        f"plain: probes {base.probe_share:.1%} of the evaluation (target ≤ {TARGET_SHARE:.0%}) → {args.out}"
    )
    return 0 if out["plain_meets_target"] and out["every_variant_as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
