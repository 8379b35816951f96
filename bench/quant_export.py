"""Benchmark: export time and bytes of a baseline-size model under each quantizer, serializer and
codec, every codec compressing the same serialized bytes.

The model is the stack's (default ``stacks/baseline_sp1024.yaml``: 9 × 512, 17.1 M parameters)
with the size estimate's surrogate weights (``surrogate_weights_``: N(0, 1) matrices, jittered
control tensors; no training), calibrated for GPTQ on random token batches (on ``--device``).
For each quantizer the export's float-state chain and quantizers run once (timed: calibration,
quantization); each serializer packs that state once (timed); then every codec compresses those
same bytes (timed, with the bytes it gives and the decompression time; each decompression is
checked against the input). Figures are printed as a table and written to ``--out`` (JSON, with
the command, the device, torch's version and the resolved settings)::

    python bench/quant_export.py                              # CPU, all quantizers and codecs
    python bench/quant_export.py --device cuda                # calibration on the GPU
    python bench/quant_export.py --quantizers int8,gptq6 --codecs zlib9,brotli11

Bytes are of surrogate weights: a trained model's differ (see the size estimate's notes in
``pgolf check``), but codecs and layouts are compared on the same input, which is the point.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

QUANTIZERS: dict[str, dict[str, Any]] = {
    "int8": {},  # the baseline's int8_rowwise (the default quantizer)
    "rtn8": {"rtn": {"bits": 8}},
    "rtn6": {"rtn": {"bits": 6}},
    "rtn5": {"rtn": {"bits": 5}},
    "gptq6": {"gptq": {"bits": 6}},
    "gptq5": {"gptq": {"bits": 5}},
    "gptq6_awq": {"gptq": {"bits": 6, "awq_groups": 4}},
}
SERIALIZERS: dict[str, dict[str, Any]] = {
    "torch_save": {},
    "bitpack": {"bitpack": {}},
    "bitpack_planes": {"bitpack": {"codes": "planes", "floats": "planes"}},
    "torch_save_shuffled": {"byte_shuffle": {"stride": 2}},
}
CODECS: dict[str, dict[str, Any]] = {
    "zlib9": {"zlib": {"level": 9}},
    "zstd22": {"zstd": {"level": 22}},
    "zstd22_long": {"zstd": {"level": 22, "long": True}},
    "lzma9": {"lzma": {"preset": 9}},
    "lzma9_delta2": {"lzma": {"preset": 9, "delta": 2}},
    "brotli11": {"brotli": {"quality": 11}},
}


def technique(name: str, params: dict[str, Any], spec: Any) -> Any:
    """An instance of registered technique ``name`` with ``params``."""
    from pgolf.registry import REGISTRY

    cls = REGISTRY.get(name)
    return cls(cls.Params(**params), spec)


def random_batches(vocab: int, shape: tuple[int, int], gen: torch.Generator, device: torch.device) -> Any:
    """Batches of random token ids, drawn on the CPU, on ``device``."""
    while True:
        yield torch.randint(0, vocab, shape, generator=gen).to(device)


def pick(table: dict[str, Any], names: str | None, what: str) -> dict[str, Any]:
    if not names:
        return table
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in table]
    if unknown:
        sys.exit(f"unknown {what} {unknown}; choose from {sorted(table)}")
    return {n: table[n] for n in chosen}


def bench(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    from pgolf.registry.api.config import load_stack
    from pgolf.registry.api.context import CalibrationData
    from pgolf.registry.api.sites import Dispatcher
    from pgolf.registry.run.export import _quantize, export_state, serialize
    from pgolf.registry.run.model import count_params
    from pgolf.registry.run.pipeline import build, eval_switches, surrogate_weights_

    device = torch.device(args.device)
    quantizers = pick(QUANTIZERS, args.quantizers, "quantizers")
    serializers = pick(SERIALIZERS, args.serializers, "serializers")
    codecs = pick(CODECS, args.codecs, "codecs")
    rows: list[dict[str, Any]] = []
    stack = Path(args.stack)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "stack": str(stack),
        "weights": "surrogate (pgolf.registry.run.pipeline.surrogate_weights_), not trained",
        "calibration": {"batches": args.calibration_batches, "batch": args.calibration_batch, "tokens": "random ids"},
        "quantizers": quantizers, "serializers": serializers, "codecs": codecs,
        "rows": rows,
    }  # fmt: skip
    for qname, qtech in quantizers.items():
        sets = [f"techniques.{k}={json.dumps(v)}" for k, v in qtech.items()]
        if "gptq" in qtech:
            sets.append(f"techniques.gptq.calibration_batches={args.calibration_batches}")
        rs = load_stack(stack, sets)
        b = build(rs, device)
        surrogate_weights_(b.model, rs.stack.seed)
        t0 = time.perf_counter()
        cal = [t for t in b.sites.implementers("calibrate")]
        if cal:
            gen = torch.Generator().manual_seed(0)
            shape = (args.calibration_batch, rs.stack.train.train_seq_len)
            vocab = rs.stack.model.vocab_size
            data = CalibrationData(random_batches(vocab, shape, gen, device))
            b.model.eval()
            with torch.no_grad():
                for t in cal:
                    t.call("calibrate", model=b.model, batches=data, switches=eval_switches(b.sites))
            if device.type == "cuda":
                torch.cuda.synchronize()
        calibrate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, infos = export_state(b.model)
        packed, _, _ = _quantize(state, infos, b.sites, rs.stack.export)
        quantize_s = time.perf_counter() - t0
        print(f"{qname}: {count_params(b.model):,} parameters, calibrate {calibrate_s:.1f}s, "
              f"quantize {quantize_s:.1f}s", flush=True)  # fmt: skip
        for sname, stech in serializers.items():
            sites = Dispatcher([technique(k, v, rs.spec) for k, v in stech.items()])
            t0 = time.perf_counter()
            raw = serialize(packed, sites)
            for t in sites.implementers("encode_bytes"):
                raw = bytes(t.call("encode_bytes", data=raw))
            serialize_s = time.perf_counter() - t0
            for cname, ctech in codecs.items():
                ((name, params),) = ctech.items()
                codec = technique(name, params, rs.spec)
                t0 = time.perf_counter()
                blob = bytes(codec.call("compress", data=raw))
                compress_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                back = bytes(codec.call("decompress", data=blob))
                decompress_s = time.perf_counter() - t0
                assert back == raw, f"{cname} did not give back its input"
                row = {"quantizer": qname, "serializer": sname, "codec": cname, "serialized_bytes": len(raw),
                       "model_bytes": len(blob), "calibrate_s": calibrate_s, "quantize_s": quantize_s,
                       "serialize_s": serialize_s, "compress_s": compress_s, "decompress_s": decompress_s}  # fmt: skip
                rows.append(row)
                save(result)  # after every row: an interrupted run keeps what it measured
                print(f"  {sname:20s} {cname:13s} {len(raw):>12,} → {len(blob):>12,} bytes  "
                      f"compress {compress_s:6.1f}s  decompress {decompress_s:5.2f}s", flush=True)  # fmt: skip
        del b
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", default=str(REPO / "stacks" / "baseline_sp1024.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantizers", help=f"comma-separated subset of {','.join(QUANTIZERS)}")
    ap.add_argument("--serializers", help=f"comma-separated subset of {','.join(SERIALIZERS)}")
    ap.add_argument("--codecs", help=f"comma-separated subset of {','.join(CODECS)}")
    ap.add_argument("--calibration-batches", type=int, default=16)
    ap.add_argument("--calibration-batch", type=int, default=8, help="sequences per calibration batch")
    ap.add_argument(
        "--out", default=None, help="JSON file (default bench/quant_export_results/DATE-DEVICE.json)"
    )
    args = ap.parse_args()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    out = Path(args.out) if args.out else (
        REPO / "bench" / "quant_export_results" / f"{today}-{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)

    bench(args, save)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
