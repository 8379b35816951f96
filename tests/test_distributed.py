"""Several processes (torchrun, gloo on CPU) train the same global batch as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_stack

from pgolf.registry.tools.cli import main


@pytest.mark.slow
def test_two_processes_match_one_process_with_gradient_accumulation(tmp_path: Path, cache_dir: Path) -> None:
    stack = tiny_stack(cache_dir)
    stack["train"].update({"iterations": 6, "val_loss_every": 3, "threads": 1})
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(stack))
    assert main(["run", str(f), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    assert main(["run", str(f), "--out", str(tmp_path / "two"), "--quiet", "--nproc", "2"]) == 0
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["versions"]["world_size"] == 2 and one["versions"]["world_size"] == 1
    assert two["train_tokens"] == one["train_tokens"] == 6 * 1024
    assert two["val_tokens"] == one["val_tokens"] and two["val_bytes"] == one["val_bytes"]
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h2["val_loss"] == pytest.approx(h1["val_loss"], abs=2e-3)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=2e-3)
