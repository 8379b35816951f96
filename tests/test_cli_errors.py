"""No bad input ends in a traceback: every CLI verb, driven with missing, malformed and unwritable
inputs, exits with status 2 and one message; a full disk says what was lost and what was kept."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SP1024, tiny_stack
from faults import full_disk, read_only

from pgolf.registry.tools.cli import build_parser, main

MALFORMED_YAML = "model: {num_layers: 2\ntrain: [\n"


def quick_stack(cache_dir: Path) -> dict[str, Any]:
    s = tiny_stack(cache_dir)
    s["train"].update(iterations=1, threads=1)
    return s


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("errors-run")
    f = root / "s.yaml"
    f.write_text(yaml.safe_dump(quick_stack(cache_dir)))
    assert main(["run", str(f), "--out", str(root / "out"), "--quiet", "--no-estimate"]) == 0
    return root / "out"


class Env:
    """Files the cases use, made on demand in the test's folder."""

    def __init__(self, tmp: Path, cache_dir: Path, run_dir: Path | None):
        self.tmp, self.cache_dir, self._run = tmp, cache_dir, run_dir
        self.ro = tmp / "readonly"
        self.ro.mkdir()

    def stack(self) -> str:
        f = self.tmp / "good.yaml"
        f.write_text(yaml.safe_dump(quick_stack(self.cache_dir)))
        return str(f)

    def malformed(self, name: str = "bad.yaml", text: str = MALFORMED_YAML) -> str:
        f = self.tmp / name
        f.write_text(text)
        return str(f)

    def missing(self, name: str) -> str:
        return str(self.tmp / name)

    def run_dir(self, edit: Callable[[Path], None] | None = None) -> str:
        assert self._run is not None
        d = self.tmp / "run"
        shutil.copytree(self._run, d)
        if edit is not None:
            edit(d)
        return str(d)

    def docs(self) -> str:
        f = self.tmp / "docs.jsonl"
        f.write_text(
            "".join(json.dumps({"text": f"Document {i} is about cats and dogs."}) + "\n" for i in range(6))
        )
        return str(f)

    def groups(self, bad: bool = False) -> list[str]:
        for g, base in (("a", 3.0), ("b", 3.2)):
            for i in (1, 2):
                d = self.tmp / g / f"seed_{i}"
                d.mkdir(parents=True)
                text = json.dumps({"seed": i, "val_loss": base + i / 100, "val_bpb": 1.4 * base})
                (d / "result.json").write_text("{not json" if bad and g == "a" and i == 1 else text)
        return [str(self.tmp / "a"), "--vs", str(self.tmp / "b")]

    def search(self) -> str:
        f = self.tmp / "search.yaml"
        f.write_text(yaml.safe_dump({
            "name": "errs", "stack": quick_stack(self.cache_dir),
            "space": {"optim.matrix_lr": {"logfloat": [0.01, 0.1]}},
            "constraint": {"artifact_bytes": 16_000_000},
            "trial": {"gpus": 0, "cpus": 1}, "search": {"num_samples": 1},
        }))  # fmt: skip
        return str(f)

    def study(self, search_yaml: str | None = None) -> str:
        d = self.tmp / "study"
        d.mkdir()
        (d / "search.yaml").write_text(search_yaml or Path(self.search()).read_text())
        (d / "trials.jsonl").write_text("")
        return str(d)


# verb -> case -> (argv, expected text in the message, whether the read-only folder applies)
Case = tuple[Callable[[Env], list[str]], str]
CASES: dict[str, dict[str, Case]] = {
    "run": {
        "missing": (lambda e: ["run", e.missing("nope.yaml")], "does not exist"),
        "malformed": (lambda e: ["run", e.malformed()], "malformed YAML"),
        "unwritable": (lambda e: ["run", e.stack(), "--out", str(e.ro / "out")], "cannot write in"),
    },
    "check": {
        "missing": (lambda e: ["check", e.missing("nope.yaml")], "does not exist"),
        "malformed": (lambda e: ["check", e.malformed()], "malformed YAML"),
        "unwritable": (lambda e: ["check", e.stack(), "--set", f"data.cache_dir={e.ro / 'cache'}"],
                       "cannot build the default corpus there"),
    },
    "eval": {
        "missing": (lambda e: ["eval", e.missing("nope")], "is not a folder"),
        "malformed": (lambda e: ["eval", e.run_dir(lambda d: (d / "manifest.json").write_text("{oops"))],
                      "unreadable run manifest"),
        "malformed stack": (lambda e: ["eval", e.run_dir(lambda d: (d / "stack.yaml").write_text(MALFORMED_YAML))],
                            "malformed YAML"),
        "unwritable": (lambda e: ["eval", e.run_dir(), "--dump-nll", str(e.ro / "nll.npy")], "cannot write in"),
    },
    "audit": {
        "missing": (lambda e: ["audit", e.missing("nope")], "is not a run folder"),
        "malformed": (lambda e: ["audit", e.run_dir(lambda d: (d / "result.json").write_text("{oops"))],
                      "unreadable result"),
        "malformed stack": (lambda e: ["audit", e.run_dir(lambda d: (d / "stack.yaml").write_text(MALFORMED_YAML))],
                            "malformed YAML"),
    },
    "export": {
        "missing": (lambda e: ["export", e.missing("nope"), "--out", str(e.tmp / "sub")], "is not a folder"),
        "malformed": (lambda e: ["export", e.run_dir(lambda d: (d / "result.json").write_text("{oops")),
                                 "--out", str(e.tmp / "sub")], "is not a valid result"),
        "malformed stack": (lambda e: ["export", e.run_dir(lambda d: (d / "stack.yaml").write_text(MALFORMED_YAML)),
                                       "--out", str(e.tmp / "sub")], "malformed YAML"),
        "no out": (lambda e: ["export", e.run_dir()], "--out DIR is required"),
        "not a submission": (lambda e: ["export", "--check", e.run_dir()], "is not a submission written by"),
        "unwritable": (lambda e: ["export", e.run_dir(), "--out", str(e.ro / "sub")],
                       "cannot write the submission"),
    },
    "techniques": {
        "missing": (lambda e: ["techniques", "no_such_technique"], "unknown technique"),
    },
    "data": {
        "missing": (lambda e: ["data", "build", "--input", e.missing("nope.jsonl"), "--out", str(e.tmp / "d"),
                               "--tokenizer", str(SP1024)], "document file not found"),
        "malformed": (lambda e: ["data", "build", "--input", e.malformed("docs.jsonl", '{"text": 1}\n'),
                                 "--out", str(e.tmp / "d"), "--tokenizer", str(SP1024)], "is a int"),
        "missing tokenizer": (lambda e: ["data", "build", "--input", e.docs(), "--out", str(e.tmp / "d"),
                                         "--tokenizer", e.missing("nope.model"), "--val-docs", "2"], "not found"),
        "unwritable": (lambda e: ["data", "build", "--input", e.docs(), "--out", str(e.ro / "d"),
                                  "--tokenizer", str(SP1024), "--val-docs", "2"], "cannot write in"),
    },
    "bench": {
        "missing": (lambda e: ["bench", e.missing("nope.yaml")], "does not exist"),
        "malformed": (lambda e: ["bench", e.malformed()], "malformed YAML"),
        "unwritable": (lambda e: ["bench", e.stack(), "--out", str(e.ro / "bench")], "cannot write in"),
    },
    "search": {
        "missing": (lambda e: ["search", e.missing("nope.yaml")], "does not exist"),
        "malformed": (lambda e: ["search", e.malformed()], "malformed YAML"),
        "unwritable": (lambda e: ["search", e.search(), "--out", str(e.ro / "study")], "Read-only file system"),
    },
    "results": {
        "missing": (lambda e: ["results", e.missing("nope")], "is not a study folder"),
        "malformed": (lambda e: ["results", e.study(MALFORMED_YAML)], "malformed YAML"),
        "unwritable": (lambda e: ["results", e.study(), "--csv", str(e.ro / "r.csv")], "Read-only file system"),
    },
    "repeat": {
        "missing": (lambda e: ["repeat", e.missing("nope.yaml"), "--seeds", "2"], "does not exist"),
        "malformed": (lambda e: ["repeat", e.malformed(), "--seeds", "2"], "malformed YAML"),
        "unwritable": (lambda e: ["repeat", e.stack(), "--seeds", "2", "--out", str(e.ro / "rep")],
                       "cannot write in"),
    },
    "ablate": {
        "missing": (lambda e: ["ablate", e.missing("nope.yaml"), "--seeds", "2"], "does not exist"),
        "malformed": (lambda e: ["ablate", e.malformed(), "--seeds", "2"], "malformed YAML"),
        "unwritable": (lambda e: ["ablate", e.stack(), "--set", "techniques.ema={}", "--seeds", "2", "--gpus", "0",
                                  "--out", str(e.ro / "st")], "cannot write in"),
        "not a study": (lambda e: ["ablate", "--resume", e.study()], "is not an ablation study"),
        "one seed": (lambda e: ["ablate", e.stack(), "--set", "techniques.ema={}", "--seeds", "1"],
                     "at least 2 seeds"),
        "no technique": (lambda e: ["ablate", e.stack(), "--seeds", "2"], "nothing to ablate"),
    },
    "compare": {
        "missing": (lambda e: ["compare", e.missing("a"), "--vs", e.missing("b")], "does not exist"),
        "malformed": (lambda e: ["compare", *e.groups(bad=True)], "is not a readable run result"),
        "unwritable": (lambda e: ["compare", *e.groups(), "--json", str(e.ro / "c.json")], "cannot write in"),
    },
}  # fmt: skip


def test_every_verb_has_cases() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(CASES)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "verb, case",
    [(v, c) for v, cases in CASES.items() for c in cases],
    ids=lambda x: str(x).replace(" ", "-"),
)
def test_bad_input_is_one_message_and_exit_2(
    verb: str, case: str, tmp_path: Path, cache_dir: Path, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    run_dir = request.getfixturevalue("finished_run") if verb in ("eval", "audit", "export") else None
    env = Env(tmp_path, cache_dir, run_dir)
    make, expected = CASES[verb][case]
    argv = make(env)
    if case == "unwritable":
        read_only(monkeypatch, env.ro)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error:") and "Traceback" not in err and expected in err, err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, "a failed command left files behind"


# -- a full disk ----------------------------------------------------------------------------------


def test_full_disk_during_a_run_says_what_was_lost_and_kept(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(quick_stack(cache_dir)))
    main(["check", str(f), "--no-estimate"])  # the default corpus is in the cache before the disk fills
    capsys.readouterr()
    out = tmp_path / "runs" / "out"
    (tmp_path / "runs").mkdir()
    full_disk(monkeypatch, tmp_path / "runs", free=20_000)  # room for the log and the stack, not the model
    assert main(["run", str(f), "--out", str(out), "--quiet", "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the trained model is lost" in err and "Traceback" not in err
    assert "not written: model.ptz, manifest.json, result.json" in err and "kept in" in err
    failed = tmp_path / "runs" / "out.failed"
    assert not out.exists() and {p.name for p in failed.iterdir()} >= {"run.log", "stack.yaml"}
    assert not list(failed.glob(".model.ptz*")) and not (failed / "model.ptz").exists()


def test_full_disk_during_a_data_build_leaves_nothing(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = Env(tmp_path, cache_dir, None)
    docs = env.docs()
    out_root = tmp_path / "out"
    out_root.mkdir()
    full_disk(monkeypatch, out_root, free=1500)  # the tokenizer copy and a shard fit, not the rest
    argv = [
        "data",
        "build",
        "--input",
        docs,
        "--out",
        str(out_root / "d"),
        "--tokenizer",
        str(SP1024),
        "--val-docs",
        "2",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was written to" in err and "Traceback" not in err
    assert list(out_root.iterdir()) == []


def test_full_disk_while_writing_the_nll_dump(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    full_disk(monkeypatch, tmp_path, free=100)
    assert main(["eval", str(finished_run), "--dump-nll", str(tmp_path / "nll.npy")]) == 2
    captured = capsys.readouterr()
    assert "val_bpb" in captured.out  # the score was shown
    assert "--dump-nll: cannot write" in captured.err and "No space left on device" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_the_corpus_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(quick_stack(cache)))
    full_disk(monkeypatch, cache, free=50_000)
    assert main(["check", str(f), "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert "cannot build the default corpus there" in err and "No space left on device" in err
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_full_disk_when_bench_saves_its_results(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(quick_stack(cache_dir)))
    full_disk(monkeypatch, tmp_path / "bench")
    argv = ["bench", str(f), "--steps", "1", "--no-profile", "--eval-tokens", "0", "--warmup", "0",
            "--out", str(tmp_path / "bench")]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "tokens/s" in captured.out  # the measurements were shown before saving failed
    assert "could not be saved" in captured.err and "No space left on device" in captured.err
    assert [p for p in (tmp_path / "bench").rglob("*") if p.is_file()] == []
