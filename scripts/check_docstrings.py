"""Check that every public function in the package documents its interface (Google style).

For each public function or method of a public class in ``nemo_rl_fp16/`` (name not starting with
``_``; ``__init__`` and ``__call__`` count, ``__init__`` may document its arguments in the class
docstring, as ruff's D107 ignore in pyproject.toml expects):

- with parameters (other than ``self``/``cls``): an ``Args:`` section;
- returning something other than None (a ``return <value>`` in its own body, or a return
  annotation other than ``None``): a ``Returns:`` section (``Yields:`` for generators and
  ``@contextmanager``); properties are exempt (their docstring describes the attribute);
- with an explicit ``raise X`` in its own body (not a bare re-raise, not an abstract stub that
  only raises NotImplementedError): a ``Raises:`` section.

ruff's D417 (on under the Google convention) then checks that an ``Args:`` section names every
parameter. ``--list`` prints every gap; the exit status is 1 when any public function has one.

Usage: ``python scripts/check_docstrings.py [--list]``.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nemo_rl_fp16"

_SECTION = re.compile(r"^\s*(Args|Arguments|Returns|Yields|Raises):\s*$", re.MULTILINE)


def _sections(doc: str | None) -> set[str]:
    found = set(_SECTION.findall(doc or ""))
    return {"Args" if s == "Arguments" else s for s in found}


def _own_nodes(fn: ast.AST):
    """Yield the nodes of ``fn``'s body, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _decorator_names(fn) -> set[str]:
    names = set()
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        if isinstance(d, ast.Attribute):
            names.add(d.attr)
        elif isinstance(d, ast.Name):
            names.add(d.id)
    return names


def _is_abstract_stub(fn) -> bool:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def _gaps(fn, method: bool, class_doc: str | None) -> list[str]:
    decos = _decorator_names(fn)
    if "overload" in decos or "setter" in decos:
        return []
    doc = ast.get_docstring(fn)
    have = _sections(doc)
    if fn.name == "__init__":
        have |= _sections(class_doc)
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    if method and "staticmethod" not in decos and params:
        params = params[1:]
    if fn.args.vararg:
        params.append("*" + fn.args.vararg.arg)
    if fn.args.kwarg:
        params.append("**" + fn.args.kwarg.arg)
    nodes = list(_own_nodes(fn))
    gaps = []
    if doc is None and fn.name != "__init__":
        gaps.append("docstring")
    if params and "Args" not in have:
        gaps.append("Args")
    if "property" not in decos and fn.name != "__init__":
        generator = "contextmanager" in decos or any(isinstance(n, ast.Yield | ast.YieldFrom) for n in nodes)
        returns_value = any(
            isinstance(n, ast.Return)
            and n.value is not None
            and not (isinstance(n.value, ast.Constant) and n.value.value is None)
            for n in nodes
        )
        ann = fn.returns
        annotated = ann is not None and not (
            (isinstance(ann, ast.Constant) and ann.value in (None, "None"))
            or (isinstance(ann, ast.Name) and ann.id in ("None", "NoReturn", "Never"))
        )
        if generator:
            if not have & {"Yields", "Returns"}:
                gaps.append("Yields")
        elif (returns_value or annotated) and "Returns" not in have:
            gaps.append("Returns")
    raises = any(isinstance(n, ast.Raise) and n.exc is not None for n in nodes)
    if raises and not _is_abstract_stub(fn) and "Raises" not in have:
        gaps.append("Raises")
    return gaps


def _top_level(body):
    """Yield module-level statements, descending into if/try blocks (not into defs)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _top_level(part)
        else:
            yield node


def _public(name: str) -> bool:
    return not name.startswith("_") or name in ("__init__", "__call__")


def check_file(path: Path, root: Path = PACKAGE) -> list[tuple[str, int, str, list[str]]]:
    """Return ``(file relative to root, line, qualified name, missing sections)`` for each gap in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root).as_posix()
    out = []
    for node in _top_level(tree.body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            gaps = _gaps(node, method=False, class_doc=None)
            if gaps:
                out.append((rel, node.lineno, node.name, gaps))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            class_doc = ast.get_docstring(node)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and _public(item.name):
                    gaps = _gaps(item, method=True, class_doc=class_doc)
                    if gaps:
                        out.append((rel, item.lineno, f"{node.name}.{item.name}", gaps))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the check; return the exit status (1 when a public function has a gap)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print every gap, not only the count")
    args = ap.parse_args(argv)
    gaps = [gap for path in sorted(PACKAGE.rglob("*.py")) for gap in check_file(path)]
    print(f"{len(gaps)} public functions with undocumented Args/Returns/Raises")
    if args.list:
        for rel, line, name, missing in gaps:
            print(f"  nemo_rl_fp16/{rel}:{line} {name}: missing {', '.join(missing)}")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
