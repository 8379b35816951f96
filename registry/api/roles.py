"""Parameter labels: every trainable parameter carries a **role** and a **kind**, set where the
parameter is created; names are never pattern-matched.

The *role* decides the optimizer group; the *kind* is what export scopes select on (which
quantizer a tensor gets, which tensors stay in float). A parameter that belongs to a block also
carries that block's physical ``layer`` index (set by the base model for everything built inside a
block, including the modules techniques add there).

==========  ================================  =================================================
role        optimizer group                   export by the framework
==========  ================================  =================================================
matrix      matrix optimizer (Muon)           quantized (the quantizer whose scope claims it)
embedding   Adam(W), tied/untied embed lr     quantized
head        Adam(W), ``optim.head_lr``        quantized
gate        Adam(W), ``optim.scalar_lr``      quantized when large, else float passthrough
scalar      Adam(W), ``optim.scalar_lr``      fp32 (control tensors), unless a quantizer that
                                              sets ``quantizes_control`` claims them
adapter     none (evaluation-time only)       never exported (LoRA adapters of TTT)
==========  ================================  =================================================

Kinds: ``attn_q``, ``attn_k``, ``attn_v``, ``attn_o``, ``mlp_up``, ``mlp_down``, ``embed``,
``head``, ``gate``, ``control``, ``other``. When a parameter is given only a role, its kind follows
from the role (embedding → embed, head → head, gate → gate, scalar → control, matrix/adapter →
other).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from .errors import PgolfError

_ROLE = "_pgolf_role"
_KIND = "_pgolf_kind"
_LAYER = "_pgolf_layer"


class Role(str, Enum):
    MATRIX = "matrix"
    EMBEDDING = "embedding"
    HEAD = "head"
    GATE = "gate"
    SCALAR = "scalar"
    ADAPTER = "adapter"


class Kind(str, Enum):
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    EMBED = "embed"
    HEAD = "head"
    GATE = "gate"
    CONTROL = "control"
    OTHER = "other"


DEFAULT_KIND: dict[Role, Kind] = {
    Role.MATRIX: Kind.OTHER,
    Role.EMBEDDING: Kind.EMBED,
    Role.HEAD: Kind.HEAD,
    Role.GATE: Kind.GATE,
    Role.SCALAR: Kind.CONTROL,
    Role.ADAPTER: Kind.OTHER,
}

BLOCK_MATRIX_KINDS = (Kind.ATTN_Q, Kind.ATTN_K, Kind.ATTN_V, Kind.ATTN_O, Kind.MLP_UP, Kind.MLP_DOWN)
"""The kinds of the matrices inside transformer blocks (the usual scope of int5/int6 quantizers)."""


def set_role(param: torch.Tensor, role: Role | str, kind: Kind | str | None = None) -> torch.Tensor:
    """Label ``param`` with its role (and kind; default from the role); returns it so it can wrap
    a constructor: ``self.w = set_role(nn.Parameter(...), Role.GATE)``."""
    r = Role(role)
    setattr(param, _ROLE, r)
    setattr(param, _KIND, Kind(kind) if kind is not None else DEFAULT_KIND[r])
    return param


def set_roles(module: nn.Module, role: Role | str, kind: Kind | str | None = None) -> nn.Module:
    """Label every parameter of ``module`` with the same role (and kind)."""
    for p in module.parameters():
        set_role(p, role, kind)
    return module


def set_layer(module: nn.Module, layer: int) -> None:
    """Mark every parameter of ``module`` that has no layer yet as belonging to physical ``layer``."""
    for p in module.parameters():
        if getattr(p, _LAYER, None) is None:
            setattr(p, _LAYER, layer)


def role_of(param: torch.Tensor) -> Role | None:
    return getattr(param, _ROLE, None)


def kind_of(param: torch.Tensor) -> Kind | None:
    return getattr(param, _KIND, None)


def layer_of(param: torch.Tensor) -> int | None:
    return getattr(param, _LAYER, None)


@dataclass(frozen=True)
class ParamInfo:
    """What export scopes and quantizers may know about a tensor: never its name's pattern."""

    name: str
    role: Role
    kind: Kind
    layer: int | None
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def role_table(model: nn.Module) -> dict[str, Role]:
    """Name → role for every parameter; raises naming each parameter that has none."""
    return {n: i.role for n, i in param_infos(model).items()}


def param_infos(model: nn.Module) -> dict[str, ParamInfo]:
    """Name → :class:`ParamInfo` for every parameter (state-dict names, shared ones once);
    raises one error naming every parameter without a role."""
    infos: dict[str, ParamInfo] = {}
    missing: list[str] = []
    for name, p in model.named_parameters():
        role = role_of(p)
        if role is None:
            missing.append(name)
            continue
        kind = kind_of(p) or DEFAULT_KIND[role]
        infos[name] = ParamInfo(name, role, kind, layer_of(p), tuple(p.shape))
    if missing:
        raise PgolfError(
            "parameters without a role: "
            + ", ".join(missing)
            + ". The module that creates a parameter must label it with "
            "pgolf.registry.set_role(param, Role.X[, Kind.Y]) (roles: "
            + ", ".join(r.value for r in Role)
            + ")."
        )
    return infos


def relabel(model: nn.Module, infos: dict[str, ParamInfo]) -> None:
    """Copy labels back onto parameters after ``model.to(...)`` replaced the Parameter objects."""
    for name, p in model.named_parameters():
        info = infos[name]
        set_role(p, info.role, info.kind)
        if info.layer is not None:
            setattr(p, _LAYER, info.layer)


def format_role_table(model: nn.Module) -> str:
    """Aligned table of parameters grouped by role, with kind and layer, for the run log."""
    rows: list[tuple[str, str, str, str, str, int]] = []
    for name, p in model.named_parameters():
        role, kind, layer = role_of(p), kind_of(p), layer_of(p)
        rows.append(
            (
                role.value if role else "?",
                kind.value if kind else "?",
                "-" if layer is None else str(layer),
                name,
                "x".join(map(str, p.shape)) or "1",
                p.numel(),
            )
        )
    rows.sort(key=lambda r: (r[0], r[3]))
    widths = [max((len(str(r[i])) for r in rows), default=4) for i in range(5)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}  "
        f"{r[4]:>{widths[4]}}  {r[5]:>10,}"
        for r in rows
    ]
    totals: dict[str, int] = {}
    for r in rows:
        totals[r[0]] = totals.get(r[0], 0) + r[5]
    lines.append("totals: " + ", ".join(f"{k}={v:,}" for k, v in sorted(totals.items())))
    return "\n".join(lines)
