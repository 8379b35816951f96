"""The entry point of an exported submission script (``pgolf export``).

pgolf never calls :func:`main` itself: the exporter bundles it with the run's modules and the
resolved stack into one ``train_gpt.py`` (:mod:`pgolf.registry.tools.bundle`), which runs the
phases every pgolf run runs (:func:`~.pipeline.train_and_score`) with the challenge's layout and
command line::

    torchrun --standalone --nproc_per_node=8 train_gpt.py

It is the script's command line, so this is where the script reads its environment: ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (torchrun); ``DATA_PATH`` (default
``./data/datasets/fineweb10B_sp{V}``, V the vocabulary size) and ``TOKENIZER_PATH`` (default
``./data/tokenizers/fineweb_{V}_bpe.model``), the challenge's data layout; ``SEED`` (default: the
stack's seed). It writes the artifact ``model.ptz`` in the working folder, prints the run's log
(its ``final`` line has the score) and ends with a ``final_result`` line holding the score and the
artifact's bytes (model + this file) as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import find_shards
from .export import ARTIFACT_NAME
from .pipeline import DataSource, train_and_score
from .runtime import DistEnv, shutdown, start_runtime

RESULT_PREFIX = "final_result "


def main(rs: Any, techniques: Sequence[tuple[Any, str, dict[str, tuple[str, ...]]]]) -> None:
    """Train, export, reload and score the stack ``rs`` (its ``stack``, ``spec`` and resolved
    ``techniques``); ``techniques``: (class, name, hooks) of each technique class, as the registry
    would have set them."""
    for cls, name, hook_names in techniques:
        cls.name, cls.hooks = name, hook_names
    env = os.environ
    stack = rs.stack
    stack.seed = int(env.get("SEED", stack.seed))
    v = stack.model.vocab_size
    folder = Path(env.get("DATA_PATH", f"./data/datasets/fineweb10B_sp{v}"))
    tokenizer = Path(env.get("TOKENIZER_PATH", f"./data/tokenizers/fineweb_{v}_bpe.model"))
    source = DataSource(
        find_shards(folder, "train", stack.data.train_shards),
        find_shards(folder, "val"),
        tokenizer,
        str(folder),
    )
    dist = DistEnv(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    threads = stack.train.threads  # the run's count (exact CPU reproduction); "auto": torch's default
    runtime = start_runtime(stack.train, dist, None if threads == "auto" else threads)

    def log(line: str) -> None:  # the log: lines on standard output, from the first process
        if runtime.is_main:
            print(line, flush=True)

    try:
        log(f"seed {stack.seed}; data {folder}; {len(source.train)} train shard(s); device {runtime.device}")
        t = train_and_score(rs, runtime, source, source.validation(v), Path(ARTIFACT_NAME), log)
    finally:
        shutdown(runtime)
    code = os.path.getsize(__file__)
    result = {
        "val_loss": t.final.val_loss,
        "val_bpb": t.final.val_bpb,
        "model_bytes": t.model_bytes,
        "code_bytes": code,
        "artifact_bytes": t.model_bytes + code,
        "seed": stack.seed,
        "steps": t.train.steps,
    }
    log(RESULT_PREFIX + json.dumps(result))
