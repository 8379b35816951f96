"""The script specialised to its stack: only code no run of the stack reaches goes, and what is
left computes what the original computed."""

from __future__ import annotations

import textwrap
from typing import Any

from pgolf.registry.tools.specialize import specialize

HOOK_SITES = {
    "embed": "embed",
    "norm": "norm",
    "calibrate": "calibrate",
    "score": "scorer",
    "compress": "codec",
}
SITE_HOOKS = {"embed": ("embed",), "norm": ("norm",), "calibrate": ("calibrate",), "scorer": ("score",),
              "codec": ("compress",)}  # fmt: skip


def spec(source: str, implemented: set[str] = frozenset(), keep: tuple[str, ...] = ("main",)) -> str:  # type: ignore[assignment]
    return specialize(textwrap.dedent(source), implemented=implemented, hook_sites=HOOK_SITES,
                      site_hooks=SITE_HOOKS, keep=keep, sites_table="SITES")  # fmt: skip


def run(source: str, *args: Any) -> Any:
    ns: dict[str, Any] = {}
    exec(compile(textwrap.dedent(source), "<test>", "exec"), ns)
    return ns["main"](*args)


class Sites:
    """A dispatcher over techniques that implement nothing (as in a stack without them)."""

    def __init__(self, calls: list[str]):
        self.calls = calls

    def chain(self, hook: str, **kw: Any) -> list[Any]:
        self.calls.append(hook)
        return []

    implementers = chain

    def event(self, hook: str, **kw: Any) -> None:
        self.calls.append(hook)

    def slot(self, hook: str, default: Any, **kw: Any) -> Any:
        self.calls.append(hook)
        return default()

    def filler(self, site: str) -> None:
        self.calls.append(site)


PROGRAM = """
def helper(x, scale=1, verbose=False):
    if verbose:
        print("never")
    return x * scale

def unused_helper():
    return 42

def main(sites, x):
    out = []
    for m in sites.chain("embed", x=x):
        out.append(m)
    sites.event("calibrate", x=x)
    norm = sites.slot("norm", lambda: "rms", layer=0)
    scorer = sites.filler("scorer")
    done = sites.implementers("compress")
    if not done:
        out.append("plain")
    if scorer is not None:
        out.append("scored")
    else:
        out.append("default")
    return [*out, norm, helper(x), helper(x, 3)]
"""


def test_unimplemented_hooks_fold_to_their_defaults_and_the_result_is_unchanged() -> None:
    calls: list[str] = []
    expected = run(PROGRAM, Sites(calls), 2)
    assert calls == ["embed", "calibrate", "norm", "scorer", "compress"]
    out = spec(PROGRAM)
    calls = []
    assert run(out, Sites(calls), 2) == expected == ["plain", "default", "rms", 2, 6]
    assert calls == []  # no dispatch left
    assert "unused_helper" not in out and "verbose" not in out and "print" not in out
    assert "scored" not in out and "scale" in out  # a parameter passed a different value stays


def test_implemented_hooks_and_impure_calls_are_left_alone() -> None:
    out = spec(PROGRAM, implemented={"embed", "compress", "norm", "score"})
    assert 'sites.chain("embed"' in out.replace("'", '"') and "sites.implementers(" in out
    assert "sites.slot(" in out and "sites.filler(" in out and "sites.event" not in out
    impure = spec("""
    def main(sites, f):
        return sites.chain("embed", x=f())
    """)
    assert "sites.chain(" in impure  # dropping the call would drop f()


def test_a_list_that_is_mutated_is_not_treated_as_empty() -> None:
    source = """
    def main(n):
        parts = []
        for i in range(n):
            parts.append(i)
        if parts:
            return parts
        return None
    """
    out = spec(source)
    assert run(out, 3) == run(source, 3) == [0, 1, 2] and "parts.append" in out


def test_a_function_passed_as_a_value_keeps_its_parameters() -> None:
    source = """
    def f(x, flag=False):
        return x + 1 if flag else x

    def main(x):
        g = f
        return f(x), g(x, True)
    """
    out = spec(source)
    assert run(out, 1) == run(source, 1) == (1, 2) and "flag" in out


def test_the_site_table_keeps_the_sites_the_code_names() -> None:
    source = """
    SITES = {"embed": 1, "norm": 2, "scorer": 3}
    def main(sites):
        return SITES["norm"], sites.chain("embed")
    """
    out = spec(source)
    assert "'norm'" in out and "'embed'" not in out and "'scorer'" not in out


def test_statements_after_return_and_empty_loops_go() -> None:
    source = """
    def main(sites):
        if not sites.implementers("calibrate"):
            return 0
        total = 0
        for t in sites.implementers("calibrate"):
            total += 1
        return total
    """
    out = spec(source)
    assert run(out, Sites([])) == run(source, Sites([])) == 0 and "total" not in out


def test_unread_parameters_and_stores_go_with_the_arguments_that_pass_them() -> None:
    source = """
    class Sites:
        def __init__(self, techniques):
            self.techniques = list(techniques)

    def stream(x, *, sites=None, extra=None):
        sites = sites or Sites(())
        unused = set()
        for step in reversed(sites.implementers("calibrate")):
            x = step(x)
        return x + 1

    def main(x, sites):
        return stream(x, sites=sites, extra=[x])
    """
    out = spec(source)
    assert run(out, 1, Sites([])) == run(source, 1, Sites([])) == 2
    assert "extra" not in out and "unused" not in out and "sites" not in out.split("def main")[0]


def test_a_call_that_may_be_a_library_method_keeps_its_arguments() -> None:
    source = """
    class Box:
        def split(self, sep=None):
            return ("box", sep)

    def main(text):
        return Box().split(sep=","), text.split(sep=",")
    """
    out = spec(source)
    assert run(out, "a,b") == run(source, "a,b") == (("box", ","), ["a", "b"])
