"""A technique from a separately installed package, found through the `pgolf.techniques` entry point."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_stack


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install tests/plugin_pkg (a package outside pgolf) into a private folder."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    shutil.copytree(REPO / "tests" / "plugin_pkg", src)
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(src)],
        check=True, timeout=300,
    )  # fmt: skip
    return site


def pgolf(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "pgolf.registry.tools.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_plugin_is_listed_with_its_origin(plugin_site: Path, tmp_path: Path) -> None:
    proc = pgolf(["techniques", "ext_smear_gate"], plugin_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "entry point ext_smear_gate = pgolf_smear_gate:SmearGate" in proc.stdout
    assert "window: 12" in proc.stdout and "lam  scalar  role=scalar kind=control" in proc.stdout
    proc = pgolf(["techniques", "uniform_mix"], plugin_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "entry point uniform_mix = pgolf_smear_gate:UniformMix" in proc.stdout
    assert "chain 'logprobs' (eval)" in proc.stdout


def test_a_stack_uses_the_plugin_by_name(plugin_site: Path, tmp_path: Path, cache_dir: Path) -> None:
    stack = tiny_stack(cache_dir, techniques={"ext_smear_gate": {"window": 8}, "xsa": {},
                                              "uniform_mix": {"epsilon": 0.5}})  # fmt: skip
    f = tmp_path / "plugin_stack.yaml"
    f.write_text(yaml.safe_dump(stack))
    proc = pgolf(["run", str(f), "--out", str(tmp_path / "out"), "--quiet"], plugin_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["techniques"][:3] == ["ext_smear_gate", "uniform_mix", "xsa"]  # YAML dump sorts keys
    assert "pgolf_smear_gate/__init__.py" in result["code_files"]  # the plugin's source is counted code
    # the evaluation chain ran on the reloaded model: half of a uniform distribution over 1024
    # tokens caps every token's loss at −log(0.5 / 1024) = 7.62 nats
    nll = tmp_path / "nll.npy"
    proc = pgolf(["eval", str(tmp_path / "out"), "--dump-nll", str(nll)], plugin_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    per_token = np.load(nll)
    assert per_token.size == result["val_tokens"] and per_token.max() <= -math.log(0.5 / 1024) + 1e-4


def test_without_the_package_the_name_is_unknown(tmp_path: Path, cache_dir: Path) -> None:
    f = tmp_path / "plugin_stack.yaml"
    f.write_text(yaml.safe_dump(tiny_stack(cache_dir, techniques={"ext_smear_gate": {}})))
    proc = subprocess.run([sys.executable, "-m", "pgolf.registry.tools.cli", "check", str(f)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "unknown technique 'ext_smear_gate'" in proc.stderr
