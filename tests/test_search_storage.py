"""Starting a study whose Optuna storage cannot be opened: one clear message (no traceback, no
password), and nothing left behind that would block the same --out or a --resume."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgolf.registry.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _search(tmp_path: Path, storage: str) -> Path:
    search = {
        "stack": {
            "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
            "model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1},
        },
        "space": {"optim.matrix_lr": {"logfloat": [0.01, 0.1]}},
        "trial": {"gpus": 0, "cpus": 1},
        "storage": storage,
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_unreachable_database_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://golfer:s3cret@127.0.0.1:{_free_port()}/studies"  # nothing listens there
    spec, out = _search(tmp_path, url), tmp_path / "study"
    for _ in range(2):  # the same --out again: the same clear error, not "already exists"
        rc, text = _run(["search", str(spec), "--out", str(out)], capsys)
        assert rc == 2, text
        assert "cannot open the Optuna storage postgresql://golfer:***@127.0.0.1" in text
        assert "s3cret" not in text and "Traceback" not in text
        assert not out.exists()
    out.mkdir()  # an empty folder the user made: kept, and still empty
    rc, text = _run(["search", str(spec), "--out", str(out)], capsys)
    assert rc == 2 and out.is_dir() and not any(out.iterdir()), text


def test_missing_postgres_driver_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if pgolf[postgres] were not installed
    spec, out = _search(tmp_path, "postgresql://golfer:s3cret@127.0.0.1/studies"), tmp_path / "study"
    rc, text = _run(["search", str(spec), "--out", str(out)], capsys)
    assert rc == 2 and "pip install 'pgolf[postgres]'" in text and "'psycopg'" in text, text
    assert "s3cret" not in text and not out.exists()


def test_resume_with_a_broken_storage_keeps_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "study"
    study.mkdir()
    url = f"postgresql://golfer:s3cret@127.0.0.1:{_free_port()}/studies"
    loaded: Any = yaml.safe_load(_search(tmp_path, url).read_text())
    loaded["storage"] = "postgresql://golfer:***@127.0.0.1:1/studies"  # as search.yaml keeps it
    (study / "search.yaml").write_text(yaml.safe_dump(loaded))
    (study / "trials.jsonl").write_text("")
    (study / ".storage_url").write_text(url + "\n")
    rc, text = _run(["search", "--resume", str(study)], capsys)
    assert rc == 2 and "cannot open the Optuna storage" in text and "s3cret" not in text, text
    assert sorted(p.name for p in study.iterdir()) == [".lock", ".storage_url", "search.yaml", "trials.jsonl"]
