"""Stacks: the YAML schema, ``base:`` inheritance (chains of any depth), ``--set`` overrides, validation.

Config flows one way: YAML → :class:`Stack` (validated) → code. Every problem in a file is
collected and raised together as one :class:`ConfigError` that names each key path.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError, PgolfError, did_you_mean
from .selectors import LayerSelector
from .technique import REGISTRY, ModelSpec, Resolved, pydantic_problems, resolve_techniques

ARTIFACT_LIMIT = 16_000_000
DEFAULT_VOCAB_SIZE = 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The base GPT (challenge baseline defaults)."""

    vocab_size: int = Field(
        0,
        description="the tokenizer's vocabulary (tokens are uint16); 0 or null: follows data.tokenizer "
        "(1024 when that is null too)",
    )
    num_layers: int = Field(9, ge=1, le=256)
    model_dim: int = Field(512, ge=8, le=16384)
    num_heads: int = Field(8, ge=1)
    num_kv_heads: int = Field(4, ge=1)
    mlp_mult: float = Field(2.0, gt=0, le=16, description="MLP hidden = int(mlp_mult * model_dim)")
    tie_embeddings: bool = True
    tied_embed_init_std: float = Field(0.005, gt=0)
    embed_init_std: float = Field(
        1.0, gt=0, description="std of the input embedding's normal init when embeddings are untied"
    )
    rope_base: float = Field(10000.0, gt=1)
    logit_softcap: float = Field(30.0, gt=0)
    qk_gain_init: float = Field(1.5, gt=0)

    @field_validator("vocab_size", mode="before")
    @classmethod
    def _vocab(cls, v: Any) -> Any:
        if v is None:
            return 0
        if isinstance(v, int) and not isinstance(v, bool) and v != 0 and not 8 <= v <= 65536:
            raise ValueError("expected 8 … 65536 (token ids are uint16), or null to follow data.tokenizer")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim={self.model_dim} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"head_dim={self.model_dim // self.num_heads} must be even for RoPE")
        return self

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)


TOKENIZER_NAME = re.compile(r"^sp(\d+)$", re.IGNORECASE)
"""``sp1024``, ``sp4096``, ``sp8192``, …: a challenge tokenizer named by its vocabulary size."""


def tokenizer_name_size(name: str | None) -> int | None:
    """The vocabulary size a tokenizer name gives (``sp8192`` -> 8192), None for a file path."""
    m = TOKENIZER_NAME.match(name or "")
    return int(m.group(1)) if m else None


class DataConfig(_Section):
    """Where the tokens come from. ``path: null`` uses the embedded default corpus.

    ``tokenizer`` is a SentencePiece ``.model`` file or a challenge tokenizer's name, ``sp1024`` /
    ``sp4096`` / ``sp8192`` (any ``sp<N>``). With ``path``, a name is looked up as the challenge
    lays its data out (``<path>/../../tokenizers/fineweb_<N>_bpe.model``, next to
    ``datasets/fineweb10B_sp<N>``) or as the ``tokenizer.model`` of a ``pgolf data build`` folder
    of that size; without ``path`` the embedded corpus is built with an N-piece tokenizer trained
    with the challenge's settings. ``model.vocab_size`` follows the tokenizer."""

    path: str | None = Field(None, description="folder with fineweb_{train,val}_NNNNNN.bin shards")
    tokenizer: str | None = Field(
        None,
        description="SentencePiece .model, or sp1024 / sp4096 / sp8192 (required with path; null without "
        "path: sp1024)",
    )
    train_shards: int | None = Field(None, ge=1, description="use only the first N train shards")
    cache_dir: str | None = Field(
        None, description="where the default corpus is built (default ~/.cache/pgolf)"
    )

    @model_validator(mode="after")
    def _pair(self) -> DataConfig:
        if self.path is not None and self.tokenizer is None:
            raise ValueError("data.tokenizer is required when data.path is set")
        size = tokenizer_name_size(self.tokenizer)
        if size is not None and not 8 <= size <= 65536:
            raise ValueError(f"data.tokenizer {self.tokenizer!r}: the vocabulary must be 8 … 65536")
        if self.path is None and self.tokenizer is not None and size is None:
            raise ValueError(
                f"data.tokenizer {self.tokenizer!r} is a file but data.path is null: the embedded corpus "
                "trains its own tokenizer; name its size (sp1024, sp4096, sp8192) or set data.path"
            )
        return self


class TrainConfig(_Section):
    train_seq_len: int = Field(1024, ge=2)
    train_batch_tokens: int = Field(524_288, ge=2, description="global tokens per optimizer step")
    micro_batch_tokens: int = Field(65_536, ge=2, description="tokens per GPU per forward/backward")
    iterations: int = Field(20_000, ge=0)
    max_wallclock_seconds: float = Field(600.0, ge=0, description="training time cap; 0 = none")
    warmdown_iters: int = Field(1200, ge=0)
    warmup_steps: int = Field(20, ge=0, description="compile warm-up steps, then state is restored")
    val_loss_every: int = Field(1000, ge=0, description="validate every N steps; 0 = only at the end")
    train_log_every: int = Field(200, ge=1)
    grad_clip_norm: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile; auto = on CUDA only")
    autocast: Literal["auto", "bf16", "off"] = Field("auto", description="auto = bf16 on CUDA, off on CPU")
    attention: Literal["auto", "sdpa", "flash"] = Field(
        "auto", description="auto = flash-attn on CUDA if installed"
    )
    threads: int | Literal["auto"] = Field(
        "auto", description="torch CPU threads; auto = the cores no other process is using (at least 1)"
    )
    checkpoint_minutes: float = Field(
        10.0, ge=0, description="write a checkpoint for `pgolf run --resume` every N minutes; 0 = never"
    )

    @field_validator("compile", "autocast", mode="before")
    @classmethod
    def _yaml_switch(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML reads on/off/yes/no/true/false as booleans: map them back to the switch's words."""
        if isinstance(v, bool):
            return ("on" if info.field_name == "compile" else "bf16") if v else "off"
        return v

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if v is None or v == "auto":  # stacks written before "auto" existed say null
            return "auto"
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        raise ValueError("expected 'auto' or a whole number of threads >= 1")

    @model_validator(mode="after")
    def _batches(self) -> TrainConfig:
        if self.micro_batch_tokens % self.train_seq_len:
            raise ValueError(
                f"micro_batch_tokens={self.micro_batch_tokens} must be a multiple of "
                f"train_seq_len={self.train_seq_len}"
            )
        if self.train_batch_tokens % self.micro_batch_tokens:
            raise ValueError(
                f"train_batch_tokens={self.train_batch_tokens} must be a multiple of "
                f"micro_batch_tokens={self.micro_batch_tokens}"
            )
        return self


class RoleGroup(_Section):
    """Per-role overrides of an optimizer group (unset keys keep the flat ``optim`` values)."""

    lr: float | None = Field(None, ge=0)
    weight_decay: float | None = Field(None, ge=0)
    beta1: float | None = Field(None, ge=0, lt=1, description="Adam groups only")
    beta2: float | None = Field(None, ge=0, lt=1, description="Adam groups only")
    eps: float | None = Field(None, gt=0, description="Adam groups only")


class OptimConfig(_Section):
    """Optimizer groups by parameter role: ``matrix`` (the matrix optimizer, Muon by default),
    ``embedding``, ``head``, ``scalar`` and ``gate`` (Adam, decoupled weight decay as AdamW).
    Weight decay is decoupled: W ← W·(1 − lr_t·wd) before each update. ``groups`` overrides lr,
    weight decay, betas and eps of one role (e.g. ``groups: {gate: {lr: 0.01, beta2: 0.99}}``)."""

    matrix_lr: float = Field(0.04, ge=0)
    scalar_lr: float = Field(0.04, ge=0, description="scalar and gate roles")
    tied_embed_lr: float = Field(0.05, ge=0)
    embed_lr: float = Field(0.6, ge=0, description="embedding lr when embeddings are untied")
    head_lr: float = Field(0.008, ge=0)
    matrix_wd: float = Field(0.0, ge=0, description="decoupled weight decay of matrix parameters (Muon WD)")
    embed_wd: float = Field(0.0, ge=0, description="decoupled weight decay of the embedding(s)")
    head_wd: float = Field(0.0, ge=0, description="decoupled weight decay of an untied head")
    scalar_wd: float = Field(0.0, ge=0, description="decoupled weight decay of scalar and gate parameters")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_momentum_warmup_start: float = Field(0.85, ge=0, lt=1)
    muon_momentum_warmup_steps: int = Field(500, ge=0)
    muon_backend_steps: int = Field(5, ge=1, le=20)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    groups: dict[Literal["matrix", "embedding", "head", "scalar", "gate"], RoleGroup] = Field(
        default_factory=dict, description="per-role overrides of lr, weight_decay, beta1, beta2, eps"
    )

    @model_validator(mode="after")
    def _matrix_group(self) -> OptimConfig:
        m = self.groups.get("matrix")
        if m is not None and (m.beta1, m.beta2, m.eps) != (None, None, None):
            raise ValueError("optim.groups.matrix takes lr and weight_decay only (betas and eps are Adam's)")
        return self


class ExportConfig(_Section):
    """How the framework stores tensors no quantizer claims: non-float tensors as they are,
    control tensors (role scalar) in fp32, tensors of at most ``passthrough_max_numel`` elements in
    ``passthrough_dtype`` when every value is representable there (else fp32)."""

    artifact_limit: int = Field(ARTIFACT_LIMIT, ge=1, description="bytes (decimal); the challenge cap")
    passthrough_max_numel: int = Field(
        65_536, ge=0, description="tensors this small stay float unless a quantizer's scope names them"
    )
    passthrough_dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16", description="float format of small passthrough tensors (fp32 where values do not fit)"
    )
    size_estimate: Literal["gaussian", "heavy_tails"] = Field(
        "gaussian",
        description="the size estimate's stand-ins for trained weights: 'gaussian' (N(0, 1): an upper "
        "bound; within 1 % of the trained baseline) or 'heavy_tails' (unit-variance Student-t, calibrated "
        "on a lineage whose trained int6 rows compressed far below the Gaussian figure)",
    )


class EvalConfig(_Section):
    seq_len: int | None = Field(None, ge=2, description="window length; default train_seq_len")
    batch_tokens: int = Field(524_288, ge=2, description="tokens per forward per GPU")
    pre_quant: bool = Field(False, description="also score the trained model before export")


class Stack(_Section):
    name: str | None = None
    seed: int = Field(1337, ge=0)
    plugins: list[str] = Field(default_factory=list, description="local .py files that register techniques")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    techniques: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _vocabulary(self) -> Stack:
        """model.vocab_size follows a named tokenizer (``sp8192``), or is 1024 with none; a
        tokenizer file is read by :func:`validate` once its path is resolved."""
        named = tokenizer_name_size(self.data.tokenizer)
        want = self.model.vocab_size  # a mismatch with the tokenizer is reported by validate()
        if want == 0 and (named is not None or self.data.tokenizer is None):
            model = self.model.model_copy(update={"vocab_size": named or DEFAULT_VOCAB_SIZE})
            object.__setattr__(self, "model", model)  # frozen: set once, while validating
        return self

    @property
    def model_spec(self) -> ModelSpec:
        m = self.model
        return ModelSpec(
            vocab_size=m.vocab_size,
            num_layers=m.num_layers,
            model_dim=m.model_dim,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            mlp_hidden=m.mlp_hidden,
            train_seq_len=self.train.train_seq_len,
            tie_embeddings=m.tie_embeddings,
            tied_embed_init_std=m.tied_embed_init_std,
            embed_init_std=m.embed_init_std,
            rope_base=m.rope_base,
            logit_softcap=m.logit_softcap,
            qk_gain_init=m.qk_gain_init,
        )


SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "export": ExportConfig,
    "eval": EvalConfig,
}


@dataclass
class ResolvedStack:
    """A validated stack with its techniques in run order (slot defaults included)."""

    stack: Stack
    techniques: list[Resolved]
    source: str = "<stack>"
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def spec(self) -> ModelSpec:
        return self.stack.model_spec

    def technique_names(self) -> list[str]:
        return [r.name for r in self.techniques]

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved stack as plain data (reloadable by :func:`load_stack`)."""
        d = self.stack.model_dump(mode="json")
        d["techniques"] = {r.name: r.params.model_dump(mode="json") for r in self.techniques}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# YAML loading
# --------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen[key] = 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping; any syntax problem becomes one ConfigError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise PgolfError(f"stack file {str(path)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([("", f"malformed YAML{where}: {problem}")], source=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([("", f"not UTF-8 text: {e}")], source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [("", f"expected a mapping at the top level, got {type(data).__name__}")], str(path)
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.num_layers=11' -> (['model', 'num_layers'], 11). Values are parsed as YAML."""
    if "=" not in text:
        raise PgolfError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set model.num_layers=11")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise PgolfError(f"--set {text!r}: empty component in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise PgolfError(f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def deep_merge(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Child keys override parent keys; mappings merge recursively. In ``techniques``, a
    technique set to ``null`` in the child is removed."""
    out = copy.deepcopy(dict(parent))
    for k, v in child.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_stack(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    merged = deep_merge(
        {k: v for k, v in parent.items() if k != "techniques"},
        {k: v for k, v in child.items() if k != "techniques"},
    )
    techs = dict(parent.get("techniques") or {})
    child_techs = child.get("techniques")
    if isinstance(child_techs, Mapping):
        for name, params in child_techs.items():
            if params is None:
                techs.pop(name, None)
            elif isinstance(params, Mapping) and isinstance(techs.get(name), Mapping):
                techs[name] = deep_merge(techs[name], params)
            else:
                techs[name] = params
    elif child_techs is not None:
        techs = child_techs  # invalid; validation reports it
    if techs or "techniques" in parent or "techniques" in child:
        merged["techniques"] = techs
    return merged


MAX_BASE_DEPTH = 32


def _inherit(data: dict[str, Any], here: Path, source: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Merge the ``base:`` parent under ``data``; the parent may have a base of its own, to any
    depth. ``chain``: the files already on the way down (a repeat is a cycle, named in full)."""
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([("base", f"expected a path to a parent stack, got {base!r}")], source)
    bpath = _find_relative(base, here)
    if bpath is None:
        raise ConfigError(
            [
                (
                    "base",
                    f"parent stack {base!r} not found (looked next to {source} and in the current directory)",
                )
            ],
            source,
        )
    if bpath in chain:
        cycle = " → ".join(p.name for p in (*chain[chain.index(bpath) :], bpath))
        raise ConfigError([("base", f"stacks inherit from each other in a cycle: {cycle}")], source)
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError([("base", f"more than {MAX_BASE_DEPTH} levels of base: stacks")], source)
    parent = read_yaml(bpath)
    plugins = parent.get("plugins")
    if isinstance(plugins, list):  # the parent's plugin paths are relative to the parent
        parent["plugins"] = [str(_abs_plugin(str(x), bpath.parent)) for x in plugins]
    parent = _inherit(parent, bpath.parent, str(bpath), (*chain, bpath))
    return _merge_stack(parent, data)


def compose(path: str | Path, overrides: Iterable[str] = ()) -> tuple[dict[str, Any], Path]:
    """Read a stack file, merge its ``base:`` parent and apply ``--set`` overrides."""
    p = Path(path)
    data = _inherit(read_yaml(p), p.parent, str(p), (p.resolve(),) if p.is_file() else ())
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "techniques" and len(parts) == 2 and value is None:
            techs = data.get("techniques")
            if isinstance(techs, dict):
                techs.pop(parts[1], None)
            continue
        apply_override(data, parts, value)
    return data, p.parent


def _find_relative(name: str, here: Path) -> Path | None:
    for cand in (here / name, Path.cwd() / name, Path(name)):
        if cand.is_file():
            return cand.resolve()
    return None


def _abs_plugin(name: str, here: Path) -> Path:
    found = _find_relative(name, here)
    return found if found is not None else (here / name)


def validate(data: Mapping[str, Any], source: str = "<stack>", base_dir: Path | None = None) -> ResolvedStack:
    """Validate a composed stack mapping; raises one ConfigError listing every problem."""
    base_dir = base_dir or Path.cwd()
    problems: list[tuple[str, str]] = []
    data = dict(data)
    for k in list(data):
        if k not in Stack.model_fields:
            problems.append(
                (
                    k,
                    "unknown key"
                    + did_you_mean(k, Stack.model_fields)
                    + f"; allowed: {', '.join(Stack.model_fields)}",
                )
            )
            data.pop(k)
    # local plugins first: they add techniques
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list):
        problems.append(("plugins", f"expected a list of .py files, got {plugins!r}"))
        plugins = []
    abs_plugins = []
    for i, plug in enumerate(plugins):
        try:
            plugin_path = _abs_plugin(str(plug), base_dir)
            REGISTRY.load_file(plugin_path)
            abs_plugins.append(str(plugin_path))
        except PgolfError as e:
            problems.append((f"plugins[{i}]", str(e)))
    data["plugins"] = abs_plugins
    raw_techs = data.pop("techniques", None) or {}
    if not isinstance(raw_techs, Mapping):
        problems.append(("techniques", f"expected a mapping of technique name -> params, got {raw_techs!r}"))
        raw_techs = {}
    stack: Stack | None = None
    try:
        stack = Stack.model_validate(data)
    except ValidationError as e:
        for path, msg in pydantic_problems(e, ""):
            if msg == "unknown key":
                section, _, key = path.partition(".")
                model = SECTIONS.get(section)
                if model is not None:
                    msg += did_you_mean(key.split(".")[0], model.model_fields)
            problems.append((path, msg))
    resolved, tproblems = resolve_techniques(raw_techs)
    problems.extend(tproblems)
    if stack is not None and not tproblems:
        problems.extend(_check_selectors(resolved, stack.model.num_layers))
    if stack is not None and stack.data.path is not None:
        stack = stack.model_copy(update={"data": _absolute_data(stack.data, base_dir)})
    if stack is not None:
        stack, problem = _resolve_vocabulary(stack)
        if problem:
            problems.append(problem)
    if problems or stack is None:
        raise ConfigError(problems, source=source)
    stack = stack.model_copy(
        update={"techniques": {r.name: r.params.model_dump(mode="json") for r in resolved}}
    )
    return ResolvedStack(stack=stack, techniques=resolved, source=source, base_dir=base_dir)


def _absolute_data(data: DataConfig, base_dir: Path) -> DataConfig:
    def fix(v: str | None) -> str | None:
        if v is None:
            return None
        p = Path(v).expanduser()
        if not p.is_absolute():
            cand = (base_dir / p) if (base_dir / p).exists() else (Path.cwd() / p)
            p = cand
        return str(p.resolve())

    return data.model_copy(
        update={
            "path": fix(data.path),
            "tokenizer": data.tokenizer if tokenizer_name_size(data.tokenizer) else fix(data.tokenizer),
            "cache_dir": data.cache_dir and str(Path(data.cache_dir).expanduser().resolve()),
        }
    )


@functools.lru_cache(maxsize=64)
def _pieces(key: tuple[str, int, int]) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_file=key[0]).vocab_size())


def tokenizer_pieces(path: str | Path) -> int:
    """The vocabulary size of a SentencePiece model file (remembered per file version)."""
    st = Path(path).stat()
    return _pieces((str(Path(path).resolve()), st.st_size, st.st_mtime_ns))


def _resolve_vocabulary(stack: Stack) -> tuple[Stack, tuple[str, str] | None]:
    """Fill model.vocab_size from a tokenizer file, or check an explicit one against the
    tokenizer (named or a file)."""
    tok = stack.data.tokenizer
    want = stack.model.vocab_size
    named = tokenizer_name_size(tok)
    if named is not None and want != named:
        return stack, (
            "model.vocab_size",
            f"{want}, but data.tokenizer {tok} has {named} pieces; remove model.vocab_size (it follows "
            "the tokenizer)",
        )
    if tok is None or named is not None:
        return stack, None
    path = Path(tok)
    if not path.is_file():
        if want:
            return stack, None  # the data check reports the missing file
        return stack, ("data.tokenizer", f"file {tok!r} does not exist (model.vocab_size follows it)")
    try:
        size = tokenizer_pieces(path)
    except (OSError, RuntimeError) as e:
        return stack, ("data.tokenizer", f"{tok!r} is not a SentencePiece model ({e})")
    if want and want != size:
        return stack, (
            "model.vocab_size",
            f"{want}, but data.tokenizer {path.name} has {size} pieces; remove model.vocab_size "
            "(it follows the tokenizer)",
        )
    return stack.model_copy(update={"model": stack.model.model_copy(update={"vocab_size": size})}), None


def _check_selectors(resolved: list[Resolved], num_layers: int) -> list[tuple[str, str]]:
    out = []
    for r in resolved:
        for fname in type(r.params).model_fields:
            v = getattr(r.params, fname)
            if isinstance(v, LayerSelector):
                msg = v.check(num_layers)
                if msg:
                    out.append((f"techniques.{r.name}.{fname}", msg))
    return out


def load_stack(path: str | Path, overrides: Iterable[str] = ()) -> ResolvedStack:
    """Read, inherit, override and validate a stack file."""
    data, here = compose(path, overrides)
    return validate(data, source=str(path), base_dir=here)


def stack_from_dict(
    data: Mapping[str, Any], source: str = "<dict>", base_dir: Path | None = None
) -> ResolvedStack:
    """Validate a stack given as a mapping (its ``base:`` is looked up relative to ``base_dir``)."""
    here = base_dir or Path.cwd()
    return validate(_inherit(copy.deepcopy(dict(data)), here, source), source=source, base_dir=here)
