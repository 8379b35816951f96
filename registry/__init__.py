"""pgolf core: the technique registry, stacks, the base model, trainer, export and scoring.

The public API a technique author needs::

    from pgolf.registry import Params, Technique, hook, register, Role, set_role, Layers

and a runner needs::

    from pgolf.registry.config import load_stack
    from pgolf.registry.run import run, estimate_artifact_bytes
"""

from __future__ import annotations

from .errors import ConfigError, DataError, PgolfError
from .hooks import HOOKS, SLOT_DEFAULTS, SLOTS, HookSpec
from .roles import Role, role_of, set_role, set_roles
from .selectors import Layers, LayerSelector
from .technique import REGISTRY, ModelSpec, Params, Technique, hook, register

__all__ = [
    "HOOKS",
    "REGISTRY",
    "SLOTS",
    "SLOT_DEFAULTS",
    "ConfigError",
    "DataError",
    "HookSpec",
    "LayerSelector",
    "Layers",
    "ModelSpec",
    "Params",
    "PgolfError",
    "Role",
    "Technique",
    "hook",
    "register",
    "role_of",
    "set_role",
    "set_roles",
]
