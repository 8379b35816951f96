"""The ``pgolf`` command line.

Errors a user can fix are printed as one message (no traceback) and exit with status 2; a run
that produced no valid result exits with 3; verdicts (``check``, ``compare``) use 0 and 1. The
statuses are listed in :mod:`pgolf.registry.api.errors`.
This is the only module that reads the process environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..api.errors import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    PgolfError,
    RunFailed,
    os_error_text,
)

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# run / check / eval
# --------------------------------------------------------------------------------------------


def _dist_env() -> Any:
    from ..run.runtime import DistEnv

    try:
        return DistEnv(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as e:
        raise PgolfError(f"malformed torchrun environment: {e}") from None


def _relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` processes."""
    rest: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pgolf.registry.tools.cli",
        *rest,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def safe_name(name: str, fallback: str = "run") -> str:
    """``name`` as one safe folder name: letters, digits, ``_``, ``.`` and ``-`` only (anything
    else, ``/`` and ``..`` included, becomes ``-``), no leading dot, at most 100 characters."""
    cleaned = re.sub(r"[^\w.-]+", "-", name).strip(".-")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:100].strip(".-")
    return cleaned or fallback


def _default_out(name: str) -> Path:
    return Path("runs") / f"{safe_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}"


RUN_FILES = (
    "run.log",
    "stack.yaml",
    "plugins",
    "model.ptz",
    "manifest.json",
    "result.json",
    "training_curve.png",
)
"""What a finished run folder holds, in the order a run writes it."""


def cmd_run(args: argparse.Namespace) -> int:
    from ..api.config import load_stack
    from ..run import checkpoint
    from ..run.pipeline import prepare_data, run
    from ..run.record import STACK_FILE
    from .progress import Ticker

    env = _dist_env()
    resume = args.resume is not None
    if resume:
        if args.stack:
            raise PgolfError(
                "give a stack file or --resume DIR, not both (a run resumes with its own stack.yaml)"
            )
        if args.set or args.out:
            raise PgolfError("--resume continues a run as it was started: --set and --out do not apply")
        out, staging = _resume_paths(Path(args.resume))
        rs = load_stack(staging / STACK_FILE)
    elif not args.stack:
        raise PgolfError("give a stack file (pgolf run STACK.yaml) or --resume DIR")
    else:
        rs = load_stack(args.stack, args.set)
    if args.nproc and args.nproc > 1 and env.world_size == 1:
        argv = list(args.argv)
        if not args.out and not resume:
            argv += ["--out", str(_default_out(rs.stack.name or Path(args.stack).stem))]
        return _relaunch(args.nproc, argv)
    if not resume:
        if env.world_size > 1 and not args.out:
            raise PgolfError("--out is required when running under torchrun (all processes must agree on it)")
        out = Path(args.out) if args.out else _default_out(rs.stack.name or Path(args.stack).stem)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PgolfError(
                f"--out {str(out)!r} already exists and is not empty; choose another folder (nothing was changed)"
            )
        staging = out.parent / f".{out.name}.partial"
    main = env.rank == 0
    source = None
    if main:
        check_writable(out, "--out", folder=True)  # before the data are prepared (minutes, maybe)
        with Ticker(
            None if args.quiet else console, "checking the data (a first run builds the default corpus)"
        ):
            source = prepare_data(rs.stack)  # data problems surface before any folder is created
        if resume:
            checkpoint.load_for(staging, 0, env.world_size)  # refuse a changed stack before any work
        elif staging.exists():
            raise PgolfError(
                f"{str(staging)!r} exists: another run is writing {str(out)!r}, or one was stopped; "
                f"continue it with: pgolf run --resume {out}  (or remove that folder to start again)"
            )
        else:
            try:
                staging.mkdir(parents=True)
            except OSError as e:
                raise PgolfError(
                    f"--out {str(out)!r}: cannot create the run folder ({os_error_text(e)}); nothing was written"
                ) from None
    try:
        result = run(
            rs,
            staging,
            env=env,
            console=None if args.quiet else console,
            estimate=not args.no_estimate,
            source=source,
            allow_over_limit=args.allow_over_limit,
            resume=resume,
        )
    except BaseException as e:
        if not main or not staging.exists():
            raise
        resumable = checkpoint.checkpoint_path(staging).exists()
        if resumable and (isinstance(e, KeyboardInterrupt) or (resume and not isinstance(e, RunFailed))):
            err_console.print(f"the run can continue from its last checkpoint: pgolf run --resume {out}")
            raise  # its .partial folder stays as it is
        if isinstance(e, PgolfError) and not isinstance(e, RunFailed):
            shutil.rmtree(staging, ignore_errors=True)  # a problem with the input: nothing to keep
            raise
        error = _keep_failed_run(staging, out, e)
        if error is None:
            raise
        raise error from None
    if main:
        try:
            if out.exists():
                out.rmdir()
            staging.rename(out)
        except OSError as e:
            raise PgolfError(
                f"the run finished but its folder could not be moved into place ({os_error_text(e)}); "
                f"everything it wrote is in {staging}"
            ) from None
    if main and not args.quiet:
        console.print(
            f"[bold]val_bpb {result.val_bpb:.6f}[/bold]  val_loss {result.val_loss:.6f}  "
            f"artifact {result.artifact_bytes:,} bytes ({'fits' if result.fits else 'does NOT fit'})"
            f"  → {out}/result.json"
        )
        if result.legal is False:
            console.print(f"[bold red]NOT LEGAL[/bold red]: {escape('; '.join(result.legal_reasons))}")
    return 0


def _resume_paths(folder: Path) -> tuple[Path, Path]:
    """(the run's folder, its ``.partial`` folder) for ``--resume FOLDER``, which may name either."""
    suffix = ".partial"
    if folder.name.startswith(".") and folder.name.endswith(suffix):
        staging, out = folder, folder.parent / folder.name[1 : -len(suffix)]
    else:
        out, staging = folder, folder.parent / f".{folder.name}{suffix}"
    if (out / "result.json").is_file():
        raise PgolfError(f"--resume {str(folder)!r}: that run already finished ({out / 'result.json'})")
    if not staging.is_dir():
        raise PgolfError(
            f"--resume {str(folder)!r}: no run to resume ({str(staging)!r}, the folder of an unfinished run, "
            "does not exist)"
        )
    if not (staging / "stack.yaml").is_file():
        raise PgolfError(
            f"--resume {str(folder)!r}: the run stopped before it wrote its stack.yaml, so there is nothing "
            f"to continue; remove {str(staging)!r} and start it again"
        )
    return out, staging


def _keep_failed_run(staging: Path, out: Path, e: BaseException) -> PgolfError | None:
    """Keep a failed run's folder as ``OUT.failed``; return the error the user should see (what
    was lost and what was kept), or None to re-raise ``e`` itself."""
    from ..run.record import ERROR_FILE, keep_failed

    kept = keep_failed(staging, out, e)
    folder = kept or staging
    present = [f for f in RUN_FILES if (folder / f).exists()]
    if kept is not None and (kept / ERROR_FILE).exists():
        present.append(ERROR_FILE)
    where = f"kept in {folder}: {', '.join(present) or 'nothing'}"
    if isinstance(e, OSError):
        missing = [f for f in RUN_FILES if not (folder / f).exists() and f != "plugins"]
        lost = (
            "the trained model is lost" if "model.ptz" in missing else "the model is kept but was not scored"
        )
        return PgolfError(
            f"the run stopped: cannot write to disk ({os_error_text(e)}); {lost} "
            f"(not written: {', '.join(missing)}); {where}"
        )
    if isinstance(e, RunFailed):
        return RunFailed(f"{e}; the run's folder is {where}")
    err_console.print(f"run failed; its log is {where}")
    return None


def cmd_check(args: argparse.Namespace) -> int:
    from ..api.config import load_stack
    from ..run.code import code_bytes
    from ..run.pipeline import dry_build, estimate_artifact_bytes, prepare_data
    from .progress import Ticker

    rs = load_stack(args.stack, args.set)
    console.print("[bold]resolved stack[/bold]")
    console.print(rs.to_yaml().rstrip(), markup=False)
    console.print("[bold]technique order[/bold]")
    for i, r in enumerate(rs.techniques, 1):
        hooks = ", ".join(r.cls.hooks) or "-"
        note = "  (slot default)" if r.implicit else ""
        console.print(f"  {i}. {r.name}  [dim]hooks: {hooks}{note}[/dim]")
    dry = dry_build(rs)  # meta device: site conflicts and signatures surface before any training
    console.print("[bold]sites filled[/bold] [dim](dry build on the meta device)[/dim]")
    for site, tech, where in dry.fills:
        console.print(f"  {site}: {tech}{('  ' + where) if where else ''}", markup=False, highlight=False)
    if len(dry.warm_up_states) > 1:
        shown = "; ".join(f"{'+'.join(sw) or 'none'} @ {n}" for sw, n in dry.warm_up_states)
        console.print(f"[bold]compiled in warm-up[/bold] (switches @ seq_len): {escape(shown)}")
    if dry.time_reserve:
        console.print(f"[bold]time reserve[/bold] {dry.time_reserve:g}s inside the wall-clock cap")
    console.print(f"[bold]parameters[/bold] {dry.params:,}")
    code = code_bytes(rs)
    shown = "the submission script" if not code.note else f"{len(code.files)} files (no script: {code.note})"
    console.print(f"[bold]counted code[/bold] {code.bytes:,} bytes: {escape(shown)}")
    if not args.no_data:  # shards, id ranges and tokenizer, as `pgolf run` checks them
        with Ticker(console, "checking the data (a first run builds the default corpus)"):
            source = prepare_data(rs.stack)
        console.print(
            f"[bold]data[/bold] {escape(source.description)}: {len(source.train)} train and "
            f"{len(source.val)} validation shard(s) checked against the tokenizer"
        )
    if args.no_estimate:
        return 0
    with Ticker(console, "estimating the artifact size with the stack's export path"):
        est = estimate_artifact_bytes(rs)
    verdict = "fits" if est.fits else "does NOT fit"
    console.print(
        f"[bold]estimated artifact[/bold] {est.total:,} bytes = {est.model_bytes:,} model + "
        f"{est.code_bytes:,} code; limit {est.limit:,}: {verdict}  [dim]({est.seconds:.1f}s; "
        f"{est.method})[/dim]"
    )
    return 0 if est.fits else 1


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    import math

    import numpy as np

    from ..api.config import load_stack
    from ..run.code import code_bytes
    from ..run.export import ARTIFACT_NAME, atomic_write
    from ..run.pipeline import prepare_data, score_artifact
    from ..run.record import RESULT_FILE, check_result, verify_data, verify_run_folder
    from ..run.runtime import make_runtime

    run_dir = Path(args.dir)
    stack_file = run_dir / "stack.yaml"
    if not run_dir.is_dir():
        raise PgolfError(f"{str(run_dir)!r} is not a folder (give a folder written by `pgolf run`)")
    if not stack_file.is_file():
        raise PgolfError(f"{str(run_dir)!r} is not a run folder (no stack.yaml)")
    if args.dump_nll is not None:
        check_writable(Path(args.dump_nll), "--dump-nll")
    rs = load_stack(stack_file)
    code = code_bytes(rs, script=False)  # the files' hashes, compared with the run's manifest
    for note in verify_run_folder(run_dir, rs, code, allow_code_change=args.allow_code_change):
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}")
    source = prepare_data(rs.stack)
    verify_data(run_dir, source.tokenizer, source.val)
    runtime = make_runtime(rs.stack.train)
    from .progress import Ticker

    with Ticker(console, "scoring the artifact on the validation split"):
        res = score_artifact(rs, run_dir / ARTIFACT_NAME, runtime, source, want_nll=args.dump_nll is not None)
    check_result({"val_loss": res.val_loss, "val_bpb": res.val_bpb, "val_tokens": res.tokens,
                  "val_bytes": res.bytes})  # fmt: skip
    console.print(
        f"val_loss {res.val_loss:.6f}  val_bpb {res.val_bpb:.6f}  tokens {res.tokens:,}  "
        f"bytes {res.bytes:,}  ({res.seconds:.1f}s)"
    )
    saved = run_dir / RESULT_FILE
    if saved.is_file():
        try:
            prev = json.loads(saved.read_text(encoding="utf-8")).get("val_bpb")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            prev = None
        if isinstance(prev, (int, float)) and math.isfinite(prev):
            console.print(f"result.json: val_bpb {prev:.6f}  (difference {res.val_bpb - prev:+.2e})")
        else:
            console.print(f"result.json holds no valid val_bpb ({prev!r})", markup=False)
    if args.dump_nll is not None:
        import io

        assert res.nll is not None
        buf = io.BytesIO()
        np.save(buf, res.nll)
        try:
            atomic_write(Path(args.dump_nll), buf.getvalue())
        except OSError as e:
            raise PgolfError(
                f"--dump-nll: cannot write {args.dump_nll} ({os_error_text(e)}); the scores above are "
                "complete, only the per-token file was not written (no partial file is left)"
            ) from None
        console.print(
            f"per-token NLL (nats, {res.tokens:,} float32 values in stream order) → {args.dump_nll}"
        )
    return 0


def check_writable(path: Path, what: str, *, folder: bool = False) -> None:
    """Refuse before any work when ``path`` (a file to write, or with ``folder`` a folder to
    create or fill) cannot be written: its nearest existing folder must take a new file."""
    import tempfile

    path = Path(path)
    if not folder and path.is_dir():
        raise PgolfError(f"{what} {str(path)!r} is a folder; give a file path")
    start = path if folder else path.parent
    existing = start if str(start) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PgolfError(f"{what} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PgolfError(
            f"{what} {str(path)!r}: cannot write in {str(existing)!r} ({os_error_text(e)}); nothing was done"
        ) from None


def cmd_export(args: argparse.Namespace) -> int:
    from .submission import SCRIPT_FILE, check_submission, export_submission

    if not args.dirs:
        raise PgolfError("give a run folder to export (pgolf export RUN_DIR --out DIR), or --check DIR")
    if args.out is None:
        if not args.check:
            raise PgolfError("--out DIR is required: the new submission folder to write")
        if len(args.dirs) != 1:
            raise PgolfError("--check without --out takes one folder: a submission written by `pgolf export`")
        folder = Path(args.dirs[0])
    else:
        record = export_submission([Path(d) for d in args.dirs], Path(args.out), name=args.name,
                                   author=args.author, github_id=args.github_id)  # fmt: skip
        folder = Path(args.out)
        seeds = ", ".join(str(s["seed"]) for s in record["seeds"])
        console.print(
            f"[bold]{escape(str(folder))}[/bold]: val_bpb {record['val_bpb']:.6f} (seed {seeds}); "
            f"{record['bytes_total']:,} bytes = {record['bytes_model']:,} model + {record['bytes_code']:,} "
            f"code ({SCRIPT_FILE})"
        )
        if not args.check:
            return 0
    echo = (
        None
        if args.quiet
        else (lambda line: console.print(f"  [dim]|[/dim] {escape(line)}", highlight=False))
    )
    shown = f"checking {escape(str(folder / SCRIPT_FILE))} without pgolf (python -E -s -S, only its packages)"
    res = check_submission(folder, tolerance=args.tolerance, echo=echo, started=lambda: console.print(shown))
    for key in ("val_bpb", "val_loss", "model_bytes", "code_bytes", "artifact_bytes"):
        console.print(f"  {key}: script {res.got[key]!r}, run {res.expected[key]!r}", highlight=False)
    if res.ok:
        console.print(
            f"[bold]the script reproduces the run[/bold] (val_bpb within {args.tolerance:g}, bytes equal)"
        )
        return 0
    for p in res.problems:
        err_console.print(f"[bold red]mismatch:[/bold red] {escape(p)}")
    return 1


# --------------------------------------------------------------------------------------------
# techniques / data
# --------------------------------------------------------------------------------------------


def cmd_techniques(args: argparse.Namespace) -> int:
    from ..api.technique import REGISTRY

    if args.name:
        return _describe_technique(args.name)
    table = Table(show_lines=False, box=None, pad_edge=False)
    table.add_column("technique", no_wrap=True)
    table.add_column("summary", overflow="fold", ratio=1)
    table.add_column("hooks", no_wrap=True)
    table.add_column("params", no_wrap=True)  # one per line, never cut inside a value
    # on a terminal one param per line; piped or redirected, one line per technique, never wrapped
    sep = "\n" if console.is_terminal else ", "
    for name in REGISTRY.names():
        cls = REGISTRY.get(name)
        params = sep.join(f"{k}={default}" for k, default, _ in param_docs(cls.Params))
        table.add_row(name, cls.summary(), sep.join(cls.hooks), params or "-")
    out = console if console.is_terminal else Console(highlight=False, width=10_000)
    out.print(table, crop=False)
    for name, err in REGISTRY.broken().items():
        err_console.print(f"[yellow]broken plugin {name}:[/yellow] {err}")
    return 0


def yaml_value(v: Any) -> str:
    """A parameter value as it is written in a stack's YAML (``last(4)``, ``fp16``, ``[7, 8]``)."""
    import yaml

    from ..api.selectors import LayerSelector

    if isinstance(v, LayerSelector):
        v = v.dump()
    if isinstance(v, tuple):
        v = list(v)
    try:
        text = yaml.safe_dump(v, default_flow_style=True, width=10_000)
    except yaml.YAMLError:
        return str(v)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def param_docs(params: type[Any]) -> list[tuple[str, str, str]]:
    """(name, default in YAML form, what values it takes) for each field of a params model:
    numeric bounds (``>= 2, <= 1048576``), the choices of a ``Literal``, the layer-selector forms."""
    import typing

    import annotated_types as at
    from pydantic_core import PydanticUndefined

    from ..api.selectors import LayerSelector

    ops = ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<="),
           (at.MultipleOf, "multiple_of", "multiple of"), (at.MinLen, "min_length", "length >="),
           (at.MaxLen, "max_length", "length <="))  # fmt: skip
    out = []
    for name, f in params.model_fields.items():
        if f.default is PydanticUndefined and f.default_factory is None:
            default = "(required)"
        else:
            default = yaml_value(f.get_default(call_default_factory=True))
        allowed = []
        if typing.get_origin(f.annotation) is typing.Literal:
            allowed.append("one of " + ", ".join(yaml_value(c) for c in typing.get_args(f.annotation)))
        if f.annotation is LayerSelector:
            allowed.append("layers: all, none, last(N), first(N), every(N) or a list like [7, 8]")
        for m in f.metadata:
            for kind, attr, sym in ops:
                if isinstance(m, kind):
                    allowed.append(f"{sym} {yaml_value(getattr(m, attr))}")
        out.append((name, default, "; ".join(allowed)))
    return out


def _describe_technique(name: str) -> int:
    import inspect

    from ..api.sites import HOOKS, SITES
    from ..api.technique import REGISTRY

    cls = REGISTRY.get(name)
    console.print(f"[bold]{name}[/bold]  [dim]({cls.origin})[/dim]")
    doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
    console.print(doc, markup=False)
    console.print("\n[bold]params[/bold]")
    fields = cls.Params.model_fields
    for k, default, allowed in param_docs(cls.Params):
        what = "; ".join(x for x in (fields[k].description or "", allowed) if x)
        console.print(f"  {k}: {escape(default)}  [dim]{escape(what)}[/dim]")
    console.print("[bold]hooks[/bold]")
    for h, hargs in cls.hooks.items():
        site = SITES[HOOKS[h].site]
        console.print(
            f"  {h}({', '.join(hargs)})  [dim]{site.kind} {site.name!r} ({site.plan}): {HOOKS[h].doc}[/dim]"
        )
    for attr in ("requires", "conflicts", "before", "after", "legality"):
        if getattr(cls, attr):
            console.print(f"[bold]{attr}[/bold] {', '.join(getattr(cls, attr))}")
    if cls.gain_at_end:
        console.print("[bold]gain_at_end[/bold] yes: its benefit shows at the end of training")
    added = _added_parameters(name)
    if added:
        console.print("[bold]parameters it adds[/bold] (on a 2-layer, width-64 model)")
        for pname, role, shape in added:
            console.print(f"  {pname}  {shape}  {role}")
    return 0


def _added_parameters(name: str) -> list[tuple[str, str, str]]:
    import torch

    from ..api.config import stack_from_dict
    from ..api.roles import kind_of, layer_of, role_of
    from ..run.pipeline import build

    tiny = {
        "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 64},
        "train": {"train_seq_len": 16, "micro_batch_tokens": 16, "train_batch_tokens": 16},
    }
    from ..api.technique import REGISTRY

    cls = REGISTRY.get(name)
    techniques: dict[str, Any] = {req: {} for req in cls.requires}
    techniques[name] = dict(cls.contract_params)  # params that fit a 2-layer model
    base = stack_from_dict(tiny)
    meta = torch.device("meta")
    try:
        with_t = stack_from_dict({**tiny, "techniques": techniques})
        before = {n for n, _ in build(base, meta).model.named_parameters()}
        model = build(with_t, meta).model
    except PgolfError:
        return []  # needs other params to build on a 2-layer model
    return [
        (
            n,
            f"role={getattr(role_of(p), 'value', '?')} kind={getattr(kind_of(p), 'value', '?')}"
            + (f" layer={layer_of(p)}" if layer_of(p) is not None else ""),
            "x".join(map(str, p.shape)) or "scalar",
        )
        for n, p in model.named_parameters()
        if n not in before
    ]


def cmd_data_build(args: argparse.Namespace) -> int:
    from .corpus import build_dataset

    if (args.tokenizer is None) == (args.vocab_size is None):
        raise PgolfError("give exactly one of --tokenizer X.model or --vocab-size N")
    out = Path(args.out)
    check_writable(out, "--out", folder=True)
    try:
        info = build_dataset(
            [Path(p) for p in args.input],
            out,
            tokenizer=Path(args.tokenizer) if args.tokenizer else None,
            vocab_size=args.vocab_size,
            val_docs=args.val_docs,
            shard_tokens=args.shard_tokens,
            txt_mode=args.txt_docs,
            text_key=args.text_key,
            tokenizer_train_docs=args.tokenizer_train_docs,
            option_names={
                "tokenizer": "--tokenizer",
                "vocab_size": "--vocab-size",
                "val_docs": "--val-docs",
                "shard_tokens": "--shard-tokens",
                "tokenizer_train_docs": "--tokenizer-train-docs",
            },
        )
    except OSError as e:  # build_dataset writes beside --out and removes its work on failure
        raise PgolfError(
            f"data build stopped: cannot write ({os_error_text(e)}); nothing was written to {out} "
            "(the partly written shards were removed) and the input documents are untouched"
        ) from None
    console.print(
        f"wrote {info.path}: val {info.val_docs:,} docs / {info.val_tokens:,} tokens, "
        f"train {info.train_docs:,} docs / {info.train_tokens:,} tokens, vocab {info.vocab_size}, "
        f"tokenizer {info.tokenizer}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def add_set_argument(
    p: argparse.ArgumentParser, what: str = "stack", example: str = "model.num_layers=11"
) -> None:
    """The repeatable ``--set KEY.PATH=VALUE`` override shared by every command that reads a YAML."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help=f"override a {what} key, e.g. --set {example} (repeatable; VALUE is YAML)",
    )


def version_line() -> str:
    """``pgolf X (python Y, torch Z)``: the installed versions, without importing torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"pgolf {v('pgolf')} (python {platform.python_version()}, torch {v('torch')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter Golf: techniques, stacks, search.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train, export, reload and score a stack")
    p.add_argument("stack", nargs="?", help="stack YAML file")
    add_set_argument(p)
    p.add_argument("--out", help="output folder (default runs/<name>-<time>)")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue a stopped run (DIR: its folder, or its .partial folder) from its last checkpoint",
    )
    p.add_argument("--nproc", type=int, default=0, help="processes (GPUs) to launch through torchrun")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing but errors (run.log and result.json are still written)",
    )
    p.add_argument("--no-estimate", action="store_true", help="skip the pre-training artifact size estimate")
    p.add_argument(
        "--allow-over-limit",
        action="store_true",
        help="train even when the estimated artifact is over export.artifact_limit (refused by default)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate a stack and estimate its artifact size without training")
    p.add_argument("stack")
    add_set_argument(p)
    p.add_argument("--no-estimate", action="store_true")
    p.add_argument("--no-data", action="store_true", help="skip checking the shards and the tokenizer")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("eval", help="re-score the artifact of a run folder")
    p.add_argument("dir", help="a folder written by `pgolf run`")
    p.add_argument("--dump-nll", metavar="FILE.npy", help="write the per-token NLL of the validation stream")
    p.add_argument(
        "--allow-code-change",
        action="store_true",
        help="re-score even if pgolf's or a plugin's code differs from the code the run executed",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export",
        help="write a run as a challenge submission (train_gpt.py, model, README, submission.json, logs)",
        description="pgolf export RUN_DIR [RUN_DIR...] --out DIR writes a submission folder (one stack, one run "
        "per seed); --check re-runs its train_gpt.py without pgolf and compares the score and bytes "
        "(pgolf export --check DIR checks an existing folder)",
    )
    p.add_argument(
        "dirs", nargs="*", metavar="DIR", help="run folders (one per seed), or a submission with --check"
    )
    p.add_argument("--out", help="the new submission folder (must not exist)")
    p.add_argument(
        "--check", action="store_true", help="run train_gpt.py without pgolf and compare with the run"
    )
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest val_bpb difference --check accepts")
    p.add_argument("--name", help="submission name (default: the stack's name)")
    p.add_argument("--author", help="author, for submission.json")
    p.add_argument("--github-id", help="GitHub id, for submission.json")
    p.add_argument("--quiet", action="store_true", help="do not show the script's output during --check")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("techniques", help="list techniques, or describe one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_techniques)

    p = sub.add_parser("data", help="build challenge-format shards from documents")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    b = dsub.add_parser("build", help="documents (.txt/.jsonl) -> fineweb_{train,val}_*.bin + tokenizer")
    b.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    b.add_argument("--out", required=True, help="new output folder")
    b.add_argument("--tokenizer", help="existing SentencePiece .model")
    b.add_argument(
        "--vocab-size", type=int, help="train a SentencePiece BPE of this size (challenge settings)"
    )
    b.add_argument(
        "--tokenizer-train-docs",
        type=int,
        help="with --vocab-size: train the tokenizer on the first N documents only (the challenge's SP4096 "
        "and SP8192: 5,000,000); default all",
    )
    b.add_argument("--val-docs", type=int, default=50_000, help="the first N documents are validation")
    b.add_argument("--shard-tokens", type=int, default=100_000_000)
    b.add_argument(
        "--txt-docs",
        choices=["file", "paragraph", "line"],
        default="file",
        help="how a .txt file splits into documents",
    )
    b.add_argument("--text-key", default="text", help="field of each .jsonl record holding the text")
    b.set_defaults(func=cmd_data_build)

    from .audit import add_command as add_audit
    from .bench import add_command as add_bench

    add_bench(sub)
    add_audit(sub)
    try:
        from pgolf.search.cli import add_commands
    except ImportError:  # the search harness is optional on GPU boxes without ray/optuna
        add_commands = None
    if add_commands is not None:
        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except RunFailed as e:
        err_console.print(
            f"[bold red]run failed:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True
        )
        return EXIT_RUN_FAILED
    except PgolfError as e:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except OSError as e:  # a file or folder the command could not read or write
        err_console.print(f"[bold red]error:[/bold red] {escape(os_error_text(e))}", highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return EXIT_INTERRUPTED
    except Exception:
        import traceback

        err_console.print(traceback.format_exc(), markup=False, highlight=False)
        err_console.print(
            "[bold red]internal error[/bold red] (a bug in pgolf; please report it with the above)"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
