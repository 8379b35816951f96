"""Search YAML validation: every problem at once, with key paths; seeds are never searched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pgolf.registry.api.errors import ConfigError
from pgolf.search.spec import load_search, parse_dim, search_from_dict

ROOT = Path(__file__).resolve().parents[1]
BASELINE = str(ROOT / "stacks" / "baseline_sp1024.yaml")
TINY_STACK: dict[str, Any] = {
    "base": BASELINE,
    "model": {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2},
}


def _search(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"stack": TINY_STACK, "space": {"model.num_layers": {"int": [1, 3]}}}
    d.update(kw)
    return d


def _problems(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        search_from_dict(raw)
    return dict(ei.value.problems)


def test_minimal_search_gets_documented_defaults() -> None:
    s = search_from_dict(_search())
    assert s.spec.objective.metric == "val_bpb" and s.spec.objective.mode == "min"
    assert s.spec.constraint.artifact_bytes == 16_000_000
    assert s.spec.trial.gpus == 1  # one trial per GPU by default
    assert s.spec.search.seeds == [1337]
    assert s.spec.search.scheduler == "asha"
    assert [d.key for d in s.dims] == ["model.num_layers"]
    assert s.base.stack.model.num_layers == 2
    assert "base" not in s.base_data and s.base_data["model"]["model_dim"] == 64


def test_all_problems_reported_together_with_key_paths() -> None:
    raw = _search(
        space={
            "model.num_layer": {"int": [1, 3]},  # typo
            "optim.matrix_lr": {"logfloat": [0, 0.1]},  # log of 0
            "model.model_dim": {"choice": []},  # empty
            "train.iterations": {"int": [10, 5]},  # reversed
            "techniques.bigram_hash.bukets": {"choice": [1, 2]},  # unknown param
            "techniques.nope": {"optional": True},  # unknown technique
            "model.mlp_mult": {"float": [1, 2], "choice": [1]},  # two kinds
        },
        search={"num_samples": 0, "seeds": [1, 1], "schedulr": "asha"},
        trial={"gpus": -1},
        colour="blue",
    )
    p = _problems(raw)
    assert "did you mean 'num_layers'" in p["space.model.num_layer"]
    assert "> 0" in p["space.optim.matrix_lr.logfloat"]
    assert "non-empty" in p["space.model.model_dim.choice"]
    assert "low must be below high" in p["space.train.iterations.int"]
    assert "did you mean 'buckets'" in p["space.techniques.bigram_hash.bukets"]
    assert "unknown technique 'nope'" in p["space.techniques.nope"]
    assert "exactly one" in p["space.model.mlp_mult"]
    assert "greater than or equal to 1" in p["search.num_samples"]
    assert "duplicate seeds" in p["search.seeds"]
    assert "did you mean 'scheduler'" in p["search.schedulr"]
    assert "trial.gpus" in p
    assert "unknown key" in p["colour"]


def test_seed_is_never_a_search_dimension() -> None:
    p = _problems(_search(space={"seed": {"choice": [1, 2]}}))
    assert "never a search dimension" in p["space.seed"] and "search.seeds" in p["space.seed"]


@pytest.mark.parametrize(
    ("key", "dim", "fragment"),
    [
        ("export.artifact_limit", {"int": [1, 2]}, "constraint.artifact_bytes"),
        ("train.threads", {"int": [1, 2]}, "trial.cpus"),
        ("model.num_layers", {"optional": True}, "techniques.<name>"),
        ("techniques.ema", {"float": [0.9, 0.99]}, "optional: true"),
        ("techniques.ema.decay", {"float": [0.9, 0.99]}, "not in the stack"),
        ("model.num_layers", {"int": [0, 3]}, "greater than or equal to 1"),
        ("techniques.xsa.layers", {"choice": ["lst(2)"]}, "lst(2)"),
        ("foo.bar", {"int": [1, 2]}, "unknown stack key"),
    ],
)
def test_bad_space_entries(key: str, dim: dict[str, Any], fragment: str) -> None:
    space = {key: dim}
    if key == "techniques.xsa.layers":
        space["techniques.xsa"] = {"optional": True}
    p = _problems(_search(space=space))
    assert fragment in p[f"space.{key}"], p


def test_conditional_param_needs_toggle_or_base_technique() -> None:
    ok = search_from_dict(
        _search(space={"techniques.ema": {"optional": True}, "techniques.ema.decay": {"float": [0.9, 0.99]}})
    )
    assert [d.technique for d in ok.dims] == ["ema", "ema"]
    in_base = search_from_dict(
        _search(
            stack={**TINY_STACK, "techniques": {"ema": {}}},
            space={"techniques.ema.decay": {"float": [0.9, 0.99]}},
        )
    )
    assert in_base.dims[0].key == "techniques.ema.decay"


def test_start_with_points_are_checked_against_the_space() -> None:
    space = {
        "model.num_layers": {"int": [1, 3]},
        "techniques.ema": {"optional": True},
        "techniques.ema.decay": {"float": [0.9, 0.99]},
    }
    p = _problems(
        _search(
            space=space,
            search={
                "start_with": [
                    {"model.num_layers": 7},
                    {"model.num_layer": 2},
                    {"techniques.ema": False, "techniques.ema.decay": 0.95},
                ]
            },
        )
    )
    assert "outside the space" in p["search.start_with[0].model.num_layers"]
    assert "not a space key" in p["search.start_with[1].model.num_layer"]
    assert "turning it off" in p["search.start_with[2].techniques.ema.decay"]


def test_stack_problems_are_prefixed_with_stack() -> None:
    p = _problems(_search(stack={**TINY_STACK, "model": {"num_layers": 0}}))
    assert any(k.startswith("stack.model.num_layers") for k in p), p


def test_parse_dim_forms() -> None:
    probs: list[tuple[str, str]] = []
    d = parse_dim("model.num_layers", {"int": [2, 10], "step": 2}, probs)
    assert d is not None and (d.low, d.high, d.step) == (2, 10, 2) and not probs
    d = parse_dim("x.y", {"int": [1, 64], "log": True}, probs)
    assert d is not None and d.log
    assert parse_dim("x.y", {"logfloat": [1e-3, 1e-1], "step": 0.1}, probs) is None
    assert "log scale" in probs[-1][1]
    assert parse_dim("x.y", {"optional": False}, probs) is None
    assert parse_dim("x.y", [1, 2], probs) is None


def test_stack_file_is_found_next_to_the_search_file(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_STACK))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"stack": "tiny.yaml", "space": {"model.num_layers": {"int": [1, 2]}}}))
    s = load_search(f, ["search.num_samples=3"])
    assert s.name == "s" and s.spec.search.num_samples == 3 and s.base.stack.model.model_dim == 64


def test_resolved_yaml_reloads_to_the_same_search(tmp_path: Path) -> None:
    s = search_from_dict(_search(space={"techniques.ema": {"optional": True}}, name="x"))
    f = tmp_path / "search.yaml"
    f.write_text(s.resolved_yaml(study_name="x-1"))
    again = load_search(f)
    assert again.spec.study_name == "x-1"
    assert again.base_data == s.base_data
    assert [d.key for d in again.dims] == ["techniques.ema"]


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "baseline_h100.yaml"])
def test_example_searches_validate(name: str) -> None:
    s = load_search(ROOT / "searches" / name)
    assert s.dims and s.spec.search.start_with
    if name == "tiny_cpu.yaml":
        assert s.spec.trial.gpus == 0 and s.spec.search.max_concurrent == 2
    else:
        assert s.spec.trial.gpus == 1 and s.spec.constraint.artifact_bytes == 16_000_000


def test_a_number_yaml_reads_as_text_gets_one_error_with_a_hint(tmp_path: Path) -> None:
    """`1.0e6` and `1e-3` are strings to YAML 1.1: one error for the entry, with the fix, and no
    'not a space key' echo from every start point that names it."""
    text = f"""
stack: {{base: {BASELINE}}}
space:
  optim.matrix_lr: {{logfloat: [1e-3, 1.0e-1]}}
  model.num_layers: {{int: [1, 3]}}
search:
  start_with:
    - {{optim.matrix_lr: 0.01, model.num_layers: 2}}
    - {{optim.matrix_lr: 0.02}}
    - {{optim.matrix_lr: 0.03}}
"""
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_search(path)
    problems = ei.value.problems
    assert len(problems) == 1, problems
    key, msg = problems[0]
    assert key == "space.optim.matrix_lr.logfloat" and "'1e-3' is text to YAML" in msg and "0.001" in msg


def test_a_constraint_written_as_1_6e7_gets_the_hint() -> None:
    p = _problems(_search(constraint={"artifact_bytes": "1.6e7"}))
    assert (
        "'1.6e7' is text to YAML" in p["constraint.artifact_bytes"]
        and "16000000" in p["constraint.artifact_bytes"]
    )


@pytest.mark.parametrize(("name", "folder"), [("../escape", "escape"), ("a/b c", "a-b-c"), ("..", "run")])
def test_default_study_folder_is_a_safe_name_inside_studies(name: str, folder: str) -> None:
    from pgolf.search.cli import _study_out

    out = _study_out(name)
    assert out.parent == Path("studies") and out.name.startswith(folder + "-") and ".." not in out.parts
