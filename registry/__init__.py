"""pgolf core: the technique API (``api``), the run (``run``) and the tools that drive it (``tools``).

The public API a technique author needs::

    from pgolf.registry import Params, Technique, hook, register, Role, Kind, set_role, Layers, Ctx

and a runner needs::

    from pgolf.registry.api.config import load_stack
    from pgolf.registry.run import run, estimate_artifact_bytes
"""

from __future__ import annotations

from .api.context import BatchShape, BlockSchedule, CalibrationData, Ctx, Emit, Switch, TrainState
from .api.errors import ConfigError, DataError, PgolfError
from .api.roles import Kind, ParamInfo, Role, kind_of, role_of, set_layer, set_role, set_roles
from .api.selectors import Layers, LayerSelector, Tensors, TensorScope
from .api.sites import HOOKS, SITES, Dispatcher, HookSpec, Site
from .api.technique import REGISTRY, ModelSpec, Params, Technique, hook, register

__all__ = [
    "HOOKS",
    "REGISTRY",
    "SITES",
    "BatchShape",
    "BlockSchedule",
    "CalibrationData",
    "ConfigError",
    "Ctx",
    "DataError",
    "Dispatcher",
    "Emit",
    "HookSpec",
    "Kind",
    "LayerSelector",
    "Layers",
    "ModelSpec",
    "ParamInfo",
    "Params",
    "PgolfError",
    "Role",
    "Site",
    "Switch",
    "Technique",
    "TensorScope",
    "Tensors",
    "TrainState",
    "hook",
    "kind_of",
    "register",
    "role_of",
    "set_layer",
    "set_role",
    "set_roles",
]
