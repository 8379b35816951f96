"""`pgolf bench` on CPU at tiny sizes: the results file, the breakdown, the README tables, the
per-technique mode; the timeline attribution on synthetic CUDA-like profiler events."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from conftest import BASELINE, REPO, tiny_stack
from torch.autograd import DeviceType

from pgolf.registry import PgolfError
from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.api.technique import REGISTRY
from pgolf.registry.tools import bench as B


def tiny(cache_dir: Path, **techniques: Any) -> dict[str, Any]:
    d = tiny_stack(
        cache_dir, train={"train_seq_len": 128, "train_batch_tokens": 2048, "micro_batch_tokens": 1024}
    )
    if techniques:
        d["techniques"] = techniques
    return d


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pgolf")
    B.add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    args.argv = ["bench", *argv]
    return int(args.func(args))


def check_breakdown(b: dict[str, Any]) -> None:
    assert set(b["fraction"]) == set(B.REGIONS) == set(b["ms"])
    assert all(0.0 <= f <= 1.0 for f in b["fraction"].values())
    assert math.isclose(sum(b["fraction"].values()), 1.0, abs_tol=1e-6)
    assert all(v >= 0 for v in b["ms"].values())
    assert b["step_ms"] > 0 and b["method"] and b["error"]


# --------------------------------------------------------------------------------------------
# end to end on CPU
# --------------------------------------------------------------------------------------------


def test_bench_writes_a_results_file_with_every_figure(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    stack = tmp_path / "tiny.yaml"
    stack.write_text(yaml.safe_dump(tiny(cache_dir)))
    monkeypatch.chdir(tmp_path)  # by default the results go into ./pgolf-bench, not the source tree
    out = tmp_path / B.DEFAULT_OUT / "results"
    argv = ["--steps", "2", "--profile-steps", "1", "--eval-tokens", "1024", "--quiet"]
    assert run_cli(str(stack), *argv) == 0
    printed, errors = capfd.readouterr()
    assert "warm-up" not in printed and "tiny on CPU" in printed  # --quiet: the summary only
    assert "USDT" not in errors and "profiler_start" not in errors and "STAGE" not in errors, errors
    assert not (REPO / "bench" / "results").exists()

    files = list(out.glob("*.json"))
    assert len(files) == 1
    r = json.loads(files[0].read_text())
    assert files[0].name == f"{r['date']}-{r['device']['slug']}-tiny.json"
    for key in (
        "schema",
        "date",
        "timestamp",
        "command",
        "device",
        "versions",
        "stack",
        "params",
        "settings",
        "train",
        "reference",
        "mfu",
        "memory",
        "eval",
        "export",
        "breakdown",
        "techniques",
        "notes",
    ):
        assert key in r, key
    assert r["schema"] == B.SCHEMA and r["command"].startswith("pgolf bench ")
    assert r["device"]["type"] == "cpu" and r["versions"]["torch"]
    assert r["stack"]["name"] == "tiny" and len(r["stack"]["hash"]) == 16
    assert r["stack"]["resolved"]["model"]["model_dim"] == 64
    assert r["settings"]["grad_accum"] == 2 and r["settings"]["train_batch_tokens"] == 2048

    t = r["train"]
    assert len(t["step_ms"]) == 2 and all(ms > 0 for ms in t["step_ms"])
    assert t["tokens_per_second"] == pytest.approx(2048 / (t["ms_per_step_mean"] / 1000))
    assert t["ms_per_step_min"] <= t["ms_per_step_median"] and math.isfinite(t["final_train_loss"])

    # CPU: no MFU and no comparison with the H100 reference
    assert r["mfu"]["value"] is None and r["mfu"]["flops_per_token"] > 0 and "CPU" in r["mfu"]["note"]
    assert r["reference"]["ratio_to_reference"] is None and r["reference"]["ratio_to_target"] is None
    assert r["reference"]["comparable"] is False

    assert r["memory"]["peak_bytes"] > 0
    assert r["eval"]["tokens"] == 1024 and r["eval"]["tokens_per_second"] > 0
    ex = r["export"]
    assert ex["compressed_bytes"] > 0 and ex["packed_bytes"] > 0
    assert ex["seconds"] == pytest.approx(ex["quantize_pack_seconds"] + ex["compress_seconds"])
    assert (ex["quantizers"], ex["codec"]) == (["int8_rowwise"], "zlib")

    b = r["breakdown"]
    check_breakdown(b)
    assert b["method"] == "linkage" and b["time_base"] == "cpu"
    assert b["ms"]["attention"] > 0 and b["ms"]["mlp"] > 0 and b["ms"]["optimizer"] > 0
    assert b["detail"]["linked_backward_ops"] > 0  # backward nodes found their forward region
    assert r["techniques"]["rows"] == []

    readme = (tmp_path / B.DEFAULT_OUT / "README.md").read_text()
    assert "pgolf bench stacks/baseline_sp1024.yaml --techniques all" in readme
    row = next(line for line in readme.splitlines() if f"results/{files[0].name}" in line)
    assert "CPU" in row and "n/a (CPU)" in row


def test_isolation_breakdown_on_cpu(cache_dir: Path) -> None:
    rs = stack_from_dict(tiny(cache_dir))
    r = B.measure(
        rs,
        B.BenchOptions(
            steps=1, profile_steps=1, eval_tokens=0, breakdown_method="isolation", isolation_repeats=1
        ),
    )
    b = r["breakdown"]
    check_breakdown(b)
    assert b["method"].startswith("isolation")
    iso = b["detail"]["isolated"]
    # identical layers are timed once and counted twice
    assert [(g["region"], g["modules"]) for g in iso["groups"]] == [
        ("attention", ["blocks.0.attn", "blocks.1.attn"]),
        ("mlp", ["blocks.0.mlp", "blocks.1.mlp"]),
    ]
    g = iso["groups"][1]
    assert iso["ms"]["mlp"] == pytest.approx(g["ms_per_micro_batch"] * 2 * 2)
    assert iso["ms"]["attention"] > 0 and iso["micro_batches_per_step"] == 2
    assert r["eval"] is None and r["breakdown_eager"] is None  # not compiled: no second, eager breakdown


def test_technique_mode_adds_one_row_per_technique(tmp_path: Path, cache_dir: Path) -> None:
    rs = stack_from_dict(tiny(cache_dir))
    opts = B.BenchOptions(steps=1, eval_tokens=0, profile=False)
    r = B.bench(rs, opts, techniques="leaky_relu_sq,brotli", command="pgolf bench tiny")
    rows = r["techniques"]["rows"]
    assert [row["technique"] for row in rows] == ["leaky_relu_sq", "brotli"]
    without = r["techniques"]["without"]
    assert len(without["measurements"]) == 2 and without["drift_percent"] is not None
    for row in rows:
        assert row["error"] is None and row["tokens_per_second"] > 0
        assert row["without_tokens_per_second"] == without["tokens_per_second"]
        assert row["delta_percent"] == pytest.approx(
            (row["tokens_per_second"] / without["tokens_per_second"] - 1) * 100
        )
    assert rows[1]["params"] == {"quality": 11, "lgwin": 24}
    assert r["breakdown"] is None  # profile off
    B.write_result(r, tmp_path / "results")
    text = B.regenerate_readme(tmp_path / "results", tmp_path / "README.md")
    table = text.split("## Technique cost", 1)[1]
    assert sum(1 for line in table.splitlines() if line.startswith("| ") and "| tiny |" in line) == 2


def test_all_techniques_gives_one_variant_per_registered_technique(cache_dir: Path) -> None:
    # the records' depth: every technique's default layers exist (noisy_qat's 3-5, say)
    rs = stack_from_dict({**tiny(cache_dir), "model": {**tiny(cache_dir)["model"], "num_layers": 11}})
    variants, skipped = B.technique_variants(rs, "all")
    names = [n for n, _ in variants]
    assert sorted(names + [s["technique"] for s in skipped]) == REGISTRY.names()
    assert {s["technique"] for s in skipped} == {"int8_rowwise", "zlib"}  # the slot defaults
    for name, v in variants:
        assert name in v.technique_names()
    brotli = dict(variants)["brotli"]
    assert "zlib" not in brotli.technique_names()  # exclusive slot: replaced, not doubled

    # a technique already in the stack is skipped; the stack's own slot filler is replaced
    with_brotli = stack_from_dict(tiny(cache_dir, brotli={"quality": 5}))
    variants, skipped = B.technique_variants(with_brotli, "all")
    assert {"technique": "brotli", "reason": "already in the stack"} in skipped
    assert B.technique_variants(rs, "none") == ([], [])
    with pytest.raises(PgolfError, match="unknown technique 'xsaa'"):
        B.technique_variants(rs, "xsaa")


def test_instrumentation_leaves_the_trainer_as_it_was(cache_dir: Path) -> None:
    import torch

    from pgolf.registry.run import data
    from pgolf.registry.run.pipeline import build, prepare_data
    from pgolf.registry.run.runtime import make_runtime
    from pgolf.registry.run.train import Trainer

    rs = stack_from_dict(tiny(cache_dir))
    src = prepare_data(rs.stack)
    rt = make_runtime(rs.stack.train)
    b = build(rs, rt.device, rt.attention)
    model = b.model
    trainer = Trainer(model, b.sites, rs.stack, rt, data.DistributedTokenLoader(src.train, 0, 1))
    with B.instrument(trainer, torch.device("cpu"), modules=True):
        assert "next_batch" in vars(trainer.loader)
        assert any(m._forward_pre_hooks for _, _, m in B.sublayers(model))
    assert "next_batch" not in vars(trainer.loader) and "step" not in vars(trainer.opt)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------


def fake_result(date: str, device: str, kind: str, stack: str, tps: float) -> dict[str, Any]:
    ratios = B._ratios(tps, kind, device)
    return {
        "schema": B.SCHEMA,
        "date": date,
        "device": {"name": device, "type": kind, "slug": B.slug(device)},
        "stack": {"name": stack},
        "train": {
            "tokens_per_second": tps,
            "ms_per_step_mean": 524288 / tps * 1000,
            "ms_per_step_median": 300.0,
        },
        "reference": ratios,
        "mfu": {"value": 0.2 if kind == "cuda" else None},
        "memory": {"peak_bytes": 10 * 2**30},
        "eval": {"tokens_per_second": 5e6},
        "export": {"seconds": 1.5},
        "breakdown": {
            "fraction": {"attention": 0.3, "mlp": 0.35, "optimizer": 0.1, "data": 0.01, "other": 0.24}
        },
        "techniques": {
            "without": {"export_seconds": 1.5, "drift_percent": 0.4},
            "rows": [
                {
                    "technique": "xsa",
                    "tokens_per_second": tps * 0.97,
                    "without_tokens_per_second": tps,
                    "delta_percent": -3.0,
                    "ms_per_step_median": 310.0,
                    "export_seconds": 1.5,
                    "error": None,
                }
            ],
        },
    }


def test_readme_regenerates_deterministically_from_several_files(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    docs = [
        fake_result("2026-05-02", "NVIDIA H100 80GB HBM3", "cuda", "baseline_sp1024", 1_600_000),
        fake_result("2026-05-01", "NVIDIA H100 80GB HBM3", "cuda", "baseline_sp1024", 1_400_000),
        fake_result("2026-05-01", "cpu (x86_64, 2 threads)", "cpu", "quickstart", 30_000),
        fake_result("2026-05-01", "NVIDIA A100-SXM4-80GB", "cuda", "baseline_sp1024", 700_000),
    ]
    for d in docs:
        B.write_result(d, results)
    (results / "notes.json").write_text('{"something": "else"}')  # not a bench file: ignored
    readme = tmp_path / "README.md"
    first = B.regenerate_readme(results, readme)
    assert B.regenerate_readme(results, readme) == first == readme.read_text()

    rows = [line for line in first.split("## Technique cost")[0].splitlines() if line.startswith("| 2026")]
    assert [row.split(" | ")[0] for row in rows] == ["| 2026-05-01"] * 3 + ["| 2026-05-02"]
    by_device = {row.split(" | ")[1]: row for row in rows[:3]}
    assert "n/a (CPU)" in by_device["CPU: cpu (x86_64, 2 threads)"]
    assert "0.93×" in by_device["NVIDIA H100 80GB HBM3"] and "20.0 %" in by_device["NVIDIA H100 80GB HBM3"]
    assert "(not H100)" in by_device["NVIDIA A100-SXM4-80GB"]
    assert "30 / 35 / 10 / 1 / 24" in rows[0]
    cost = [line for line in first.split("## Technique cost")[1].splitlines() if line.startswith("| 2026")]
    assert len(cost) == 4 and all("| xsa |" in line and "-3.0" in line for line in cost)

    # a hand-written header is kept; the generated part is replaced
    readme.write_text("# My header\n\nkeep me\n\n" + first.split(B.BEGIN, 1)[1].join([B.BEGIN, ""]))
    (results / sorted(p.name for p in results.glob("2026-05-02*"))[0]).unlink()
    text = B.regenerate_readme(results, readme)
    assert text.startswith("# My header\n\nkeep me\n") and text.count(B.BEGIN) == 1
    assert "2026-05-02" not in text


def test_readme_only_and_argument_errors(tmp_path: Path) -> None:
    assert run_cli("--readme-only", "--out", str(tmp_path)) == 0
    assert "no results yet" in (tmp_path / "README.md").read_text()
    with pytest.raises(PgolfError, match="give a stack"):
        run_cli("--out", str(tmp_path))
    with pytest.raises(PgolfError, match="--steps must be at least 1"):
        run_cli(str(BASELINE), "--steps", "0", "--out", str(tmp_path))


# --------------------------------------------------------------------------------------------
# attribution maths
# --------------------------------------------------------------------------------------------


def test_peak_flops_by_device_name() -> None:
    assert B.peak_bf16_flops("NVIDIA H100 80GB HBM3", "cuda")[0] == 989e12
    assert B.peak_bf16_flops("NVIDIA H100 PCIe", "cuda")[0] == 756e12
    assert B.peak_bf16_flops("NVIDIA H200", "cuda")[0] == 989e12
    assert B.peak_bf16_flops("NVIDIA A100-SXM4-40GB", "cuda")[0] == 312e12
    assert B.peak_bf16_flops("NVIDIA GeForce RTX 4090", "cuda")[0] is None
    assert B.peak_bf16_flops("cpu (x86_64, 2 threads)", "cpu")[0] is None


def test_attribute_timeline_covers_the_window_exactly() -> None:
    spans = [B.Span(10, 20, "attention"), B.Span(15, 30, "mlp"), B.Span(40, 50, "optimizer")]
    busy, gaps = B.attribute_timeline((0, 60), spans, gaps_to_next=True)
    assert busy == {
        "attention": 10,
        "mlp": 10,
        "optimizer": 10,
        "data": 0,
        "other": 0,
    }  # overlap counted once
    assert gaps == {"attention": 10, "mlp": 0, "optimizer": 10, "data": 0, "other": 10}  # tail 50..60
    busy, gaps = B.attribute_timeline((0, 60), spans, gaps_to_next=False)
    assert gaps["other"] == 30 and sum(busy.values()) + sum(gaps.values()) == 60


class Ev(SimpleNamespace):
    pass


def ev(
    name: str,
    start: float,
    end: float,
    *,
    parent: Ev | None = None,
    seq: int = -1,
    thread: int = 1,
    fwd_thread: int = 0,
    id: int = 0,
    linked: int = 0,
    device: DeviceType = DeviceType.CPU,
) -> Ev:
    e = Ev(
        name=name,
        time_range=SimpleNamespace(start=start, end=end),
        cpu_parent=parent,
        sequence_nr=seq,
        thread=thread,
        fwd_thread=fwd_thread,
        id=id,
        linked_correlation_id=linked,
        device_type=device,
        is_async=False,
        is_user_annotation=name.startswith("pgolf::") and device != DeviceType.CPU,
    )
    return e


def test_cuda_breakdown_links_kernels_and_backward_nodes_to_regions() -> None:
    step = ev("pgolf::step", 0, 100)
    data = ev("pgolf::data", 1, 5, parent=step)
    copy_ = ev("aten::copy_", 2, 4, parent=data, id=10)
    attn = ev("pgolf::attention", 10, 30, parent=step)
    mm = ev("aten::mm", 11, 12, parent=attn, seq=5, id=11)
    view = ev("aten::view", 25, 26, parent=attn, seq=6, id=20)  # no node: the next op creates node 6
    add = ev("aten::add", 31, 32, parent=step, seq=6, id=12)
    bw_mm = ev(B.BACKWARD_PREFIX + "MmBackward0", 40, 50, seq=5, thread=2, fwd_thread=1)
    bw_mm_k = ev("aten::mm", 41, 42, parent=bw_mm, thread=2, id=13)
    bw_add = ev(B.BACKWARD_PREFIX + "AddBackward0", 51, 55, seq=6, thread=2, fwd_thread=1)
    bw_add_k = ev("aten::fill_", 52, 53, parent=bw_add, thread=2, id=14)
    opt = ev("pgolf::optimizer", 60, 80, parent=step)
    opt_k = ev("aten::_foreach_add_", 61, 62, parent=opt, id=15)
    cpu = [step, data, copy_, attn, mm, view, add, bw_mm, bw_mm_k, bw_add, bw_add_k, opt, opt_k]
    kernels = [
        ev("Memcpy HtoD", 6, 8, linked=10, device=DeviceType.CUDA),
        ev("gemm", 12, 20, linked=11, device=DeviceType.CUDA),
        ev("add_kernel", 32, 34, linked=12, device=DeviceType.CUDA),
        ev("gemm_bw", 45, 50, linked=13, device=DeviceType.CUDA),
        ev("fill", 52, 54, linked=14, device=DeviceType.CUDA),
        ev("adam", 61, 70, linked=15, device=DeviceType.CUDA),
        ev("mystery", 70, 72, linked=99, device=DeviceType.CUDA),
        ev("pgolf::attention", 12, 20, device=DeviceType.CUDA),  # gpu_user_annotation: not a kernel
    ]
    r = B.breakdown_from_events(cpu + kernels, device="cuda")
    assert r["step_ms"] == pytest.approx(0.1)
    ms = {k: v * 1000 for k, v in r["ms"].items()}  # back to µs
    # data: gap 0..6 + copy 6..8; attention: gap 8..12 + gemm 12..20 + gap 34..45 + gemm_bw 45..50
    assert ms == pytest.approx({"data": 8, "attention": 28, "optimizer": 16, "mlp": 0, "other": 48})
    assert r["detail"]["kernels_per_step"] == 7 and r["detail"]["unlinked_kernels_per_step"] == 1
    assert math.isclose(sum(B.fractions(r["ms"]).values()), 1.0)

    cpu_view = B.breakdown_from_events(cpu, device="cpu")
    ms = {k: v * 1000 for k, v in cpu_view["ms"].items()}
    assert ms == pytest.approx({"data": 4, "attention": 30, "optimizer": 20, "mlp": 0, "other": 46})
