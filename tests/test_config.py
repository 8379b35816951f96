"""Stacks: schema, inheritance, overrides, every error at once with its key path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BASELINE, REPO, SP1024

from pgolf.registry import ConfigError, PgolfError
from pgolf.registry.api.config import load_stack, stack_from_dict


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_baseline_stack_equals_the_challenge_defaults() -> None:
    rs = load_stack(BASELINE)
    m, t, o = rs.stack.model, rs.stack.train, rs.stack.optim
    assert (m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_hidden) == (
        1024, 9, 512, 8, 4, 1024)  # fmt: skip
    assert (m.tie_embeddings, m.tied_embed_init_std, m.rope_base, m.logit_softcap, m.qk_gain_init) == (
        True, 0.005, 10000.0, 30.0, 1.5)  # fmt: skip
    assert (t.train_seq_len, t.train_batch_tokens, t.iterations, t.max_wallclock_seconds) == (
        1024,
        524288,
        20000,
        600,
    )
    assert (t.warmdown_iters, t.warmup_steps, t.val_loss_every, t.train_log_every, t.grad_clip_norm) == (
        1200, 20, 1000, 200, 0.0)  # fmt: skip
    assert (o.matrix_lr, o.scalar_lr, o.tied_embed_lr, o.embed_lr, o.head_lr) == (
        0.04,
        0.04,
        0.05,
        0.6,
        0.008,
    )
    assert (o.muon_momentum, o.muon_momentum_warmup_start, o.muon_momentum_warmup_steps, o.muon_backend_steps) == (
        0.95, 0.85, 500, 5)  # fmt: skip
    assert (o.beta1, o.beta2, o.adam_eps) == (0.9, 0.95, 1e-8)
    assert rs.stack.seed == 1337 and rs.stack.export.artifact_limit == 16_000_000
    assert rs.technique_names() == ["int8_rowwise", "zlib"]
    q = rs.techniques[0].params
    assert q.clip_percentile == 99.99984  # type: ignore[attr-defined]
    assert rs.stack.export.passthrough_max_numel == 65536 and rs.stack.export.passthrough_dtype == "fp16"
    assert rs.techniques[1].params.level == 9  # type: ignore[attr-defined]


def test_child_inherits_and_overrides_one_level(tmp_path: Path) -> None:
    child = write(
        tmp_path / "c.yaml", f"base: {BASELINE}\nmodel: {{num_layers: 11}}\ntechniques: {{xsa: {{}}}}\n"
    )
    rs = load_stack(child, ["model.mlp_mult=3", "techniques.xsa.layers=last(2)", "train.device=cpu"])
    assert rs.stack.model.num_layers == 11 and rs.stack.model.model_dim == 512
    assert rs.stack.model.mlp_mult == 3.0 and rs.stack.train.device == "cpu"
    assert rs.techniques[0].params.layers.dump() == "last(2)"  # type: ignore[attr-defined]


def test_a_technique_set_to_null_is_removed(tmp_path: Path) -> None:
    write(tmp_path / "p.yaml", "techniques: {xsa: {}, ema: {decay: 0.99}}\n")
    child = write(tmp_path / "c.yaml", "base: p.yaml\ntechniques: {xsa: null, ema: {}}\n")
    rs = load_stack(child)
    assert rs.technique_names() == ["ema", "int8_rowwise", "zlib"]
    assert rs.techniques[0].params.decay == 0.99  # type: ignore[attr-defined]
    assert load_stack(child, ["techniques.ema=null"]).technique_names() == ["int8_rowwise", "zlib"]


def test_base_chains_of_any_depth(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "a.yaml",
        "seed: 1\nmodel: {num_layers: 3, model_dim: 64}\ntechniques: {ema: {decay: 0.9}}\n",
    )
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\nmodel: {num_layers: 4}\ntechniques: {xsa: {}}\n")
    c = write(tmp_path / "c.yaml", "base: sub/b.yaml\nseed: 3\ntechniques: {ema: {decay: 0.95}}\n")
    rs = load_stack(c)
    assert (rs.stack.seed, rs.stack.model.num_layers, rs.stack.model.model_dim) == (3, 4, 64)
    techs = {r.name: r.params for r in rs.techniques}
    assert "xsa" in techs and techs["ema"].decay == 0.95  # type: ignore[attr-defined]
    # the README's example: a stack on top of quickstart, which has a base of its own
    q = write(tmp_path / "q.yaml", f"base: {REPO / 'stacks' / 'quickstart.yaml'}\nmodel: {{num_layers: 2}}\n")
    qs = load_stack(q).stack
    assert (qs.model.num_layers, qs.model.model_dim, qs.train.train_seq_len) == (2, 128, 256)


def test_base_cycles_are_named(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml → b\.yaml → c\.yaml → a\.yaml"):
        load_stack(tmp_path / "a.yaml")
    me = write(tmp_path / "me.yaml", "base: me.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: me\.yaml → me\.yaml"):
        load_stack(me)


@pytest.mark.parametrize(
    ("text", "compile_", "autocast"),
    [("compile: off\n  autocast: off", "off", "off"), ("compile: on\n  autocast: on", "on", "bf16"),
     ("compile: no\n  autocast: yes", "off", "bf16"), ("compile: false\n  autocast: true", "off", "bf16"),
     ("compile: 'off'\n  autocast: bf16", "off", "bf16")],
)  # fmt: skip
def test_yaml_booleans_switch_compile_and_autocast(
    tmp_path: Path, text: str, compile_: str, autocast: str
) -> None:
    f = write(tmp_path / "s.yaml", f"train:\n  {text}\n")
    t = load_stack(f).stack.train
    assert (t.compile, t.autocast) == (compile_, autocast)
    assert load_stack(f, ["train.compile=off"]).stack.train.compile == "off"


def test_threads_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        stack_from_dict({"train": {"threads": 0}})
    assert (
        list(problems_of(e)) == ["train.threads"]
        and "'auto' or a whole number" in problems_of(e)["train.threads"]
    )


def test_every_problem_is_reported_at_once_with_key_paths(tmp_path: Path) -> None:
    f = write(
        tmp_path / "bad.yaml",
        "model: {num_layers: 0, model_dim: wide, num_hedas: 8}\n"
        "train: {iterations: -1}\n"
        "techniques:\n  bigram_hsh: {}\n  xsa: {layers: last(4), strength: 2}\n  ema: {decay: 1.5}\n"
        "trian: {}\n",
    )
    with pytest.raises(ConfigError) as e:
        load_stack(f)
    p = problems_of(e)
    assert "greater than or equal to 1 (got 0)" in p["model.num_layers"]
    assert "valid integer" in p["model.model_dim"] and "'wide'" in p["model.model_dim"]
    assert p["model.num_hedas"] == "unknown key (did you mean 'num_heads'?)"
    assert "greater than or equal to 0 (got -1)" in p["train.iterations"]
    assert "unknown technique 'bigram_hsh' (did you mean 'bigram_hash'?)" in p["techniques.bigram_hsh"]
    assert p["techniques.xsa.strength"] == "unknown key"
    assert "less than 1 (got 1.5)" in p["techniques.ema.decay"]
    assert p["trian"].startswith("unknown key (did you mean 'train'?)")
    assert str(f) in str(e.value) and "8 problems" in str(e.value)


def test_layer_selector_out_of_range_names_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        stack_from_dict({"model": {"num_layers": 4}, "techniques": {"xsa": {"layers": [2, 7]}}})
    assert problems_of(e) == {"techniques.xsa.layers": "layer 7 is out of range for num_layers=4"}
    with pytest.raises(ConfigError, match="expected 'all', 'none'"):
        stack_from_dict({"techniques": {"xsa": {"layers": "lats(3)"}}})


def test_cross_field_shape_checks() -> None:
    with pytest.raises(ConfigError) as e:
        stack_from_dict({"model": {"model_dim": 100, "num_heads": 8}, "train": {"micro_batch_tokens": 1000}})
    p = problems_of(e)
    assert "model_dim=100 must be divisible by num_heads=8" in p["model"]
    assert "must be a multiple of train_seq_len=1024" in p["train"]


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    f = write(tmp_path / "broken.yaml", "model:\n  num_layers: 9\n  model_dim: [512\n")
    with pytest.raises(ConfigError) as e:
        load_stack(f)
    assert "broken.yaml" in str(e.value) and "malformed YAML at line" in str(e.value)


def test_duplicate_yaml_keys_are_rejected(tmp_path: Path) -> None:
    f = write(tmp_path / "dup.yaml", "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_stack(f)


def test_override_syntax_errors() -> None:
    with pytest.raises(PgolfError, match="expected KEY.PATH=VALUE"):
        load_stack(BASELINE, ["model.num_layers"])
    with pytest.raises(PgolfError, match="model.num_layers is not a mapping"):
        load_stack(BASELINE, ["model.num_layers.x=1"])


def test_missing_stack_file() -> None:
    with pytest.raises(PgolfError, match="stack file 'nope.yaml' does not exist"):
        load_stack("nope.yaml")


def test_data_path_requires_tokenizer_and_is_made_absolute(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer is required"):
        stack_from_dict({"data": {"path": "x"}})
    shutil.copyfile(SP1024, tmp_path / "tok.model")
    rs = stack_from_dict({"data": {"path": "shards", "tokenizer": "tok.model"}}, base_dir=tmp_path)
    assert Path(rs.stack.data.path or "").is_absolute()
    assert rs.stack.data.tokenizer == str(tmp_path / "tok.model") and rs.stack.model.vocab_size == 1024


def test_the_vocabulary_follows_the_tokenizer(tmp_path: Path) -> None:
    sp4096 = SP1024.parent / "fineweb_4096_bpe.model"
    for tokenizer, data, size in (("sp8192", {}, 8192), ("SP4096", {}, 4096), (None, {}, 1024),
                                  (str(sp4096), {"path": str(tmp_path)}, 4096),
                                  ("sp1024", {"path": str(tmp_path)}, 1024)):  # fmt: skip
        rs = stack_from_dict({"data": {"tokenizer": tokenizer, **data}})
        assert rs.stack.model.vocab_size == rs.spec.vocab_size == size, tokenizer
    assert stack_from_dict({"data": {"tokenizer": "sp1024", "path": "x"}}).stack.data.tokenizer == "sp1024"
    # an explicit vocabulary must agree with the tokenizer; without one it is the embedded corpus's size
    assert stack_from_dict({"model": {"vocab_size": 64}}).stack.model.vocab_size == 64
    assert stack_from_dict({"model": {"vocab_size": 8192}, "data": {"tokenizer": "sp8192"}})
    for raw, key, words in (
        ({"model": {"vocab_size": 1024}, "data": {"tokenizer": "sp8192"}}, "model.vocab_size", "8192 pieces"),
        ({"model": {"vocab_size": 1024}, "data": {"tokenizer": str(sp4096), "path": "x"}}, "model.vocab_size",
         "fineweb_4096_bpe.model has 4096 pieces; remove model.vocab_size"),
        ({"data": {"tokenizer": "missing.model", "path": "x"}}, "data.tokenizer", "does not exist"),
        ({"data": {"tokenizer": str(sp4096)}}, "data", "data.path is null"),
        ({"data": {"tokenizer": "sp4"}}, "data", "8 … 65536"),
        ({"model": {"vocab_size": 100000}}, "model.vocab_size", "8 … 65536"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as exc:
            stack_from_dict(raw, base_dir=tmp_path)
        assert words in problems_of(exc)[key], raw


def test_resolved_yaml_reloads_to_the_same_stack(tmp_path: Path) -> None:
    rs = load_stack(REPO / "stacks" / "first_five.yaml")
    out = write(tmp_path / "resolved.yaml", rs.to_yaml())
    again = load_stack(out)
    assert again.hash() == rs.hash()
    assert again.technique_names() == rs.technique_names()
    xsa = {
        "layers": "last(4)",
        "gated": False,
        "gate_init": 0.0,
        "repeats": True,
    }  # every param, defaults included
    assert yaml.safe_load(out.read_text())["techniques"]["xsa"] == xsa


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "stacks").glob("*.yaml")))
def test_every_example_stack_validates(name: str) -> None:
    load_stack(REPO / "stacks" / name)
