"""The run: the base model, optimizers, training loop, data, scoring and export — the code a
submission needs. :func:`run` is the one entry point the CLI, the tests and the search call."""

from .pipeline import (
    RunResult,
    SizeEstimate,
    build,
    estimate_artifact_bytes,
    prepare_data,
    run,
    score_artifact,
)

__all__ = [
    "RunResult",
    "SizeEstimate",
    "build",
    "estimate_artifact_bytes",
    "prepare_data",
    "run",
    "score_artifact",
]
