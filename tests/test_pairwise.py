"""Generated from the registry: any two techniques that `pgolf check` accepts together also build
and train two steps together on a tiny CPU model with a finite loss — and with untied embeddings.

Cheap by construction: whether two techniques are accepted together is decided without building
where it can be (the stack's resolution catches conflicts, requirements and whole-model slots);
only pairs that share a per-layer, per-Linear or per-tensor slot are dry-built on the meta device,
as `pgolf check` does. The accepted pairs are then covered by few groups in which every pair is
accepted (a greedy clique cover), and each group is checked, built and trained once; only a group
that fails is taken apart, pair by pair, to name the pair that fails.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pgolf.registry import REGISTRY, PgolfError
from pgolf.registry.api.config import ResolvedStack, stack_from_dict
from pgolf.registry.api.sites import SITES, SLOT_PER_LAYER, SLOT_PER_LINEAR, SLOT_PER_TENSOR
from pgolf.registry.api.technique import resolve_techniques
from pgolf.registry.run.data import DistributedTokenLoader, write_shard
from pgolf.registry.run.pipeline import build, dry_build
from pgolf.registry.run.runtime import Runtime, seed_everything
from pgolf.registry.run.train import Trainer

UNTIED = "<untied embeddings>"  # a stack setting paired with every technique, like a technique
MODEL = {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 128}
TRAIN = {"train_seq_len": 16, "train_batch_tokens": 64, "micro_batch_tokens": 32, "iterations": 2,
         "max_wallclock_seconds": 0, "warmup_steps": 0, "warmdown_iters": 0}  # fmt: skip
CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, compile=False, attention="sdpa")
PER_INSTANCE = {
    s.required[0] for s in SITES.values() if s.kind in (SLOT_PER_LAYER, SLOT_PER_LINEAR, SLOT_PER_TENSOR)
}
"""Hooks of slots that are exclusive per layer / Linear / tensor: two fillers clash only on the same
instance, which only a build can tell."""


def techniques_of(members: tuple[str, ...]) -> dict[str, Any]:
    """The stack's ``techniques:`` for these members: each with its contract params and requirements."""
    out: dict[str, Any] = {}
    for name in members:
        if name == UNTIED:
            continue
        cls = REGISTRY.get(name)
        for req in cls.requires:
            out.setdefault(req, dict(REGISTRY.get(req).contract_params))
        out[name] = dict(cls.contract_params)
    return out


def stack_of(members: tuple[str, ...]) -> ResolvedStack:
    model = {**MODEL, "tie_embeddings": UNTIED not in members}
    return stack_from_dict({"model": model, "train": TRAIN, "techniques": techniques_of(members)})


def checked(members: tuple[str, ...]) -> ResolvedStack | None:
    """The stack if `pgolf check` accepts it (validation and the dry build on the meta device)."""
    try:
        rs = stack_of(members)
        dry_build(rs)
    except PgolfError:
        return None
    return rs


def accepted_pairs(members: list[str]) -> set[frozenset[str]]:
    """Every pair `pgolf check` accepts; a build only where the pair shares a per-instance slot
    (counting the hooks of the techniques each one requires, which come into the stack with it)."""
    hooks = {m: {h for t in techniques_of((m,)) for h in REGISTRY.get(t).hooks} for m in members}
    out = set()
    for a, b in itertools.combinations(members, 2):
        _, problems = resolve_techniques(techniques_of((a, b)))
        if problems:
            continue
        if hooks[a] & hooks[b] & PER_INSTANCE and checked((a, b)) is None:
            continue
        out.add(frozenset((a, b)))
    return out


def clique_cover(members: list[str], pairs: set[frozenset[str]]) -> list[tuple[str, ...]]:
    """Groups in which every pair is accepted, covering every accepted pair (greedy, deterministic:
    each group grows by the member that covers most pairs not yet covered)."""
    uncovered = set(pairs)
    groups = []
    while uncovered:
        group = sorted(min(uncovered, key=sorted))
        while True:
            gains = [(sum(frozenset((c, g)) in uncovered for g in group), c) for c in members
                     if c not in group and all(frozenset((c, g)) in pairs for g in group)]  # fmt: skip
            best = max(gains, key=lambda t: (t[0], -members.index(t[1])), default=(0, ""))
            if best[0] == 0:
                break
            group.append(best[1])
        groups.append(tuple(group))
        uncovered -= {frozenset(p) for p in itertools.combinations(group, 2)}
    return groups


def train_two_steps(rs: ResolvedStack, shard: Path) -> float:
    seed_everything(0)
    b = build(rs, CPU.device)
    trainer = Trainer(b.model, b.sites, rs.stack, CPU, DistributedTokenLoader([shard], 0, 1))
    return trainer.run().final_train_loss


def problem(members: tuple[str, ...], shard: Path) -> str | None:
    """None when the members build and train two steps with a finite loss (or check refuses
    them), else what went wrong."""
    rs = checked(members)
    if rs is None:
        return None
    try:
        loss = train_two_steps(rs, shard)
    except Exception as e:  # report which pair, and how
        return f"{' + '.join(members)}: {type(e).__name__}: {e}"
    return None if math.isfinite(loss) else f"{' + '.join(members)}: loss {loss}"


def shipped() -> list[str]:
    """The techniques pgolf ships and those installed plugins register (entry points): never the
    toy plugins other test modules load from files."""
    return [
        n for n in REGISTRY.names() if REGISTRY.get(n).origin.startswith(("pgolf.techniques.", "entry point"))
    ]


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pairwise") / "fineweb_train_000000.bin"
    write_shard(path, np.random.default_rng(0).integers(0, 128, 4096))
    return path


def test_every_pair_check_accepts_builds_and_trains_together(
    shard: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = [*shipped(), UNTIED]
    assert len(members) > 50
    t0 = time.perf_counter()
    pairs = accepted_pairs(members)
    groups = clique_cover(members, pairs)
    covered = {frozenset(p) for g in groups for p in itertools.combinations(g, 2)}
    assert pairs <= covered and covered <= pairs  # the groups hold accepted pairs only, and all of them
    t1 = time.perf_counter()
    failures, split = [], []
    for group in groups:
        if problem(group, shard) is None and checked(group) is not None:
            continue
        split.append(group)  # a failure, or more than two refused together: every pair on its own
        failures += [p for a, b in itertools.combinations(group, 2) if (p := problem((a, b), shard))]
    with capsys.disabled():
        print(f"\npairwise: {len(members)} members, {len(pairs)} accepted pairs in {len(groups)} groups "
              f"({len(split)} taken apart); {t1 - t0:.1f}s to find them, {time.perf_counter() - t1:.1f}s to train")  # fmt: skip
    assert not failures, "\n".join(failures)


def test_the_cover_is_exact_on_a_small_graph() -> None:
    members = ["a", "b", "c", "d"]
    pairs = {frozenset(p) for p in (("a", "b"), ("a", "c"), ("b", "c"), ("c", "d"))}
    groups = clique_cover(members, pairs)
    assert groups == [("a", "b", "c"), ("c", "d")]


def test_a_pair_whose_requirement_clashes_is_not_accepted() -> None:
    """self_generated_calibration brings gptq into the stack, whose quantizer claims the same tensors
    as rtn's: the pair shares no hook itself, but `pgolf check` refuses it, and so must the test."""
    assert accepted_pairs(["rtn", "self_generated_calibration"]) == set()
    assert accepted_pairs(["gptq", "self_generated_calibration"]) == {
        frozenset(("gptq", "self_generated_calibration"))
    }


def test_the_pairs_cover_the_shipped_techniques_never_a_plugin_left_by_another_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A toy plugin another test module registered (test_cli's broken_gate, ...) made 76 members and
    9 failing groups: the generated test covers what pgolf ships and installed entry points only."""
    from pgolf.registry import Technique

    toy = type("Toy", (Technique,), {"__module__": "pgolf_plugin_0123456789ab_toy"})
    monkeypatch.setitem(REGISTRY._entries, "toy_left_behind", toy)
    monkeypatch.setattr(toy, "origin", "pgolf_plugin_0123456789ab_toy", raising=False)
    names = shipped()
    assert "toy_left_behind" not in names and "xsa" in names and "gptq" in names
