#!/usr/bin/env python
"""Generate the keys reference of docs/recipes.md from the comments in recipes/base.yaml.

    python scripts/gen_recipes_doc.py            # rewrite the generated block in docs/recipes.md
    python scripts/gen_recipes_doc.py --check    # exit 1 if docs/recipes.md is stale (CI / tests)

The block sits between `<!-- keys:begin -->` and `<!-- keys:end -->`; one table row per key of
base.yaml: dotted key, default, and the inline comment (continuation comment lines appended).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "nemo_rl_fp16" / "recipes" / "base.yaml"
DOC = ROOT / "docs" / "recipes.md"
BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def _scalar(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def keys_reference(text: str) -> str:
    """Markdown table of every key in a base.yaml text (see module doc)."""
    rows: list[list[str]] = []
    stack: list[tuple[int, str]] = []
    last_indent = -1
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            indent = len(line) - len(line.lstrip())
            if rows and indent > last_indent:  # continuation of the previous key's comment
                rows[-1][2] = f"{rows[-1][2]} {stripped.lstrip('#').strip()}".strip()
            continue
        m = _LINE.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m["key"]])
        value = m["value"].strip()
        if not value:  # a section: children follow
            stack.append((indent, m["key"]))
        if value.startswith("{"):  # inline mapping: a section row + one row per child
            rows.append([key, "", (m["comment"] or "").strip()])
            rows += [[f"{key}.{k}", _scalar(v), ""] for k, v in yaml.safe_load(value).items()]
        else:
            rows.append([key, value, (m["comment"] or "").strip()])
        last_indent = indent
    out = ["| key | default | meaning |", "|---|---|---|"]
    for key, value, comment in rows:
        cell = f"`{value}`" if value else "(section)"
        out.append(f"| `{key}` | {cell} | {comment.replace('|', '/')} |")
    return "\n".join(out)


def render(doc: str, base_text: str) -> str:
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{keys_reference(base_text)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doc = DOC.read_text()
    new = render(doc, BASE.read_text())
    if "--check" in argv:
        if new != doc:
            print("docs/recipes.md is stale: run python scripts/gen_recipes_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
