"""Partial RoPE: rotate only the first ``dims`` of each head's dimensions; the rest carry no
positional signal. Optional NTK-aware base scaling for windows longer than training.

What: for q and k (B,T,H,D) after QK-norm, the first r = ``dims`` channels of every head are
rotated in pairs (i, i + r/2), i < r/2, by the angle t·θ_i with θ_i = base^(−2i/r) (the baseline's
half-split convention, restricted to r channels); channels r … D−1 pass unchanged. With ``ntk``
on, a forward over T > L0 = ``train_seq_len`` tokens uses base' = base·(T/L0)^(r/(r−2))
(NTK-aware extension, as the records compute it from the forward's length); T ≤ L0 keeps base.

Why: most of each head is left free of position, so content matching is not disturbed by the
rotation, while 16 channels still give relative position; it also extends better to longer
evaluation windows.

Source: parameter-golf ``R/2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248`` (16 of 64 dims,
base 10 000); every later record; the NTK extension is the ``ROPE_YARN`` flag of the 04-27
records (off by default there, L = L0 = 2048) and the NTK evaluation of
``R/2026-03-19_WarmdownQuantization``.

Sites: the ``rotary`` slot (shared by every layer).

Interactions: ``dims`` must be even and at most the head dim (model_dim / num_heads);
``dims`` = head dim is the baseline's RoPE. Rotates after any ``qkv`` chain element (value
residual, …) and after QK-norm, like the base model. Long-context evaluation (``eval.seq_len`` >
``train.train_seq_len``, e.g. with sliding_window) is where ``ntk`` matters.

Evidence (records, 8×H100): partial RoPE together with LN scale 1.1271 → 1.1248 (−0.0023 BPB,
``R/2026-03-21``); NTK evaluation at 1408 after training at 1024 was the best length there, 2048
hurt. Not yet measured with pgolf.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor

from pgolf.registry import Params, PgolfError, Technique, hook, register
from pgolf.registry.run.model import RotaryBase, apply_rotary, rotary_tables


class PartialRoPEParams(Params):
    dims: int = Field(16, ge=2, multiple_of=2, description="r: rotated channels at the start of each head")
    base: float | None = Field(None, gt=1.0, description="RoPE base; null = model.rope_base")
    ntk: bool = Field(False, description="NTK-aware base scaling for forwards longer than train_seq_len")
    train_seq_len: int | None = Field(
        None, ge=2, description="L0 of the NTK scaling; null = train.train_seq_len"
    )

    @model_validator(mode="after")
    def _ntk_needs_four_dims(self) -> PartialRoPEParams:
        if self.ntk and self.dims < 4:
            raise ValueError(f"ntk scaling needs dims >= 4 (the exponent is r/(r-2)), got dims={self.dims}")
        return self


def ntk_base(base: float, dims: int, seq_len: int, train_seq_len: int) -> float:
    """base·(T/L0)^(r/(r−2)) when T > L0, else base."""
    if seq_len <= train_seq_len:
        return base
    return base * (seq_len / train_seq_len) ** (dims / (dims - 2))


def partial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first r = 2·cos.size(-1) channels of x (B,T,H,D) in pairs (i, i + r/2) by the
    angles of cos/sin (T, r/2); channels r … D−1 unchanged."""
    r = 2 * cos.size(-1)
    return torch.cat((apply_rotary(x[..., :r], cos, sin), x[..., r:]), dim=-1)


class PartialRotary(RotaryBase):
    """The rotary slot filled with partial RoPE (stateless: tables are recomputed per forward)."""

    def __init__(self, dims: int, base: float, ntk_len: int | None):
        super().__init__()
        self.dims, self.base, self.ntk_len = dims, base, ntk_len

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        base = self.base if self.ntk_len is None else ntk_base(self.base, self.dims, seq_len, self.ntk_len)
        return rotary_tables(self.dims, base, seq_len, device)

    def rotate(self, x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
        cos, sin = tables
        return partial_rotary(x, cos.to(x.dtype), sin.to(x.dtype))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, base={self.base:g}, ntk_len={self.ntk_len}"


@register("partial_rope")
class PartialRoPE(Technique):
    """Partial RoPE: rotate only the first ``dims`` of each head's dimensions; the rest carry no
    positional signal. Optional NTK-aware base scaling for windows longer than training."""

    Params = PartialRoPEParams
    params: PartialRoPEParams
    contract_params: ClassVar[dict[str, Any]] = {"dims": 4}  # the contract models have head dims 8 and 12

    @hook
    def rotary(self) -> PartialRotary:
        p, spec = self.params, self.spec
        if p.dims > spec.head_dim:
            raise PgolfError(
                f"techniques.partial_rope.dims={p.dims} is more than the head dim {spec.head_dim} "
                f"(model.model_dim {spec.model_dim} / model.num_heads {spec.num_heads}); allowed: even, "
                f"2 … {spec.head_dim}"
            )
        base = spec.rope_base if p.base is None else p.base
        ntk_len = (p.train_seq_len or spec.train_seq_len) if p.ntk else None
        return PartialRotary(p.dims, base, ntk_len)
