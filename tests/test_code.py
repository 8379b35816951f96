"""Counted code: every file a run executes is counted, plugins included, or the plugin is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BASELINE, tiny_stack

from pgolf.registry import REGISTRY
from pgolf.registry.api.config import load_stack, stack_from_dict
from pgolf.registry.run.code import (
    LZMA_FILTERS,
    VERIFICATION_MODULES,
    WRAPPER_HEAD,
    WRAPPER_TAIL,
    CodeCountError,
    counted_files,
    files_count,
    wrapped_size,
)

PLUGIN = '''
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import {helper}  # noqa: E402

from pgolf.registry import Technique, hook, register  # noqa: E402


@register("{name}")
class Local(Technique):
    """A local technique that uses a helper module from its folder."""

    @hook
    def on_step(self, state):
        {helper}.bump(step)
'''


def _classes(rs: object) -> list[type]:
    return [r.cls for r in rs.techniques]  # type: ignore[attr-defined]


def test_the_core_count_includes_package_inits_and_the_progress_display() -> None:
    names = {f.name for f in counted_files(_classes(load_stack(BASELINE)))}
    for must in ("pgolf/registry/__init__.py", "pgolf/registry/run/__init__.py", "pgolf/registry/api/__init__.py",
                 "pgolf/registry/tools/__init__.py", "pgolf/registry/tools/progress.py",
                 "pgolf/registry/run/code.py", "pgolf/techniques/__init__.py", "pgolf/techniques/zlib.py"):  # fmt: skip
        assert must in names, must
    assert "pgolf/registry/tools/cli.py" not in names and "pgolf/techniques/xsa.py" not in names


def test_the_corpus_builder_is_counted_only_with_the_default_corpus() -> None:
    classes = _classes(load_stack(BASELINE))
    with_path = files_count(classes)
    default = files_count(classes, default_corpus=True)
    corpus = next(f for f in default.entries if f.name == "pgolf/registry/tools/corpus.py")
    assert "pgolf/registry/tools/corpus.py" not in with_path.files
    assert default.source_bytes - with_path.source_bytes == corpus.bytes == len(corpus.path.read_bytes())
    assert default.bytes > with_path.bytes


def test_code_bytes_count_the_core_and_the_techniques_used() -> None:
    plain = files_count(_classes(load_stack(BASELINE)))
    with_xsa = files_count(_classes(stack_from_dict({"techniques": {"xsa": {}}})))
    xsa = next(f for f in with_xsa.entries if f.name == "pgolf/techniques/xsa.py")
    sources = [f.path.read_text(encoding="utf-8").encode() for f in with_xsa.entries]
    assert with_xsa.source_bytes == sum(len(x) for x in sources)
    assert with_xsa.source_bytes - plain.source_bytes == xsa.bytes and plain.sha256 != with_xsa.sha256
    # the counted bytes are those of the self-extracting script of every counted file
    assert with_xsa.bytes == wrapped_size(b"\n".join(sources)) < with_xsa.source_bytes
    assert with_xsa.bytes > plain.bytes


def test_the_counted_size_is_the_size_of_a_script_that_runs_the_sources(tmp_path: Path) -> None:
    import base64
    import lzma
    import subprocess
    import sys

    source = b"import math\nprint(sum(math.isqrt(i) for i in range(1000)))\n" * 20
    blob = base64.b85encode(lzma.compress(source, format=lzma.FORMAT_ALONE, filters=list(LZMA_FILTERS)))
    script = WRAPPER_HEAD + blob + WRAPPER_TAIL
    (tmp_path / "s.py").write_bytes(script)
    out = subprocess.run([sys.executable, str(tmp_path / "s.py")], capture_output=True, check=True)
    assert out.stdout.decode().split() == ["20584"] * 20
    assert wrapped_size(source) == len(script)


RUN_AND_LIST = """
import json, sys
from pathlib import Path
from pgolf.registry.api.config import stack_from_dict
from pgolf.registry.run.pipeline import run
rs = stack_from_dict(json.loads(sys.argv[1]))
out = Path(sys.argv[2]); out.mkdir()
r = run(rs, out, estimate=False)
loaded = sorted(n for n, m in list(sys.modules.items()) if n.startswith("pgolf.") and getattr(m, "__file__", None))
print(json.dumps({"loaded": loaded, "counted": r.code_files}))
"""


@pytest.mark.parametrize("corpus", ["default", "path"])
def test_every_pgolf_module_a_run_loads_is_counted(
    corpus: str, cache_dir: Path, text_dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    data_dir, _ = text_dataset
    data = {"cache_dir": str(cache_dir)} if corpus == "default" else {
        "path": str(data_dir), "tokenizer": str(data_dir / "tokenizer.model")}  # fmt: skip
    stack = tiny_stack(data=data, techniques={"xsa": {}})
    stack["train"].update(iterations=1, threads=1)
    proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST, json.dumps(stack), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    used = {"xsa", "int8_rowwise", "zlib"}
    expected_uncounted = {f"pgolf.techniques.{n}" for n in REGISTRY.names() if n not in used}
    expected_uncounted |= set(VERIFICATION_MODULES)  # the legality probes verify the run, not make it
    # helpers shared by built-in techniques (pgolf.techniques._rowquant): loaded with the unused ones
    expected_uncounted |= {n for n in got["loaded"] if n.startswith("pgolf.techniques._")}
    if corpus == "path":
        expected_uncounted.add("pgolf.registry.tools.corpus")  # imported, but builds nothing
    counted = set(got["counted"])
    uncounted = {
        n for n in got["loaded"]
        if n.replace(".", "/") + ".py" not in counted and n.replace(".", "/") + "/__init__.py" not in counted
    }  # fmt: skip
    assert uncounted <= expected_uncounted, uncounted - expected_uncounted
    assert ("pgolf/registry/tools/corpus.py" in counted) == (corpus == "default")


def _load_plugin(
    folder: Path, name: str, helper: str, helper_src: str = "def bump(step):\n    return step\n"
) -> type:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{helper}.py").write_text(helper_src)
    f = folder / f"{name}.py"
    f.write_text(PLUGIN.format(name=name, helper=helper))
    REGISTRY.load_file(f)
    return REGISTRY.get(name)


def test_a_local_plugin_and_the_helper_it_imports_from_its_folder_are_counted(tmp_path: Path) -> None:
    cls = _load_plugin(tmp_path / "plug", "trust_counted_plugin", "trust_counted_helper")
    count = files_count([cls])
    by_name = {f.name: f for f in count.entries}
    assert {"plugins/trust_counted_plugin.py", "plugins/trust_counted_helper.py"} <= set(by_name)
    assert by_name["plugins/trust_counted_helper.py"].local_plugin
    helper_bytes = len((tmp_path / "plug" / "trust_counted_helper.py").read_bytes())
    core = files_count([])
    plugin_bytes = len((tmp_path / "plug" / "trust_counted_plugin.py").read_bytes())
    assert count.source_bytes == core.source_bytes + plugin_bytes + helper_bytes


def test_a_helper_imported_only_inside_a_function_is_counted_too(tmp_path: Path) -> None:
    folder = tmp_path / "lazy"
    folder.mkdir()
    (folder / "trust_lazy_helper.py").write_text("X = 1\n")
    (folder / "trust_lazy_plugin.py").write_text(
        PLUGIN.format(name="trust_lazy_plugin", helper="math").replace(
            "math.bump(step)", "import trust_lazy_helper\n        return trust_lazy_helper.X"
        )
    )
    REGISTRY.load_file(folder / "trust_lazy_plugin.py")
    names = files_count([REGISTRY.get("trust_lazy_plugin")]).files
    assert "plugins/trust_lazy_helper.py" in names


def test_a_plugin_importing_uncountable_local_code_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "trust_far_helper.py").write_text("def bump(step):\n    return step\n")
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "trust_far_plugin.py").write_text(
        PLUGIN.format(name="trust_far_plugin", helper="trust_far_helper").replace(
            "Path(__file__).parent", "Path(__file__).parent.parent / 'elsewhere'"
        )
    )
    REGISTRY.load_file(plug / "trust_far_plugin.py")
    with pytest.raises(CodeCountError, match=r"trust_far_helper.*neither in the plugin's own folder"):
        files_count([REGISTRY.get("trust_far_plugin")])


def test_a_plugin_that_loads_code_dynamically_is_refused(tmp_path: Path) -> None:
    plug = tmp_path / "dyn"
    cls = _load_plugin(plug, "trust_dynamic_plugin", "trust_dynamic_helper",
                       "import importlib\nmod = importlib.import_module('json')\ndef bump(step):\n    return step\n")  # fmt: skip
    with pytest.raises(CodeCountError, match=r"trust_dynamic_helper.py:2: .*importlib.import_module"):
        files_count([cls])


def test_check_refuses_an_uncountable_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pgolf.registry.tools.cli import main

    plug = tmp_path / "p"
    _load_plugin(
        plug, "trust_exec_plugin", "trust_exec_helper", "exec('x = 1')\ndef bump(step):\n    return step\n"
    )
    stack = tiny_stack(plugins=[str(plug / "trust_exec_plugin.py")], techniques={"trust_exec_plugin": {}})
    f = tmp_path / "s.yaml"
    f.write_text(json.dumps(stack))
    assert main(["check", str(f), "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert "loads code dynamically (exec())" in err and "Traceback" not in err
