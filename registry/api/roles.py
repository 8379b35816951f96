"""Parameter roles: every trainable parameter carries one, and the role alone decides its
optimizer group and how the exporter treats it (no parameter-name pattern matching).

=========  ==========================  ============================================
role       optimizer group             export (baseline int8 quantizer)
=========  ==========================  ============================================
matrix     Muon, ``optim.matrix_lr``   int8 per row when large, else fp16
embedding  Adam, tied/untied embed lr  int8 per row when large, else fp16
head       Adam, ``optim.head_lr``     int8 per row when large, else fp16
gate       Adam, ``optim.scalar_lr``   int8 per row when large, else fp16
scalar     Adam, ``optim.scalar_lr``   kept in fp32 (control tensors)
=========  ==========================  ============================================
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from .errors import PgolfError

_ATTR = "_pgolf_role"


class Role(str, Enum):
    MATRIX = "matrix"
    EMBEDDING = "embedding"
    HEAD = "head"
    GATE = "gate"
    SCALAR = "scalar"


def set_role(param: torch.Tensor, role: Role | str) -> torch.Tensor:
    """Label ``param`` with its role; returns it so it can wrap a constructor."""
    setattr(param, _ATTR, Role(role))
    return param


def set_roles(module: nn.Module, role: Role | str) -> nn.Module:
    """Label every parameter of ``module`` with the same role."""
    for p in module.parameters():
        set_role(p, role)
    return module


def role_of(param: torch.Tensor) -> Role | None:
    return getattr(param, _ATTR, None)


def role_table(model: nn.Module) -> dict[str, Role]:
    """Name → role for every parameter; raises naming each parameter that has none."""
    table: dict[str, Role] = {}
    missing: list[str] = []
    for name, p in model.named_parameters():
        role = role_of(p)
        if role is None:
            missing.append(name)
        else:
            table[name] = role
    if missing:
        raise PgolfError(
            "parameters without a role: "
            + ", ".join(missing)
            + ". The module that creates a parameter must label it with "
            "pgolf.registry.set_role(param, Role.X) (roles: " + ", ".join(r.value for r in Role) + ")."
        )
    return table


def format_role_table(model: nn.Module) -> str:
    """Aligned table of parameters grouped by role, for the run log."""
    rows: list[tuple[str, str, str, int]] = []
    for name, p in model.named_parameters():
        role = role_of(p)
        rows.append((role.value if role else "?", name, "x".join(map(str, p.shape)) or "1", p.numel()))
    rows.sort(key=lambda r: (r[0], r[1]))
    w0 = max((len(r[0]) for r in rows), default=4)
    w1 = max((len(r[1]) for r in rows), default=4)
    w2 = max((len(r[2]) for r in rows), default=4)
    lines = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:>{w2}}  {r[3]:>10,}" for r in rows]
    totals: dict[str, int] = {}
    for r in rows:
        totals[r[0]] = totals.get(r[0], 0) + r[3]
    lines.append("totals: " + ", ".join(f"{k}={v:,}" for k, v in sorted(totals.items())))
    return "\n".join(lines)
