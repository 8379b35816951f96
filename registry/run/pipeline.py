"""``run(stack) -> RunResult``: the one function the CLI, the tests and the search harness call.

resolve data → build model (sites filled, init event) → train → finalize → calibrate → export to
disk (verified) → reload the artifact from disk into a fresh build → score → result.json.
Each phase's seconds are reported; the training side (train + finalize + calibration + export) is
compared with the wall-clock cap.

The phases from the build to the score are :func:`train_and_score`, which an exported submission
script (:mod:`.submission`) runs as well; what ``pgolf run`` adds around them (the size gate, the
live display, run.log, stack.yaml, checkpoints, the data watch, the manifest, the legality probes,
result.json and the plot) comes through :class:`RunHooks` and never enters the script.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..api.config import ResolvedStack, Stack, tokenizer_name_size
from ..api.context import CalibrationData
from ..api.errors import DataError, PgolfError
from ..api.roles import Role, format_role_table, param_infos, relabel
from ..api.sites import SITES, Dispatcher
from ..api.technique import Technique
from . import bpb, checkpoint, data, legality
from .code import code_bytes
from .dataset import check_dataset, find_named_tokenizer
from .evaluate import EvalResult, Violation, evaluate
from .export import (
    ARTIFACT_NAME,
    Export,
    atomic_write,
    export_model,
    load_artifact,
    load_into,
    quantizer_of,
    stored_bits,
    verify_export,
)
from .model import GPT, attention_kernel, build_model, count_params
from .provenance import Provenance, check_overlap, provenance
from .record import check_result, write_json, write_manifest, write_stack
from .runtime import DistEnv, Runtime, make_runtime, pin_runtime, seed_everything, shutdown, versions
from .train import Progress, Trainer, TrainResult, grad_accum_steps

if TYPE_CHECKING:  # the tools drive the run; the run imports them only where `pgolf run` needs them
    from rich.console import Console

Reporter = Callable[[Mapping[str, Any]], None]


@dataclass
class DataSource:
    train: list[Path]
    val: list[Path]
    tokenizer: Path
    description: str
    provenance: Provenance | None = None  # fingerprint and train/validation overlap, once checked

    def validation(self, vocab_size: int) -> tuple[torch.Tensor, bpb.ByteLUT]:
        """The whole validation stream and the byte table that scores it (the tokenizer's
        byte accounting was checked with the data, by :func:`prepare_data`)."""
        return data.load_tokens(self.val, vocab_size), bpb.byte_tables(
            bpb.load_tokenizer(self.tokenizer), vocab_size
        )

    def check_provenance(self) -> Provenance:
        """Fingerprint the shards and refuse validation documents that are training documents
        (:class:`DataError` naming how many); remembered on this source."""
        if self.provenance is None:
            bos = int(bpb.load_tokenizer(self.tokenizer).bos_id())
            self.provenance = provenance(self.train, self.val, bos)
        check_overlap(self.provenance.overlap, Path(self.val[0]).parent)
        return self.provenance


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
    code_source_bytes: int = 0  # the plain UTF-8 size of the counted files
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
    phase_seconds: dict[str, float] = field(
        default_factory=dict
    )  # train/finalize/calibration/export/evaluation
    training_side_seconds: float = 0.0  # train + finalize + calibration + export
    over_time: bool = False  # the training side exceeded train.max_wallclock_seconds
    switches: list[str] = field(default_factory=list)  # switches on at the end of training
    legal: bool | None = None  # every legality probe passed (registry/run/legality.py)
    legal_reasons: list[str] = field(default_factory=list)  # why not, one line per failed probe
    legality: dict[str, Any] = field(default_factory=dict)  # each probe's verdict and figures
    dataset: dict[str, Any] = field(default_factory=dict)  # the data's fingerprint (provenance.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SizeEstimate:
    model_bytes: int  # the surrogate's compressed model + ``allowance``
    code_bytes: int
    margin: int
    limit: int
    seconds: float
    allowance: int = 0  # bytes added for calibration-dependent codes (part of model_bytes)
    method: str = (
        "the stack's real quantizer and codec applied to the freshly built model with "
        "non-scalar weights replaced by N(0,1) draws (a stand-in for trained weights)"
    )

    @staticmethod
    def describe(weights: str) -> str:
        """The method line for the surrogate weights ``weights`` (``export.size_estimate``)."""
        if weights == "gaussian":
            return SizeEstimate.method
        return (
            "the stack's real quantizer and codec applied to the freshly built model with non-scalar "
            f"weights replaced by unit-variance Student-t draws (export.size_estimate: heavy_tails, ν = "
            f"{SURROGATE_TAIL_DOF:g}: calibrated on the 03-23 record, whose trained int6 rows compressed "
            "16 % below N(0, 1) stand-ins)"
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


def prepare_data(stack: Stack, *, check_provenance: bool = True) -> DataSource:
    """Locate and check every shard and the tokenizer, and (``check_provenance``) that no
    validation document is a training document (raises before anything is written)."""
    d = stack.data
    if d.path is None:
        from ..tools import corpus

        cache = Path(d.cache_dir).expanduser() if d.cache_dir else corpus.DEFAULT_CACHE_DIR
        info = corpus.default_dataset(cache, vocab_size=stack.model.vocab_size)
        folder, tok = Path(info.path), Path(info.tokenizer)
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        desc = f"embedded default corpus (Python {py} standard-library docstrings) at {folder}"
    else:
        folder, tok = Path(d.path), Path(d.tokenizer or "")
        if not folder.is_dir():
            raise DataError(f"data.path: folder {str(folder)!r} does not exist")
        named = tokenizer_name_size(d.tokenizer)
        if named is not None:
            tok = find_named_tokenizer(folder, str(d.tokenizer), named)
        if not tok.is_file():
            raise DataError(f"data.tokenizer: file {str(tok)!r} does not exist")
        desc = f"{folder} (tokenizer {tok.name})"
    train = data.find_shards(folder, "train", limit=d.train_shards)
    val = data.find_shards(folder, "val")
    check_dataset(folder, train, val, tok, stack.model.vocab_size, all_train=d.train_shards is None)
    source = DataSource(train, val, tok, desc)
    if check_provenance:
        source.check_provenance()
    return source


@dataclass
class Built:
    """One build of a stack: its own technique instances, their dispatcher and the model."""

    model: GPT
    techniques: list[Technique]
    sites: Dispatcher


def build(rs: ResolvedStack, device: torch.device, attention: str = "sdpa") -> Built:
    """A fresh build of the stack on ``device`` (``meta`` for a dry build): new technique
    instances, every site filled, the ``init`` event run, every parameter labelled."""
    techniques = [r.instantiate(rs.spec) for r in rs.techniques]
    sites = Dispatcher(techniques)
    kernel = attention_kernel(attention, device)
    if device.type == "meta":
        with torch.device("meta"):
            model = build_model(rs.spec, sites, attention=kernel)
        return Built(model, techniques, sites)
    model = build_model(rs.spec, sites, attention=kernel)
    infos = param_infos(model)
    model = model.to(device)  # moving may replace Parameter objects: relabel them
    relabel(model, infos)
    return Built(model, techniques, sites)


@dataclass
class DryBuild:
    """What ``pgolf check`` learns from building a stack on the meta device."""

    params: int
    fills: list[tuple[str, str, str]]  # (site, technique, where)
    warm_up_states: list[tuple[tuple[str, ...], int]]  # (switches, seq_len) compiled in warm-up
    time_reserve: float
    quantizers: dict[str, str]  # tensor -> quantizer or "float"


def dry_build(rs: ResolvedStack) -> DryBuild:
    """Build the stack on the meta device and exercise every site without data or weights: the
    model (slot conflicts per layer / Linear, module signatures, the ``init`` event, roles and
    kinds), the export claims of every tensor, the optimizer plan, the schedule (switches, batch
    shapes, time reserve) and a forward pass in every switch state and sequence length. Raises a
    :class:`PgolfError` naming the techniques and the site on the first problem."""
    meta = torch.device("meta")
    b = build(rs, meta)
    infos = {n: i for n, i in param_infos(b.model).items() if i.role != Role.ADAPTER}
    quantizers: dict[str, str] = {}
    for name, info in infos.items():
        q = quantizer_of(info, b.sites, rs.stack.export)
        quantizers[name] = "float" if q is None else q.name
    runtime = Runtime(device=meta, autocast_dtype=None, compile=False, attention="sdpa")
    with torch.device("meta"):
        trainer = Trainer(b.model, b.sites, rs.stack, runtime, None)  # type: ignore[arg-type]
        state = trainer.new_state()
        _ = trainer.lr_schedule(state), trainer.wd_schedule(state)
        states = trainer.warm_up_states()
        for switches, seq_len in {*states, (eval_switches(b.sites), eval_seq_len(rs.stack))}:
            idx = torch.zeros(1, seq_len, dtype=torch.int64)
            b.model(idx, idx, switches=switches)
    return DryBuild(count_params(b.model), b.sites.summary(), states, trainer.reserve, quantizers)


SURROGATE_CALIBRATION_TOKENS = 128
"""Tokens per batch of the size estimate's calibration (random ids; the estimate's forward passes
run on the CPU, so they are kept short)."""


SURROGATE_TAIL_DOF = 3.85
"""ν of the Student-t draws of ``export.size_estimate: heavy_tails``.

The tail of a row decides how many bits it takes on a grid scaled by its largest values (GPTQ-lite's
percentile search, absmax, the int8 percentile clip): N(0, 1) rows of 512 take 5.3 bits per weight
at int6 with the percentile search, unit-variance t rows with ν = 4 about 4.4; SDClip (k·std)
hardly depends on it. N(0, 1) stand-ins (the default) put the trained baseline within 1 % of its
real artifact (int8, percentile clip) and the SDClip records' stacks 1.6-3.5 % above their records
per parameter (``bench/record_estimates.json``), but put the 03-23 lineage (STE QAT, int6
percentile search, zstd-22: 15,887,928 model bytes for 26,928,220 parameters,
../shared/reference/techniques.md §5) 16 % high. ν = 3.85 is where the estimate of
``stacks/pr754.yaml`` meets that record (15,804,714 model bytes for 26,765,453 parameters: the same
bits per parameter). Measured 2026-12-01, model bytes of that estimate by ν: 3.5 → 15,482,269;
3.75 → 15,305,513; 3.85 → 15,804,714; 3.9 → 15,155,789; 4.0 → 16,277,572 — not monotonic: the
percentile search's choice per row and zstd-22's parse on 27 MB of codes move the result by up to
±4 % between neighbouring draws, which bounds how closely any stand-in can be calibrated."""


def surrogate_weights_(model: nn.Module, seed: int, weights: str = "gaussian") -> None:
    """Replace every weight by a stand-in for trained values. Non-scalar weights: N(0, 1) draws
    (``weights="gaussian"``: a Gaussian has the most entropy for its variance, so this errs high)
    or unit-variance Student-t draws with ν = :data:`SURROGATE_TAIL_DOF` (``"heavy_tails"``).
    Either fills the quantizer's grid the way trained matrices do, whereas freshly initialised
    zero projections would compress to almost nothing and make the size estimate far too small.
    Control tensors (role ``scalar``, stored as fp32) become their initial values times
    (1 + 0.1·N(0, 1)) plus 0.01·N(0, 1): trained control values have random low bits, which no
    codec can shrink, while their constant initial values (ones, zeros) would compress to nothing.
    Deterministic in ``seed``."""
    if weights not in ("gaussian", "heavy_tails"):
        raise ValueError(f"weights must be 'gaussian' or 'heavy_tails', not {weights!r}")
    gen = torch.Generator().manual_seed(seed)
    tails = np.random.default_rng(seed)
    unit = math.sqrt((SURROGATE_TAIL_DOF - 2) / SURROGATE_TAIL_DOF)  # a t(ν) draw's std is √(ν/(ν−2))
    infos = param_infos(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = infos[name].role
            if role == Role.ADAPTER:
                continue
            if role == Role.SCALAR:
                draw = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                jitter = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                draw = p.detach().float().cpu() * (1 + 0.1 * draw) + 0.01 * jitter
            elif weights == "gaussian":
                draw = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            else:
                t = tails.standard_t(SURROGATE_TAIL_DOF, size=tuple(p.shape)) * unit
                draw = torch.from_numpy(t.astype(np.float32))
            p.copy_(draw.to(p.dtype))


def surrogate_calibration(b: Built, rs: ResolvedStack) -> None:
    """The ``calibrate`` event of the export's techniques (GPTQ's Hessians, AWQ-lite's salience)
    on the surrogate model, with batches of random token ids (1 × min(train_seq_len,
    SURROGATE_CALIBRATION_TOKENS)), so that the estimate runs their real export path. Training
    techniques' calibrate hooks are not run (the estimate stands in weights, not training)."""
    export_hooks = {h.name for s in SITES.values() if s.plan == "export" for h in s.hooks}
    techs = [t for t in b.sites.implementers("calibrate") if export_hooks & set(t.hooks)]
    if not techs:
        return
    gen = torch.Generator().manual_seed(rs.stack.seed)
    length = min(rs.stack.train.train_seq_len, SURROGATE_CALIBRATION_TOKENS)
    vocab = rs.stack.model.vocab_size
    data = CalibrationData(iter(lambda: torch.randint(0, vocab, (1, length), generator=gen), None))
    switches = eval_switches(b.sites)
    b.model.eval()
    with torch.no_grad():
        for t in techs:
            t.call("calibrate", model=b.model, batches=data, switches=switches)


def estimate_artifact_bytes(
    rs: ResolvedStack, *, margin: int = 0, model_bytes: int | None = None
) -> SizeEstimate:
    """Artifact size of a stack before any training, with its real export path (CPU, seconds):
    the stack's model with surrogate weights (:func:`surrogate_weights_`), calibrated by the
    export's techniques on random tokens (:func:`surrogate_calibration`), quantized, packed and
    compressed as a run would. ``model_bytes``: the compressed model's size when the caller
    already knows it (an artifact on disk, or an earlier estimate of the same model layout and
    export settings): then only the counted code is measured (milliseconds)."""
    t0 = time.perf_counter()
    allowance = 0
    notes: list[str] = []
    if model_bytes is None:
        b = build(rs, torch.device("cpu"))
        surrogate_weights_(b.model, rs.stack.seed, rs.stack.export.size_estimate)
        surrogate_calibration(b, rs)
        ex = export_model(b.model, b.sites, rs.stack.export)
        share = allowance_share(ex.packed, ex.infos, b.sites)
        allowance = math.ceil(len(ex.blob) * share)
        caps = [(c, t) for t in b.techniques if (c := t.size_cap()) is not None]
        cap, capper = min(caps, key=lambda ct: ct[0]) if caps else (None, None)
        if cap is not None and capper is not None and len(ex.blob) <= cap:
            # the export enforces the cap on the trained codes too: the allowance stops there
            capped = allowance > cap - len(ex.blob)
            allowance = min(allowance, cap - len(ex.blob))
            what = capper.size_cap_note(capped)
            if what:
                notes.append(
                    f"{capper.name}: {what} its {cap:,}-byte target (trained codes may need more or fewer); the "
                    "allowance for calibration-dependent codes stops at the target, which the export enforces"
                )
        model_bytes = len(ex.blob) + allowance
        if allowance:
            notes.append(
                f"includes {allowance:,} bytes ({100 * allowance / len(ex.blob):.1f} %) allowance for codes that "
                "depend on the trained model's calibration data (the quantizers' size_allowance)"
            )
        used = {e["q"] for e in ex.packed["tensors"].values()} | {
            t.name for t in b.sites.implementers("post_quantize")
        }
        notes += [
            f"{t.name}: {t.size_estimate_note}"
            for t in b.techniques
            if t.size_estimate_note and t.name in used
        ]
    code = code_bytes(rs)
    est = SizeEstimate(
        model_bytes, code.bytes, margin, rs.stack.export.artifact_limit, time.perf_counter() - t0,
        allowance=allowance, method=SizeEstimate.describe(rs.stack.export.size_estimate),
    )  # fmt: skip
    return replace(est, method="; ".join([est.method, *notes])) if notes else est


def allowance_share(packed: Mapping[str, Any], infos: Mapping[str, Any], sites: Dispatcher) -> float:
    """The estimate's allowance as a share of the compressed model: Σ a_t·bits_t / Σ bits_t over
    the stored tensors, a_t the ``size_allowance`` of the quantizer that stored tensor t (0 when
    it states none) and bits_t the bits its stored form needs before the codec (``stored_bits``).
    Low-bit codes compress further than wider data, so this overstates their share: the
    allowance errs high."""
    by_name = {t.name: t for t in sites.techniques}
    total = weighted = 0.0
    for name, entry in packed["tensors"].items():
        bits = stored_bits(entry["data"])
        total += bits
        q = by_name.get(entry["q"])
        if q is not None and "size_allowance" in q.hooks and name in infos:
            weighted += bits * float(q.call("size_allowance", info=infos[name]))
    return weighted / total if total else 0.0


def eval_seq_len(stack: Stack) -> int:
    return stack.eval.seq_len or stack.train.train_seq_len


def score_artifact(
    rs: ResolvedStack,
    artifact: Path,
    runtime: Runtime,
    source: DataSource,
    *,
    validation: tuple[torch.Tensor, bpb.ByteLUT] | None = None,
    want_nll: bool = False,
    fresh: Callable[[], Built] | None = None,
    inspect: Callable[[Any], None] | None = None,
) -> EvalResult:
    """Rebuild the model afresh from the artifact on disk and score the validation split
    (``validation``: the split already loaded by :meth:`DataSource.validation`; ``fresh``: a
    factory from :func:`artifact_builds` that has read the artifact already)."""
    if fresh is not None:
        b = fresh()
    else:
        b = build(rs, runtime.device, runtime.attention)
        load_into(b.model, load_artifact(artifact, b.sites, param_infos(b.model)))
    val, lut = validation or source.validation(rs.stack.model.vocab_size)
    return evaluate(
        b.model,
        val,
        lut,
        seq_len=eval_seq_len(rs.stack),
        batch_tokens=rs.stack.eval.batch_tokens,
        runtime=runtime,
        sites=b.sites,
        switches=eval_switches(b.sites),
        want_nll=want_nll,
        inspect=inspect,
    )


class ArtifactBuilds:
    """Fresh builds of a stack holding an artifact's weights (see :func:`artifact_builds`)."""

    def __init__(self, rs: ResolvedStack, artifact: Path, runtime: Runtime, seed: int):
        self.rs, self.runtime = rs, runtime
        self.start = legality.RandomState.seeded(seed, runtime.device)
        t0 = time.perf_counter()
        self.pristine: Built | None = self.new()
        self.build_seconds = time.perf_counter() - t0
        self.state = load_artifact(artifact, self.pristine.sites, param_infos(self.pristine.model))
        load_into(self.pristine.model, self.state)
        self.copying = True

    def new(self) -> Built:
        """A build made from the same random state as ``seed_everything(seed)`` leaves (cheaply)."""
        self.start.restore()
        return build(self.rs, self.runtime.device, self.runtime.attention)

    def __call__(self) -> Built:
        if self.copying and self.pristine is not None:
            t = time.perf_counter()
            try:
                b = copy.deepcopy(self.pristine)
            except Exception:  # a technique holding something that cannot be copied
                self.copying = False
            else:
                self.copying = time.perf_counter() - t <= self.build_seconds
                return b
        b = self.new()
        load_into(b.model, self.state)
        return b

    def last(self) -> Built:
        """The pristine build itself, for a caller's last use (later calls build anew)."""
        if self.pristine is None:
            return self()
        b, self.pristine = self.pristine, None
        return b


def artifact_builds(rs: ResolvedStack, artifact: Path, runtime: Runtime, seed: int) -> ArtifactBuilds:
    """A factory of fresh builds of the stack holding the artifact's weights. The artifact is read
    from disk once, into a build made right after ``seed_everything(seed)`` that is kept pristine;
    each call returns a deep copy of it (new technique instances and modules, so scorers and
    transforms start afresh), or — where copying is slower than building, or impossible — a new
    build made the same way; ``.last()`` hands over the pristine build itself."""
    return ArtifactBuilds(rs, artifact, runtime, seed)


def probe_plan(rs: ResolvedStack, stream: torch.Tensor) -> legality.Plan | None:
    """Where the probes of this stack look in ``stream`` (the scorer may name cut points)."""
    sites = Dispatcher([r.instantiate(rs.spec) for r in rs.techniques])
    scorer = sites.filler("scorer")
    suggested: list[int] = []
    if scorer is not None and "probe_points" in scorer.hooks:
        got = scorer.call("probe_points", n_targets=stream.numel() - 1, seq_len=eval_seq_len(rs.stack),
                          stream=stream.to(torch.int64))  # fmt: skip
        suggested = [int(k) for k in got]
    return legality.probe_plan(stream.numel() - 1, suggested, rs.stack.seed)


def probe_recorder(rs: ResolvedStack, stream: torch.Tensor) -> legality.Recorder | None:
    """For a stack with no evaluation technique (the default scorer, no logprobs chain), a
    recorder that lets the run's own evaluation stand as the probes' unchanged pass; None for
    any other stack, whose scorer or transforms may depend on how positions are batched (the
    probes then make that pass themselves, batched like their other passes)."""
    sites = Dispatcher([r.instantiate(rs.spec) for r in rs.techniques])
    if sites.filler("scorer") is not None or sites.implementers("transform_logprobs"):
        return None
    plan = probe_plan(rs, stream)
    return legality.Recorder(plan) if plan is not None else None


def probe_artifact(
    rs: ResolvedStack,
    artifact: Path,
    runtime: Runtime,
    stream: torch.Tensor,
    eval_violations: list[Violation] | None = None,
    fresh: Callable[[], Built] | None = None,
    base: legality.Pass | None = None,
) -> list[legality.ProbeResult]:
    """The future and normalisation probes of a stack's evaluation on its artifact, in one
    process on ``runtime``'s device (:mod:`.legality`); ``fresh``: the run's factory of builds
    (:func:`artifact_builds`), which has read the artifact already; ``base``: what the run's
    evaluation recorded of the unchanged stream (:class:`~.legality.Recorder`)."""
    single = legality.single_process(runtime)
    switches = eval_switches(Dispatcher([r.instantiate(rs.spec) for r in rs.techniques]))
    future, norm = legality.future_and_normalisation(
        fresh or artifact_builds(rs, artifact, single, rs.stack.seed), stream, single, probe_plan(rs, stream),
        seq_len=eval_seq_len(rs.stack), batch_tokens=rs.stack.eval.batch_tokens, switches=switches,
        vocab_size=rs.stack.model.vocab_size, seed=rs.stack.seed, base=base, eval_violations=eval_violations,
    )  # fmt: skip
    return [future, norm]


def check_legality(
    rs: ResolvedStack,
    artifact: Path,
    runtime: Runtime,
    stream: torch.Tensor,
    final: EvalResult | None,
    watch: data.FileWatch | Mapping[str, Any] | None,
    prov: Provenance | None,
    fresh: Callable[[], Built] | None = None,
    recorder: legality.Recorder | None = None,
) -> legality.Legality:
    """Every probe of a run's artifact (the artifact probes on the first process only).
    ``final``: the evaluation just made of it (its normalisation violations count); ``watch``:
    the files opened during training, or the data probe its run recorded when the artifact is
    scored again (``pgolf eval``-style re-scoring in an eval-only search)."""
    t0 = time.perf_counter()
    probes = [
        legality.tags_probe(r.cls for r in rs.techniques),
        legality.data_probe(watch),
        legality.provenance_probe(prov),
    ]
    if runtime.is_main:
        base = recorder.result() if recorder is not None else None
        violations = final.violations if final is not None else None
        probes += probe_artifact(rs, artifact, runtime, stream, violations, fresh, base)
    runtime.barrier()
    return legality.assess(probes, time.perf_counter() - t0)


def training_loader(
    sites: Dispatcher, source: DataSource, runtime: Runtime, seed: int, vocab_size: int
) -> Any:
    """The ``train_loader`` slot over the training shards only (default: the baseline's
    sequential loader, which range-checks token ids). Validation files are never handed to a
    technique."""
    return sites.slot(
        "train_loader",
        lambda: data.DistributedTokenLoader(
            source.train, runtime.rank, runtime.world_size, vocab_size=vocab_size
        ),
        files=list(source.train),
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=seed,
    )


def eval_switches(sites: Dispatcher) -> tuple[str, ...]:
    """The switches that are on when a model of this stack is evaluated (structural ones)."""
    return tuple(s.name for group in sites.chain("switches") for s in group if s.at_eval)


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
    resume: bool = False,
) -> RunResult:
    """Train, export, reload and score a stack; writes run.log, stack.yaml, the artifact and
    result.json into ``out_dir`` (which must exist). ``source``: the data as already checked
    by :func:`prepare_data`. With ``estimate``, a stack whose estimated artifact is over the
    limit is refused before training (:class:`OverLimitError`) unless ``allow_over_limit``.
    Checkpoints go into ``out_dir`` every ``train.checkpoint_minutes`` and are removed at the
    end; ``resume`` continues from the one there (:mod:`.checkpoint`)."""
    stack = rs.stack
    main = env is None or env.rank == 0
    source = source or prepare_data(stack, check_provenance=main)
    if main:
        source.check_provenance()  # refuses overlapping train/validation documents before training
    runtime = make_runtime(stack.train, env)
    rs = pin_runtime(rs, runtime)  # the stack.yaml it writes reruns with the same settings
    try:
        validation = source.validation(stack.model.vocab_size)  # read before the data watch starts
        # every shard opened from here until the artifact is on disk is recorded (the data probe)
        with data.watch_opens(source.val) as watch:
            return _run(rs, out_dir, runtime, source, report, console, estimate, allow_over_limit,
                        validation, watch, resume)  # fmt: skip
    finally:
        shutdown(runtime)


class RunHooks:
    """What ``pgolf run`` adds to the phases of :func:`train_and_score`: the data watch's phase,
    live training progress, checkpoints, a note while a slow phase runs, the moments the model is
    built, a periodic validation is done and the artifact is written, and the builds that score
    the artifact. Every default does nothing. An exported submission script passes no hooks, so
    none of this enters it."""

    checkpointer: checkpoint.Checkpointer | None = None
    """Writes periodic checkpoints while training and holds the one to resume from (set up by
    :meth:`training`)."""

    def phase(self, name: str, where: Callable[[], str] | None = None) -> None:
        """The run enters phase ``name`` (``where``: the position within it, for the data watch)."""

    def built(self, b: Built) -> None:
        """The model is built (seeded, every site filled), before any data is read."""

    def training(self) -> contextlib.AbstractContextManager[Callable[[Progress], None] | None]:
        """Around the training loop; yields the per-step progress callback (or None) and may set
        :attr:`checkpointer`."""
        return contextlib.nullcontext()

    def busy(self, what: str) -> contextlib.AbstractContextManager[Any]:
        """Around a slow step without progress of its own (export, scoring)."""
        return contextlib.nullcontext()

    def validated(self, step: int, result: EvalResult) -> None:
        """A periodic validation during training (``train.val_loss_every``)."""

    def exported(self, artifact: Path, export: Export, sites: Dispatcher) -> None:
        """The artifact is written (main process only); ``export`` holds what produced it.
        ``pgolf run`` reads it back and verifies every tensor here (:func:`.export.verify_export`);
        an exported script, running the code and stack pgolf verified, does not."""

    def written(self, artifact: Path) -> None:
        """The training side is over: the artifact is on disk (every process, before the barrier)."""

    def fresh(self, artifact: Path) -> Callable[[], Built] | None:
        """The builds that score the artifact (:func:`artifact_builds`), or None for a plain build."""
        return None

    def inspect(self) -> Callable[[Any], None] | None:
        """What watches the final evaluation (:func:`probe_recorder`), or None."""
        return None


@dataclass
class Trained:
    """What :func:`train_and_score` did: the build, training, the scores and the seconds of each
    phase (train, finalize, calibration, export, evaluation)."""

    built: Built
    train: TrainResult
    final: EvalResult
    pre: EvalResult | None
    model_bytes: int
    phases: dict[str, float]


def train_and_score(
    rs: ResolvedStack,
    runtime: Runtime,
    source: DataSource,
    validation: tuple[torch.Tensor, bpb.ByteLUT],
    artifact: Path,
    log: Callable[[str], None],
    hooks: RunHooks | None = None,
) -> Trained:
    """Seed, build, train, finalize, calibrate, export the artifact to ``artifact``, reload it
    into a fresh build and score it on ``validation`` (:meth:`DataSource.validation`): the phases
    a run and an exported script share. ``log`` takes the log one line at a time; ``hooks``: what
    ``pgolf run`` adds (:class:`RunHooks`)."""
    # `x if hooks is not None else ...`: an exported script, which passes no hooks, keeps the
    # `else` alone (pgolf.registry.tools.specialize), so none of the run's extras enter it
    stack = rs.stack
    seed_everything(stack.seed)
    if hooks is not None:
        hooks.phase("model build")
    b = build(rs, runtime.device, runtime.attention)
    model = b.model
    for t in b.techniques:
        t.bind_log(log)
    if hooks is not None:
        hooks.built(b)
    val_tokens, lut = validation
    loader = training_loader(b.sites, source, runtime, stack.seed, stack.model.vocab_size)
    trainer = Trainer(model, b.sites, stack, runtime, loader)
    if hooks is not None:
        hooks.phase("training", lambda: f"step {trainer.state.step}")

    def score(m: nn.Module, switches: tuple[str, ...]) -> EvalResult:
        return evaluate(
            m, val_tokens, lut, seq_len=eval_seq_len(stack), batch_tokens=stack.eval.batch_tokens,
            runtime=runtime, switches=switches,
        )  # fmt: skip

    def validate(step: int) -> tuple[float, float]:
        on = tuple(s for s in trainer.eval_switches if s in trainer.state.switches)
        r = score(model, on)
        if hooks is not None:
            hooks.validated(step, r)
        return r.val_loss, r.val_bpb

    with hooks.training() if hooks is not None else contextlib.nullcontext() as on_progress:
        checkpointer = hooks.checkpointer if hooks is not None else None
        tres = trainer.run(validate=validate, on_progress=on_progress, log=log, checkpointer=checkpointer)
    log(
        f"trained {tres.steps} steps ({tres.stopped_by}) in {tres.train_seconds:.1f}s: "
        f"{tres.tokens_per_second:,.0f} tokens/s, final train loss {tres.final_train_loss:.4f}"
    )
    phases: dict[str, float] = {"train": tres.train_seconds}
    if hooks is not None:
        hooks.phase("finalize")
    with Phase(phases, "finalize", runtime):
        trainer.finalize()
    if hooks is not None:
        hooks.phase("calibration")
    with Phase(phases, "calibration", runtime):
        n_cal = trainer.calibrate()
    if n_cal:
        log(f"calibration: {n_cal} training batches in {phases['calibration']:.1f}s")

    pre = score(model, trainer.eval_switches) if stack.eval.pre_quant else None
    if pre is not None:
        log(f"pre-export: val_loss {pre.val_loss:.4f} val_bpb {pre.val_bpb:.4f}")

    if hooks is not None:
        hooks.phase("export", lambda: "")
    with Phase(phases, "export", runtime):
        if runtime.is_main:
            busy = hooks.busy("exporting the artifact (quantize, pack, compress, verify)") if hooks else None
            with busy or contextlib.nullcontext():
                ex = export_model(model, b.sites, stack.export)
                atomic_write(artifact, ex.blob)
                if hooks is not None:
                    hooks.exported(artifact, ex, b.sites)
        if hooks is not None:
            hooks.written(artifact)
        runtime.barrier()
    model_bytes = artifact.stat().st_size
    scoring = (
        hooks.busy(f"scoring the reloaded artifact on {val_tokens.numel() - 1:,} tokens") if hooks else None
    )
    with Phase(phases, "evaluation", runtime), scoring or contextlib.nullcontext():
        fresh = hooks.fresh(artifact) if hooks is not None else None
        inspect = hooks.inspect() if hooks is not None else None
        final = score_artifact(
            rs, artifact, runtime, source, validation=validation, fresh=fresh, inspect=inspect
        )
    log(
        f"final (from {artifact.name} reloaded from disk): val_loss {final.val_loss:.6f} nats, "
        f"val_bpb {final.val_bpb:.6f} over {final.tokens:,} tokens / {final.bytes:,} bytes "
        f"in {final.seconds:.1f}s"
    )
    return Trained(b, tres, final, pre, model_bytes, phases)


def _run(
    rs: ResolvedStack,
    out_dir: Path,
    runtime: Runtime,
    source: DataSource,
    report: Reporter | None,
    console: Console | None,
    estimate: bool,
    allow_over_limit: bool,
    validation: tuple[torch.Tensor, bpb.ByteLUT],
    watch: data.FileWatch,
    resume: bool = False,
) -> RunResult:
    from ..tools.plots import CURVE_FILE, plot_training_curve
    from ..tools.progress import LiveProgress, RunLog, Ticker, slowdown_hint

    stack = rs.stack
    main = runtime.is_main
    accum = grad_accum_steps(stack, runtime.world_size)
    log = RunLog(out_dir / "run.log" if main else None, console if main else None)
    saved = checkpoint.load_for(out_dir, runtime.rank, runtime.world_size) if resume else None
    est = None
    watch.phase = "size estimate"
    if estimate and main and saved is None:
        with Ticker(console, "estimating the artifact size with the stack's export path"):
            est = estimate_artifact_bytes(rs)
    if runtime.any_rank(est is not None and not est.fits) and not allow_over_limit:
        raise OverLimitError(est)
    code = code_bytes(rs)
    vers = versions(runtime)
    live: list[LiveProgress] = []
    scoring: dict[str, Any] = {}
    val_tokens = validation[0]

    class Hooks(RunHooks):
        def phase(self, name: str, where: Callable[[], str] | None = None) -> None:
            watch.phase = name
            if where is not None:
                watch.where = where

        def built(self, b: Built) -> None:
            if main and saved is None:
                write_stack(out_dir, rs, code)
            if main:
                log.block("stack (resolved)", rs.to_yaml())
                log.block("versions", json.dumps(vers, indent=2))
                log.block("code", f"{code.bytes:,} bytes ({code.method}), sha256 {code.sha256}: "
                          f"{', '.join(code.files)}")  # fmt: skip
                log.block("parameter roles", format_role_table(b.model))
            log(
                f"stack {stack.name or rs.source} ({rs.hash()}): techniques {' → '.join(rs.technique_names())}"
            )
            if code.note:
                log(f"note: no submission script can be generated for this stack ({code.note}); its code bytes "
                    "count the source files the run executes")  # fmt: skip
            log(
                f"data: {source.description}: {len(source.train)} train shard(s), {len(source.val)} val shard(s)"
            )
            log(
                f"model: {count_params(b.model):,} parameters; device {vers['device']} × {runtime.world_size}; "
                f"grad accumulation {accum}; compile {'on' if runtime.compile else 'off'}; "
                f"autocast {runtime.autocast_dtype or 'off'}; threads {runtime.threads} ({runtime.threads_note})"
            )
            if est is not None:
                log(
                    f"estimated artifact: {est.total:,} bytes ({est.model_bytes:,} model + {est.code_bytes:,} code) "
                    f"of {est.limit:,}{'' if est.fits else '  — over the limit'}"
                )

        @contextlib.contextmanager
        def training(self) -> Iterator[Callable[[Progress], None] | None]:
            if saved is not None:
                watch.shards.update(saved.get("shards_opened", {}))
                watch.validation_opened.update(saved.get("validation_opened", {}))
                state = saved["train_state"]
                log(f"resumed from step {state['step']} ({state['elapsed']:.1f}s of training)")
            with LiveProgress(
                console if main else None,
                stack.train.iterations,
                stack.train.max_wallclock_seconds,
                log=log if main else None,
                tokens_per_step=stack.train.train_batch_tokens,
                slow_hint=slowdown_hint(runtime.device.type, runtime.threads),
            ) as bar:
                live.append(bar)
                bar.points = list(saved.get("train_history", [])) if saved is not None else []
                self.checkpointer = checkpoint.Checkpointer(
                    out_dir,
                    runtime.rank,
                    runtime.world_size,
                    checkpoint.stack_sha256(out_dir) if main else "",
                    stack.train.checkpoint_minutes,
                    # the shards opened before a checkpoint count for the data probe of the resumed run
                    extra=lambda: {
                        "train_history": list(bar.points),
                        "shards_opened": dict(watch.shards),
                        "validation_opened": dict(watch.validation_opened),
                    },
                    log=log,
                    resume=saved,
                )
                yield bar.update

        def busy(self, what: str) -> contextlib.AbstractContextManager[Any]:
            return Ticker(console if main else None, what)

        def validated(self, step: int, result: EvalResult) -> None:
            if report is not None:
                report({"step": step, "val_loss": result.val_loss, "val_bpb": result.val_bpb, "final": False})

        def exported(self, artifact: Path, export: Export, sites: Dispatcher) -> None:
            verify_export(artifact, export, sites)

        def written(self, artifact: Path) -> None:
            watch.stop()  # the training side ends with the artifact on disk
            if main:
                write_manifest(out_dir, rs, code, artifact, source.tokenizer, source.val)

        def fresh(self, artifact: Path) -> Callable[[], Built] | None:
            # read once: scoring and the probes
            scoring["fresh"] = artifact_builds(rs, artifact, runtime, stack.seed)
            return scoring["fresh"]

        def inspect(self) -> Callable[[Any], None] | None:
            scoring["recorder"] = probe_recorder(rs, val_tokens) if not runtime.distributed else None
            return scoring["recorder"]

    artifact = out_dir / ARTIFACT_NAME
    t = train_and_score(rs, runtime, source, validation, artifact, log, Hooks())
    phases, final, pre, tres = t.phases, t.final, t.pre, t.train
    with Ticker(console if main else None, "legality probes (future, normalisation, data, provenance)"):
        legal = check_legality(rs, artifact, runtime, val_tokens, final, watch, source.provenance,
                               scoring["fresh"], scoring["recorder"])  # fmt: skip
    training_side = sum(
        phases[k] for k in ("train", "finalize", "calibration", "export")
    )  # what the cap covers
    cap = stack.train.max_wallclock_seconds
    over = cap > 0 and training_side > cap
    if over:
        log(
            f"warning: the training side took {training_side:.1f}s (train {phases['train']:.1f} + finalize "
            f"{phases['finalize']:.1f} + calibration {phases['calibration']:.1f} + export "
            f"{phases['export']:.1f}), over train.max_wallclock_seconds={cap:g}"
        )
    model_bytes = t.model_bytes
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
        params=count_params(t.built.model),
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
        code_source_bytes=code.source_bytes,
        code_files=list(code.files),
        techniques=rs.technique_names(),
        stopped_by=tres.stopped_by,
        data=source.description,
        estimated_artifact_bytes=est.total if est else None,
        pre_quant_val_loss=pre.val_loss if pre else None,
        pre_quant_val_bpb=pre.val_bpb if pre else None,
        history=tres.history,
        train_history=live[0].points if live else [],
        phase_seconds={k: round(v, 3) for k, v in phases.items()},
        training_side_seconds=round(training_side, 3),
        over_time=over,
        switches=list(tres.switches),
        legal=legal.legal,
        legal_reasons=legal.reasons,
        legality=legal.to_dict(),
        dataset=source.provenance.fingerprint if source.provenance is not None else {},
    )
    check_result(result.to_dict())  # a non-finite or empty score is a failed run, never a result
    log(
        f"artifact: {model_bytes:,} model + {code.bytes:,} code = {total:,} bytes "
        f"({'fits' if result.fits else 'DOES NOT FIT'} the {result.artifact_limit:,} limit)"
    )
    log(f"legality ({legal.seconds:.1f}s, apart from the evaluation): {legal.summary()}")
    if main:
        write_json(out_dir / "result.json", result.to_dict())
        plot_training_curve(
            out_dir / CURVE_FILE,
            result.train_history,
            result.history,
            title=f"{stack.name or rs.source}: {result.steps} steps, val_bpb {result.val_bpb:.4f}",
            final={"steps": result.steps, "train_seconds": result.train_seconds, "val_bpb": result.val_bpb},
        )
    checkpoint.remove(out_dir, runtime.rank)  # the run is complete: nothing to resume
    if report is not None:
        report({**result.to_dict(), "step": tres.steps, "final": True})
    log.close()
    return result


class Phase:
    """Adds the wall-clock seconds of a ``with`` block (device synchronised) to ``phases[name]``."""

    def __init__(self, phases: dict[str, float], name: str, runtime: Runtime):
        self.phases, self.name, self.runtime = phases, name, runtime

    def __enter__(self) -> Phase:
        self.runtime.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runtime.synchronize()
        self.phases[self.name] = self.phases.get(self.name, 0.0) + time.perf_counter() - self.t0
