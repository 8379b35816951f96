"""The submission script and `pgolf export`: the script of a tiny stack with nine techniques, run
without pgolf, reproduces the run's val_bpb and bytes; the baseline's script size; bad input."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import BASELINE, tiny_stack

from pgolf.registry.api.config import load_stack
from pgolf.registry.run.code import FILES_METHOD, SCRIPT_METHOD, code_bytes
from pgolf.registry.run.pipeline import estimate_artifact_bytes
from pgolf.registry.tools.cli import main
from pgolf.registry.tools.script import build_script, minify
from pgolf.registry.tools.submission import (
    ISOLATED,
    SCRIPT_FILE,
    check_submission,
    script_environment,
)

BASELINE_SCRIPT_LIMIT = 20_000
"""Bytes the baseline stack's wrapped script may take (issue 14's bound; measured 19,985 on 2026-12-01 (19,956
before Technique.size_cap) after issue 11's loader rewind, ctx.repeat and TrainState.shared). Code that grows the baseline's
run grows every submission's artifact: make it reachable only from the techniques that need it."""

NINE = {
    "leaky_relu_sq": {"slope": 0.5},
    "xsa": {"layers": "last(1)"},
    "bigram_hash": {"buckets": 64, "dim": 16},
    "ema": {"decay": 0.9},
    "partial_rope": {"dims": 8},
    "late_qat": {"bits": 6, "threshold": 0.5},  # a switch, flipped during training
    "zstd": {"level": 3},  # the codec's package
    "sliding_window": {"stride": 16},  # the scorer slot
    "temperature": {"temperature": 0.98},  # the log-prob chain
}


def write_stack(path: Path, stack: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    return path


def pgolf_run(root: Path, cache_dir: Path, techniques: dict[str, Any], **extra: Any) -> Path:
    stack = tiny_stack(cache_dir, techniques=techniques, **extra)
    f = write_stack(root / "stack.yaml", stack)
    assert main(["run", str(f), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def nine_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    return pgolf_run(tmp_path_factory.mktemp("nine"), cache_dir, NINE)


def test_exported_script_reproduces_the_run_without_pgolf(nine_run: Path, tmp_path: Path) -> None:
    result = json.loads((nine_run / "result.json").read_text())
    assert result["code_bytes_method"] == SCRIPT_METHOD
    out = tmp_path / "submission"
    assert main(["export", str(nine_run), "--out", str(out), "--author", "A. Golfer"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "model.ptz", "stack.yaml", "submission.json", "train_gpt.py", "train_gpt_readable.py",
         "train_seed1337.log"]
    )  # fmt: skip
    sub = json.loads((out / "submission.json").read_text())
    script_bytes = (out / SCRIPT_FILE).stat().st_size
    assert sub["bytes_code"] == script_bytes == result["code_bytes"]  # the run counted this very file
    assert sub["bytes_model"] == result["model_bytes"] == (out / "model.ptz").stat().st_size
    assert sub["bytes_total"] == sub["bytes_code"] + sub["bytes_model"] == result["artifact_bytes"]
    assert sub["val_bpb"] == result["val_bpb"] and sub["author"] == "A. Golfer"
    assert [s["seed"] for s in sub["seeds"]] == [1337]
    readme = (out / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in NINE) and "fineweb10B_sp1024" in readme

    res = check_submission(out)  # python -E -s -S, only torch/numpy/sentencepiece/codecs linked in
    assert res.ok, res.problems
    assert abs(res.got["val_bpb"] - result["val_bpb"]) <= 1e-6
    assert res.got["artifact_bytes"] == sub["bytes_total"] and res.got["code_bytes"] == script_bytes
    assert res.got["model_bytes"] == sub["bytes_model"] and res.got["steps"] == result["steps"]


def test_the_check_environment_cannot_import_pgolf(tmp_path: Path) -> None:
    script_environment(tmp_path, ["torch", "numpy", "sentencepiece", "zstandard"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}

    def imports(module: str) -> bool:
        code = f"import importlib.util as u,sys;sys.exit(u.find_spec({module!r}) is None)"
        return subprocess.run([sys.executable, *ISOLATED, "-c", code], cwd=tmp_path, env=env).returncode == 0

    assert imports("torch") and imports("numpy") and imports("sentencepiece") and imports("zstandard")
    assert not imports("pgolf") and not imports("pydantic") and not imports("yaml")  # pgolf's own needs


def test_baseline_script_size_is_what_the_gate_counts() -> None:
    rs = load_stack(BASELINE)
    script = build_script(rs)
    assert script.wrapped and script.bytes <= BASELINE_SCRIPT_LIMIT
    assert script.text.startswith(b"import lzma,base64;exec(lzma.decompress(base64.b85decode(")
    assert set(script.libraries) == {"torch", "numpy", "sentencepiece"}  # zlib is the standard library's
    assert code_bytes(rs).bytes == script.bytes
    assert estimate_artifact_bytes(rs, model_bytes=0).code_bytes == script.bytes
    compile(script.source, "train_gpt.py", "exec")  # the unwrapped form is valid Python too
    assert "pydantic" not in script.source and "yaml" not in script.source


def test_minifying_leaves_no_trace_on_later_syntax_trees() -> None:
    """python-minifier annotates the Load()/Add()/... nodes ast.parse shares between trees; left
    there, a deep copy of any later tree copied the whole minified script (bundling went from 5 s
    to 80-130 s per stack after the first in a process)."""
    minify("def f(x):\n    y = x + 1\n    return -y and not y < 2 or x[0]\n")
    fresh = ast.parse("del a\nb = -c + d * e and not f < g or h")
    kinds = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
    shared = list({id(n): n for n in ast.walk(fresh) if isinstance(n, kinds)}.values())
    assert len(shared) == 10 and all(vars(n) == {} for n in shared), [
        (type(n).__name__, vars(n)) for n in shared
    ]
    stmt = fresh.body[1]
    assert sum(1 for _ in ast.walk(copy.deepcopy(stmt))) == sum(1 for _ in ast.walk(stmt))


def test_script_is_the_same_from_the_run_and_from_its_stack_yaml(nine_run: Path) -> None:
    """The gate counts the stack in memory (slot defaults implicit); export reads stack.yaml."""
    rs = load_stack(nine_run / "stack.yaml")
    assert build_script(rs).bytes == json.loads((nine_run / "result.json").read_text())["code_bytes"]


# --------------------------------------------------------------------------------------------
# bad input: one message, nothing written
# --------------------------------------------------------------------------------------------


def export_fails(capsys: pytest.CaptureFixture[str], args: list[str], out: Path, *expected: str) -> None:
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert main(["export", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(e in err for e in expected), err
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert after == before  # nothing written (no partial folder either)


def test_export_refuses_a_failed_run(
    nine_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = tmp_path / "run.failed"
    failed.mkdir()
    for f in ("stack.yaml", "run.log", "model.ptz"):
        (failed / f).write_bytes((nine_run / f).read_bytes())
    (failed / "error.txt").write_text("TrainingDiverged: training diverged: loss is nan at step 3\n")
    export_fails(capsys, [str(failed)], tmp_path / "out" / "sub", "failed run")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "stack.yaml").write_bytes((nine_run / "stack.yaml").read_bytes())
    export_fails(capsys, [str(unfinished)], tmp_path / "out" / "sub", "no result.json")


def test_export_refuses_an_existing_folder(
    nine_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export_fails(capsys, [str(nine_run)], out, "already exists")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_export_refuses_a_changed_artifact(
    nine_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    for p in nine_run.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    with (copy / "model.ptz").open("ab") as f:
        f.write(b"\0")
    export_fails(capsys, [str(copy)], tmp_path / "out" / "sub", "model.ptz changed since the run")


ILLEGAL = '''
"""Peeks at the target: a known-invalid evaluation trick kept so the probes can be shown to catch it."""
from pgolf.registry import Params, Technique, hook, register


class Identity:
    def __call__(self, logprobs, positions, context):
        return logprobs


@register("peek_target")
class PeekTarget(Technique):
    """Peeks at the target."""

    Params = Params
    legality = ("illegal",)

    @hook
    def transform_logprobs(self, logprobs, positions, context):
        return logprobs
'''

NOT_INLINABLE = '''
"""Reads its scale from YAML at import: fine in pgolf, impossible in a script without PyYAML."""
import torch
import yaml
from torch import nn
from pgolf.registry import Params, Role, Technique, hook, register, set_role

SCALE = yaml.safe_load("scale: 1.0")["scale"]


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = set_role(nn.Parameter(torch.tensor(SCALE)), Role.SCALAR)

    def forward(self, y, ctx):
        return y * self.s


@register("yaml_scale")
class YamlScale(Technique):
    """Scales attention output by a learned scalar read from YAML."""

    Params = Params

    @hook
    def attn_out(self, layer):
        return Scale()
'''


@pytest.mark.parametrize(
    ("source", "name", "expected"),
    [
        (ILLEGAL, "peek_target", ("peek_target (illegal)",)),
        (NOT_INLINABLE, "yaml_scale", ("cannot be inlined", "'yaml'")),
    ],
)
def test_export_refuses_an_illegal_or_not_inlinable_plugin(
    source: str, name: str, expected: tuple[str, ...], tmp_path: Path, cache_dir: Path
) -> None:  # fmt: skip
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(source)
    run = pgolf_run(tmp_path, cache_dir, {name: {}}, plugins=[str(plugin)],
                    train={**tiny_stack()["train"], "iterations": 2})  # fmt: skip
    result = json.loads((run / "result.json").read_text())
    if name == "yaml_scale":  # the run still counts its code: the files it executed, and says why
        assert result["code_bytes_method"] == FILES_METHOD
        assert "no submission script" in (run / "run.log").read_text()
    # a new process, as `pgolf export` runs: this one registered the plugin from its first path
    out = tmp_path / "out" / "sub"
    proc = subprocess.run([sys.executable, "-m", "pgolf.registry.tools.cli", "export", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert all(e in proc.stderr for e in expected), proc.stderr
    assert not out.parent.exists()  # nothing written


def test_check_refuses_a_folder_that_is_not_a_submission(
    nine_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--check", str(nine_run)]) == 2
    out, err = capsys.readouterr()
    assert "is not a submission written by `pgolf export`" in err and "Traceback" not in err
    assert "checking" not in out  # refused before anything runs
