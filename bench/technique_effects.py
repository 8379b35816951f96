"""Measurement: the effect of each training-side technique on a tiny CPU model.

Every technique is added alone to one tiny baseline (the challenge baseline shrunk to 4 layers ×
64, SP1024 tokenizer trained on the embedded default corpus, 128-token sequences, 2,048 tokens per
step, a fixed number of steps with a linear warmdown over the last third, one CPU thread) and
trained, exported, reloaded and scored by ``pgolf.registry.run.run`` on two seeds; its
Δval_bpb is the mean over the seeds of (technique − baseline), each seed against the baseline of
the same seed. Techniques that need a setting to act at all (weight decay for ``wd_taper``) are
compared with a reference that has that setting. Parameters are the records' where they fit
the tiny model, else scaled down (``PARAMS`` below, written into the results).

At this size and length the numbers say whether a technique trains and roughly how it moves a
tiny model early in training; they are not the records' gains (8×H100, 10 minutes, 11 layers ×
512). Results are printed and written to ``--out`` (JSON, default
``bench/technique_effects.json``) and ``--table`` (Markdown)::

    python bench/technique_effects.py                   # every technique below, 2 seeds
    python bench/technique_effects.py --only xsa ema    # some of them (merged into --out)
    python bench/technique_effects.py --steps 60 --seeds 1337   # quicker, noisier
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
BASE: dict[str, Any] = {
    "base": "stacks/baseline_sp1024.yaml",  # relative to the repository root
    "name": "tiny_effects",
    "model": {"num_layers": 4, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
    "train": {
        "train_seq_len": 128,
        "train_batch_tokens": 2048,
        "micro_batch_tokens": 2048,
        "iterations": 120,
        "max_wallclock_seconds": 0,
        "warmdown_iters": 40,
        "warmup_steps": 0,
        "val_loss_every": 0,
        "train_log_every": 40,
        "threads": 1,
    },
    "eval": {"batch_tokens": 16384},
}
PARAMS: dict[str, dict[str, Any]] = {
    "asymmetric_softcap": {},
    "bigram_hash": {"buckets": 1024, "dim": 32},
    "cosine_lr": {},
    "depth_recurrence": {"loop_start": 1, "loop_end": 2, "num_loops": 1, "start_fraction": 0.35},
    "document_packing": {},
    "ema": {"decay": 0.95},  # 0.997 averages over ~330 steps: longer than the whole tiny run
    "gated_attention": {},
    "gated_skips": {},
    "late_qat": {},
    "leaky_relu_sq": {},
    "ln_scale": {},
    "muon_eq_r": {},
    "orthogonal_init": {"min_dim": 16},
    "parallel_muon": {},
    "parallel_residuals": {"start_layer": 2},
    "partial_rope": {},
    "perplexity_curriculum": {},
    "polar_express": {},
    "progressive_context": {"lengths": [32, 64, 128], "boundaries": [0.1, 0.7], "rewarm_steps": 8},
    "shuffled_loader": {},
    "smear_gate": {},
    "swa": {"interval": 5},
    "value_embeddings": {"dim": 32},
    "value_residual": {},
    "varlen_attention": {},
    "warmdown_fraction": {},
    "wd_taper": {},
    "xsa": {"layers": "last(2)"},
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # extra rows: label -> (technique, params)
    "gated_attention (dense)": ("gated_attention", {"variant": "dense"}),
    "parallel_residuals (lanes)": ("parallel_residuals", {"variant": "lanes", "start_layer": 2}),
    "parallel_residuals (routed)": ("parallel_residuals", {"variant": "routed", "start_layer": 2}),
    "smear_gate (static)": ("smear_gate", {"variant": "static"}),
    "xsa (gated)": ("xsa", {"layers": "last(2)", "gated": True}),
    "ema + swa": ("ema", {"decay": 0.95}),
}
EXTRA_TECHNIQUES = {"ema + swa": {"swa": {"interval": 5}}}
REFERENCE: dict[str, dict[str, Any]] = {  # stack settings without which the technique does nothing
    "wd_taper": {"optim": {"matrix_wd": 0.04}},
}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_one(settings: dict[str, Any], seed: int, cache: Path, work: Path) -> dict[str, float]:
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run.pipeline import run

    raw = merge(merge(BASE, settings), {"seed": seed, "data": {"cache_dir": str(cache)}})
    out = Path(tempfile.mkdtemp(dir=work))
    r = run(stack_from_dict(raw, base_dir=REPO), out, estimate=False)
    return {"val_bpb": r.val_bpb, "val_loss": r.val_loss, "train_seconds": r.train_seconds,
            "artifact_bytes": r.artifact_bytes, "params": r.params}  # fmt: skip


def rows() -> dict[str, tuple[str, dict[str, Any]]]:
    out = {name: (name, params) for name, params in PARAMS.items()}
    out.update(VARIANTS)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", nargs="*", help="rows to measure (technique names or variant labels)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338])
    ap.add_argument("--steps", type=int, default=BASE["train"]["iterations"])
    ap.add_argument("--out", default=str(REPO / "bench" / "technique_effects.json"))
    ap.add_argument("--table", default=str(REPO / "bench" / "technique_effects.md"))
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "pgolf"))
    args = ap.parse_args(argv)
    BASE["train"]["iterations"] = args.steps
    BASE["train"]["warmdown_iters"] = max(1, args.steps // 3)
    todo = rows()
    if args.only:
        unknown = [n for n in args.only if n not in todo]
        if unknown:
            ap.error(f"unknown row(s) {unknown}; known: {', '.join(todo)}")
        todo = {n: todo[n] for n in args.only}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    same_setup = (
        previous.get("setup", {}).get("base") == BASE and previous.get("setup", {}).get("seeds") == args.seeds
    )
    results: dict[str, Any] = previous.get("rows", {}) if same_setup else {}
    references: dict[str, Any] = previous.get("references", {}) if same_setup else {}
    cache = Path(args.cache_dir).expanduser()
    with tempfile.TemporaryDirectory(prefix="pgolf-effects-") as tmp:
        work = Path(tmp)

        def reference(name: str) -> dict[str, Any]:
            settings = REFERENCE.get(name, {})
            key = json.dumps(settings, sort_keys=True)
            if key not in references:
                references[key] = {str(s): run_one(settings, s, cache, work) for s in args.seeds}
                print(
                    f"reference {key}: "
                    + ", ".join(f"{references[key][str(s)]['val_bpb']:.4f}" for s in args.seeds)
                )
            return references[key]

        reference("")  # the tiny baseline
        for label, (name, params) in todo.items():
            t0 = time.perf_counter()
            settings = merge(
                REFERENCE.get(name, {}), {"techniques": {name: params, **EXTRA_TECHNIQUES.get(label, {})}}
            )
            ref = reference(name)
            runs = {str(s): run_one(settings, s, cache, work) for s in args.seeds}
            deltas = [runs[str(s)]["val_bpb"] - ref[str(s)]["val_bpb"] for s in args.seeds]
            results[label] = {
                "technique": name,
                "params": params,
                "extra_techniques": EXTRA_TECHNIQUES.get(label, {}),
                "reference": REFERENCE.get(name, {}),
                "runs": runs,
                "delta_val_bpb": deltas,
                "mean_delta_val_bpb": statistics.fmean(deltas),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(
                f"{label:32s} Δval_bpb {statistics.fmean(deltas):+.4f}  ("
                + ", ".join(f"{d:+.4f}" for d in deltas)
                + ")"
            )
            out.write_text(json.dumps(payload(args, results, references), indent=1) + "\n")
    out.write_text(json.dumps(payload(args, results, references), indent=1) + "\n")
    Path(args.table).write_text(table(results, args.seeds))
    print(f"wrote {out} and {args.table}")
    return 0


def payload(args: argparse.Namespace, results: dict[str, Any], references: dict[str, Any]) -> dict[str, Any]:
    return {
        "setup": {"base": BASE, "seeds": args.seeds, "command": "python bench/technique_effects.py"},
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "date": dt.date.today().isoformat(),
        },
        "references": references,
        "rows": results,
    }


def table(results: dict[str, Any], seeds: list[int]) -> str:
    lines = [
        "# Technique effects on a tiny CPU model",
        "",
        f"`python bench/technique_effects.py`: each row is the baseline shrunk to 4 layers × 64 (SP1024 on the "
        f"embedded corpus, {BASE['train']['iterations']} steps of {BASE['train']['train_batch_tokens']:,} tokens) "
        f"plus one technique, seeds {', '.join(map(str, seeds))}; Δval_bpb is the mean over seeds of technique − "
        "baseline (negative = better). Not the records' gains: a tiny model early in training.",
        "",
        "| technique | params | Δval_bpb (mean) | per seed | val_bpb |",
        "|---|---|---|---|---|",
    ]
    for label, r in sorted(results.items(), key=lambda kv: kv[1]["mean_delta_val_bpb"]):
        per = ", ".join(f"{d:+.4f}" for d in r["delta_val_bpb"])
        bpb = ", ".join(f"{v['val_bpb']:.4f}" for v in r["runs"].values())
        params = json.dumps(r["params"]) if r["params"] else "defaults"
        for other, p in r["extra_techniques"].items():
            params += f"; + {other} {json.dumps(p)}"
        if r["reference"]:
            params += f"; vs reference {json.dumps(r['reference'])}"
        lines.append(f"| {label} | `{params}` | {r['mean_delta_val_bpb']:+.4f} | {per} | {bpb} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
