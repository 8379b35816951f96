"""``pgolf export``: a run (or several seeds of one stack) as a challenge submission folder, and
``pgolf export --check``: the exported script re-run without pgolf, compared with the run.

The folder holds what a pull request to the challenge adds under ``records/…``:

===========================  ======================================================================
``train_gpt.py``             the submission script (:mod:`.script`): the counted code
``train_gpt_readable.py``    the same code before minification and wrapping, for reading
``model.ptz``                the artifact of the first run
``submission.json``          name, val_bpb / val_loss (mean over the seeds), bytes (total, code,
                             model), each seed's figures, the pgolf version and the stack hash
``README.md``                the stack, each technique with its source, results per seed, bytes,
                             how to run it
``stack.yaml``               the resolved stack as pgolf ran it
``train_seed{N}.log``        each run's log
===========================  ======================================================================

Export refuses (one message, nothing written): a folder that is not a finished run (a failed run,
``OUT.failed``, or one without ``result.json``), a run whose artifact, stack or code changed since it
ran (its manifest), a run over the artifact limit, a stack using a technique tagged ``illegal`` or
``needs_review``, runs of different stacks or code, a stack whose code cannot be inlined into one
script, and an output folder that exists. The folder is written beside its final place and moved
there whole.

The check copies ``train_gpt.py`` into an empty folder, links in the installed packages it may
import (torch, numpy, sentencepiece, the codec's package and what they need — never pgolf), runs it
with ``python -E -s -S`` (no site-packages, no user site, no ``PYTHON*`` variables) on the data the run
used, with the first run's seed, and compares its ``final_result`` line with ``submission.json``:
val_bpb within the tolerance (1e-6 by default), model, code and total bytes equal.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..api.config import DataConfig, ResolvedStack, load_stack
from ..api.errors import PgolfError, RunFailed, os_error_text
from ..run.code import code_bytes
from ..run.export import ARTIFACT_NAME
from ..run.record import (
    ERROR_FILE,
    MANIFEST_FILE,
    RESULT_FILE,
    STACK_FILE,
    check_result,
    dumps_json,
    verify_run_folder,
)
from ..run.submission import RESULT_PREFIX
from .bundle import SCRIPT_LIBRARIES, BundleError
from .script import Script, build_script

SCRIPT_FILE = "train_gpt.py"
READABLE_FILE = "train_gpt_readable.py"
SUBMISSION_FILE = "submission.json"
README_FILE = "README.md"
BLOCKED_LEGALITY = ("illegal", "needs_review")


class ExportError(PgolfError):
    """A run that cannot be exported as a submission."""


@dataclass
class FinishedRun:
    folder: Path
    rs: ResolvedStack
    result: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.result["seed"])


# --------------------------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------------------------


def load_run(folder: Path) -> FinishedRun:
    """A finished, valid, unchanged run folder that may become a submission (raises
    :class:`ExportError` or :class:`~pgolf.registry.run.record.RunFolderMismatch` otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{str(folder)!r} is not a folder (give a folder written by `pgolf run`)")
    if folder.name.endswith(".failed") or (folder / ERROR_FILE).exists():
        raise ExportError(
            f"{folder} is a failed run ({ERROR_FILE} says why); only a finished run can be exported"
        )
    if not (folder / STACK_FILE).is_file():
        raise ExportError(f"{folder} is not a run folder (no {STACK_FILE})")
    if not (folder / RESULT_FILE).is_file():
        raise ExportError(
            f"{folder} has no {RESULT_FILE}: the run did not finish, so it has no score to submit"
        )
    try:
        result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
        check_result(result)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"{folder / RESULT_FILE} is not a valid result ({e})") from None
    except RunFailed as e:
        raise ExportError(f"{folder / RESULT_FILE}: {e}") from None
    if not (folder / MANIFEST_FILE).is_file():
        raise ExportError(f"{folder} has no {MANIFEST_FILE} (written by an older pgolf): its artifact and code "
                          "cannot be checked against what was trained; re-run the stack")  # fmt: skip
    rs = load_stack(folder / STACK_FILE)
    verify_run_folder(folder, rs, code_bytes(rs, script=False))
    flagged = [(r.name, t) for r in rs.techniques for t in r.cls.legality if t in BLOCKED_LEGALITY]
    if flagged:
        what = ", ".join(f"{name} ({tag})" for name, tag in flagged)
        raise ExportError(
            f"{folder}: the stack uses {what}: a run whose evaluation breaks or may break the challenge's "
            "rules cannot be a submission (`pgolf techniques NAME` says why)"
        )
    if not result.get("fits", False):
        raise ExportError(
            f"{folder}: the artifact is {result.get('artifact_bytes', 0):,} bytes, over the "
            f"{result.get('artifact_limit', 0):,}-byte limit; it cannot be a submission"
        )
    return FinishedRun(folder, rs, result)


def _same_stack(runs: Sequence[FinishedRun]) -> None:
    """Every run must be the same stack (but its seed) on the same code."""

    def key(r: FinishedRun) -> str:
        d = r.rs.to_dict()
        d.pop("seed", None)
        d.pop("plugins", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    first = runs[0]
    for r in runs[1:]:
        if key(r) != key(first):
            raise ExportError(f"{r.folder} and {first.folder} ran different stacks; a submission is one stack on "
                              "several seeds")  # fmt: skip
        if r.result.get("code_hash") != first.result.get("code_hash"):
            raise ExportError(f"{r.folder} and {first.folder} ran different code; re-run them with one pgolf")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ExportError(f"two runs have the same seed ({sorted(seeds)}); give one run per seed")


# --------------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------------


def _pgolf_version() -> str:
    try:
        return importlib.metadata.version("pgolf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def submission_record(
    runs: Sequence[FinishedRun],
    script: Script,
    *,
    name: str | None,
    author: str | None,
    github_id: str | None,
) -> dict[str, Any]:
    """``submission.json``: the first run's bytes (its artifact is the folder's), the mean score over
    the seeds, and each seed's figures."""
    first = runs[0]
    model = int(first.result["model_bytes"])
    seeds = []
    for r in runs:
        m = int(r.result["model_bytes"])
        seeds.append({"seed": r.seed, "val_bpb": r.result["val_bpb"], "val_loss": r.result["val_loss"],
                      "bytes_model": m, "bytes_total": m + script.bytes, "steps": r.result.get("steps"),
                      "train_seconds": r.result.get("train_seconds")})  # fmt: skip
    record: dict[str, Any] = {"name": name or first.rs.stack.name or first.folder.name}
    if author:
        record["author"] = author
    if github_id:
        record["github_id"] = github_id
    record.update(
        {
            "date": datetime.date.today().isoformat(),
            "val_bpb": sum(s["val_bpb"] for s in seeds) / len(seeds),
            "val_loss": sum(s["val_loss"] for s in seeds) / len(seeds),
            "bytes_total": model + script.bytes,
            "bytes_code": script.bytes,
            "bytes_model": model,
            "seeds": seeds,
            "pgolf": {
                "version": _pgolf_version(),
                "stack_hash": first.rs.hash(),
                "code_hash": first.result.get("code_hash"),
                "script_wrapped": script.wrapped,
            },
        }
    )
    return record


def _doc_field(doc: str, label: str) -> str:
    """The ``Label: ...`` paragraph of a technique docstring, on one line ('' if absent)."""
    m = re.search(rf"^{label}:(.*?)(?=^\w[\w /-]*:|\n\s*\n|\Z)", doc, flags=re.M | re.S)
    return " ".join(m.group(1).split()) if m else ""


def render_readme(runs: Sequence[FinishedRun], script: Script, record: dict[str, Any]) -> str:
    import inspect

    first = runs[0]
    rs = first.rs
    lines = [f"# {record['name']}", ""]
    lines += [f"val_bpb **{record['val_bpb']:.6f}** (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}), "
              f"artifact **{record['bytes_total']:,}** bytes = {record['bytes_model']:,} model + "
              f"{record['bytes_code']:,} code (limit {rs.stack.export.artifact_limit:,}).", ""]  # fmt: skip
    lines += [
        "Exported by pgolf " + record["pgolf"]["version"] + f" from stack `{rs.hash()}` (`stack.yaml`).",
        "",
    ]
    lines += ["## Techniques", "", "| technique | parameters | what | source |", "|---|---|---|---|"]
    for r in rs.techniques:
        doc = inspect.getdoc(sys.modules.get(r.cls.__module__)) or inspect.getdoc(r.cls) or ""
        params = ", ".join(f"{k}={v}" for k, v in r.params.model_dump(mode="json").items()) or "-"
        note = " (slot default)" if r.implicit else ""
        lines.append(
            f"| `{r.name}`{note} | {params} | {r.cls.summary()} | {_doc_field(doc, 'Source') or '-'} |"
        )
    lines += ["", "## Results", "", "| seed | val_bpb | val_loss (nats) | steps | train s | model bytes | total bytes |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in record["seeds"]:
        train_s = f"{s['train_seconds']:.1f}" if isinstance(s.get("train_seconds"), (int, float)) else "-"
        lines.append(f"| {s['seed']} | {s['val_bpb']:.6f} | {s['val_loss']:.6f} | {s['steps']} | {train_s} | "
                     f"{s['bytes_model']:,} | {s['bytes_total']:,} |")  # fmt: skip
    form = ("a one-line self-extracting script (the base85 of its LZMA)" if script.wrapped
            else "plain minified Python")  # fmt: skip
    lines += ["", "## Bytes", "",
              f"`train_gpt.py` is {script.bytes:,} bytes: pgolf's run and the techniques above bundled into one "
              f"file with the resolved stack, minified and stored as {form}. `{READABLE_FILE}` is the same code "
              "before minification, for reading. The script imports only the standard library and "
              f"{', '.join(script.libraries)}.", "",
              "## Running it", "", "```bash",
              "torchrun --standalone --nproc_per_node=8 train_gpt.py   # SEED=42 for another seed",
              "```", "",
              f"It reads `./data/datasets/fineweb10B_sp{rs.stack.model.vocab_size}` and "
              f"`./data/tokenizers/fineweb_{rs.stack.model.vocab_size}_bpe.model` (or `DATA_PATH` and "
              "`TOKENIZER_PATH`), trains for at most "
              f"{rs.stack.train.max_wallclock_seconds:g} s, writes `{ARTIFACT_NAME}`, reloads it and prints "
              f"the score; its last line, `{RESULT_PREFIX.strip()} {{...}}`, holds the score and the bytes.",
              "", "Logs: " + ", ".join(f"`train_seed{r.seed}.log`" for r in runs) + " (the pgolf runs).", ""]  # fmt: skip
    return "\n".join(lines)


def export_submission(
    run_dirs: Sequence[Path],
    out: Path,
    *,
    name: str | None = None,
    author: str | None = None,
    github_id: str | None = None,
) -> dict[str, Any]:
    """Write the submission folder ``out`` for ``run_dirs`` (one stack, one run per seed; the
    first run's artifact and seed go into the folder). Returns ``submission.json``'s content."""
    out = Path(out)
    if not run_dirs:
        raise ExportError("give at least one run folder")
    if out.exists():
        raise ExportError(f"--out {str(out)!r} already exists; choose a new folder (nothing was changed)")
    runs = [load_run(Path(d)) for d in run_dirs]
    _same_stack(runs)
    first = runs[0]
    try:
        script = build_script(first.rs, readable=True)
    except BundleError as e:
        raise ExportError(
            f"{first.folder}: its code cannot be inlined into one submission script: {e}"
        ) from None
    record = submission_record(runs, script, name=name, author=author, github_id=github_id)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        raise ExportError(f"{str(staging)!r} exists: another export is writing {str(out)!r}, or one was killed; "
                          "remove that folder and retry")  # fmt: skip
    try:
        staging.mkdir(parents=True)
        (staging / SCRIPT_FILE).write_bytes(script.text)
        header = (f"# The code of {SCRIPT_FILE} before minification and wrapping, for reading: {SCRIPT_FILE} is "
                  "the file that runs and is counted.\n")  # fmt: skip
        (staging / READABLE_FILE).write_text(header + script.readable, encoding="utf-8")
        shutil.copyfile(first.folder / ARTIFACT_NAME, staging / ARTIFACT_NAME)
        shutil.copyfile(first.folder / STACK_FILE, staging / STACK_FILE)
        for r in runs:
            if (r.folder / "run.log").is_file():
                shutil.copyfile(r.folder / "run.log", staging / f"train_seed{r.seed}.log")
        (staging / SUBMISSION_FILE).write_text(dumps_json(record), encoding="utf-8")
        (staging / README_FILE).write_text(render_readme(runs, script, record), encoding="utf-8")
        staging.rename(out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(
            f"--out {str(out)!r}: cannot write the submission ({os_error_text(e)}); nothing was written"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


# --------------------------------------------------------------------------------------------
# running the script without pgolf
# --------------------------------------------------------------------------------------------


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_closure(packages: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that provide the import names ``packages``, with everything
    they require (markers for extras left out), pgolf never among them."""
    provides = importlib.metadata.packages_distributions()
    todo = [d for p in packages for d in provides.get(p, [p])]
    seen: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        key = _dist_key(name)
        if key in seen or key == "pgolf":
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if "extra" in marker:
                continue
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
            if m:
                todo.append(m.group(1))
    return list(seen.values())


def script_environment(folder: Path, packages: Iterable[str]) -> list[str]:
    """Link the installed files of :func:`package_closure` (``packages``) into ``folder``, where a
    script run with ``python -E -s -S`` finds them and nothing else installed; returns the names."""
    linked: list[str] = []
    for dist in package_closure(packages):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops - {"__pycache__"}):
            if top.endswith(".pth"):
                continue
            src = Path(str(dist.locate_file(top)))
            dst = folder / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
                linked.append(top)
    return linked


ISOLATED = ("-E", "-s", "-S")
"""Python flags of the check: no PYTHON* variables, no user site, no site-packages."""


@dataclass
class CheckResult:
    expected: dict[str, Any]
    got: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    tolerance: float = 1e-6

    @property
    def ok(self) -> bool:
        return not self.problems


def run_isolated(
    script: Path, work: Path, env: dict[str, str], echo: Callable[[str], None] | None = None
) -> tuple[int, list[str]]:
    """Run ``script`` in ``work`` with :data:`ISOLATED` flags; returns its exit status and output."""
    cmd = [sys.executable, *ISOLATED, str(script.name)]
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if echo is not None:
            echo(line.rstrip("\n"))
    return proc.wait(), lines


def _data_of(folder: Path) -> tuple[Path, Path, int]:
    """The data folder, tokenizer and vocabulary the exported run used (from its stack.yaml)."""
    try:
        d = yaml.safe_load((folder / STACK_FILE).read_text(encoding="utf-8"))
        data = DataConfig(**(d.get("data") or {}))
        vocab = int((d.get("model") or {}).get("vocab_size", 1024))
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        raise ExportError(f"{folder / STACK_FILE}: cannot read the run's data settings ({e})") from None
    if data.path is None:
        from .corpus import DEFAULT_CACHE_DIR, default_dataset

        info = default_dataset(Path(data.cache_dir).expanduser() if data.cache_dir else DEFAULT_CACHE_DIR,
                               vocab_size=vocab)  # fmt: skip
        return Path(info.path), Path(info.tokenizer), vocab
    return Path(data.path), Path(data.tokenizer or ""), vocab


def check_submission(
    folder: Path,
    *,
    tolerance: float = 1e-6,
    echo: Callable[[str], None] | None = None,
    started: Callable[[], None] | None = None,
) -> CheckResult:
    """Run ``folder``'s train_gpt.py without pgolf on the run's data and seed and compare its
    score and bytes with ``submission.json``."""
    folder = Path(folder)
    try:
        record = json.loads((folder / SUBMISSION_FILE).read_text(encoding="utf-8"))
        first = record["seeds"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ExportError(
            f"{folder} is not a submission written by `pgolf export` ({SUBMISSION_FILE}: {e})"
        ) from None
    script = folder / SCRIPT_FILE
    if not script.is_file():
        raise ExportError(f"{folder} has no {SCRIPT_FILE}")
    data, tokenizer, _ = _data_of(folder)
    if not data.is_dir() or not tokenizer.is_file():
        raise ExportError(
            f"the run's data ({data}, tokenizer {tokenizer}) is not on this machine; the check needs it"
        )
    packages = sorted(SCRIPT_LIBRARIES)  # all a script may import; which one a codec uses does not matter
    with tempfile.TemporaryDirectory(prefix="pgolf-check-") as tmp:
        work = Path(tmp)
        shutil.copyfile(script, work / SCRIPT_FILE)
        script_environment(work, packages)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(
            DATA_PATH=str(data.resolve()), TOKENIZER_PATH=str(tokenizer.resolve()), SEED=str(first["seed"])
        )
        probe = subprocess.run([sys.executable, *ISOLATED, "-c", "import importlib.util as u,sys;"
                                "sys.exit(u.find_spec('pgolf') is not None)"], cwd=work, env=env)  # fmt: skip
        if probe.returncode != 0:
            raise ExportError(f"the check's environment in {work} can import pgolf; it would not show the script "
                              "running without it")  # fmt: skip
        if started is not None:
            started()
        status, lines = run_isolated(work / SCRIPT_FILE, work, env, echo)
    got = next(
        (
            json.loads(line[len(RESULT_PREFIX) :])
            for line in reversed(lines)
            if line.startswith(RESULT_PREFIX)
        ),
        None,
    )
    if status != 0 or got is None:
        tail = "\n".join(lines[-15:])
        raise RunFailed(f"{SCRIPT_FILE} failed without pgolf (exit status {status}); its last lines:\n{tail}")
    expected = {"val_bpb": first["val_bpb"], "val_loss": first["val_loss"], "model_bytes": first["bytes_model"],
                "code_bytes": record["bytes_code"], "artifact_bytes": first["bytes_total"], "seed": first["seed"]}  # fmt: skip
    result = CheckResult(expected, got, tolerance=tolerance)
    for key in ("val_bpb", "val_loss"):
        diff = abs(float(got[key]) - float(expected[key]))
        if not math.isfinite(float(got[key])) or diff > tolerance:
            result.problems.append(
                f"{key} {got[key]!r} differs from the run's {expected[key]!r} by {diff:.3g}"
            )
    for key in ("model_bytes", "code_bytes", "artifact_bytes"):
        if int(got[key]) != int(expected[key]):
            result.problems.append(f"{key} {got[key]:,} differs from submission.json's {expected[key]:,}")
    return result


__all__ = [
    "CheckResult",
    "ExportError",
    "check_submission",
    "export_submission",
    "load_run",
    "script_environment",
]
