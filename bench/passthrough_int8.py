"""What ``passthrough_int8`` saves and costs (CPU).

``python bench/passthrough_int8.py bytes [STACK]`` (default ``stacks/pr1716.yaml``, seconds): the
stack's model with the size estimate's stand-in weights; the tensors ``passthrough_int8`` (default
params) claims, packed alone and compressed by the stack's own serializer and codec, as float
passthrough and as int8. The tensors alone, because a 17 MB lzma-9 artifact moves by tens of KB
with the layout of its tensors whatever they hold.

``python bench/passthrough_int8.py round-trip`` (about 10 minutes on the busy 2-core machine): the
quickstart stack (4 × 128, 300 steps, embedded corpus) with BigramHash 1024 × 32, SmearGate (input,
12), gated skips, gated attention, GPTQ int6 / int8 embedding and lzma-9, trained once with one
thread; the same weights exported without the technique, with it, with control tensors only and
with the small matrices only, each scored from its artifact read back from disk: model bytes,
val_bpb and the largest relative RMS error of an int8 tensor.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from pgolf.registry.api.config import ResolvedStack, load_stack
from pgolf.registry.api.roles import Role
from pgolf.registry.run.export import (
    encode,
    export_model,
    export_state,
    load_artifact,
    quantize_tensors,
    relative_rms_error,
    serialize,
    write_artifact,
)
from pgolf.registry.run.pipeline import (
    build,
    prepare_data,
    score_artifact,
    surrogate_weights_,
    training_loader,
)
from pgolf.registry.run.runtime import Runtime, seed_everything
from pgolf.registry.run.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
ROUND_TRIP: dict[str, Any] = {
    "base": str(ROOT / "stacks" / "quickstart.yaml"),
    "train": {"threads": 1},
    "techniques": {
        "bigram_hash": {"buckets": 1024, "dim": 32},
        "smear_gate": {"variant": "input", "width": 12},
        "gated_skips": {},
        "gated_attention": {},
        "gptq": {
            "scope": ["matrices", "embed"],
            "bits": {"default": 6, "embed": 8},
            "calibration_batches": 4,
        },
        "lzma": {"preset": 9},
    },
}
VARIANTS: dict[str, dict[str, Any]] = {
    "without": {},
    "with": {"passthrough_int8": {}},
    "control only": {"passthrough_int8": {"scope": "none"}},
    "small matrices only": {"passthrough_int8": {"control": False}},
}


def with_technique(path: Path, params: dict[str, Any] | None = None) -> ResolvedStack:
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("techniques", {})["passthrough_int8"] = params or {}
    base = raw.get("base")
    if base is not None:
        raw["base"] = str((path.parent / base).resolve())
    return load_yaml(raw)


def load_yaml(raw: dict[str, Any]) -> ResolvedStack:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "stack.yaml"
        f.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_stack(f)


def measure_bytes(stack: Path) -> None:
    rs = with_technique(stack)
    plain = load_stack(stack)
    b = build(rs, torch.device("cpu"))
    surrogate_weights_(b.model, rs.stack.seed, rs.stack.export.size_estimate)
    state, infos = export_state(b.model)
    tech = next(t for t in b.techniques if t.name == "passthrough_int8")
    claimed = [n for n, i in infos.items() if tech.claims(i)]
    plain_sites = build(plain, torch.device("meta")).sites
    groups = {
        "control tensors": [n for n in claimed if infos[n].role == Role.SCALAR],
        "small matrices": [n for n in claimed if infos[n].role != Role.SCALAR],
        "all claimed": claimed,
    }
    print(
        f"{stack}: the claimed tensors alone, stand-in weights, serialized and compressed as the stack does"
    )
    for label, names in groups.items():
        sub = {n: state[n] for n in names}
        sizes = [
            len(encode(serialize(quantize_tensors(sub, infos, s, rs.stack.export), s), s))
            for s in (plain_sites, b.sites)
        ]
        values = sum(t.numel() for t in sub.values())
        print(f"  {label}: {len(names)} tensors, {values:,} values: float {sizes[0]:,} bytes -> int8 "
              f"{sizes[1]:,} bytes (saves {sizes[0] - sizes[1]:,})")  # fmt: skip


def round_trip() -> None:
    torch.set_num_threads(1)

    def stack(variant: str) -> ResolvedStack:
        raw = copy.deepcopy(ROUND_TRIP)
        raw["techniques"].update(VARIANTS[variant])
        return load_yaml(raw)

    rs = stack("with")
    source = prepare_data(rs.stack, check_provenance=False)
    val = source.validation(rs.stack.model.vocab_size)
    vocab = rs.stack.model.vocab_size

    def trainer(built: Any, r: ResolvedStack) -> Trainer:
        loader = training_loader(built.sites, source, CPU, r.stack.seed, vocab)
        return Trainer(built.model, built.sites, r.stack, CPU, loader)

    seed_everything(rs.stack.seed)
    b = build(rs, CPU.device)
    t = trainer(b, rs)
    t.run()
    t.finalize()
    state = {k: v.clone() for k, v in b.model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            rv = stack(variant)
            seed_everything(rv.stack.seed)
            bv = build(rv, CPU.device)
            bv.model.load_state_dict(state)
            trainer(bv, rv).calibrate()  # the same calibration batches for every variant
            path = Path(tmp) / "model.ptz"
            size = write_artifact(path, bv.model, bv.sites, rv.stack.export)
            res = score_artifact(rv, path, CPU, source, validation=val)
            ex = export_model(bv.model, bv.sites, rv.stack.export)
            back = load_artifact(path, bv.sites, ex.infos)
            errs = {n: relative_rms_error(back[n], ex.state[n].float())
                    for n, e in ex.packed["tensors"].items() if e["q"] == "passthrough_int8"}  # fmt: skip
            worst = max(errs.items(), key=lambda kv: kv[1]) if errs else ("-", 0.0)
            print(f"{variant}: model {size:,} bytes, val_bpb {res.val_bpb:.6f}, {len(errs)} int8 tensors, "
                  f"worst relative RMS error {worst[1]:.4f} ({worst[0]})", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("what", choices=["bytes", "round-trip"])
    ap.add_argument("stack", nargs="?", default=str(ROOT / "stacks" / "pr1716.yaml"))
    args = ap.parse_args()
    if args.what == "bytes":
        measure_bytes(Path(args.stack))
    else:
        round_trip()


if __name__ == "__main__":
    main()
