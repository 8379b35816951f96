"""The pgolf command end to end on CPU: run, eval, check, techniques, data build, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import REPO, SP1024, tiny_stack

from pgolf.registry.run.data import find_shards, read_header
from pgolf.registry.tools.cli import RUN_FILES, main


def write_stack(path: Path, stack: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, text_dataset: tuple[Path, list[str]]) -> Path:
    """One `pgolf run` of the tiny baseline on real text shards made with the challenge tokenizer."""
    data_dir, _ = text_dataset
    root = tmp_path_factory.mktemp("tiny-run")
    stack = tiny_stack(data={"path": str(data_dir), "tokenizer": str(data_dir / "tokenizer.model")})
    stack["train"]["val_loss_every"] = 4
    f = write_stack(root / "tiny.yaml", stack)
    assert main(["run", str(f), "--out", str(root / "out"), "--quiet"]) == 0
    return root / "out"


def test_run_writes_the_result_with_the_challenge_accounting(
    tiny_run: Path, text_dataset: tuple[Path, list[str]]
) -> None:
    data_dir, val_docs = text_dataset
    assert {p.name for p in tiny_run.iterdir()} == set(RUN_FILES) - {"plugins"}  # no plugin: no copies
    r = json.loads((tiny_run / "result.json").read_text())
    for key in ("val_loss", "val_bpb", "val_tokens", "val_bytes", "model_bytes", "code_bytes", "artifact_bytes",
                "artifact_limit", "fits", "params", "steps", "train_tokens", "train_seconds",
                "tokens_per_second", "eval_seconds", "seed", "versions"):  # fmt: skip
        assert key in r, key
    assert set(r["versions"]) >= {"python", "torch", "cuda", "device"}
    # every validation token is scored: all targets of the stream (its first token has none)
    n_val = sum(read_header(p) for p in find_shards(data_dir, "val"))
    assert r["val_tokens"] == n_val - 1
    assert r["val_bytes"] == sum(len(d.encode("utf-8")) for d in val_docs)
    assert r["val_bpb"] == pytest.approx(
        r["val_loss"] / math.log(2) * r["val_tokens"] / r["val_bytes"], rel=1e-12
    )
    assert r["model_bytes"] == (tiny_run / "model.ptz").stat().st_size
    assert r["artifact_bytes"] == r["model_bytes"] + r["code_bytes"]
    assert r["fits"] is True and r["artifact_limit"] == 16_000_000
    assert r["steps"] == 8 and r["train_tokens"] == 8 * 1024 and r["seed"] == 1337
    assert [h["step"] for h in r["history"]] == [4, 8]
    assert "code_bytes_method" in r and "technique" in r["code_bytes_method"]
    log = (tiny_run / "run.log").read_text()
    assert (
        "==== stack (resolved) ====" in log
        and "==== parameter roles ====" in log
        and "final (from model.ptz" in log
    )


def test_eval_rescoring_the_saved_artifact_gives_the_same_score(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = json.loads((tiny_run / "result.json").read_text())
    dump = tmp_path / "nll.npy"
    assert main(["eval", str(tiny_run), "--dump-nll", str(dump)]) == 0
    out = capsys.readouterr().out
    assert f"val_bpb {r['val_bpb']:.6f}" in out
    nll = np.load(dump)
    assert nll.dtype == np.float32 and nll.shape == (r["val_tokens"],)
    assert float(nll.astype(np.float64).sum()) == pytest.approx(r["val_loss"] * r["val_tokens"], rel=1e-5)


def test_resolved_stack_reruns(tiny_run: Path, tmp_path: Path) -> None:
    assert main(["check", str(tiny_run / "stack.yaml"), "--no-estimate"]) == 0


def test_all_five_first_techniques_run_end_to_end(cache_dir: Path, tmp_path: Path) -> None:
    stack = tiny_stack(cache_dir, techniques={
        "bigram_hash": {"buckets": 256, "dim": 16},
        "xsa": {"layers": "last(1)"},
        "leaky_relu_sq": {"slope": 0.5},
        "ema": {"decay": 0.9},
        "brotli": {"quality": 5},
    })  # fmt: skip
    f = write_stack(tmp_path / "five.yaml", stack)
    assert main(["run", str(f), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert r["techniques"] == ["bigram_hash", "xsa", "leaky_relu_sq", "ema", "brotli", "int8_rowwise"]
    assert np.isfinite(r["val_bpb"]) and r["fits"]
    assert "embedded default corpus" in r["data"]


def test_check_prints_order_params_data_and_estimate(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quickstart = str(REPO / "stacks" / "quickstart.yaml")
    assert main(["check", quickstart, "--set", f"data.cache_dir={cache_dir}"]) == 0
    out = capsys.readouterr().out
    assert "technique order" in out and "int8_rowwise" in out and "(slot default)" in out
    assert "parameters 592,144" in out  # 1024·128 + 4·(114,688 + 516) + 2·128
    assert "estimated artifact" in out and "fits" in out
    assert "embedded default corpus" in out and "checked against the tokenizer" in out


def test_check_exits_1_when_the_estimate_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "check",
                str(REPO / "stacks" / "quickstart.yaml"),
                "--no-data",
                "--set",
                "export.artifact_limit=1000",
            ]
        )
        == 1
    )
    assert "does NOT fit" in capsys.readouterr().out


def test_techniques_lists_and_describes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    for name in ("bigram_hash", "xsa", "leaky_relu_sq", "ema", "brotli", "zlib", "int8_rowwise"):
        assert name in out
    assert main(["techniques", "bigram_hash"]) == 0
    out = capsys.readouterr().out
    assert "buckets: 3072" in out and "embed()" in out
    assert "table.weight  3072x128  role=embedding" in out.replace("embed_transforms.0.", "")


def test_data_build_from_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Document number {i} talks about cats."}) + "\n" for i in range(5))
    )
    assert main(["data", "build", "--input", str(src), "--out", str(tmp_path / "d"), "--tokenizer", str(SP1024),
                 "--val-docs", "2"]) == 0  # fmt: skip
    assert len(find_shards(tmp_path / "d", "val")) == 1 and len(find_shards(tmp_path / "d", "train")) == 1
    assert "val 2 docs" in capsys.readouterr().out


# -- bad input: one clear message, exit 2, no traceback, no output folder -------------------------


def bad_cases(tmp_path: Path, cache_dir: Path) -> dict[str, tuple[list[str], str]]:
    good = tiny_stack(cache_dir)

    def stack(name: str, **sections: Any) -> str:
        d = tiny_stack(cache_dir, **sections)
        return str(write_stack(tmp_path / f"{name}.yaml", d))

    bad_shards = tmp_path / "bad_shards"
    bad_shards.mkdir()
    (bad_shards / "fineweb_train_000000.bin").write_bytes(b"\x00" * 1030)
    (bad_shards / "fineweb_val_000000.bin").write_bytes(b"\x00" * 1030)
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("model: {num_layers: 2\ntrain: [\n")
    unknown = dict(good, modle={"num_layers": 2})
    return {
        "misspelt technique": (["run", stack("t1", techniques={"bigram_hsh": {}})], "did you mean 'bigram_hash'"),
        "unknown key": (["run", str(write_stack(tmp_path / "t2.yaml", unknown))], "modle: unknown key"),
        "wrong type": (["run", stack("t3", model={"num_layers": "deep"})], "model.num_layers"),
        "out of range": (["run", stack("t4", optim={"matrix_lr": -1})], "optim.matrix_lr"),
        "conflicting techniques": (["run", stack("t5", techniques={"brotli": {}, "zlib": {}})],
                                   "both fill the exclusive 'codec' slot"),
        "missing data path": (["run", stack("t6", data={"path": str(tmp_path / "nowhere"),
                                                         "tokenizer": str(SP1024)})], "data.path"),
        "bad shard header": (["run", stack("t7", data={"path": str(bad_shards), "tokenizer": str(SP1024)})],
                             "fineweb_train_000000.bin"),
        "malformed yaml": (["run", str(malformed)], "malformed.yaml"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "misspelt technique",
        "unknown key",
        "wrong type",
        "out of range",
        "conflicting techniques",
        "missing data path",
        "bad shard header",
        "malformed yaml",
    ],
)
def test_bad_input_gives_one_clear_error(
    case: str, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = bad_cases(tmp_path, cache_dir)[case]
    out_dir = tmp_path / "out"
    assert main([*argv, "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and expected in err and "Traceback" not in err
    assert not out_dir.exists() and not list(tmp_path.glob(".out.partial*"))


def test_existing_output_folder_is_never_touched(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    f = write_stack(tmp_path / "s.yaml", tiny_stack(cache_dir))
    assert main(["run", str(f), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_the_console_script_prints_no_traceback(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("techniques: {xsaa: {}}\n")
    proc = subprocess.run([sys.executable, "-m", "pgolf.registry.tools.cli", "check", str(f)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown technique 'xsaa' (did you mean 'xsa'?)" in proc.stderr and "Traceback" not in proc.stderr
