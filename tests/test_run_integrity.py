"""A score you can trust: a non-finite score is a failed run, and a saved run folder is checked
against what was trained before it is re-scored."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_stack

from pgolf.registry.api.errors import PgolfError, RunFailed
from pgolf.registry.run import pipeline
from pgolf.registry.run.record import check_result, dumps_json, stack_changes
from pgolf.registry.tools.cli import main


def write_stack(path: Path, stack: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    return path


def quick(cache_dir: Path, **sections: Any) -> dict[str, Any]:
    s = tiny_stack(cache_dir, **sections)
    s["train"].update(iterations=2, threads=1)
    return s


def nan_after_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reloaded artifact scores NaN (as an export that overflowed would)."""
    original = pipeline.load_into

    def load(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        original(model, state)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(pipeline, "load_into", load)


# -- kind 3: a non-finite score is never a result ----------------------------------------------


def test_a_nan_score_is_a_failed_run_kept_apart(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nan_after_reload(monkeypatch)
    out = tmp_path / "out"
    f = write_stack(tmp_path / "s.yaml", quick(cache_dir))
    assert main(["run", str(f), "--out", str(out), "--quiet", "--no-estimate"]) == 3
    captured = capsys.readouterr()
    assert (
        "run failed:" in captured.err
        and "val_loss is nan" in captured.err
        and "Traceback" not in captured.err
    )
    assert "val_bpb nan" not in captured.out and "fits" not in captured.out
    failed = tmp_path / "out.failed"
    assert not out.exists() and failed.is_dir()
    assert not (failed / "result.json").exists()
    assert "val_bpb is nan" in (failed / "error.txt").read_text()


def test_eval_refuses_to_report_a_nan_score(
    good_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nan_after_reload(monkeypatch)
    dump = tmp_path / "nll.npy"
    assert main(["eval", str(good_run), "--dump-nll", str(dump)]) == 3
    captured = capsys.readouterr()
    assert "val_loss is nan" in captured.err and "val_bpb nan" not in captured.out
    assert not dump.exists()


def test_results_are_strict_json() -> None:
    with pytest.raises(PgolfError, match=r"history\[1\].val_bpb is nan"):
        dumps_json({"val_bpb": 1.0, "history": [{"val_bpb": 2.0}, {"val_bpb": math.nan}]})
    assert json.loads(dumps_json({"a": 1.5, "b": [1, None]})) == {"a": 1.5, "b": [1, None]}


@pytest.mark.parametrize(
    "result, problem",
    [
        ({"val_loss": math.inf, "val_bpb": 1.0, "val_tokens": 5, "val_bytes": 9}, "val_loss is inf"),
        ({"val_loss": 1.0, "val_bpb": 1.0, "val_tokens": 5, "val_bytes": 0}, "val_bytes is 0"),
        ({"val_loss": 1.0, "val_bpb": 1.0, "val_tokens": 0, "val_bytes": 9}, "val_tokens is 0"),
        ({"val_loss": 1.0, "val_bpb": 1.0, "val_tokens": 5, "val_bytes": 9,
          "history": [{"val_loss": math.nan}]}, "history[0].val_loss is nan"),
        ({"val_loss": 1.0, "val_bpb": 1.0, "val_tokens": 5, "val_bytes": 9, "pre_quant_val_bpb": -math.inf},
         "pre_quant_val_bpb is -inf"),
    ],
)  # fmt: skip
def test_check_result_names_every_invalid_field(result: dict[str, Any], problem: str) -> None:
    with pytest.raises(RunFailed, match=re_escape(problem)):
        check_result(result)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


# -- repeat and compare ---------------------------------------------------------------------------


def fake_result(folder: Path, seed: int, loss: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps({"seed": seed, "val_loss": loss, "val_bpb": loss * 1.4}))


def test_repeat_keeps_a_failed_seed_apart_and_exits_3(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_run(rs: Any, out: Path, **kw: Any) -> None:
        if rs.stack.seed == 2:
            (out / "run.log").write_text("diverged\n")
            raise RunFailed("training diverged: loss is nan at step 3")
        fake_result(out, rs.stack.seed, 3.0 + rs.stack.seed / 100)

    monkeypatch.setattr(pipeline, "run", fake_run)
    f = write_stack(tmp_path / "s.yaml", quick(cache_dir))
    out = tmp_path / "rep"
    assert main(["repeat", str(f), "--seed-list", "1,2,3", "--out", str(out)]) == 3
    text = capsys.readouterr().out
    assert (
        "2 seeds (1, 3)" in text and "seed 2 failed" in text and "nan" not in text.replace("loss is nan", "")
    )
    assert sorted(p.name for p in out.iterdir()) == ["seed_1", "seed_2.failed", "seed_3"]
    assert "diverged" in (out / "seed_2.failed" / "error.txt").read_text()


def test_compare_needs_two_runs_per_group_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_result(tmp_path / "a" / "seed_1", 1, 3.0)
    fake_result(tmp_path / "b" / "seed_1", 1, 3.1)
    fake_result(tmp_path / "b" / "seed_2", 2, 3.2)
    assert main(["compare", str(tmp_path / "a"), "--vs", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: group A has 1 run") and "Traceback" not in err


def test_compare_with_zero_spread_writes_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in (1, 2):
        fake_result(tmp_path / "a" / f"seed_{i}", i, 3.0)
        fake_result(tmp_path / "b" / f"seed_{i}", i, 3.0)
    out = tmp_path / "c.json"
    assert main(["compare", str(tmp_path / "a"), "--vs", str(tmp_path / "b"), "--json", str(out)]) == 1
    assert "p undefined" in capsys.readouterr().out
    d = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert d["t"] is None and d["p"] is None and d["bar_met"] is False


def test_a_nan_result_json_is_never_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in (1, 2):
        fake_result(tmp_path / "a" / f"seed_{i}", i, 3.0 + i)
        fake_result(tmp_path / "b" / f"seed_{i}", i, 3.5 + i)
    (tmp_path / "a" / "seed_2" / "result.json").write_text('{"seed": 2, "val_loss": NaN, "val_bpb": NaN}')
    assert main(["compare", str(tmp_path / "a"), "--vs", str(tmp_path / "b")]) == 2
    assert "holds no valid result (val_loss nan" in capsys.readouterr().err


# -- kind 6: a saved run is what it says it is ---------------------------------------------------


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """One tiny run with the brotli codec (no frame checksum)."""
    root = tmp_path_factory.mktemp("good-run")
    f = write_stack(root / "s.yaml", quick(cache_dir, techniques={"brotli": {"quality": 5}}))
    assert main(["run", str(f), "--out", str(root / "out"), "--quiet", "--no-estimate"]) == 0
    return root / "out"


@pytest.fixture
def run_copy(good_run: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(good_run, d)
    return d


def test_the_manifest_records_artifact_stack_and_every_code_file(good_run: Path) -> None:
    m = json.loads((good_run / "manifest.json").read_text())
    r = json.loads((good_run / "result.json").read_text())
    assert m["artifact"]["bytes"] == r["model_bytes"] and len(m["artifact"]["sha256"]) == 64
    assert set(m["code"]["files"]) == set(r["code_files"]) and m["code"]["bytes"] == r["code_bytes"]
    assert m["stack"]["resolved"]["techniques"]["brotli"]["quality"] == 5


def test_a_flipped_bit_in_the_artifact_is_refused(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = bytearray((run_copy / "model.ptz").read_bytes())
    blob[len(blob) // 2] ^= 0x10
    (run_copy / "model.ptz").write_bytes(bytes(blob))
    assert main(["eval", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "model.ptz changed since the run" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s["techniques"].update(xsa={"layers": "all"}), "techniques.xsa.layers: added ('all')"),
        (lambda s: s["eval"].update(seq_len=32), "eval.seq_len: None → 32"),
        (lambda s: s["model"].update(model_dim=128), "model.model_dim: 64 → 128"),
        (
            lambda s: (s["model"].update(vocab_size=512), s["data"].update(tokenizer="sp512")),
            "model.vocab_size: 1024 → 512",
        ),
    ],
    ids=["technique added", "eval length", "model_dim", "vocab_size"],
)
def test_an_edited_stack_is_refused_naming_the_change(
    run_copy: Path, edit: Any, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    s = yaml.safe_load((run_copy / "stack.yaml").read_text())
    edit(s)
    write_stack(run_copy / "stack.yaml", s)
    assert main(["eval", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "no longer matches the stack this run trained" in err and expected in err
    assert "Traceback" not in err and "size mismatch" not in err


def test_without_a_manifest_a_shape_change_is_a_clear_error(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_copy / "manifest.json").unlink()  # a folder from an older pgolf
    s = yaml.safe_load((run_copy / "stack.yaml").read_text())
    s["model"]["model_dim"] = 128
    write_stack(run_copy / "stack.yaml", s)
    assert main(["eval", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "does not match this stack's model shape" in err and "(64, 64) in the artifact" not in err
    assert "in the artifact but" in err and "Traceback" not in err and "no manifest.json" in err


def test_changed_code_is_refused_unless_accepted(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = json.loads((run_copy / "manifest.json").read_text())
    m["code"]["files"]["pgolf/registry/run/model.py"] = "0" * 64  # as if model.py changed since
    (run_copy / "manifest.json").write_text(json.dumps(m))
    assert main(["eval", str(run_copy)]) == 2
    assert "changed: pgolf/registry/run/model.py" in capsys.readouterr().err
    assert main(["eval", str(run_copy), "--allow-code-change"]) == 0
    captured = capsys.readouterr()
    assert "re-scoring with the current code" in captured.err and "val_bpb" in captured.out


# -- local plugins are kept in the run folder ----------------------------------------------------

PLUGIN = '''
from pgolf.registry import Technique, hook, register


@register("trust_kept_plugin")
class Kept(Technique):
    """Scales the logits' input by a constant (a change that moves the score)."""

    @hook
    def on_step(self, state):
        pass
'''


def pgolf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pgolf.registry.tools.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_local_plugins_are_copied_and_checked(cache_dir: Path, tmp_path: Path) -> None:
    plug = tmp_path / "src" / "trust_kept_plugin.py"
    plug.parent.mkdir()
    plug.write_text(PLUGIN)
    stack = quick(cache_dir, plugins=[str(plug)], techniques={"trust_kept_plugin": {}})
    f = write_stack(tmp_path / "s.yaml", stack)
    r = pgolf("run", str(f), "--out", "out", "--quiet", "--no-estimate", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert yaml.safe_load((out / "stack.yaml").read_text())["plugins"] == ["plugins/trust_kept_plugin.py"]
    assert (out / "plugins" / "trust_kept_plugin.py").read_text() == PLUGIN
    # the original may change or go away: the run folder re-scores with the code that ran
    plug.write_text(PLUGIN.replace("pass", "raise RuntimeError('edited')"))
    moved = tmp_path / "moved"
    out.rename(moved)
    r = pgolf("eval", str(moved), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"val_bpb {json.loads((moved / 'result.json').read_text())['val_bpb']:.6f}" in r.stdout
    # but the kept copy may not
    (moved / "plugins" / "trust_kept_plugin.py").write_text(PLUGIN + "\nX = 1\n")
    r = pgolf("eval", str(moved), cwd=tmp_path)
    assert r.returncode == 2 and "changed: plugins/trust_kept_plugin.py" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_stack_changes_lists_each_key() -> None:
    a = {"model": {"model_dim": 64}, "techniques": {"zlib": {"level": 9}}}
    b = {"model": {"model_dim": 128}, "techniques": {"zlib": {"level": 9}, "xsa": {"layers": "all"}}}
    assert stack_changes(a, b) == ["model.model_dim: 64 → 128", "techniques.xsa.layers: added ('all')"]


def test_the_seed_changes_the_init_but_not_the_data_order(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's promise for `seed`: it seeds the model's initialisation; the training batches
    are the challenge loader's, in shard order, whatever the seed."""
    from pgolf.registry.api.config import stack_from_dict
    from pgolf.registry.run import data

    batches: list[torch.Tensor] = []
    inits: list[torch.Tensor] = []
    next_batch, build = data.DistributedTokenLoader.next_batch, pipeline.build

    def recording_next_batch(self: Any, *a: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next_batch(self, *a)
        batches.append(x.clone())
        return x, y

    def recording_build(*a: Any, **kw: Any) -> Any:
        built = build(*a, **kw)
        inits.append(torch.cat([p.detach().flatten().clone() for p in built.model.parameters()]))
        return built

    monkeypatch.setattr(data.DistributedTokenLoader, "next_batch", recording_next_batch)
    monkeypatch.setattr(pipeline, "build", recording_build)
    seen = []
    for seed in (1, 2):
        batches.clear()
        inits.clear()
        (tmp_path / str(seed)).mkdir()
        pipeline.run(
            stack_from_dict({**quick(cache_dir), "seed": seed}), tmp_path / str(seed), estimate=False
        )
        seen.append((list(batches), inits[0]))
    (b1, init1), (b2, init2) = seen
    assert len(b1) == len(b2) > 1 and all(torch.equal(a, b) for a, b in zip(b1, b2))
    assert not torch.equal(init1, init2)


def test_changed_validation_data_are_refused(
    text_dataset: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from pgolf.registry.run import data

    folder = tmp_path / "data"
    shutil.copytree(text_dataset[0], folder)
    stack = quick(tmp_path, data={"path": str(folder), "tokenizer": str(folder / "tokenizer.model")})
    f = write_stack(tmp_path / "s.yaml", stack)
    assert main(["run", str(f), "--out", str(tmp_path / "out"), "--quiet", "--no-estimate"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(m["data"]["val"]) == {"fineweb_val_000000.bin"} and len(m["data"]["tokenizer"]["sha256"]) == 64
    val = data.find_shards(folder, "val")[0]
    tokens = np.asarray(data.load_shard(val)).copy()
    tokens[-3], tokens[-2] = tokens[-2], tokens[-3]  # same tokens, same count: a different stream
    data.write_shard(val, tokens)
    assert main(["eval", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the scoring data differ from the run's (fineweb_val_000000.bin changed)" in err
