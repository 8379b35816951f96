"""``pgolf audit RUN_DIR``: run the legality probes again on a finished run folder.

Checks the folder against its manifest (as ``pgolf eval`` does), then, on the data the run was
scored on:

* **future** and **normalisation** — the artifact, reloaded into fresh builds of the run's stack,
  scored over the changed streams (:func:`pgolf.registry.run.pipeline.probe_artifact`);
* **data** — the validation shards opened during training, as the run recorded them (training
  cannot be observed again);
* **provenance** — the train/validation document overlap of the current shards, and whether the
  dataset's fingerprint is still the one in ``result.json``;
* **tags** — the techniques' legality tags.

Prints one line per probe with its verdict and the run's recorded verdict, and exits 0 when the run
is legal, 1 when it is not (2 for an error). This module is tooling: not part of a stack's counted code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.markup import escape

from ..api.errors import PgolfError


def _recorded(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "result.json"
    if not path.is_file():
        return {}
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PgolfError(f"{path}: unreadable result ({e})") from None
    return rec if isinstance(rec, dict) else {}


def cmd_audit(args: argparse.Namespace) -> int:
    from ..api.config import load_stack
    from ..run import bpb, legality
    from ..run.code import code_bytes
    from ..run.export import ARTIFACT_NAME
    from ..run.pipeline import prepare_data, probe_artifact
    from ..run.provenance import provenance
    from ..run.record import verify_data, verify_run_folder
    from ..run.runtime import make_runtime, shutdown
    from .cli import console, err_console

    run_dir = Path(args.dir)
    if not (run_dir / "stack.yaml").is_file():
        raise PgolfError(
            f"{str(run_dir)!r} is not a run folder (no stack.yaml; give a folder written by `pgolf run`)"
        )
    rs = load_stack(run_dir / "stack.yaml")
    code = code_bytes(rs, script=False)  # the files' hashes, compared with the run's manifest
    for note in verify_run_folder(run_dir, rs, code, allow_code_change=args.allow_code_change):
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}")
    source = prepare_data(rs.stack, check_provenance=False)  # an overlap is a verdict here, not an error
    verify_data(run_dir, source.tokenizer, source.val)
    rec = _recorded(run_dir)
    recorded = (rec.get("legality") or {}).get("probes") or {}

    probes = [legality.tags_probe(r.cls for r in rs.techniques)]
    probes.append(legality.data_probe(recorded.get("data")))
    prov = provenance(source.train, source.val, int(bpb.load_tokenizer(source.tokenizer).bos_id()))
    prov_probe = legality.provenance_probe(prov)
    was = (rec.get("dataset") or {}).get("sha256")
    if was and was != prov.fingerprint["sha256"]:
        prov_probe = legality.ProbeResult(
            "provenance",
            False,
            f"provenance: the shards are not the run's (dataset sha256 {prov.fingerprint['sha256'][:16]}… now, "
            f"{str(was)[:16]}… in result.json): the overlap cannot be checked on the run's data",
            prov_probe.details,
        )
    probes.append(prov_probe)
    runtime = make_runtime(rs.stack.train)
    try:
        val, _ = source.validation(rs.stack.model.vocab_size)
        probes += probe_artifact(rs, run_dir / ARTIFACT_NAME, runtime, val)
    finally:
        shutdown(runtime)
    verdict = legality.assess(probes)

    for p in verdict.probes:
        mark = {True: "[green]pass[/green]", False: "[bold red]FAIL[/bold red]", None: "[yellow]n/a[/yellow]"}
        then = (recorded.get(p.probe) or {}).get("passed", "not recorded")
        then_text = {True: "pass", False: "FAIL", None: "n/a"}.get(then, str(then))
        console.print(
            f"{p.probe:<14} {mark[p.passed]}  {escape(p.message)}  [dim](at the run: {then_text})[/dim]"
        )
    if verdict.legal:
        console.print(f"[bold]legal[/bold]: every probe passed ({run_dir})")
        return 0
    console.print(f"[bold red]NOT LEGAL[/bold red]: {len(verdict.reasons)} probe(s) failed ({run_dir})")
    return 1


def add_command(subparsers: Any) -> None:
    """Register ``pgolf audit`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "audit",
        help="run the legality probes (future, normalisation, data, provenance, tags) on a run folder",
        description="Re-run the legality probes on a run's artifact and data; exit 0 when legal, 1 when not.",
    )
    p.add_argument("dir", help="a folder written by `pgolf run`")
    p.add_argument(
        "--allow-code-change",
        action="store_true",
        help="audit even if pgolf's or a plugin's code differs from the code the run executed",
    )
    p.set_defaults(func=cmd_audit)
