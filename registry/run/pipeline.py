"""``run(stack) -> RunResult``: the one function the CLI, the tests and the search harness call.

resolve data → build model (slots filled) → train → finalize → export to disk → reload the
artifact from disk → score → result.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from ..api.config import ResolvedStack, Stack
from ..api.errors import DataError, PgolfError
from ..api.roles import Role, format_role_table, role_table, set_role
from ..api.technique import Technique
from ..tools import corpus
from ..tools.plots import CURVE_FILE, plot_training_curve
from ..tools.progress import LiveProgress, RunLog, Ticker, slowdown_hint
from . import bpb, data
from .code import code_bytes
from .dataset import check_dataset
from .evaluate import EvalResult, evaluate
from .export import (
    ARTIFACT_NAME,
    export_bytes,
    load_artifact,
    load_into,
    write_artifact,
)
from .model import GPT, attention_kernel, build_model, count_params
from .record import check_result, write_json, write_manifest, write_stack
from .runtime import DistEnv, Runtime, make_runtime, pin_runtime, seed_everything, shutdown, versions
from .train import Trainer, grad_accum_steps

Reporter = Callable[[Mapping[str, Any]], None]


@dataclass
class DataSource:
    train: list[Path]
    val: list[Path]
    tokenizer: Path
    description: str

    def validation(self, vocab_size: int) -> tuple[torch.Tensor, bpb.ByteLUT]:
        """The whole validation stream and the byte table that scores it."""
        return data.load_tokens(self.val, vocab_size), bpb.build_byte_lut(
            bpb.load_tokenizer(self.tokenizer), vocab_size
        )


@dataclass
class RunResult:
    val_loss: float
    val_bpb: float
    val_tokens: int
    val_bytes: int
    model_bytes: int
    code_bytes: int
    artifact_bytes: int
    artifact_limit: int
    fits: bool
    params: int
    steps: int
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    eval_seconds: float
    seed: int
    versions: dict[str, Any]
    stack_name: str | None = None
    stack_hash: str = ""
    code_hash: str = ""
    code_bytes_method: str = ""
    code_files: list[str] = field(default_factory=list)
    techniques: list[str] = field(default_factory=list)
    stopped_by: str = ""
    artifact_file: str = ARTIFACT_NAME
    data: str = ""
    estimated_artifact_bytes: int | None = None
    pre_quant_val_loss: float | None = None
    pre_quant_val_bpb: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    train_history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SizeEstimate:
    model_bytes: int
    code_bytes: int
    margin: int
    limit: int
    seconds: float
    method: str = (
        "the stack's real quantizer and codec applied to the freshly built model with "
        "non-scalar weights replaced by N(0,1) draws (a stand-in for trained weights)"
    )

    @property
    def total(self) -> int:
        return self.model_bytes + self.code_bytes + self.margin

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


class OverLimitError(PgolfError):
    """A stack whose estimated artifact does not fit, refused before training."""

    def __init__(self, est: SizeEstimate | None):
        what = "the estimated artifact is over export.artifact_limit"
        if est is not None:
            what = (
                f"the estimated artifact is {est.total:,} bytes ({est.model_bytes:,} model + "
                f"{est.code_bytes:,} code), {est.total - est.limit:,} over the {est.limit:,}-byte limit "
                "(export.artifact_limit)"
            )
        super().__init__(
            f"{what}; nothing was trained. Shrink the stack (`pgolf check` prints the estimate) or "
            "pass --allow-over-limit to train it anyway (the estimate stands in random weights for "
            "trained ones)"
        )


def prepare_data(stack: Stack) -> DataSource:
    """Locate and check every shard and the tokenizer (raises before anything is written)."""
    d = stack.data
    if d.path is None:
        cache = Path(d.cache_dir).expanduser() if d.cache_dir else corpus.DEFAULT_CACHE_DIR
        info = corpus.default_dataset(cache, vocab_size=stack.model.vocab_size)
        folder, tok = Path(info.path), Path(info.tokenizer)
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        desc = f"embedded default corpus (Python {py} standard-library docstrings) at {folder}"
    else:
        folder, tok = Path(d.path), Path(d.tokenizer or "")
        if not folder.is_dir():
            raise DataError(f"data.path: folder {str(folder)!r} does not exist")
        if not tok.is_file():
            raise DataError(f"data.tokenizer: file {str(tok)!r} does not exist")
        desc = f"{folder} (tokenizer {tok.name})"
    train = data.find_shards(folder, "train", limit=d.train_shards)
    val = data.find_shards(folder, "val")
    check_dataset(folder, train, val, tok, stack.model.vocab_size, all_train=d.train_shards is None)
    return DataSource(train, val, tok, desc)


def build(
    rs: ResolvedStack, techniques: Sequence[Technique], device: torch.device, attention: str = "sdpa"
) -> GPT:
    m = rs.stack.model
    model = build_model(
        rs.spec,
        techniques,
        tie_embeddings=m.tie_embeddings,
        tied_embed_init_std=m.tied_embed_init_std,
        rope_base=m.rope_base,
        logit_softcap=m.logit_softcap,
        qk_gain_init=m.qk_gain_init,
        attention=attention_kernel(attention, device),
    )
    roles = role_table(model)
    model = model.to(device)  # moving may replace Parameter objects (e.g. to "meta"): relabel them
    for name, p in model.named_parameters():
        set_role(p, roles[name])
    return model


def surrogate_weights_(model: nn.Module, seed: int) -> None:
    """Replace every non-scalar weight by N(0, 1) draws: trained matrices fill their int8 range
    the way Gaussian ones do, whereas freshly initialised zero projections would compress to
    almost nothing and make the size estimate far too small."""
    gen = torch.Generator().manual_seed(seed)
    roles = role_table(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if roles[name] != Role.SCALAR:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def estimate_artifact_bytes(
    rs: ResolvedStack, *, margin: int = 0, model_bytes: int | None = None
) -> SizeEstimate:
    """Artifact size of a stack before any training, with its real export path (CPU, seconds).
    ``model_bytes``: the compressed model's size when the caller already knows it (an artifact
    on disk, or an earlier estimate of the same model layout and export settings): then only
    the counted code is measured (milliseconds)."""
    t0 = time.perf_counter()
    techniques = [r.instantiate(rs.spec) for r in rs.techniques]
    if model_bytes is None:
        model = build(rs, techniques, torch.device("cpu"))
        surrogate_weights_(model, rs.stack.seed)
        model_bytes = len(export_bytes(model, techniques))
    code = code_bytes(techniques, default_corpus=rs.stack.data.path is None)
    return SizeEstimate(
        model_bytes, code.bytes, margin, rs.stack.export.artifact_limit, time.perf_counter() - t0
    )


def score_artifact(
    rs: ResolvedStack,
    artifact: Path,
    runtime: Runtime,
    source: DataSource,
    *,
    techniques: Sequence[Technique] | None = None,
    validation: tuple[torch.Tensor, bpb.ByteLUT] | None = None,
    want_nll: bool = False,
) -> EvalResult:
    """Rebuild the model from the artifact on disk and score the validation split
    (``validation``: the split already loaded by :meth:`DataSource.validation`)."""
    techniques = techniques or [r.instantiate(rs.spec) for r in rs.techniques]
    model = build(rs, techniques, runtime.device, runtime.attention)
    load_into(model, load_artifact(artifact, techniques))
    val, lut = validation or source.validation(rs.stack.model.vocab_size)
    return evaluate(
        model,
        val,
        lut,
        seq_len=rs.stack.eval.seq_len or rs.stack.train.train_seq_len,
        batch_tokens=rs.stack.eval.batch_tokens,
        runtime=runtime,
        want_nll=want_nll,
    )


def run(
    rs: ResolvedStack,
    out_dir: Path,
    *,
    env: DistEnv | None = None,
    report: Reporter | None = None,
    console: Console | None = None,
    estimate: bool = True,
    source: DataSource | None = None,
    allow_over_limit: bool = False,
) -> RunResult:
    """Train, export, reload and score a stack; writes run.log, stack.yaml, the artifact and
    result.json into ``out_dir`` (which must exist). ``source``: the data as already checked
    by :func:`prepare_data`. With ``estimate``, a stack whose estimated artifact is over the
    limit is refused before training (:class:`OverLimitError`) unless ``allow_over_limit``."""
    stack = rs.stack
    source = source or prepare_data(stack)
    runtime = make_runtime(stack.train, env)
    rs = pin_runtime(rs, runtime)  # the stack.yaml it writes reruns with the same settings
    try:
        return _run(rs, out_dir, runtime, source, report, console, estimate, allow_over_limit)
    finally:
        shutdown(runtime)


def _run(
    rs: ResolvedStack,
    out_dir: Path,
    runtime: Runtime,
    source: DataSource,
    report: Reporter | None,
    console: Console | None,
    estimate: bool,
    allow_over_limit: bool = False,
) -> RunResult:
    stack = rs.stack
    main = runtime.is_main
    accum = grad_accum_steps(stack, runtime.world_size)
    log = RunLog(out_dir / "run.log" if main else None, console if main else None)
    est = None
    if estimate and main:
        with Ticker(console, "estimating the artifact size with the stack's export path"):
            est = estimate_artifact_bytes(rs)
    if runtime.any_rank(est is not None and not est.fits) and not allow_over_limit:
        raise OverLimitError(est)
    seed_everything(stack.seed)
    techniques = [r.instantiate(rs.spec) for r in rs.techniques]
    model = build(rs, techniques, runtime.device, runtime.attention)
    code = code_bytes(techniques, default_corpus=stack.data.path is None)
    n_params = count_params(model)
    vers = versions(runtime)
    if main:
        write_stack(out_dir, rs, code)
        log.block("stack (resolved)", rs.to_yaml())
        log.block("versions", json.dumps(vers, indent=2))
        log.block("code", f"{code.bytes:,} bytes, sha256 {code.sha256}: {', '.join(code.files)}")
        log.block("parameter roles", format_role_table(model))
    log(f"stack {stack.name or rs.source} ({rs.hash()}): techniques {' → '.join(rs.technique_names())}")
    log(f"data: {source.description}: {len(source.train)} train shard(s), {len(source.val)} val shard(s)")
    log(
        f"model: {n_params:,} parameters; device {vers['device']} × {runtime.world_size}; "
        f"grad accumulation {accum}; compile {'on' if runtime.compile else 'off'}; "
        f"autocast {runtime.autocast_dtype or 'off'}; threads {runtime.threads} ({runtime.threads_note})"
    )
    if est is not None:
        log(
            f"estimated artifact: {est.total:,} bytes ({est.model_bytes:,} model + {est.code_bytes:,} code) "
            f"of {est.limit:,}{'' if est.fits else '  — over the limit'}"
        )

    val_tokens, lut = source.validation(stack.model.vocab_size)
    eval_len = stack.eval.seq_len or stack.train.train_seq_len

    def score(m: nn.Module) -> EvalResult:
        return evaluate(
            m, val_tokens, lut, seq_len=eval_len, batch_tokens=stack.eval.batch_tokens, runtime=runtime
        )

    def validate(step: int) -> tuple[float, float]:
        r = score(model)
        if report is not None:
            report({"step": step, "val_loss": r.val_loss, "val_bpb": r.val_bpb, "final": False})
        return r.val_loss, r.val_bpb

    loader = data.DistributedTokenLoader(
        source.train, runtime.rank, runtime.world_size, vocab_size=stack.model.vocab_size
    )
    trainer = Trainer(model, techniques, stack, runtime, loader)
    with LiveProgress(
        console if main else None,
        stack.train.iterations,
        stack.train.max_wallclock_seconds,
        log=log if main else None,
        tokens_per_step=stack.train.train_batch_tokens,
        slow_hint=slowdown_hint(runtime.device.type, runtime.threads),
    ) as bar:
        tres = trainer.run(validate=validate, on_progress=bar.update, log=log)
    log(
        f"trained {tres.steps} steps ({tres.stopped_by}) in {tres.train_seconds:.1f}s: "
        f"{tres.tokens_per_second:,.0f} tokens/s, final train loss {tres.final_train_loss:.4f}"
    )

    pre = score(model) if stack.eval.pre_quant else None
    if pre is not None:
        log(f"pre-export: val_loss {pre.val_loss:.4f} val_bpb {pre.val_bpb:.4f}")

    artifact = out_dir / ARTIFACT_NAME
    if main:
        with Ticker(console, "exporting the artifact (quantize, pack, compress)"):
            write_artifact(artifact, model, techniques)
        write_manifest(out_dir, rs, code, artifact, source.tokenizer, source.val)
    runtime.barrier()
    model_bytes = artifact.stat().st_size
    with Ticker(
        console if main else None, f"scoring the reloaded artifact on {val_tokens.numel() - 1:,} tokens"
    ):
        final = score_artifact(
            rs, artifact, runtime, source, techniques=techniques, validation=(val_tokens, lut)
        )
    total = model_bytes + code.bytes
    result = RunResult(
        val_loss=final.val_loss,
        val_bpb=final.val_bpb,
        val_tokens=final.tokens,
        val_bytes=final.bytes,
        model_bytes=model_bytes,
        code_bytes=code.bytes,
        artifact_bytes=total,
        artifact_limit=stack.export.artifact_limit,
        fits=total <= stack.export.artifact_limit,
        params=n_params,
        steps=tres.steps,
        train_tokens=tres.train_tokens,
        train_seconds=tres.train_seconds,
        tokens_per_second=tres.tokens_per_second,
        eval_seconds=final.seconds,
        seed=stack.seed,
        versions=vers,
        stack_name=stack.name,
        stack_hash=rs.hash(),
        code_hash=code.sha256,
        code_bytes_method=code.method,
        code_files=list(code.files),
        techniques=rs.technique_names(),
        stopped_by=tres.stopped_by,
        data=source.description,
        estimated_artifact_bytes=est.total if est else None,
        pre_quant_val_loss=pre.val_loss if pre else None,
        pre_quant_val_bpb=pre.val_bpb if pre else None,
        history=tres.history,
        train_history=bar.points,
    )
    check_result(result.to_dict())  # a non-finite or empty score is a failed run, never a result
    log(
        f"final (from {artifact.name} reloaded from disk): val_loss {result.val_loss:.6f} nats, "
        f"val_bpb {result.val_bpb:.6f} over {result.val_tokens:,} tokens / {result.val_bytes:,} bytes "
        f"in {result.eval_seconds:.1f}s"
    )
    log(
        f"artifact: {model_bytes:,} model + {code.bytes:,} code = {total:,} bytes "
        f"({'fits' if result.fits else 'DOES NOT FIT'} the {result.artifact_limit:,} limit)"
    )
    if main:
        write_json(out_dir / "result.json", result.to_dict())
        plot_training_curve(
            out_dir / CURVE_FILE,
            result.train_history,
            result.history,
            title=f"{stack.name or rs.source}: {result.steps} steps, val_bpb {result.val_bpb:.4f}",
            final={"steps": result.steps, "train_seconds": result.train_seconds, "val_bpb": result.val_bpb},
        )
    if report is not None:
        report({**result.to_dict(), "step": tres.steps, "final": True})
    log.close()
    return result
