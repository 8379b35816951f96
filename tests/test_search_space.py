"""Define-by-run sampling: conditional technique parameters, toggles applied to stacks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from pgolf.registry.api.config import stack_from_dict
from pgolf.search import space
from pgolf.search.spec import Dim, search_from_dict

ROOT = Path(__file__).resolve().parents[1]
TINY: dict[str, Any] = {
    "base": str(ROOT / "stacks" / "baseline_sp1024.yaml"),
    "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
    "techniques": {"xsa": {"layers": "last(1)"}},
}
SPACE = {
    "model.num_layers": {"int": [1, 4], "step": 1},
    "optim.matrix_lr": {"logfloat": [0.01, 0.1]},
    "model.mlp_mult": {"float": [1.0, 3.0], "step": 0.5},
    "techniques.bigram_hash.buckets": {"choice": [256, 512]},  # listed before its toggle on purpose
    "techniques.bigram_hash": {"optional": True},
    "techniques.xsa": {"optional": True},
    "techniques.xsa.layers": {"choice": ["all", [0, 1]]},  # a non-scalar choice
}


@pytest.fixture(scope="module")
def loaded() -> Any:
    return search_from_dict({"stack": TINY, "space": SPACE})


def _study(seed: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))


def test_conditional_params_only_when_their_technique_is_on(loaded: Any) -> None:
    study = _study()
    seen_on = seen_off = 0
    for _ in range(40):
        t = study.ask()
        point = space.sample(loaded.dims, t)
        assert set(t.params) == set(space.encode_point(loaded.dims, point))  # Optuna saw exactly these
        if point["techniques.bigram_hash"]:
            seen_on += 1
            assert point["techniques.bigram_hash.buckets"] in (256, 512)
        else:
            seen_off += 1
            assert "techniques.bigram_hash.buckets" not in point
        assert ("techniques.xsa.layers" in point) == point["techniques.xsa"]
        assert 1 <= point["model.num_layers"] <= 4
        assert 0.01 <= point["optim.matrix_lr"] <= 0.1
        assert point["model.mlp_mult"] in (1.0, 1.5, 2.0, 2.5, 3.0)
        study.tell(t, 1.0)
    assert seen_on and seen_off


def test_non_scalar_choices_round_trip(loaded: Any) -> None:
    dim = next(d for d in loaded.dims if d.key == "techniques.xsa.layers")
    assert not dim.scalar_choices
    study = _study(1)
    values = set()
    for _ in range(30):
        t = study.ask()
        p = space.sample(loaded.dims, t)
        if "techniques.xsa.layers" in p:
            values.add(json.dumps(p["techniques.xsa.layers"]))
            assert isinstance(t.params["techniques.xsa.layers"], str)  # Optuna stores the JSON text
        study.tell(t, 1.0)
    assert values == {'"all"', "[0, 1]"}


def test_sampling_is_reproducible_with_a_seeded_sampler(loaded: Any) -> None:
    def points(seed: int) -> list[dict[str, Any]]:
        s = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
        out = []
        for i in range(6):
            t = s.ask()
            out.append(space.sample(loaded.dims, t))
            s.tell(t, float(i % 3))
        return out

    assert points(7) == points(7)
    assert points(7) != points(8)


def test_enqueued_point_is_sampled_first(loaded: Any) -> None:
    study = _study()
    study.enqueue_trial(
        space.encode_point(
            loaded.dims, {"techniques.xsa": True, "techniques.xsa.layers": [0, 1], "model.num_layers": 3}
        )
    )
    p = space.sample(loaded.dims, study.ask())
    assert p["techniques.xsa"] is True and p["techniques.xsa.layers"] == [0, 1] and p["model.num_layers"] == 3


def test_apply_toggles_techniques_and_sets_params(loaded: Any) -> None:
    base = loaded.base_data
    on = space.apply(
        base,
        {
            "techniques.bigram_hash": True,
            "techniques.bigram_hash.buckets": 512,
            "techniques.xsa": False,
            "model.num_layers": 3,
            "optim.matrix_lr": 0.05,
        },
    )
    assert on["techniques"]["bigram_hash"] == {"buckets": 512}
    assert "xsa" not in on["techniques"]
    assert on["model"]["num_layers"] == 3 and on["optim"]["matrix_lr"] == 0.05
    assert "xsa" in base["techniques"]  # the base is not modified
    rs = stack_from_dict(on)
    assert rs.technique_names()[:1] == ["bigram_hash"] and "xsa" not in rs.technique_names()
    assert rs.stack.model.num_layers == 3
    # a toggle that is on keeps the base's params of a technique already in the stack
    kept = space.apply(base, {"techniques.xsa": True})
    assert kept["techniques"]["xsa"]["layers"] == base["techniques"]["xsa"]["layers"]


def test_describe_point() -> None:
    text = space.describe_point(
        {
            "model.num_layers": 3,
            "optim.matrix_lr": 0.0421234,
            "techniques.ema": False,
            "techniques.bigram_hash": True,
            "techniques.bigram_hash.buckets": 512,
        }
    )
    assert text == "num_layers=3 matrix_lr=0.04212 -ema +bigram_hash(buckets=512)"


def test_dim_contains() -> None:
    d = Dim("model.num_layers", "int", low=1, high=4)
    assert d.contains(2) and not d.contains(5) and not d.contains(2.5) and not d.contains(True)
    c = Dim("x.y", "choice", choices=(1, "a"))
    assert c.contains("a") and not c.contains(1.0) and not c.contains("b")


def test_one_entry_of_a_parameter_set_by_kind() -> None:
    """``techniques.gptq.sdclip_k.embed`` searches the embedding's clip alone (the records'
    EMBED_CLIP_SIGMAS): the stack's mapping keeps its other entries, a single value becomes the
    default entry, a parameter the stack leaves out starts from the technique's default, and a
    point that also sets the whole parameter applies it first."""
    base = {**TINY, "techniques": {"gptq": {"scope": ["matrices", "embed"], "sdclip_k": 12.0}}}
    loaded = search_from_dict(
        {"stack": base, "space": {"techniques.gptq.sdclip_k.embed": {"float": [15.0, 25.0]}}}
    )
    out = space.apply(loaded.base_data, {"techniques.gptq.sdclip_k.embed": 20.0})
    assert out["techniques"]["gptq"]["sdclip_k"] == {"default": 12.0, "embed": 20.0}
    (gptq,) = (r.params for r in stack_from_dict(out).techniques if r.name == "gptq")
    assert gptq.sdclip_k == {"default": 12.0, "embed": 20.0}  # type: ignore[attr-defined]
    mapped = {**base, "techniques": {"gptq": {"scope": "all", "sdclip_k": {"default": 11.0, "head": 9.0}}}}
    out = space.apply(mapped, {"techniques.gptq.sdclip_k.embed": 18.0})
    assert out["techniques"]["gptq"]["sdclip_k"] == {"default": 11.0, "head": 9.0, "embed": 18.0}
    assert mapped["techniques"]["gptq"]["sdclip_k"] == {"default": 11.0, "head": 9.0}  # not modified
    bare = {**base, "techniques": {"gptq": {"scope": "all"}}}
    out = space.apply(bare, {"techniques.gptq.bits.embed": 8})
    assert out["techniques"]["gptq"]["bits"] == {"default": 6, "embed": 8}  # gptq's default bits: 6
    both = {"techniques.gptq.sdclip_k.embed": 18.0, "techniques.gptq.sdclip_k": 13.0}
    assert space.apply(bare, both)["techniques"]["gptq"]["sdclip_k"] == {"default": 13.0, "embed": 18.0}
    assert space.describe_point({"techniques.gptq.sdclip_k.embed": 18.0}) == "gptq(sdclip_k.embed=18)"


@pytest.mark.parametrize(
    ("key", "dim", "message"),
    [
        ("techniques.gptq.sdclip_k.emb", {"float": [15.0, 25.0]}, "unknown kind 'emb'"),
        (
            "techniques.gptq.sdclip_k.embed",
            {"float": [15.0, 2000.0]},
            "value 2000.0 is not valid for this entry",
        ),
        ("techniques.gptq.clip.embed", {"choice": ["sdclip"]}, "takes one value, not entries by kind"),
        ("techniques.gptq.sdclip_k.embed.x", {"float": [1.0, 2.0]}, "techniques.<name>.<param>.<kind>"),
    ],
)
def test_a_bad_entry_key_names_the_key_and_what_is_allowed(
    key: str, dim: dict[str, Any], message: str
) -> None:
    from pgolf.registry.api.errors import ConfigError

    base = {**TINY, "techniques": {"gptq": {"scope": ["matrices", "embed"]}}}
    with pytest.raises(ConfigError) as e:
        search_from_dict({"stack": base, "space": {key: dim}})
    assert f"space.{key}" in str(e.value) and message in str(e.value)
