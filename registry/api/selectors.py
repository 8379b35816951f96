"""Typed layer selectors for techniques placed on some layers: ``all``, ``none``, ``last(4)``,
``first(2)``, ``every(2)`` or an explicit list such as ``[7, 8]`` (0-based; negative indices
count from the end)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_FORMS = "'all', 'none', 'last(N)', 'first(N)', 'every(N)' or a list of layer indices like [7, 8]"
_CALL = re.compile(r"^\s*(last|first|every)\s*\(\s*(\d+)\s*\)\s*$")


@dataclass(frozen=True)
class LayerSelector:
    kind: str  # all | none | last | first | every | list
    n: int = 0
    indices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> LayerSelector:
        if isinstance(value, LayerSelector):
            return value
        if isinstance(value, bool):
            raise ValueError(f"expected {_FORMS}, got {value!r}")
        if isinstance(value, int):
            return cls("list", indices=(value,))
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"a layer list must hold integers, got {list(value)!r}")
            return cls("list", indices=tuple(value))
        if isinstance(value, str):
            s = value.strip()
            if s in ("all", "none"):
                return cls(s)
            m = _CALL.match(s)
            if m:
                n = int(m.group(2))
                if m.group(1) == "every" and n < 1:
                    raise ValueError("every(N) needs N >= 1")
                return cls(m.group(1), n=n)
        raise ValueError(f"expected {_FORMS}, got {value!r}")

    def dump(self) -> str | list[int]:
        if self.kind == "list":
            return list(self.indices)
        if self.kind in ("all", "none"):
            return self.kind
        return f"{self.kind}({self.n})"

    def resolve(self, num_layers: int) -> tuple[int, ...]:
        """The sorted layer indices this selector picks in a model of ``num_layers`` layers."""
        if self.kind == "all":
            return tuple(range(num_layers))
        if self.kind == "none":
            return ()
        if self.kind == "last":
            return tuple(range(max(0, num_layers - self.n), num_layers))
        if self.kind == "first":
            return tuple(range(min(self.n, num_layers)))
        if self.kind == "every":
            return tuple(range(0, num_layers, self.n))
        out = set()
        for i in self.indices:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ValueError(f"layer {i} is out of range for num_layers={num_layers}")
            out.add(j)
        return tuple(sorted(out))

    def check(self, num_layers: int) -> str | None:
        """An error message if this selector does not fit ``num_layers``, else None."""
        try:
            self.resolve(num_layers)
        except ValueError as e:
            return str(e)
        return None  # last(N)/first(N) with N > num_layers simply pick every layer

    def __str__(self) -> str:
        return str(self.dump())


Layers = Annotated[
    LayerSelector,
    BeforeValidator(LayerSelector.parse),
    PlainSerializer(LayerSelector.dump, return_type=Any),
]
"""Field type for technique params: ``layers: Layers = LayerSelector.parse("last(4)")``."""


# --------------------------------------------------------------------------------------------
# Tensor scopes (export): which parameters a quantizer or export step applies to
# --------------------------------------------------------------------------------------------

_SCOPE_FORMS = (
    "'all', 'none', 'matrices' (the block matrices: attn_q/k/v/o, mlp_up/down), 'embeddings', or a list "
    "of kinds, roles and those two groups such as [attn_q, mlp_up, embedding] or [matrices, embed]"
)


_GROUPS = ("matrices", "embeddings")
"""Scope forms that may also appear inside a list (``[matrices, embed]``)."""


@dataclass(frozen=True)
class TensorScope:
    """A set of parameter kinds and roles, selected by labels (never by name patterns)."""

    form: str  # all | none | matrices | embeddings | list
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> TensorScope:
        from .roles import Kind, Role

        if isinstance(value, TensorScope):
            return value
        if isinstance(value, str):
            s = value.strip()
            if s in ("all", "none", "matrices", "embeddings"):
                return cls(s)
            value = [s]
        if isinstance(value, (list, tuple)) and value:
            allowed = {k.value for k in Kind} | {r.value for r in Role} | set(_GROUPS)
            bad = [v for v in value if not isinstance(v, str) or v not in allowed]
            if bad:
                raise ValueError(
                    f"unknown kind or role {bad[0]!r}; kinds: {', '.join(k.value for k in Kind)}; "
                    f"roles: {', '.join(r.value for r in Role)}; groups: {', '.join(_GROUPS)}"
                )
            return cls("list", tuple(value))
        raise ValueError(f"expected {_SCOPE_FORMS}, got {value!r}")

    def dump(self) -> str | list[str]:
        return list(self.names) if self.form == "list" else self.form

    def contains(self, info: Any) -> bool:
        """Whether a :class:`~pgolf.registry.api.roles.ParamInfo` falls in this scope."""
        from .roles import BLOCK_MATRIX_KINDS, Kind, Role

        if self.form == "all":
            return True
        if self.form == "none":
            return False
        if self.form == "matrices":
            return info.kind in BLOCK_MATRIX_KINDS
        if self.form == "embeddings":
            return info.kind == Kind.EMBED or info.role == Role.EMBEDDING
        groups = [TensorScope(n) for n in self.names if n in _GROUPS]
        return (
            info.kind.value in self.names
            or info.role.value in self.names
            or any(g.contains(info) for g in groups)
        )

    def may_claim_kind(self, kind: Any) -> bool:
        """Whether a tensor of this :class:`~pgolf.registry.api.roles.Kind` can fall in this scope
        (False only when none can: e.g. ``embed`` under ``matrices``). A role in the scope may
        label tensors of any kind."""
        from .roles import BLOCK_MATRIX_KINDS, Role

        if self.form in ("all", "embeddings"):
            return True
        if self.form == "none":
            return False
        if self.form == "matrices":
            return kind in BLOCK_MATRIX_KINDS
        roles = {r.value for r in Role}
        return (
            kind.value in self.names
            or any(n in roles for n in self.names)
            or any(TensorScope(n).may_claim_kind(kind) for n in self.names if n in _GROUPS)
        )

    def __str__(self) -> str:
        return str(self.dump())


Tensors = Annotated[
    TensorScope,
    BeforeValidator(TensorScope.parse),
    PlainSerializer(TensorScope.dump, return_type=Any),
]
"""Field type for export-technique params: ``scope: Tensors = TensorScope.parse("matrices")``."""
