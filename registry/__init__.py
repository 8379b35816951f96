"""pgolf core: the technique registry, stacks, the base model, trainer, export and scoring.

The public API a technique author needs::

    from pgolf.registry import Params, Technique, hook, register, Role, set_role, Layers

and a runner needs::

    from pgolf.registry.api.config import load_stack
    from pgolf.registry.run.pipeline import run, estimate_artifact_bytes
"""

from __future__ import annotations

from .api.errors import ConfigError, DataError, PgolfError
from .api.hooks import HOOKS, SLOT_DEFAULTS, SLOTS, HookSpec
from .api.roles import Role, role_of, set_role, set_roles
from .api.selectors import Layers, LayerSelector
from .api.technique import REGISTRY, ModelSpec, Params, Technique, hook, register

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
