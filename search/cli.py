"""The search commands of the ``pgolf`` CLI: ``search``, ``results``, ``repeat``, ``compare``,
``ablate``.

Importing this module imports neither Ray nor Optuna (a GPU box may lack them, and ``pgolf
run`` must not pay for them): ``pgolf search`` imports the harness inside its command.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from pgolf.registry.api.errors import EXIT_OK, EXIT_RUN_FAILED, EXIT_VERDICT_NO, PgolfError

console = Console(highlight=False, soft_wrap=True)
if not console.is_terminal and console.width < 160:  # logs and pipes: room for the results table
    console.width = 160


def _safe(name: str) -> str:
    from pgolf.registry.tools.cli import safe_name

    return safe_name(name)


def _study_out(name: str) -> Path:
    """The default study folder: a safe folder name inside studies/ (``../x`` cannot escape)."""
    return Path("studies") / f"{_safe(name) if name else 'study'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _new_study_dir(out: str | None, name: str) -> Path:
    """The folder of a new study: ``--out`` or the default; one that holds anything is refused."""
    study_dir = Path(out) if out else _study_out(name)
    if study_dir.exists() and any(study_dir.iterdir()):
        raise PgolfError(
            f"--out {str(study_dir)!r} already exists and is not empty; continue it with "
            f"--resume {study_dir} or choose another folder"
        )
    return study_dir


def cmd_search(args: argparse.Namespace) -> int:
    from .spec import load_search

    if args.dry_run:
        if args.resume or not args.search:
            raise PgolfError("--dry-run takes a search file: pgolf search SEARCH.yaml --dry-run")
        return _dry_run(load_search(args.search, args.set), args)
    if args.resume and args.search:
        raise PgolfError("give a search file or --resume DIR, not both (a study keeps its own search.yaml)")
    if not args.resume and not args.search:
        raise PgolfError("give a search file (pgolf search SEARCH.yaml) or --resume DIR")
    if args.resume:
        study_dir = Path(args.resume)
        from .harness import load_study_spec, run_search

        loaded = load_study_spec(study_dir, args.set)
    else:
        loaded = load_search(args.search, args.set)
        study_dir = _new_study_dir(args.out, loaded.name)
        from .harness import run_search
    if not args.quiet:
        console.print(
            f"[bold]study[/bold] {study_dir}  ({'resumed' if args.resume else 'new'}; "
            f"{loaded.spec.search.num_samples} trials × {len(loaded.spec.search.seeds)} seed(s), "
            f"limit {loaded.spec.constraint.artifact_bytes:,} bytes)"
        )
    summary = run_search(
        loaded,
        study_dir,
        address=args.address,
        resume=bool(args.resume),
        console=None if args.quiet else console,
        quiet=args.quiet,
    )
    if summary.get("message") and not args.quiet:
        console.print(summary["message"])
    _results(study_dir, quiet=args.quiet)
    trained, total = summary.get("trained"), summary.get("num_samples")
    code = int(summary.get("exit_code") or 0)
    if code:
        console.print(
            f"[yellow]stopped by {summary.get('signal')}: {trained}/{total} trials trained; every finished "
            f"trial is in the ledger. Continue with: pgolf search --resume {study_dir}[/yellow]"
        )
        return code
    if trained == 0 and summary.get("ran"):  # every sample was invalid or could not fit: exit 2
        raise PgolfError(
            "no trial was trained: every sampled stack was invalid or over the size limit (see "
            f"{study_dir / 'trials.jsonl'}); narrow the space or raise the limit"
        )
    if summary.get("gave_up"):
        console.print(
            f"[yellow]stopped sampling after {loaded.spec.search.max_resample} rejected samples in a "
            "row: most of the space does not fit or does not validate; narrow it[/yellow]"
        )
    elif trained is not None and total is not None and trained < total:
        console.print(
            f"[yellow]{trained}/{total} trials trained; continue with: pgolf search --resume "
            f"{study_dir}[/yellow]"
        )
    return 0


def _dry_run(loaded: Any, args: argparse.Namespace) -> int:
    import statistics

    from .harness import dry_run

    n = args.samples
    console.print(
        f"[bold]dry run[/bold] of {loaded.source}: {n} points drawn uniformly from the space, each "
        f"sized by the gate (limit {loaded.spec.constraint.artifact_bytes:,} bytes); nothing is trained"
    )

    def line(i: int, what: str, est: Any, note: str) -> None:
        if args.verbose:
            size = f" {est.total:,} bytes ({est.method})" if est is not None else ""
            console.print(f"sample {i}: {what}{size}{(' ' + note) if note else ''}", markup=False)

    r = dry_run(loaded, n, workers=args.workers, check=args.check, on_decision=line)
    secs = r["estimate_seconds"]
    console.print(
        f"feasible: {r['feasible']}/{r['sized']} sized samples ({r['feasible_fraction']:.1%}); "
        f"{r['invalid']} invalid",
        markup=False,
    )
    console.print("decided by: " + ", ".join(f"{v} {k}" for k, v in r["methods"].items() if v), markup=False)
    if secs:
        console.print(
            f"estimate jobs: {len(secs)}, {statistics.fmean(secs):.2f} s mean, "
            f"{statistics.median(secs):.2f} s median, {max(secs):.2f} s max (each on one thread)",
            markup=False,
        )
    console.print(
        f"wall {r['wall_seconds']:.1f} s with {r['workers']} parallel estimate(s) "
        f"({r['driver_seconds']:.2f} s of it in the driver): "
        + (
            f"{r['seconds_per_feasible']:.1f} s of sizing per trainable sample"
            if r["feasible"]
            else "no sample fits: narrow the space"
        ),
        markup=False,
    )
    if r["wrong_decisions"] is not None:
        console.print(
            f"check: {len(r['wrong_decisions'])} analytic/proxy decisions differ from a real estimate"
            + "".join(f"\n  {w}" for w in r["wrong_decisions"]),
            markup=False,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


def _results(
    study_dir: Path,
    *,
    quiet: bool = False,
    csv: str | None = None,
    png: str | None = None,
    best: str | None = None,
    top: int | None = None,
    importance: bool = False,
) -> int:
    from .results import confirmation, footer, load_study, table, write_all

    study = load_study(study_dir)
    written = write_all(
        study, Path(csv) if csv else None, Path(png) if png else None, Path(best) if best else None
    )
    if quiet:
        return 0
    console.print(table(study, top))
    for line in footer(study):
        console.print(line, markup=False)
    for line in confirmation(study):
        console.print(line, markup=False)
    if importance:
        from .results import importance_lines

        for line in importance_lines(study):
            console.print(line, markup=False)
    console.print(
        f"wrote {written.csv}, {written.png}, {written.history}"
        + (
            f", {written.best_yaml} (pgolf run {written.best_yaml})"
            if written.best_yaml
            else "; no trial completed within the limit, so no best stack"
        ),
        markup=False,
    )
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    return _results(
        Path(args.dir),
        csv=args.csv,
        png=args.png,
        best=args.best_yaml,
        top=args.top,
        importance=args.importance,
    )


def _seed_list(args: argparse.Namespace) -> list[int]:
    if args.seed_list:
        try:
            seeds = [int(s) for s in args.seed_list.replace(",", " ").split()]
        except ValueError:
            raise PgolfError(f"--seed-list {args.seed_list!r}: expected integers like 1337,1338") from None
        if len(set(seeds)) != len(seeds):
            raise PgolfError(f"--seed-list {args.seed_list!r} has duplicates")
        return seeds
    if args.seeds is None or args.seeds < 1:
        raise PgolfError("give --seeds N (N ≥ 1) or --seed-list 1337,1338,...")
    return list(range(args.first_seed, args.first_seed + args.seeds))


def cmd_repeat(args: argparse.Namespace) -> int:
    from pgolf.registry.tools.cli import check_writable

    from .repeat import RunScore, repeat

    seeds = _seed_list(args)
    out = (
        Path(args.out)
        if args.out
        else Path("runs") / f"{_safe(Path(args.stack).stem)}-repeat-{time.strftime('%Y%m%d-%H%M%S')}"
    )

    check_writable(out, "--out", folder=True)

    def on_seed(seed: int, score: RunScore | None) -> None:
        if score is None:
            console.print(f"seed {seed}: running → {out / f'seed_{seed}'}", markup=False)
        else:
            console.print(
                f"seed {seed}: val_loss {score.val_loss:.5f}  val_bpb {score.val_bpb:.5f}", markup=False
            )

    summary = repeat(args.stack, seeds, out, args.set, on_seed=on_seed)
    if summary.skipped:
        console.print(f"kept earlier results for seed(s) {', '.join(map(str, summary.skipped))}")
    for line in summary.lines():
        console.print(f"[bold]{escape(line)}[/bold]")
    console.print(f"runs in {out}; compare with: pgolf compare {out} --vs OTHER_DIR", markup=False)
    return EXIT_RUN_FAILED if summary.failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pgolf.registry.tools.cli import check_writable

    from .repeat import compare

    if args.json:
        check_writable(Path(args.json), "--json")
    c = compare(args.a, args.vs)
    for line in c.lines():
        console.print(line, markup=False)
    if args.json:
        from pgolf.registry.run.record import write_json

        write_json(Path(args.json), c.to_dict())
    return EXIT_OK if c.bar_met else EXIT_VERDICT_NO


def _ablation_report(study_dir: Path, *, quiet: bool = False) -> int:
    from .ablate import footer, report, table, write_all

    rep = report(study_dir)
    written = write_all(rep)
    if quiet:
        return 0
    console.print(table(rep))
    for line in footer(rep):
        console.print(line, markup=False)
    console.print(f"wrote {written.csv}, {written.json}, {written.png}", markup=False)
    return 0


def _technique_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [t for t in text.replace(",", " ").split() if t]
    if not names:
        raise PgolfError(f"--techniques {text!r}: expected technique names like xsa,ema")
    return names


def cmd_ablate(args: argparse.Namespace) -> int:
    from pgolf.registry.api.config import load_stack

    from .ablate import plan, read_plan, search_dict
    from .spec import search_from_dict

    if args.resume and args.stack:
        raise PgolfError("give a stack or --resume DIR, not both (an ablation keeps its own plan)")
    if not args.resume and not args.stack:
        raise PgolfError("give a stack (pgolf ablate STACK.yaml) or --resume DIR")
    if args.resume:
        study_dir = Path(args.resume)
        p = read_plan(study_dir)
        from .harness import load_study_spec

        loaded = load_study_spec(study_dir, args.set_search)
        if args.set:
            raise PgolfError("--set changes the stack, which an existing ablation keeps; start a new one")
    else:
        if args.set_search:
            raise PgolfError(
                "--set-search applies to --resume (budget and resources of an existing ablation)"
            )
        rs = load_stack(args.stack, args.set)
        if args.seed_list or args.seeds is not None:
            seeds = _seed_list(args)
        else:
            seeds = list(range(args.first_seed, args.first_seed + 3))
        p = plan(
            rs,
            seeds=seeds,
            techniques=_technique_list(args.techniques),
            add_one_in=args.add_one_in,
            step_matched=args.step_matched,
            source=args.stack,
        )
        gpus = args.gpus
        if gpus is None:
            import torch

            gpus = 1.0 if torch.cuda.is_available() else 0.0
        data = search_dict(
            rs, p, gpus=gpus, cpus=args.cpus, max_concurrent=args.max_concurrent,
            timeout_seconds=args.timeout, size_workers=args.size_workers,
        )  # fmt: skip
        loaded = search_from_dict(data, source=args.stack, base_dir=Path(args.stack).resolve().parent)
        study_dir = _new_study_dir(args.out, loaded.name)
        from pgolf.registry.tools.cli import check_writable

        check_writable(study_dir, "--out", folder=True)
    from .ablate_run import run_ablation

    points = len(p.points())
    if not args.quiet:
        console.print(
            f"[bold]ablation[/bold] {study_dir}  ({'resumed' if args.resume else 'new'}; "
            f"{len(p.variants)} variants of {p.stack_name} in {points} trials × {len(p.seeds)} seeds, "
            f"limit {loaded.spec.constraint.artifact_bytes:,} bytes"
            + (", step-matched" if p.step_matched else "")
            + ")"
        )
    summary = run_ablation(
        loaded, study_dir, None if args.resume else p, address=args.address, resume=bool(args.resume),
        console=None if args.quiet else console, quiet=args.quiet,
    )  # fmt: skip
    _results(study_dir, quiet=True)
    _ablation_report(study_dir, quiet=args.quiet)
    code = int(summary.get("exit_code") or 0)
    if code:
        console.print(
            f"[yellow]stopped by {summary.get('signal')}: every finished variant is in the ledger. "
            f"Continue with: pgolf ablate --resume {study_dir}[/yellow]"
        )
        return code
    if summary.get("halt"):
        console.print(f"[yellow]{escape(str(summary['halt']))}[/yellow]")
        return EXIT_RUN_FAILED
    if summary.get("trained") == 0 and summary.get("ran"):
        raise PgolfError(
            f"no variant was trained: every one was invalid or over the size limit (see {study_dir / 'trials.jsonl'})"
        )
    return 0


def add_commands(sub: Any) -> None:
    """Register ``search``, ``results``, ``repeat`` and ``compare`` on the pgolf sub-parsers."""
    from pgolf.registry.tools.cli import add_set_argument

    p = sub.add_parser(
        "search",
        help="search stacks (Ray Tune + Optuna); sizes every stack before training",
        description="Run a search YAML, or continue a study with --resume DIR. See docs/search.md.",
    )
    p.add_argument("search", nargs="?", help="search YAML file")
    p.add_argument("--out", help="study folder (default studies/<name>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the study in DIR; finished trials are kept")
    p.add_argument(
        "--address",
        help="join a running Ray cluster (from `ray start --head`), e.g. auto or "
        "HEAD_IP:6379; the study folder must be on storage every node sees",
    )
    add_set_argument(p, "search", "search.num_samples=8")
    p.add_argument("--quiet", action="store_true", help="no live table; results files are still written")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="size --samples points of the space and print the feasible fraction and the time per "
        "estimate; train nothing, write nothing",
    )
    p.add_argument("--samples", type=int, default=64, help="--dry-run: points to draw (default 64)")
    p.add_argument(
        "--workers", type=int, help="--dry-run: estimates at once (default search.size_workers; 0 = inline)"
    )
    p.add_argument(
        "--check", action="store_true", help="--dry-run: verify analytic/proxy decisions with real estimates"
    )
    p.add_argument("--json", help="--dry-run: also write the figures as JSON")
    p.add_argument("--verbose", action="store_true", help="--dry-run: one line per sample")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "results", help="rank a study's trials; write results.csv, pareto.png, best_stack.yaml"
    )
    p.add_argument("dir", help="a study folder written by `pgolf search`")
    p.add_argument("--csv", help="CSV path (default DIR/results.csv)")
    p.add_argument("--png", help="Pareto plot path (default DIR/pareto.png)")
    p.add_argument("--best-yaml", help="best stack path (default DIR/best_stack.yaml)")
    p.add_argument("--top", type=int, help="show only the first N rows")
    p.add_argument(
        "--importance",
        action="store_true",
        help="Optuna's parameter importance over the complete trials",
    )
    p.set_defaults(func=cmd_results)

    p = sub.add_parser(
        "ablate",
        help="leave-one-out (and add-one-in) over a stack's techniques, on seeds, with the Welch test",
        description="Train the stack and the stack without each of its techniques (with --add-one-in also "
        "the bare base and the base with each technique) on the same seeds, through the search "
        "harness (every variant sized first; one trial per GPU; --resume after a kill), and compare "
        "each with its reference by the one-sided Welch test in nats against the challenge bar. "
        "Writes ablation.csv, ablation_results.json and ablation.png into the study folder. See "
        "docs/ablate.md.",
    )
    p.add_argument("stack", nargs="?", help="stack YAML file")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3): first-seed, first-seed+1, ...")
    p.add_argument("--first-seed", type=int, default=1337)
    p.add_argument("--seed-list", help="explicit seeds, e.g. 1337,42,7")
    p.add_argument(
        "--step-matched",
        action="store_true",
        help="stop each seed of every variant at the full stack's step count on that seed (no wall-clock cap)",
    )
    p.add_argument(
        "--add-one-in", action="store_true", help="also the base without the techniques, plus each one alone"
    )
    p.add_argument("--techniques", help="ablate only these (comma-separated; default: every technique named)")
    add_set_argument(p)
    p.add_argument("--out", help="study folder (default studies/ablate-<stack>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the ablation in DIR; finished variants are kept")
    p.add_argument(
        "--set-search",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --resume: change resources (trial.cpus=2, search.max_concurrent=4)",
    )
    p.add_argument("--gpus", type=float, help="GPUs per trial (default 1 when CUDA is available, else 0)")
    p.add_argument(
        "--cpus", type=float, default=1.0, help="CPUs per trial, also its torch threads (default 1)"
    )
    p.add_argument(
        "--max-concurrent", type=int, help="trials at once (default: as many as the GPUs/CPUs allow)"
    )
    p.add_argument(
        "--size-workers", type=int, default=2, help="size estimates at once (default 2; 0 = inline)"
    )
    p.add_argument(
        "--timeout", type=float, help="hard limit on a variant's wall-clock in seconds (all seeds)"
    )
    p.add_argument("--address", help="join a running Ray cluster (see pgolf search --address)")
    p.add_argument("--quiet", action="store_true", help="no live table; the table files are still written")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("repeat", help="run one stack on several seeds (for pgolf compare)")
    p.add_argument("stack", help="stack YAML file")
    p.add_argument("--seeds", type=int, help="number of seeds: first-seed, first-seed+1, ...")
    p.add_argument("--first-seed", type=int, default=1337)
    p.add_argument("--seed-list", help="explicit seeds, e.g. 1337,42,7")
    add_set_argument(p)
    p.add_argument(
        "--out",
        help="folder for seed_<s>/ runs (default runs/<stack>-repeat-<time>); "
        "seeds already done there are kept",
    )
    p.set_defaults(func=cmd_repeat)

    p = sub.add_parser(
        "compare",
        help="Welch test: is A's val_loss lower than B's (challenge bar)?",
        description="Exit status 0 when the challenge bar is met (≥ 0.005 nats lower at "
        "p < 0.01), 1 when not.",
    )
    p.add_argument("a", nargs="+", metavar="A_DIR", help="run folders or folders of seed_* runs (group A)")
    p.add_argument("--vs", nargs="+", required=True, metavar="B_DIR", help="group B (the reference)")
    p.add_argument("--json", help="also write the numbers as JSON")
    p.set_defaults(func=cmd_compare)
