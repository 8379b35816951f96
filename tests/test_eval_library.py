"""Issue 13's acceptance on a tiny model trained on CPU (bench/eval_library.yaml): every legal
evaluation technique passes every probe and lowers or keeps val_bpb against plain windows; each
known-invalid variant is caught by its probe, which names where."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgolf.registry.tools.probebench import (
    Library,
    Trained,
    VariantResult,
    load_library,
    score_variant,
    train_base,
)

pytestmark = pytest.mark.slow  # one 60-step training run, then 13 scorings with their probes
LIB = load_library()


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> tuple[Library, Trained, VariantResult]:
    lib = load_library()
    lib.overrides = {"data": {"cache_dir": str(cache_dir)}}
    tr = train_base(lib, tmp_path_factory.mktemp("eval-library") / "run")
    assert tr.result["legal"] is True, tr.result["legal_reasons"]
    return lib, tr, score_variant(lib, "plain", tr, None)


@pytest.mark.parametrize("name", [n for n in LIB.variants if n != "plain"])
def test_variant_is_legal_and_no_worse_or_is_caught(name: str, trained: tuple[Library, Trained, Any]) -> None:
    lib, tr, plain = trained
    assert plain.legal, plain.reasons
    r = score_variant(lib, name, tr, plain.val_bpb)
    if r.expected_legal:
        assert r.legal, r.reasons
        assert all(p["passed"] for p in r.probes.values())
        if lib.variants[name].get("expect", {}).get("keeps_bpb", True):
            assert r.val_bpb <= plain.val_bpb + 2e-4, (r.val_bpb, plain.val_bpb)
    else:
        assert not r.legal
        probe = r.probes[str(r.expected_probe)]
        assert probe["passed"] is False
        assert r.expected_probe in probe["message"] and (
            "position" in probe["message"] or "(at " in probe["message"]
        )
    assert r.met
