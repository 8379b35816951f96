"""The sites techniques fill, and the one dispatcher that calls them.

A technique never edits the core: it implements **hooks**, methods marked with
:func:`pgolf.registry.hook` whose names come from the fixed vocabulary below. Each hook belongs to
a **site**, which is one of

* a **slot** — exactly one filler. The base default is in it until a technique fills it; a second
  filler is an error that names both techniques and the site. Slots *per layer*, *per Linear* or
  *per tensor* are exclusive per instance: a technique returns ``None`` (or does not claim) where it
  does not apply, so two techniques may share a slot on disjoint layers or tensors;
* a **chain** — every contribution runs, in the stack's resolved technique order;
* an **event** — every implementation is called, in resolved order.

A hook implementation may take any subset of its declared arguments (pluggy-style) and is
checked at registration. Model hooks return ``nn.Module`` objects; the base model checks that
their ``forward`` accepts the arguments of the site (``module`` below) when it is built, and
``pgolf check`` builds every stack on the meta device, so a wrong signature or a slot conflict is
reported before any training.

Every model site module receives a per-forward context :class:`~pgolf.registry.api.context.Ctx`
(token ids, x0, physical and virtual layer, switches, a dict for cross-layer state).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import PgolfError

if TYPE_CHECKING:
    from .technique import Technique

T = TypeVar("T")

SLOT = "slot"
SLOT_PER_LAYER = "slot per layer"
SLOT_PER_LINEAR = "slot per Linear"
SLOT_PER_TENSOR = "slot per tensor"
CHAIN = "chain"
CHAIN_PER_LAYER = "chain per layer"
CHAIN_PER_LINEAR = "chain per Linear"
EVENT = "event"
PLANS = ("model", "optimizer", "schedule", "data", "train", "export", "eval")


@dataclass(frozen=True)
class HookSpec:
    """One hook: the method name a technique implements, its arguments and what it returns."""

    name: str
    site: str
    args: tuple[str, ...]
    doc: str
    module: tuple[str, ...] | None = None  # positional arguments of a returned module's forward
    optional: bool = False  # a member of a multi-hook site that fillers may leave out


@dataclass(frozen=True)
class Site:
    name: str
    plan: str
    kind: str
    default: str
    doc: str
    hooks: tuple[HookSpec, ...]

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hooks if not h.optional)

    @property
    def exclusive(self) -> bool:
        return self.kind.startswith(SLOT)


def _site(name: str, plan: str, kind: str, default: str, doc: str, *hooks: tuple[Any, ...]) -> Site:
    specs = []
    for h in hooks:
        hname, args, hdoc, *rest = h
        module = rest[0] if rest else None
        optional = rest[1] if len(rest) > 1 else False
        specs.append(HookSpec(hname, name, tuple(args), hdoc, module, optional))
    return Site(name, plan, kind, default, doc, tuple(specs))


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        # ---- model: hooks return modules placed in the base model when it is built ----------
        _site("embed", "model", CHAIN, "-", "the token embedding (B,T,D) before the input RMSNorm",
              ("embed", (), "module m(x, ctx) -> x", ("x", "ctx"))),
        _site("rotary", "model", SLOT, "full-head RoPE, base model.rope_base",
              "positional rotation of q and k, shared by all layers",
              ("rotary", (), "a RotaryBase module: tables(seq_len, device) once per forward, "
               "rotate(x (B,T,H,D), tables) -> x", None)),
        _site("norm", "model", SLOT_PER_LAYER, "parameter-free RMSNorm",
              "the norm in front of a block's attention and MLP",
              ("norm", ("layer",), "module m(x, ctx) -> x, or None for layers it leaves", ("x", "ctx"))),
        _site("block", "model", SLOT_PER_LAYER, "sequential: x + attn(norm x), then + mlp(norm x)",
              "how a block adds its attention and MLP branches to the residual (after resid_mix)",
              ("block", ("layer",), "module m(x, block, ctx) -> x; block.attn_branch(x, ctx) and "
               "block.mlp_branch(x, ctx) give the scaled branch outputs", ("x", "block", "ctx"))),
        _site("qkv", "model", CHAIN_PER_LAYER, "-",
              "q (B,T,H,Dh), k, v (B,T,KV,Dh) right after the projections, before QK-norm and RoPE",
              ("qkv", ("layer",), "module m(q, k, v, ctx) -> (q, k, v), or None", ("q", "k", "v", "ctx"))),
        _site("attention", "model", SLOT_PER_LAYER, "causal SDPA (flash-attn on CUDA when installed)",
              "the attention kernel",
              ("attention", ("layer",), "module m(q, k, v, ctx) -> y (B,T,H,Dh), or None",
               ("q", "k", "v", "ctx"))),
        _site("attn_out", "model", CHAIN_PER_LAYER, "-",
              "per-head attention output y (B,T,H,Dh) before the output projection; ctx.v holds the "
              "layer's values, ctx.attn_input the block's normalised input",
              ("attn_out", ("layer",), "module m(y, ctx) -> y, or None", ("y", "ctx"))),
        _site("mlp_act", "model", SLOT_PER_LAYER, "relu²", "the MLP activation",
              ("mlp_act", ("layer",), "module m(u) -> u, or None", ("u",))),
        _site("linear_weight", "model", SLOT_PER_LINEAR, "the weight as is",
              "the weight every pgolf Linear uses in its forward (fake quantization for QAT)",
              ("linear_weight", ("kind", "layer"), "module m(w, ctx) -> w, or None", ("w", "ctx"))),
        _site("linear_adapter", "model", CHAIN_PER_LINEAR, "-",
              "additive adapters on a Linear's output (LoRA at evaluation); their parameters take role "
              "'adapter': never trained with the model, never exported",
              ("linear_adapter", ("kind", "layer", "in_features", "out_features"),
               "module m(x, y, ctx) -> y, or None", ("x", "y", "ctx"))),
        _site("schedule", "model", SLOT, "U-Net halves: encoder blocks 0..L/2-1, decoder the rest",
              "the order of physical blocks over virtual layers (encoder, decoder); skip count follows",
              ("schedule", (), "a BlockSchedule: order(switches) -> (encoder, decoder) index tuples", None)),
        _site("skip_merge", "model", SLOT, "x + skip_weights[j]·skip",
              "how decoder layer j merges the encoder output it pops",
              ("skip_merge", ("num_skips",), "module m(x, skip, j, ctx) -> x", ("x", "skip", "j", "ctx"))),
        _site("final", "model", CHAIN, "-", "the residual stream after the last block, before the final norm",
              ("final", (), "module m(x, ctx) -> x", ("x", "ctx"))),
        _site("head", "model", SLOT, "tied/untied projection + softcap c·tanh(z/c)",
              "final hidden state to logits (and the training loss)",
              ("head", (), "a Head module: forward(h, out, ctx) -> fp32 logits (B,T,V) with out(h, ctx) the "
               "raw logits and out.effective_weight(ctx) the output weight (V,D); "
               "loss(h, out, targets, ctx, reduction) -> loss in nats", None)),
        _site("init", "model", EVENT, "-",
              "after the model is built, before roles are checked, the size is estimated and optimizers "
              "are made (runs on the meta device in `pgolf check`)",
              ("init", ("model", "spec"), "initialise parameters in place")),
        # ---- optimizer ----------------------------------------------------------------------------
        _site("matrix_optimizer", "optimizer", SLOT, "Muon (Nesterov momentum + orthogonalised update)",
              "the optimizer of role-'matrix' parameters; one that sets owns_grad_sync = True does its "
              "own gradient reduction and the trainer leaves its parameters out of DDP",
              ("matrix_optimizer", ("params", "lr", "weight_decay", "momentum", "backend_steps",
                                    "orthogonalize", "update_chain", "runtime"),
               "a torch.optim.Optimizer over params (each group carries 'base_lr' and 'base_wd')", None)),
        _site("orthogonalize", "optimizer", SLOT, "Newton–Schulz, 5 steps, (3.4445, −4.7750, 2.0315)",
              "the orthogonalizer of matrix updates",
              ("orthogonalize", (), "fn(G (N,rows,cols), steps) -> (N,rows,cols)", None)),
        _site("muon_update", "optimizer", CHAIN, "-", "matrix updates before orthogonalization",
              ("muon_update", (), "fn(U (N,rows,cols)) -> U", None)),
        # ---- schedule -----------------------------------------------------------------------------
        _site("lr_schedule", "schedule", SLOT,
              "linear warmdown over train.warmdown_iters steps (by wall clock when capped)",
              "the LR multiplier of every group",
              ("lr_schedule", (), "fn(state: TrainState) -> multiplier", None)),
        _site("wd_schedule", "schedule", SLOT, "1", "the weight-decay multiplier",
              ("wd_schedule", (), "fn(state: TrainState) -> multiplier", None)),
        _site("batch_shape", "schedule", SLOT, "train.train_seq_len throughout",
              "the training sequence length over the run",
              ("batch_shape", (), "a BatchShape: lengths (all it may use, compiled in warm-up), "
               "seq_len(state) -> int and an optional lr_scale(state) (re-warm-up after a change)", None)),
        _site("switches", "schedule", CHAIN, "-",
              "flags flipped once by training progress (recurrence start, late QAT); passed into the "
              "forward as ctx.switches so torch.compile keeps one graph per state, compiled in warm-up",
              ("switches", (), "iterable of Switch(name, when, expected, at_eval)", None)),
        _site("time_reserve", "schedule", CHAIN, "-",
              "seconds a technique needs inside the wall-clock cap after the loop (calibration)",
              ("time_reserve", (), "seconds (float)", None)),
        # ---- data ---------------------------------------------------------------------------------
        _site("train_loader", "data", SLOT, "sequential shards, contiguous spans per rank (the baseline)",
              "the training batches (never validation data: no plan or context holds its path)",
              ("train_loader", ("files", "rank", "world_size", "seed"),
               "a loader: next_batch(tokens, seq_len) -> (x, y); reset(); state_dict()", None)),
        _site("calibration_batches", "data", SLOT, "the next batches of the training stream",
              "the batches the calibrate event sees",
              ("calibration_batches", ("model", "loader", "seq_len", "batch_tokens"),
               "an iterator of token batches (B,T) int64", None)),
        # ---- training events --------------------------------------------------------------------
        _site("on_train_start", "train", EVENT, "-", "after the compile warm-up, before step 1",
              ("on_train_start", ("model", "state"), "")),
        _site("on_step", "train", EVENT, "-", "after every optimizer step",
              ("on_step", ("model", "state"), "state: TrainState (step, elapsed, fraction, lr_mult, switches, "
               "shared: a dict techniques hand each other state in)")),
        _site("finalize", "train", EVENT, "-", "after training, before calibration and export (EMA swap)",
              ("finalize", ("model", "state"), "")),
        _site("calibrate", "train", EVENT, "-",
              "on the real, uncompiled model with training batches, inside the time reserve (GPTQ Hessians)",
              ("calibrate", ("model", "batches", "switches"),
               "batches.take(n) yields n token batches (B,T); run model.logits(x, switches)")),
        # ---- export -------------------------------------------------------------------------------
        _site("float_state", "export", CHAIN, "-", "the float state before quantization (pruning)",
              ("float_state", ("state", "infos"), "fn -> state (name -> tensor)", None)),
        _site("quantizer", "export", SLOT_PER_TENSOR,
              "int8_rowwise for every tensor no other quantizer claims; small tensors are float "
              "passthrough, control tensors fp32 unless a quantizer with quantizes_control claims them",
              "how one tensor is stored",
              ("claims", ("info",), "whether it quantizes this tensor (ParamInfo)", None),
              ("quantize", ("name", "tensor", "info"), "dict of tensors to store", None),
              ("dequantize", ("name", "data", "info"), "the float tensor back", None),
              ("error_bound", ("info", "tensor"),
               "largest relative RMS error ‖ŵ − w‖/‖w‖ its round trip can give this tensor", None, True),
              ("size_allowance", ("info",),
               "relative extra bytes its stored form of this tensor may take on trained weights over the "
               "size estimate's surrogate (codes that depend on real calibration data); the estimate "
               "adds it", None, True)),
        _site("post_quant", "export", CHAIN, "-", "the packed state after quantization (±1 pruning, LQER)",
              ("post_quantize", ("packed", "state", "infos", "quantized", "measure"),
               "packed -> packed; state: the float state the quantizers were given, quantized: their "
               "output dequantized (name -> tensor), measure(packed) -> artifact bytes", None),
              ("post_dequantize", ("state", "packed"), "float state -> float state at load", None, True)),
        _site("serializer", "export", SLOT, "torch.save / torch.load(weights_only)",
              "packed state <-> bytes (bit packing)",
              ("serialize", ("packed",), "bytes", None),
              ("deserialize", ("data",), "packed state", None)),
        _site("byte_transform", "export", CHAIN, "-", "bytes before the codec (byte shuffle); undone in reverse",
              ("encode_bytes", ("data",), "bytes", None),
              ("decode_bytes", ("data",), "bytes", None)),
        _site("codec", "export", SLOT, "zlib level 9 (technique zlib)", "the compressor of the artifact",
              ("compress", ("data",), "bytes", None),
              ("decompress", ("data",), "bytes", None)),
        # ---- evaluation ---------------------------------------------------------------------------
        _site("scorer", "eval", SLOT, "non-overlapping windows of eval.seq_len",
              "emits per-position logits in stream order; may change weights only between emits",
              ("score", ("model", "stream", "runtime", "seq_len", "batch_tokens", "switches"),
               "an iterator of Emit(start, logits (N,V)) covering this rank's positions in order", None),
              ("probe_points", ("n_targets", "seq_len", "stream"),
               "target positions where the future probe should also cut the stream (e.g. inside a "
               "chunk the scorer trains on); list of ints", None, True)),
        _site("logprobs", "eval", CHAIN, "-",
              "normalised log-probabilities (N,V) of emitted positions before the NLL is taken; observe "
              "is called by the runner only after those positions' NLL is recorded (score-first)",
              ("transform_logprobs", ("logprobs", "positions", "context"), "(N,V) log-probabilities", None),
              ("observe", ("positions", "targets"), "learn from positions already scored", None, True)),
    )
}  # fmt: skip

HOOKS: dict[str, HookSpec] = {h.name: h for s in SITES.values() for h in s.hooks}

DEFAULT_FILLERS: dict[str, str] = {"quantizer": "int8_rowwise", "codec": "zlib"}
"""Slots whose default is a technique (added implicitly when the stack names none)."""


class SiteConflict(PgolfError):
    """Two techniques fill one slot."""


def check_module(module: Any, technique: str, hook: HookSpec) -> None:
    """Raise if a module returned by a model hook cannot be called with the site's arguments."""
    if hook.module is None:
        return
    fwd = getattr(module, "forward", None)
    if fwd is None or not callable(fwd):
        raise PgolfError(
            f"technique {technique!r}: hook {hook.name!r} must return an nn.Module, got {type(module).__name__}"
        )
    try:
        inspect.signature(fwd).bind(*hook.module)
    except TypeError:
        sig = f"forward(self, {', '.join(hook.module)})"
        raise PgolfError(
            f"technique {technique!r}: the module its {hook.name!r} hook returns "
            f"({type(module).__name__}) has forward{inspect.signature(fwd)}; the {hook.site!r} site "
            f"calls {sig}"
        ) from None


class Dispatcher:
    """Calls the hooks of one build's techniques (resolved order). Every site goes through it."""

    def __init__(self, techniques: Sequence[Technique]):
        self.techniques = list(techniques)
        self.fills: list[tuple[str, str, dict[str, Any]]] = []  # (site, technique, call arguments)

    def implementers(self, hook: str) -> list[Technique]:
        assert hook in HOOKS, hook
        return [t for t in self.techniques if hook in t.hooks]

    def chain(self, hook: str, **kwargs: Any) -> list[Any]:
        """Every technique's contribution (``None`` results skipped), in order."""
        out = []
        for t in self.implementers(hook):
            r = t.call(hook, **kwargs)
            if r is not None:
                check_module(r, t.name, HOOKS[hook])
                self.fills.append((HOOKS[hook].site, t.name, kwargs))
                out.append(r)
        return out

    def event(self, hook: str, **kwargs: Any) -> None:
        for t in self.implementers(hook):
            t.call(hook, **kwargs)

    def summary(self) -> list[tuple[str, str, str]]:
        """(site, technique, where) for every site a technique filled in this build, in order;
        ``where`` lists the layers / Linear kinds of per-layer and per-Linear sites."""
        where: dict[tuple[str, str], list[str]] = {}
        for site, tech, kw in self.fills:
            parts = [f"{k} {v.value if hasattr(v, 'value') else v}" for k, v in kw.items()
                     if k in ("layer", "kind") and v is not None]  # fmt: skip
            where.setdefault((site, tech), [])
            if parts:
                where[(site, tech)].append(" ".join(parts))
        return [(site, tech, _compress(w)) for (site, tech), w in where.items()]

    def slot(self, hook: str, default: Callable[[], T] | None, where: str = "", **kwargs: Any) -> T:
        """The one filler's result, or ``default()``; two fillers are a :class:`SiteConflict`."""
        got = [(t.name, r) for t in self.implementers(hook) if (r := t.call(hook, **kwargs)) is not None]
        if len(got) > 1:
            raise conflict(HOOKS[hook].site, [n for n, _ in got], where)
        if got:
            check_module(got[0][1], got[0][0], HOOKS[hook])
            self.fills.append((HOOKS[hook].site, got[0][0], kwargs))
            return got[0][1]
        return default() if default is not None else None  # type: ignore[return-value]

    def filler(self, site: str) -> Technique | None:
        """The technique filling a whole-model slot (checked when the stack is resolved)."""
        hook = SITES[site].required[0]
        found = self.implementers(hook)
        if len(found) > 1:
            raise conflict(site, [t.name for t in found])
        return found[0] if found else None


def conflict(site: str, names: Sequence[str], where: str = "") -> SiteConflict:
    at = f" at {where}" if where else ""
    s = SITES[site]
    hint = (
        "give them disjoint layers or scopes, or keep one"
        if s.kind in (SLOT_PER_LAYER, SLOT_PER_LINEAR, SLOT_PER_TENSOR)
        else "keep one"
    )
    return SiteConflict(
        f"techniques {' and '.join(repr(n) for n in names)} both fill the {s.kind} {site!r}{at}; {hint}"
    )


def _layers(nums: list[int]) -> str:
    runs: list[str] = []
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ("layer " if len(nums) == 1 else "layers ") + ", ".join(runs)


def _compress(places: list[str]) -> str:
    """'layer 0, layer 1, layer 2' -> 'layers 0-2'; 'kind attn_q layer 0, …' -> 'kinds attn_q, …;
    layers 0-10'; other lists joined as they are."""
    if not places:
        return ""
    kinds: list[str] = []
    layers: set[int] = set()
    other: list[str] = []
    for p in places:
        words = p.split()
        if len(words) >= 2 and words[-2] == "layer" and words[-1].isdigit():
            layers.add(int(words[-1]))
            words = words[:-2]
        if len(words) == 2 and words[0] == "kind":
            kinds.append(words[1])
        elif words:
            other.append(" ".join(words))
    parts = []
    if kinds:
        uniq = list(dict.fromkeys(kinds))
        parts.append(("kind " if len(uniq) == 1 else "kinds ") + ", ".join(uniq))
    if layers:
        parts.append(_layers(sorted(layers)))
    parts.extend(dict.fromkeys(other))
    return "; ".join(parts)
