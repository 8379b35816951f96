"""The base GPT: the Parameter Golf challenge baseline, with the sites techniques fill.

The baseline (``train_gpt.py``, 2026-03-17):

* tied token embedding E ~ N(0, 0.005²), used as the input table and the output head;
* parameter-free RMSNorm on the input embedding, before attention, before the MLP, before the head;
* GQA attention (8 query / 4 KV heads), QK-norm, RoPE on the full head (half-split pairs),
  a learned per-head q gain (init 1.5), causal SDPA, zero-initialised output projection;
* relu² MLP (hidden = mlp_mult·d), zero-initialised down projection;
* ``resid_mix``: each block's input is m0⊙x + m1⊙x0 with x0 the normalised embedding;
* U-Net-style skips: the first ⌊L/2⌋ blocks push their outputs, the later blocks pop them
  (LIFO) weighted by ``skip_weights``;
* logit softcap c·tanh(z/c), c = 30, cross-entropy in fp32.

Every place a technique can change is a site (:mod:`pgolf.registry.api.sites`), filled when the
model is built through the :class:`~pgolf.registry.api.sites.Dispatcher`; the forward has no
technique branches. Each site module gets the per-forward :class:`~pgolf.registry.api.context.Ctx`.
Every parameter carries a role and a kind (:mod:`pgolf.registry.api.roles`); parameters built
inside a block also carry its physical layer index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api.context import BlockSchedule, Ctx, unet_halves
from ..api.errors import PgolfError
from ..api.roles import Kind, Role, param_infos, role_of, set_layer, set_role
from ..api.sites import Dispatcher
from ..api.technique import ModelSpec, Technique


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def softcap(logits: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(logits / cap)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2) of x (B,T,H,D) by angles with cos/sin of shape (T, D/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c + x2 * s, x2 * c - x1 * s), dim=-1)


def rotary_tables(dims: int, base: float, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin (T, dims/2) for angles t·base^(−2i/dims)."""
    exponent = torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), base**-exponent)
    return freqs.cos(), freqs.sin()


# --------------------------------------------------------------------------------------------
# Slot defaults
# --------------------------------------------------------------------------------------------


class RotaryBase(nn.Module):
    """The rotary slot: ``tables`` once per forward, ``rotate`` q and k in every layer."""

    def tables(self, seq_len: int, device: torch.device) -> Any:
        raise NotImplementedError

    def rotate(self, x: Tensor, tables: Any) -> Tensor:
        raise NotImplementedError


class Rotary(RotaryBase):
    """RoPE over the full head dim (base 10 000). Stateless, so ``torch.compile`` sees no Python
    state to guard on and DDP no buffer to sync."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return rotary_tables(self.head_dim, self.base, seq_len, device)

    def rotate(self, x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
        cos, sin = tables
        return apply_rotary(x, cos.to(x.dtype), sin.to(x.dtype))


class RMSNorm(nn.Module):
    """The norm slot's default: parameter-free RMSNorm."""

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        return rms_norm(x)


class SequentialResidual(nn.Module):
    """The block slot's default: x + attn(norm x), then + mlp(norm x)."""

    def forward(self, x: Tensor, block: Block, ctx: Ctx) -> Tensor:
        x = x + block.attn_branch(x, ctx)
        return x + block.mlp_branch(x, ctx)


class SDPAttention(nn.Module):
    """Causal attention through ``F.scaled_dot_product_attention`` (the reference kernel)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx | None = None) -> Tensor:
        # q (B,T,H,D), k/v (B,T,KV,D) -> (B,T,H,D)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=q.size(2) != k.size(2),
        )
        return y.transpose(1, 2)


class FlashAttention(nn.Module):
    """Causal attention through flash-attn (FA3 ``flash_attn_interface`` or FA2 ``flash_attn``).

    Same maths as :class:`SDPAttention` (scale 1/√D, GQA without repeating K/V); CUDA + bf16 only.
    """

    def __init__(self) -> None:
        super().__init__()
        fn = flash_attention_function()
        if fn is None:
            raise PgolfError(
                "train.attention=flash but neither flash_attn_interface nor flash_attn is installed"
            )
        self._fn: Callable[..., object] = fn

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: Ctx | None = None) -> Tensor:
        dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16  # flash: 16-bit only
        out = self._fn(q.to(dt), k.to(dt), v.to(dt), causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return cast(Tensor, out).to(q.dtype)


def flash_attention_function() -> Callable[..., object] | None:
    """The installed flash-attn kernel, FA3 first, or None."""
    try:
        from flash_attn_interface import flash_attn_func

        return cast(Callable[..., object], flash_attn_func)
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func

        return cast(Callable[..., object], flash_attn_func)
    except ImportError:
        return None


def attention_kernel(name: str, device: torch.device) -> Callable[[], nn.Module]:
    """Default of the attention slot: ``sdpa``, ``flash`` or ``auto`` (flash on CUDA when installed)."""
    if name == "flash" or (
        name == "auto" and device.type == "cuda" and flash_attention_function() is not None
    ):
        return FlashAttention
    return SDPAttention


class ReluSquared(nn.Module):
    def forward(self, u: Tensor) -> Tensor:
        return torch.relu(u).square()


class SkipMerge(nn.Module):
    """The skip-merge slot's default: x + skip_weights[j]·skip (weights init 1)."""

    def __init__(self, num_skips: int, model_dim: int):
        super().__init__()
        self.skip_weights = set_role(nn.Parameter(torch.ones(num_skips, model_dim)), Role.SCALAR)

    def forward(self, x: Tensor, skip: Tensor, j: int, ctx: Ctx) -> Tensor:
        return x + self.skip_weights[j].to(x.dtype) * skip


class Head(nn.Module):
    """The head slot: final hidden state h (B,T,D) and the model's output projection ``out`` ->
    fp32 logits (B,T,V).

    ``out(h, ctx)`` gives the raw logits h·Wᵀ (with the head's ``linear_weight`` transform and
    ``linear_adapter`` chain applied); ``out.effective_weight(ctx)`` is W (V,D) for heads that
    fuse the projection into their own kernel. ``loss`` is cross-entropy in nats on the logits; a
    head may override it (fused kernels)."""

    def forward(self, h: Tensor, out: nn.Module, ctx: Ctx) -> Tensor:
        raise NotImplementedError

    def loss(self, h: Tensor, out: nn.Module, targets: Tensor, ctx: Ctx, reduction: str = "mean") -> Tensor:
        logits = self(h, out, ctx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return loss if reduction != "none" else loss.view_as(targets)


class SoftcapHead(Head):
    """The baseline head: softcap c·tanh(h·Wᵀ / c) in fp32."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, h: Tensor, out: nn.Module, ctx: Ctx) -> Tensor:
        return softcap(out(h, ctx).float(), self.cap)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """A bias-free Linear labelled with its role and kind. Its weight passes through the
    ``linear_weight`` slot (QAT) and its output gets the ``linear_adapter`` chain (LoRA)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        role: Role,
        kind: Kind,
        *,
        zero: bool = False,
        sites: Dispatcher | None = None,
        layer: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=False)
        if zero:
            nn.init.zeros_(self.weight)
        set_role(self.weight, role, kind)
        self.kind = kind
        sites = sites or Dispatcher(())
        where = f"{kind.value} of layer {layer}" if layer is not None else kind.value
        self.weight_transform: nn.Module | None = sites.slot(
            "linear_weight", None, where, kind=kind, layer=layer
        )
        self.adapters = nn.ModuleList(
            sites.chain(
                "linear_adapter", kind=kind, layer=layer, in_features=in_features, out_features=out_features
            )
        )

    def effective_weight(self, ctx: Ctx | None = None) -> Tensor:
        """The weight the forward uses (after the ``linear_weight`` slot)."""
        return self.weight if self.weight_transform is None else self.weight_transform(self.weight, ctx)

    def forward(self, x: Tensor, ctx: Ctx | None = None) -> Tensor:
        y = F.linear(x, self.effective_weight(ctx))
        for adapter in self.adapters:
            y = adapter(x, y, ctx)
        return y


class TiedOutput(nn.Module):
    """The output projection of a tied model: the token embedding's weight (held by the model, not
    by this module) through the head's ``linear_weight`` slot and ``linear_adapter`` chain."""

    def __init__(self, embedding: nn.Embedding, spec: ModelSpec, sites: Dispatcher):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # a reference, not a second copy
        self.weight_transform: nn.Module | None = sites.slot(
            "linear_weight", None, "head (tied)", kind=Kind.HEAD, layer=None
        )
        self.adapters = nn.ModuleList(
            sites.chain(
                "linear_adapter",
                kind=Kind.HEAD,
                layer=None,
                in_features=spec.model_dim,
                out_features=spec.vocab_size,
            )
        )

    @property
    def weight(self) -> Tensor:
        """The token embedding's weight (V,D): the parameter this projection multiplies by."""
        embedding: nn.Embedding = self._embedding  # type: ignore[assignment]
        return embedding.weight

    def effective_weight(self, ctx: Ctx | None = None) -> Tensor:
        w = self.weight
        return w if self.weight_transform is None else self.weight_transform(w, ctx)

    def forward(self, h: Tensor, ctx: Ctx | None = None) -> Tensor:
        y = F.linear(h, self.effective_weight(ctx).to(h.dtype))
        for adapter in self.adapters:
            y = adapter(h, y, ctx)
        return y


class Attention(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        sites: Dispatcher,
        kernel: Callable[[], nn.Module] = SDPAttention,
    ):
        super().__init__()
        d, h, kv = spec.model_dim, spec.num_heads, spec.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, spec.head_dim
        lin = {"sites": sites, "layer": layer}
        self.c_q = Linear(d, d, Role.MATRIX, Kind.ATTN_Q, **lin)  # type: ignore[arg-type]
        self.c_k = Linear(d, spec.kv_dim, Role.MATRIX, Kind.ATTN_K, **lin)  # type: ignore[arg-type]
        self.c_v = Linear(d, spec.kv_dim, Role.MATRIX, Kind.ATTN_V, **lin)  # type: ignore[arg-type]
        self.proj = Linear(d, d, Role.MATRIX, Kind.ATTN_O, zero=True, **lin)  # type: ignore[arg-type]
        self.q_gain = set_role(nn.Parameter(torch.full((h,), spec.qk_gain_init)), Role.SCALAR)
        where = f"layer {layer}"
        self.qkv = nn.ModuleList(sites.chain("qkv", layer=layer))
        self.kernel: nn.Module = sites.slot("attention", kernel, where, layer=layer)
        self.out = nn.ModuleList(sites.chain("attn_out", layer=layer))

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x, ctx).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x, ctx).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x, ctx).view(B, T, self.num_kv_heads, self.head_dim)
        for transform in self.qkv:
            q, k, v = transform(q, k, v, ctx)
        q, k = rms_norm(q), rms_norm(k)
        q, k = ctx.rotary.rotate(q, ctx.rope), ctx.rotary.rotate(k, ctx.rope)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = self.kernel(q, k, v, ctx)  # (B,T,H,D)
        ctx.v, ctx.attn_input = v, x
        for transform in self.out:
            y = transform(y, ctx)
        return cast(Tensor, self.proj(y.reshape(B, T, -1), ctx))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, sites: Dispatcher):
        super().__init__()
        lin = {"sites": sites, "layer": layer}
        self.fc = Linear(spec.model_dim, spec.mlp_hidden, Role.MATRIX, Kind.MLP_UP, **lin)  # type: ignore[arg-type]
        self.act: nn.Module = sites.slot("mlp_act", ReluSquared, f"layer {layer}", layer=layer)
        self.proj = Linear(spec.mlp_hidden, spec.model_dim, Role.MATRIX, Kind.MLP_DOWN, zero=True, **lin)  # type: ignore[arg-type]

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        return cast(Tensor, self.proj(self.act(self.fc(x, ctx)), ctx))


class Block(nn.Module):
    """One transformer block: resid_mix with x0, then the block-wiring slot adds the branches."""

    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        sites: Dispatcher,
        kernel: Callable[[], nn.Module] = SDPAttention,
    ):
        super().__init__()
        d = spec.model_dim
        where = f"layer {layer}"
        self.layer = layer
        self.norm: nn.Module = sites.slot("norm", RMSNorm, where, layer=layer)
        self.attn = Attention(spec, layer, sites, kernel)
        self.mlp = MLP(spec, layer, sites)
        self.attn_scale = set_role(nn.Parameter(torch.ones(d)), Role.SCALAR)
        self.mlp_scale = set_role(nn.Parameter(torch.ones(d)), Role.SCALAR)
        self.resid_mix = set_role(nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d)))), Role.SCALAR)
        self.wiring: nn.Module = sites.slot("block", SequentialResidual, where, layer=layer)
        set_layer(self, layer)

    def attn_branch(self, x: Tensor, ctx: Ctx) -> Tensor:
        return self.attn_scale.to(x.dtype) * self.attn(self.norm(x, ctx), ctx)

    def mlp_branch(self, x: Tensor, ctx: Ctx) -> Tensor:
        return self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x, ctx), ctx)

    def forward(self, x: Tensor, ctx: Ctx) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * cast(Tensor, ctx.x0)
        return cast(Tensor, self.wiring(x, self, ctx))


class GPT(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        sites: Dispatcher | None = None,
        attention: Callable[[], nn.Module] = SDPAttention,
    ):
        super().__init__()
        sites = sites or Dispatcher(())
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.model_dim)
        std = spec.tied_embed_init_std if spec.tie_embeddings else spec.embed_init_std
        nn.init.normal_(self.tok_emb.weight, std=std)  # the baseline: N(0, 1) (nn.Embedding's) when untied
        set_role(self.tok_emb.weight, Role.EMBEDDING, Kind.EMBED)
        self.embed = nn.ModuleList(sites.chain("embed"))
        self.rotary: RotaryBase = sites.slot("rotary", lambda: Rotary(spec.head_dim, spec.rope_base))
        self.blocks = nn.ModuleList(Block(spec, i, sites, attention) for i in range(spec.num_layers))
        self.schedule: BlockSchedule = sites.slot("schedule", lambda: unet_halves(spec.num_layers))
        check_schedule(self.schedule, spec.num_layers)
        n_skips = self.schedule.num_skips()
        self.skip_merge: nn.Module = sites.slot(
            "skip_merge", lambda: SkipMerge(n_skips, spec.model_dim), num_skips=n_skips
        )
        self.final = nn.ModuleList(sites.chain("final"))
        self.lm_head: nn.Module = (
            TiedOutput(self.tok_emb, spec, sites)
            if spec.tie_embeddings
            else Linear(spec.model_dim, spec.vocab_size, Role.HEAD, Kind.HEAD, zero=True, sites=sites)
        )
        self.head: Head = sites.slot("head", lambda: SoftcapHead(spec.logit_softcap))

    def hidden(self, idx: Tensor, switches: tuple[str, ...] = ()) -> tuple[Tensor, Ctx]:
        """Final normalised hidden states (B,T,D) for token ids idx (B,T), and the context."""
        ctx = Ctx(idx, switches)
        x = self.tok_emb(idx)
        for transform in self.embed:
            x = transform(x, ctx)
        x = rms_norm(x)
        ctx.x0 = x
        ctx.rotary = self.rotary
        ctx.rope = self.rotary.tables(idx.size(1), idx.device)
        encoder, decoder = self.schedule.order(switches)
        skips: list[Tensor] = []
        runs: dict[int, int] = {}  # physical block -> passes so far (ctx.repeat)
        for v, i in enumerate(encoder):
            ctx.layer, ctx.virtual, ctx.repeat = i, v, runs.get(i, 0)
            runs[i] = ctx.repeat + 1
            x = self.blocks[i](x, ctx)
            skips.append(x)
        for j, i in enumerate(decoder):
            ctx.layer, ctx.virtual, ctx.repeat = i, len(encoder) + j, runs.get(i, 0)
            runs[i] = ctx.repeat + 1
            if skips:
                x = self.skip_merge(x, skips.pop(), j, ctx)
            x = self.blocks[i](x, ctx)
        for transform in self.final:
            x = transform(x, ctx)
        return rms_norm(x), ctx

    def logits(self, idx: Tensor, switches: tuple[str, ...] = ()) -> Tensor:
        """fp32 logits (B,T,V) from the head slot (soft-capped by default)."""
        h, ctx = self.hidden(idx, switches)
        return cast(Tensor, self.head(h, self.lm_head, ctx))

    def forward(
        self, idx: Tensor, targets: Tensor, reduction: str = "mean", switches: tuple[str, ...] = ()
    ) -> Tensor:
        """Cross-entropy in nats: a scalar (``mean``) or per token (B,T) (``none``)."""
        h, ctx = self.hidden(idx, switches)
        return self.head.loss(h, self.lm_head, targets, ctx, reduction)


def check_schedule(schedule: BlockSchedule, num_layers: int) -> None:
    for encoder, decoder in schedule.orders():
        bad = [i for i in (*encoder, *decoder) if not 0 <= i < num_layers]
        if bad or not (encoder or decoder):
            raise PgolfError(
                f"block schedule {schedule!r} uses layer(s) {bad} outside 0..{num_layers - 1}"
                if bad
                else f"block schedule {schedule!r} runs no block"
            )


def build_model(
    spec: ModelSpec,
    techniques: Sequence[Technique] | Dispatcher = (),
    *,
    attention: Callable[[], nn.Module] = SDPAttention,
) -> GPT:
    """The base GPT with every site filled, the ``init`` event run and every parameter's role
    checked (on the current default device; ``with torch.device("meta")`` for a dry build)."""
    sites = techniques if isinstance(techniques, Dispatcher) else Dispatcher(techniques)
    model = GPT(spec, sites, attention)
    sites.event("init", model=model, spec=spec)
    param_infos(model)  # every parameter, including those techniques added, must have a role
    return model


def count_params(model: nn.Module) -> int:
    """Parameters of the model that is trained and exported: a published record's parameter count.
    Evaluation-time adapters (role ``adapter``: the per-document LoRA A / B of ``lora_ttt`` and
    ``phased_ttt``, allocated for every document slot of a batch) are not counted."""
    return sum(p.numel() for p in model.parameters() if role_of(p) is not Role.ADAPTER)


def model_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3× forward) of the dense parts."""
    d, L, V = spec.model_dim, spec.num_layers, spec.vocab_size
    per_layer = 2 * (d * d * 2 + 2 * d * spec.kv_dim + 2 * d * spec.mlp_hidden)
    attn = 2 * 2 * seq_len * d / 2 * L  # causal: half of the T×T scores, QKᵀ and AV
    return 3.0 * (L * per_layer + attn + 2 * d * V)


__all__ = [
    "GPT",
    "MLP",
    "Attention",
    "Block",
    "FlashAttention",
    "Head",
    "Linear",
    "RMSNorm",
    "ReluSquared",
    "Rotary",
    "RotaryBase",
    "SDPAttention",
    "SequentialResidual",
    "SkipMerge",
    "SoftcapHead",
    "TiedOutput",
    "apply_rotary",
    "attention_kernel",
    "build_model",
    "count_params",
    "model_flops_per_token",
    "rms_norm",
    "rotary_tables",
    "softcap",
]
