"""The pgolf command end to end on CPU: run, eval, check, techniques, data build, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
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
    stack["train"]["threads"] = "auto"  # written into stack.yaml as the number it used
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
    assert f"threads {torch.get_num_threads()} (auto: " in log  # the thread count and why
    # the training curve: every report's train loss, and a PNG of it beside the periodic val_bpb
    assert [p["step"] for p in r["train_history"]][:3] == [1, 2, 3] and r["train_history"][-1]["step"] == 8
    png = (tiny_run / "training_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


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


def test_resolved_stack_reruns_to_the_same_score_quietly(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = yaml.safe_load((tiny_run / "stack.yaml").read_text())["train"]
    # every runtime setting is written as what the run used, not "auto"
    assert isinstance(train["threads"], int) and train["threads"] >= 1
    assert (train["device"], train["compile"], train["autocast"], train["attention"]) == (
        "cpu",
        "off",
        "off",
        "sdpa",
    )
    capsys.readouterr()
    assert main(["run", str(tiny_run / "stack.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")  # --quiet: nothing at all on success
    first, again = (json.loads((d / "result.json").read_text()) for d in (tiny_run, tmp_path / "again"))
    assert again["val_bpb"] == first["val_bpb"] and again["val_loss"] == first["val_loss"]
    assert yaml.safe_load((tmp_path / "again" / "stack.yaml").read_text())["train"] == train


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
                                   "both fill the slot 'codec'"),
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


# -- the first hour: what a new user meets ------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("pgolf 0.1.0 (python ") and f"torch {torch.__version__}" in out


def test_run_refuses_a_stack_estimated_over_the_limit(
    chdir_tmp: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write_stack(chdir_tmp / "s.yaml", tiny_stack(cache_dir, name="../escape/a b"))
    over = ["--set", "export.artifact_limit=1000"]
    assert main(["run", str(f), *over]) == 2
    err = capsys.readouterr().err
    assert "over the 1,000-byte limit" in err and "--allow-over-limit" in err and "nothing was trained" in err
    assert not (chdir_tmp / "runs").exists() or not any((chdir_tmp / "runs").iterdir())
    # allowed: it trains, says it does not fit, and its folder is a safe name inside runs/
    assert main(["run", str(f), *over, "--allow-over-limit", "--quiet"]) == 0
    [run_dir] = (chdir_tmp / "runs").iterdir()
    assert run_dir.name.startswith("escape-a-b-") and not (chdir_tmp.parent / "escape").exists()
    assert json.loads((run_dir / "result.json").read_text())["fits"] is False


@pytest.mark.parametrize(
    ("name", "folder"),
    [("../escape", "escape"), ("a/b", "a-b"), ("..", "run"), ("/abs/x", "abs-x"), ("mine v2", "mine-v2"),
     (".hidden", "hidden"), ("qs_1.5", "qs_1.5"), ("a\\b", "a-b"), ("x" * 300, "x" * 100)],
)  # fmt: skip
def test_safe_folder_names(name: str, folder: str) -> None:
    from pgolf.registry.tools.cli import safe_name

    assert safe_name(name) == folder


def test_check_looks_at_the_data(
    tmp_path: Path, text_dataset: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir, _ = text_dataset
    ok = write_stack(tmp_path / "ok.yaml", tiny_stack(data={"path": str(data_dir),
                                                            "tokenizer": str(data_dir / "tokenizer.model")}))  # fmt: skip
    assert main(["check", str(ok), "--no-estimate"]) == 0
    assert "1 train and 1 validation shard(s) checked" in capsys.readouterr().out
    missing = write_stack(tmp_path / "m.yaml", tiny_stack(data={"path": str(tmp_path / "nowhere"),
                                                                 "tokenizer": str(SP1024)}))  # fmt: skip
    assert main(["check", str(missing), "--no-estimate"]) == 2
    assert "data.path" in capsys.readouterr().err
    sp4096 = SP1024.parent / "fineweb_4096_bpe.model"
    wrong = write_stack(
        tmp_path / "w.yaml", tiny_stack(data={"path": str(data_dir), "tokenizer": str(sp4096)})
    )
    assert main(["check", str(wrong), "--no-estimate"]) == 2
    assert "is not the tokenizer the shards in" in capsys.readouterr().err  # vocab_size follows the tokenizer


def test_check_shows_progress_while_the_size_estimate_is_slow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    from pgolf.registry.run import pipeline
    from pgolf.registry.tools import progress

    real = pipeline.estimate_artifact_bytes

    def slow(rs: Any, **kw: Any) -> Any:
        time.sleep(0.3)
        return real(rs, **kw)

    monkeypatch.setattr(pipeline, "estimate_artifact_bytes", slow)
    monkeypatch.setattr(progress, "TICKER_DELAY", 0.05)
    assert main(["check", str(REPO / "stacks" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "estimating the artifact size with the stack's export path … 0:00" in out
    assert "estimating the artifact size with the stack's export path: done in" in out


def test_readme_opening_stack_fits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The front page's YAML, saved beside the stacks as a user would, passes `pgolf check`."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    f = tmp_path / "front.yaml"
    f.write_text(block)
    monkeypatch.chdir(REPO / "stacks")  # its base: is relative to the stacks folder
    assert main(["check", str(f)]) == 0
    out = capsys.readouterr().out
    assert ": fits" in out and "bigram_hash" in out


def test_techniques_output_reads_like_yaml_and_never_splits_a_value() -> None:
    def pgolf(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "pgolf.registry.tools.cli", *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    listing = pgolf("techniques")
    row = next(line for line in listing.splitlines() if line.startswith("int8_rowwise"))
    assert "clip_percentile=99.99984, scope=all" in row
    assert "layers=last(4)" in listing and "layers=all" in listing
    xsa = pgolf("techniques", "xsa")
    assert "  layers: last(4)  layers that get XSA; layers: all, none, last(N)" in xsa
    assert "Validator" not in xsa and "Serializer" not in xsa and "<" not in xsa.split("params", 1)[1]
    int8 = pgolf("techniques", "int8_rowwise")
    assert "scope: all  kinds/roles it claims" in int8
    assert "clip_percentile: 99.99984  clip percentile of |w|; > 50; <= 100" in int8
    temperature = pgolf("techniques", "temperature")
    assert "mode: fixed  fixed T, or fitted on scored tokens; one of fixed, fitted" in temperature


def test_quickstart_is_capped_by_steps() -> None:
    from pgolf.registry.api.config import load_stack

    t = load_stack(REPO / "stacks" / "quickstart.yaml").stack.train
    assert t.max_wallclock_seconds == 0 and t.iterations == 300  # the README's number needs both


def test_data_build_errors_name_the_flags_and_leave_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Document {i} is about cats and dogs."}) + "\n" for i in range(4))
    )
    out = tmp_path / "new" / "deeper" / "d"
    base = ["data", "build", "--input", str(src), "--out", str(out)]
    cases = [
        (["--tokenizer", str(SP1024), "--val-docs", "9"], "lower --val-docs"),
        (["--tokenizer", str(SP1024), "--val-docs", "0"], "--val-docs must be at least 1"),
        (["--tokenizer", str(SP1024), "--val-docs", "1", "--shard-tokens", "0"], "--shard-tokens must be"),
        (["--val-docs", "1"], "give exactly one of --tokenizer"),
        (["--vocab-size", "30000", "--val-docs", "1"], "--vocab-size 30,000: this text supports only"),
    ]
    for extra, expected in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and "val_docs" not in err and "shard_tokens" not in err, err
        assert not (tmp_path / "new").exists()  # no empty folder left behind


def test_search_with_nothing_trainable_exits_nonzero(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every sample was rejected (invalid or over the limit): nothing trained, so the exit status
    is not 0. (Ray is not started: the harness's summary of such a study stands in for it.)"""
    from pgolf.search import cli as search_cli
    from pgolf.search import harness

    search = {
        "stack": tiny_stack(cache_dir),
        "space": {"model.num_layers": {"int": [1, 2]}},
        "constraint": {"artifact_bytes": 1000},
        "trial": {"gpus": 0, "cpus": 1},
        "search": {"num_samples": 2, "max_resample": 3, "scheduler": "fifo"},
    }
    f = write_stack(tmp_path / "search.yaml", search)
    summary = {"ran": 2, "trained": 0, "gave_up": True, "num_samples": 2}
    monkeypatch.setattr(harness, "run_search", lambda *a, **k: summary)
    monkeypatch.setattr(search_cli, "_results", lambda *a, **k: 0)
    assert main(["search", str(f), "--out", str(tmp_path / "study"), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: no trial was trained")
    summary["trained"] = 1  # one trial trained: a normal end
    assert main(["search", str(f), "--out", str(tmp_path / "study2"), "--quiet"]) == 0


# -- pgolf check: a dry build on the meta device catches site problems before training ------------

LOCAL_PLUGIN = '''
"""Local test techniques filling a slot per layer, a chain, and a model with a broken module."""

import torch
from torch import nn

from pgolf.registry import Ctx, Params, Role, Technique, hook, register, set_role


class GainNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.g = set_role(nn.Parameter(torch.ones(dim)), Role.SCALAR)

    def forward(self, x, ctx: Ctx):
        return nn.functional.rms_norm(x, (x.size(-1),)) * self.g


@register("gain_norm_{tag}")
class GainNormA(Technique):
    """RMSNorm with a learned gain on every layer."""

    @hook
    def norm(self, layer):
        return GainNorm(self.spec.model_dim)


@register("gain_norm_{tag}_b")
class GainNormB(Technique):
    """The same norm again, on layer 0 only."""

    @hook
    def norm(self, layer):
        return GainNorm(self.spec.model_dim) if layer == 0 else None


class TwoArgs(nn.Module):
    def forward(self, y, v, extra):
        return y


@register("broken_gate_{tag}")
class BrokenGate(Technique):
    """An attention-output module whose forward does not match the site."""

    @hook
    def attn_out(self, layer):
        return TwoArgs()


@register("needs_ema_{tag}")
class NeedsEma(Technique):
    """Needs the ema technique in the same stack."""

    requires = ("ema",)

    @hook
    def on_step(self, state):
        pass
'''


def plugin_stack(tmp_path: Path, cache_dir: Path, tag: str, techniques: dict[str, Any]) -> Path:
    plugin = tmp_path / f"local_{tag}.py"
    plugin.write_text(LOCAL_PLUGIN.replace("{tag}", tag))
    d = tiny_stack(cache_dir, techniques=techniques)
    d["plugins"] = [str(plugin)]
    return write_stack(tmp_path / f"stack_{tag}.yaml", d)


@pytest.mark.parametrize(
    ("case", "techniques", "expected"),
    [
        ("two_fillers", {"gain_norm_{tag}": {}, "gain_norm_{tag}_b": {}},
         "techniques 'gain_norm_{tag}' and 'gain_norm_{tag}_b' both fill the slot per layer 'norm' at layer 0"),
        ("wrong_signature", {"broken_gate_{tag}": {}},
         "technique 'broken_gate_{tag}': the module its 'attn_out' hook returns (TwoArgs) has "
         "forward(y, v, extra); the 'attn_out' site calls forward(self, y, ctx)"),
        ("missing_sibling", {"needs_ema_{tag}": {}},
         "techniques.needs_ema_{tag}: requires technique 'ema'; add it to the stack"),
    ],
)  # fmt: skip
def test_check_refuses_site_problems_before_training(
    case: str, techniques: dict[str, Any], expected: str, tmp_path: Path, cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    techs = {k.replace("{tag}", case): v for k, v in techniques.items()}
    f = plugin_stack(tmp_path, cache_dir, case, techs)
    assert main(["check", str(f), "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert expected.replace("{tag}", case) in err and "Traceback" not in err


def test_a_local_plugin_fills_a_slot_per_layer_and_check_shows_where(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = plugin_stack(tmp_path, cache_dir, "ok", {"gain_norm_ok": {}, "xsa": {"layers": "last(1)"}})
    assert main(["check", str(f), "--no-estimate"]) == 0
    out = capsys.readouterr().out
    assert "norm: gain_norm_ok  layers 0-1" in out and "attn_out: xsa  layer 1" in out
    assert main(["run", str(f), "--out", str(tmp_path / "run"), "--quiet", "--no-estimate"]) == 0
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    assert math.isfinite(r["val_bpb"]) and r["techniques"][:2] == ["gain_norm_ok", "xsa"]
