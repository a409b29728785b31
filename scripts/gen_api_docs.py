"""Write docs/api.md from the docstrings, so the reference never drifts from the code.

    python scripts/gen_api_docs.py          # rewrite docs/api.md
    python scripts/gen_api_docs.py --check  # exit 1, with a diff, if docs/api.md is stale

Each section is a module's docstring, then an entry per public name: its signature and its
docstring (classes with their documented public methods and properties). Docstrings are written
in Markdown with Google-style sections (``Args:``, ``Returns:``, ``Raises:``, ...), which become
bold headings with bullet lists; reST roles (``:func:`x```) and double backticks become code
spans. No dependency beyond the library itself (tests/test_docs.py runs ``--check``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
API_MD = ROOT / "docs" / "api.md"

# (title, module, names): the reading order. names None: the module's __all__; [] the module's
# docstring alone.
SECTIONS = [
    ("NSAConfig", "nsa_flex.config", ["NSAConfig"]),
    ("attend", "nsa_flex.api", ["attend", "NSAAux", "BACKENDS"]),
    ("Block selection", "nsa_flex.selection", ["select_blocks", "block_scores"]),
    ("nsa_flex.scoring", "nsa_flex.scoring", ["block_importance", "straight_through_score_mod"]),
    ("nsa_flex.top_n", "nsa_flex.top_n", ["top_n_blocks"]),
    ("nsa_flex.block_indices", "nsa_flex.block_indices", ["sort_unique_blocks"]),
    ("SparseAttention", "nsa_flex.module", ["SparseAttention"]),
    ("nsa_flex.rotary", "nsa_flex.rotary", ["RotaryEmbedding", "rotate_half"]),
    ("nsa_flex.buckets", "nsa_flex.buckets", None),
    ("Compression", "nsa_flex.compression", ["mean_compress", "BlockCompressor", "block_view"]),
    ("nsa_flex.masks", "nsa_flex.masks", None),
    ("nsa_flex.reference", "nsa_flex.reference", None),
    ("Inference", "nsa_flex.inference", ["NSACache", "prefill", "decode_step"]),
    ("Context parallelism", "nsa_flex.distributed", None),
    ("nsa_flex.varlen", "nsa_flex.varlen", ["Documents", "documents", "compressed_cu_seqlens"]),
    ("nsa_flex.triton_backend", "nsa_flex.triton_backend", ["selected_attention", "invert_selection", "available"]),
    ("nsa_flex.dispatch", "nsa_flex.dispatch", ["plan", "Paths"]),
    ("nsa_flex.testing", "nsa_flex.testing", []),
    ("nsa_flex.ops", "nsa_flex.ops", []),
    ("nsa_flex.bench", "nsa_flex.bench", []),
]

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc):`(~?)([^`]+)`")
SECTION = re.compile(r"^(?:(Args|Returns|Raises):\s*(.*)|(Attributes|Shapes|Examples?|Note):\s*)$")
ITEM = re.compile(r"^ {4}(\S.*)$")
MORE = re.compile(r"^ {8,}(\S.*)$")
NAMED = re.compile(r"^([A-Za-z_][\w.]*(?:, [A-Za-z_][\w.]*)*):( .*|)$")


def _role(m: re.Match) -> str:
    """A reST role as a code span: ``:func:`~a.b``` is `b`, ``:func:`a.b``` is `a.b`."""
    return f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`"


def _prose(lines: list[str]) -> list[str]:
    """Docstring lines outside code fences: roles and double backticks as code spans, Google
    sections as bold headings whose entries are bullets."""
    out, in_section = [], False
    for line in lines:
        line = ROLE.sub(_role, line).replace("``", "`")
        head = SECTION.match(line)
        if head:
            title, rest = head.group(1) or head.group(3), head.group(2)
            out += ["", f"**{title}:**" + (f" {rest}" if rest else ""), ""]
            in_section = True
            continue
        if in_section and (m := MORE.match(line)):
            out.append(f"  {m.group(1)}")
        elif in_section and (m := ITEM.match(line)):
            item = m.group(1)
            if (named := NAMED.match(item)):  # "q, k: text" -> "`q`, `k`: text"
                names = ", ".join(f"`{n.strip()}`" for n in named.group(1).split(","))
                item = f"{names}:{named.group(2)}"
            out.append(f"- {item}")
        else:
            if line.strip():
                in_section = False
            out.append(line)
    return out


def to_markdown(doc: str | None) -> str:
    """A docstring as Markdown (code fences kept as written)."""
    if not doc:
        return ""
    out, prose, fence = [], [], False
    for line in doc.splitlines():
        if line.lstrip().startswith("```"):
            if not fence:
                out += _prose(prose)
                prose = []
            out.append(line.strip() if not fence else line.strip())
            fence = not fence
        elif fence:
            out.append(line)
        else:
            prose.append(line)
    out += _prose(prose)
    text = "\n".join(out).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def signature(name: str, obj, method: bool = False) -> str:
    """``name(arguments)``, defaults shown, annotations left to the docstring (``self`` left out
    of a method's)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    if method:
        params = params[1:]
    text = f"{name}{sig.replace(parameters=params, return_annotation=inspect.Signature.empty)}"
    if len(text) <= 100:
        return text
    first, rest = text.split("(", 1)
    return first + "(\n" + textwrap.fill(rest[:-1], 96, initial_indent="    ", subsequent_indent="    ") + "\n)"


def _members(cls):
    """Documented public methods and properties of ``cls``, in source order."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property) and member.__doc__:
            yield name, member, True
        elif inspect.isfunction(member) and member.__doc__:
            yield name, member, False


def entry(module: str, name: str, obj) -> str:
    if inspect.ismodule(obj):
        return ""
    if not (inspect.isclass(obj) or callable(obj)):
        return f"### {name}\n\n```\n{name} = {obj!r}\n```"
    parts = [f"### {name}", "", "```", signature(name, obj), "```", "", to_markdown(inspect.getdoc(obj))]
    if inspect.isclass(obj):
        for member_name, member, is_property in _members(obj):
            head = f"{name}.{member_name}" if is_property else signature(f"{name}.{member_name}", member, method=True)
            parts += ["", f"#### {name}.{member_name}", "", "```", head, "```", "",
                      to_markdown(inspect.getdoc(member))]
    return "\n".join(parts).rstrip()


def render() -> str:
    package = importlib.import_module("nsa_flex")
    parts = [
        "<!-- Generated by scripts/gen_api_docs.py from the docstrings: edit those, then rerun it. -->",
        to_markdown(inspect.getdoc(package)),
    ]
    for title, module_name, names in SECTIONS:
        module = importlib.import_module(module_name)
        parts += [f"## {title}", to_markdown(inspect.getdoc(module))]
        for name in module.__all__ if names is None else names:
            text = entry(module_name, name, getattr(module, name))
            if text:
                parts.append(text)
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the docstrings")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        old = API_MD.read_text() if API_MD.exists() else ""
        if old != text:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                       "docs/api.md", "from the docstrings"))
            print("\ndocs/api.md is stale: run python scripts/gen_api_docs.py")
            return 1
        return 0
    API_MD.write_text(text)
    print(f"wrote {API_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
