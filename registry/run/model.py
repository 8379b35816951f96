"""The base GPT: the Parameter Golf challenge baseline, with named slots techniques fill.

Notable features (all from the baseline ``train_gpt.py``):

* tied token embedding E ~ N(0, 0.005²), used as the input table and the output head;
* parameter-free RMSNorm: on the input embedding, before attention, before the MLP, before the head;
* GQA attention (8 query / 4 KV heads), QK-norm, RoPE on the full head (half-split pairs),
  a learned per-head q gain (init 1.5), causal SDPA, zero-initialised output projection;
* relu² MLP (hidden = mlp_mult·d), zero-initialised down projection;
* ``resid_mix``: each block's input is m0⊙x + m1⊙x0 with x0 the normalised embedding;
* U-Net-style skips: the first ⌊L/2⌋ blocks push their outputs, the later blocks pop them
  (LIFO) weighted by ``skip_weights``;
* logit softcap c·tanh(z/c), c = 30, cross-entropy in fp32.

Slots (filled at build time by technique hooks; the forward has no technique branches):

* ``GPT.embed_transforms``      — modules m(x, idx) -> x on the raw embedding (hook ``embed``)
* ``GPT.rotary``                — the RoPE tables (cos, sin) shared by every layer
* ``Attention.core``            — the attention kernel (SDPA, or flash-attn when installed)
* ``Attention.out_transforms``  — modules m(y, v) -> y on per-head outputs (hook ``attn_out``)
* ``MLP.act``                   — the activation (hook ``mlp_act``; default relu²)

Every parameter carries a role (:mod:`pgolf.registry.roles`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api.errors import PgolfError
from ..api.roles import Role, role_table, set_role
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


class Rotary(nn.Module):
    """RoPE tables over the full head dim (base 10 000), computed once per forward for all layers.

    Stateless, so ``torch.compile`` sees no Python state to guard on and DDP no buffer to sync.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.base**-exponent)
        return freqs.cos(), freqs.sin()  # (T, D/2) each


class SDPAttention(nn.Module):
    """Causal attention through ``F.scaled_dot_product_attention`` (the reference kernel)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
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

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
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
    """Factory for the attention slot: ``sdpa``, ``flash`` or ``auto`` (flash on CUDA when installed)."""
    if name == "flash" or (
        name == "auto" and device.type == "cuda" and flash_attention_function() is not None
    ):
        return FlashAttention
    return SDPAttention


class ReluSquared(nn.Module):
    def forward(self, u: Tensor) -> Tensor:
        return torch.relu(u).square()


def _linear(in_dim: int, out_dim: int, role: Role, zero: bool = False) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim, bias=False)
    if zero:
        nn.init.zeros_(lin.weight)
    set_role(lin.weight, role)
    return lin


def _vector(n: int, value: float) -> nn.Parameter:
    return set_role(nn.Parameter(torch.full((n,), value)), Role.SCALAR)  # type: ignore[return-value]


class Attention(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        qk_gain_init: float,
        kernel: Callable[[], nn.Module] = SDPAttention,
    ):
        super().__init__()
        d, h, kv = spec.model_dim, spec.num_heads, spec.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, spec.head_dim
        self.c_q = _linear(d, d, Role.MATRIX)
        self.c_k = _linear(d, spec.kv_dim, Role.MATRIX)
        self.c_v = _linear(d, spec.kv_dim, Role.MATRIX)
        self.proj = _linear(d, d, Role.MATRIX, zero=True)
        self.q_gain = _vector(h, qk_gain_init)
        self.core: nn.Module = kernel()
        self.out_transforms = nn.ModuleList()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = rms_norm(q), rms_norm(k)
        q = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype))
        k = apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = self.core(q, k, v)  # (B,T,H,D)
        for transform in self.out_transforms:
            y = transform(y, v)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.fc = _linear(spec.model_dim, spec.mlp_hidden, Role.MATRIX)
        self.act: nn.Module = ReluSquared()
        self.proj = _linear(spec.mlp_hidden, spec.model_dim, Role.MATRIX, zero=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        qk_gain_init: float,
        kernel: Callable[[], nn.Module] = SDPAttention,
    ):
        super().__init__()
        d = spec.model_dim
        self.attn = Attention(spec, qk_gain_init, kernel)
        self.mlp = MLP(spec)
        self.attn_scale = _vector(d, 1.0)
        self.mlp_scale = _vector(d, 1.0)
        self.resid_mix = set_role(nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d)))), Role.SCALAR)

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x), cos, sin)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        *,
        tie_embeddings: bool = True,
        tied_embed_init_std: float = 0.005,
        rope_base: float = 10000.0,
        logit_softcap: float = 30.0,
        qk_gain_init: float = 1.5,
        attention: Callable[[], nn.Module] = SDPAttention,
    ):
        super().__init__()
        self.spec = spec
        self.logit_softcap = logit_softcap
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        set_role(self.tok_emb.weight, Role.EMBEDDING)
        self.embed_transforms = nn.ModuleList()
        self.rotary: nn.Module = Rotary(spec.head_dim, rope_base)
        self.blocks = nn.ModuleList(Block(spec, qk_gain_init, attention) for _ in range(spec.num_layers))
        self.num_encoder_layers = spec.num_layers // 2
        num_skips = min(self.num_encoder_layers, spec.num_layers - self.num_encoder_layers)
        self.skip_weights = set_role(nn.Parameter(torch.ones(num_skips, spec.model_dim)), Role.SCALAR)
        self.lm_head = (
            None if tie_embeddings else _linear(spec.model_dim, spec.vocab_size, Role.HEAD, zero=True)
        )

    def hidden(self, idx: Tensor) -> Tensor:
        """Final normalised hidden states (B,T,D) for token ids idx (B,T)."""
        x = self.tok_emb(idx)
        for transform in self.embed_transforms:
            x = transform(x, idx)
        x = x0 = rms_norm(x)
        cos, sin = self.rotary(idx.size(1), idx.device)
        skips: list[Tensor] = []
        for block in self.blocks[: self.num_encoder_layers]:
            x = block(x, x0, cos, sin)
            skips.append(x)
        for j, block in enumerate(self.blocks[self.num_encoder_layers :]):
            if skips:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = block(x, x0, cos, sin)
        return rms_norm(x)

    def logits(self, idx: Tensor) -> Tensor:
        """Soft-capped logits (B,T,V) in fp32."""
        h = self.hidden(idx)
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return softcap(F.linear(h, weight.to(h.dtype)).float(), self.logit_softcap)

    def forward(self, idx: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in nats: a scalar (``mean``) or per token (B,T) (``none``)."""
        logits = self.logits(idx)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return loss if reduction != "none" else loss.view_as(targets)


def build_model(
    spec: ModelSpec,
    techniques: Sequence[Technique],
    *,
    tie_embeddings: bool = True,
    tied_embed_init_std: float = 0.005,
    rope_base: float = 10000.0,
    logit_softcap: float = 30.0,
    qk_gain_init: float = 1.5,
    attention: Callable[[], nn.Module] = SDPAttention,
) -> GPT:
    """The base GPT with every slot filled by the techniques' model hooks, roles checked."""
    model = GPT(
        spec,
        tie_embeddings=tie_embeddings,
        tied_embed_init_std=tied_embed_init_std,
        rope_base=rope_base,
        logit_softcap=logit_softcap,
        qk_gain_init=qk_gain_init,
        attention=attention,
    )
    for t in techniques:
        if "embed" in t.hooks and (m := t.call("embed")) is not None:
            model.embed_transforms.append(m)
    for i in range(spec.num_layers):
        block = cast(Block, model.blocks[i])
        for t in techniques:
            if "attn_out" in t.hooks and (m := t.call("attn_out", layer=i)) is not None:
                block.attn.out_transforms.append(m)
        acts = [
            (t.name, m)
            for t in techniques
            if "mlp_act" in t.hooks and (m := t.call("mlp_act", layer=i)) is not None
        ]
        if len(acts) > 1:
            raise PgolfError(
                f"techniques {' and '.join(repr(n) for n, _ in acts)} both replace the MLP activation "
                f"of layer {i}; give them disjoint `layers`"
            )
        if acts:
            block.mlp.act = acts[0][1]
    role_table(model)  # every parameter, including those techniques added, must have a role
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
    "ReluSquared",
    "Rotary",
    "SDPAttention",
    "apply_rotary",
    "attention_kernel",
    "build_model",
    "count_params",
    "model_flops_per_token",
    "rms_norm",
    "softcap",
]
