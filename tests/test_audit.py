"""The legality verdict end to end through the CLI: ``pgolf run`` refuses a dataset whose validation
documents are in its training shards (naming how many), and ``pgolf audit RUN_DIR`` re-runs every
probe on a finished run, exiting 0 when it is legal and 1 (naming the probe) when it is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import SP1024, real_text_documents, tiny_stack

from pgolf.registry.tools.cli import main


def _stack_file(folder: Path, **sections: object) -> Path:
    s = tiny_stack(**sections)  # type: ignore[arg-type]
    s["train"].update(iterations=1, threads=1)
    f = folder / "s.yaml"
    f.write_text(yaml.safe_dump(s))
    return f


def test_run_refuses_overlapping_training_and_validation_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pgolf.registry.tools.corpus import build_dataset

    docs = real_text_documents(60)
    src = tmp_path / "docs.jsonl"
    # the first 12 documents are validation; 5 of them are repeated among the training documents
    leaked = [*docs[:12], *docs[12:40], *docs[2:7], *docs[40:]]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in leaked))
    build_dataset([src], tmp_path / "data", tokenizer=SP1024, val_docs=12)
    f = _stack_file(tmp_path, data={"path": str(tmp_path / "data"), "tokenizer": str(SP1024)})
    code = main(["run", str(f), "--out", str(tmp_path / "out"), "--quiet", "--no-estimate"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "5 of 12 validation documents" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("audit-run")
    f = _stack_file(root, data={"cache_dir": str(cache_dir)})
    assert main(["run", str(f), "--out", str(root / "out"), "--quiet", "--no-estimate"]) == 0
    return root / "out"


def test_audit_passes_a_legal_run_and_reports_every_probe(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = json.loads((finished / "result.json").read_text())
    assert rec["legal"] is True and rec["legal_reasons"] == []
    assert set(rec["legality"]["probes"]) == {"tags", "data", "provenance", "future", "normalisation"}
    assert rec["dataset"]["sha256"]
    assert main(["audit", str(finished)]) == 0
    out = capsys.readouterr().out
    for probe in ("tags", "data", "provenance", "future", "normalisation"):
        assert any(line.startswith(probe) and "pass" in line for line in out.splitlines()), out
    assert "legal: every probe passed" in out


def test_audit_fails_a_run_that_read_validation_data_during_training(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    rec = json.loads((run / "result.json").read_text())
    rec["legality"]["probes"]["data"]["validation_opened"] = [
        {"file": "/data/fineweb_val_000000.bin", "where": "training step 3"}
    ]
    (run / "result.json").write_text(json.dumps(rec))
    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    assert "validation shard fineweb_val_000000.bin was opened during training (at training step 3)" in out
    assert "NOT LEGAL" in out
