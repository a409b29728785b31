"""docs/api.md is the docstrings, rendered (scripts/gen_api_docs.py), and its examples run."""

import contextlib
import importlib.util
import io
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_md_is_generated_from_the_docstrings():
    # stale api.md (a docstring changed, the page not regenerated): the diff is printed
    assert _generator().main(["--check"]) == 0, "docs/api.md is stale: run python scripts/gen_api_docs.py"


def test_the_check_sees_a_stale_page(tmp_path, monkeypatch, capsys):
    gen = _generator()
    stale = tmp_path / "api.md"
    stale.write_text(gen.render().replace("Notation used throughout", "Notation"))
    monkeypatch.setattr(gen, "API_MD", stale)
    assert gen.main(["--check"]) == 1
    assert "-Notation:\n" in capsys.readouterr().out


def _examples():
    text = (ROOT / "docs" / "api.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _expected(block: str) -> list[str]:
    """What each ``print`` of an example says it prints: its ``# `` comment, or the comment
    line after it."""
    lines = block.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("print("):
            if "  # " in line:
                out.append(line.split("  # ", 1)[1].strip())
            elif i + 1 < len(lines) and lines[i + 1].startswith("# "):
                out.append(lines[i + 1][2:].strip())
    return out


@pytest.mark.parametrize("index", range(len(_examples())))
def test_api_md_examples_run(index):
    block = _examples()[index]
    printed = io.StringIO()
    # a module of its own: torch.compile (FlexAttention traces the mods) looks it up by name
    module = types.ModuleType(f"api_example_{index}")
    sys.modules[module.__name__] = module
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(block, f"docs/api.md example {index}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    expected = _expected(block)
    assert expected, "an example should say what it prints"
    assert printed.getvalue().splitlines()[: len(expected)] == expected
