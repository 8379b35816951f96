"""The technique registry: hook checks at registration, names, plugins, ordering, slots."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from pgolf.registry import REGISTRY, Params, PgolfError, Technique, hook
from pgolf.registry.api.technique import Registry, Resolved, order_techniques, resolve_techniques


def make(**attrs: Any) -> type[Technique]:
    return type("T", (Technique,), attrs)


def test_hook_with_unknown_name_is_rejected_with_suggestion() -> None:
    def atn_out(self: Any, layer: int) -> None:
        return None

    with pytest.raises(PgolfError, match=r"'atn_out' is not a hook \(did you mean 'attn_out'\?\)"):
        Registry().add("bad", make(atn_out=hook(atn_out)))


def test_hook_with_extra_argument_names_technique_hook_and_signature() -> None:
    def attn_out(self: Any, layer: int, depth: int) -> None:
        return None

    with pytest.raises(PgolfError) as e:
        Registry().add("bad", make(attn_out=hook(attn_out)))
    msg = str(e.value)
    assert "'bad'" in msg and "'attn_out'" in msg and "'depth'" in msg and "attn_out(self, layer)" in msg


def test_hook_may_not_take_varargs() -> None:
    def on_step(self: Any, **kw: Any) -> None:
        return None

    with pytest.raises(PgolfError, match="may not take"):
        Registry().add("bad", make(on_step=hook(on_step)))


def test_hook_taking_a_subset_is_called_with_only_those_arguments() -> None:
    seen: list[Any] = []

    def on_step(self: Any, state: Any) -> None:
        seen.append(state)

    cls = make(on_step=hook(on_step))
    Registry().add("subset", cls)
    assert cls.hooks == {"on_step": ("state",)}
    cls(Params(), None).call("on_step", model=nn.Linear(1, 1), state=7)  # type: ignore[arg-type]
    assert seen == [7]


def test_a_site_must_be_filled_whole() -> None:
    def compress(self: Any, data: bytes) -> bytes:
        return data

    with pytest.raises(PgolfError, match="fills the 'codec' site with compress but not decompress"):
        Registry().add("half_codec", make(compress=hook(compress)))


def test_every_site_is_a_slot_chain_or_event_of_one_plan_with_known_hooks() -> None:
    from pgolf.registry import HOOKS, SITES

    for name, site in SITES.items():
        assert site.plan in ("model", "optimizer", "schedule", "data", "train", "export", "eval"), name
        assert site.kind.split()[0] in ("slot", "chain", "event"), name
        assert site.required and all(HOOKS[h.name].site == name for h in site.hooks), name
        if site.exclusive:
            assert site.default and site.default != "-", f"slot {name} needs a stated default"


def test_duplicate_name_is_an_error_unless_overridden() -> None:
    reg = Registry()
    a, b = make(), make()
    reg.add("dup", a)
    with pytest.raises(PgolfError, match="registered twice"):
        reg.add("dup", b)
    reg.add("dup", b, override=True)
    assert reg._entries["dup"] is b


def test_names_must_be_snake_case() -> None:
    with pytest.raises(PgolfError, match="snake_case"):
        Registry().add("BigramHash", make())


def test_builtin_technique_name_must_match_its_file() -> None:
    cls = make()
    cls.__module__ = "pgolf.techniques.some_file"
    with pytest.raises(PgolfError, match="techniques/other.py"):
        Registry().add("other", cls)


def test_unknown_technique_suggests_close_names() -> None:
    with pytest.raises(PgolfError, match=r"unknown technique 'bigram_hsh' \(did you mean 'bigram_hash'\?\)"):
        REGISTRY.get("bigram_hsh")


def test_builtins_are_loaded_from_the_package() -> None:
    assert {"bigram_hash", "xsa", "leaky_relu_sq", "ema", "brotli", "zlib", "int8_rowwise"} <= set(
        REGISTRY.names()
    )


PLUGIN_SRC = '''
from pgolf.registry import Params, Technique, hook, register

@register("{name}")
class Local(Technique):
    """A local test technique."""
    @hook
    def on_step(self, state):
        pass
'''


def test_local_plugin_file_registers_its_techniques(tmp_path: Path) -> None:
    f = tmp_path / "my_tech.py"
    f.write_text(PLUGIN_SRC.format(name="local_file_tech_a"))
    assert REGISTRY.load_file(f) == ["local_file_tech_a"]
    assert REGISTRY.get("local_file_tech_a").summary() == "A local test technique."
    assert REGISTRY.load_file(f) == ["local_file_tech_a"]  # loading twice is harmless


def test_broken_local_plugin_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken_tech.py"
    f.write_text("import not_a_module_anywhere\n")
    with pytest.raises(PgolfError, match=r"broken_tech.py' failed to import: ModuleNotFoundError"):
        REGISTRY.load_file(f)


def test_broken_entry_point_does_not_break_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = importlib.metadata.EntryPoints(
        [importlib.metadata.EntryPoint("broken_ep", "not_a_module_anywhere:Thing", "pgolf.techniques")]
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps)
    monkeypatch.setattr(REGISTRY, "_entry_points_loaded", False)
    monkeypatch.setattr(REGISTRY, "_broken", {})
    REGISTRY.load_entry_points()
    assert "xsa" in REGISTRY.names()
    assert "broken_ep" in REGISTRY.broken()
    with pytest.raises(PgolfError, match="plugin entry point broken_ep = not_a_module_anywhere:Thing failed"):
        REGISTRY.get("broken_ep")


def _resolved(name: str, **attrs: Any) -> Resolved:
    cls = make(**attrs)
    cls.name = name
    return Resolved(name, cls, Params())


def test_order_follows_before_and_after_and_keeps_stack_order_otherwise() -> None:
    chosen = [
        _resolved("a"),
        _resolved("b", after=("c",)),
        _resolved("c"),
        _resolved("d", before=("a",)),
    ]
    assert [r.name for r in order_techniques(chosen)] == ["c", "b", "d", "a"]


def test_order_cycle_is_reported() -> None:
    with pytest.raises(PgolfError, match="cycle among: x, y"):
        order_techniques([_resolved("x", before=("y",)), _resolved("y", before=("x",))])


def test_resolve_adds_slot_defaults_and_rejects_two_codecs() -> None:
    ordered, problems = resolve_techniques({"xsa": {}})
    assert problems == []
    assert [r.name for r in ordered] == ["xsa", "int8_rowwise", "zlib"]
    assert [r.implicit for r in ordered] == [False, True, True]
    _, problems = resolve_techniques({"brotli": {}, "zlib": {}})
    assert problems == [("techniques", "techniques 'brotli' and 'zlib' both fill the slot 'codec'; keep one")]
    ordered, problems = resolve_techniques({"brotli": {}, "xsa": {}})
    assert [r.name for r in ordered] == ["brotli", "xsa", "int8_rowwise"] and problems == []


def test_requires_and_conflicts_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    needs = make(requires=("ema",))
    clash = make(conflicts=("xsa",))
    monkeypatch.setitem(REGISTRY._entries, "needs_ema", needs)
    monkeypatch.setitem(REGISTRY._entries, "hates_xsa", clash)
    _, problems = resolve_techniques({"needs_ema": {}, "hates_xsa": {}, "xsa": {}})
    assert ("techniques.needs_ema", "requires technique 'ema'; add it to the stack") in problems
    assert ("techniques.hates_xsa", "conflicts with technique 'xsa'; remove one of them") in problems


def test_legality_tags_come_from_a_fixed_vocabulary() -> None:
    Registry().add("fine", make(legality=("score_first",)))
    with pytest.raises(
        PgolfError, match=r"unknown legality tag\(s\) \['legal_enough'\]; allowed: score_first"
    ):
        Registry().add("vague", make(legality=("legal_enough",)))
    Registry().add("known_bad", make(legality=("illegal",)))
