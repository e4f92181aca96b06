"""No import circles inside the package (issue 15).

The graph: one node per module file of `nemo_rl_fp16` (a package is its `__init__.py`), one edge per
`import` / `from ... import` of another package module, read with `ast` (nothing is imported).

What counts as an edge (decided here, on purpose):

- module-level imports AND imports inside functions/methods both count: a function-level import
  only hides a circle until the function runs, it does not remove the dependency;
- imports under `if TYPE_CHECKING:` do not count: they never execute (annotations only);
- `from pkg import name` points at `pkg.name` when that is a module of the package, else at `pkg`;
- importing `a.b.c` does not add edges to the parent packages `a.b` / `a` (Python imports them
  first, but a submodule using a sibling through its parent package is not a circle in the design).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = "nemo_rl_fp16"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes of `tree`, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the package modules it imports (edges as the module docstring defines them)."""
    modules = modules or _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules and "." in t:  # `import a.b.func`-style tails
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Circles of `graph`, each as its modules with the first repeated at the end.

    For every module in a strongly connected component, the shortest circle through it (Tarjan,
    then BFS), each circle once (rotated to start at its smallest module name).
    """
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = set()
    for comp in sccs:
        for start in sorted(comp):
            cycle = _shortest_cycle(graph, comp, start)
            i = cycle.index(min(cycle[:-1]))  # one rotation per circle: it starts at its smallest module
            cycles.add(tuple(cycle[i:-1] + cycle[:i] + [cycle[i]]))
    return sorted(map(list, cycles))


def _shortest_cycle(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """Shortest path start -> ... -> start inside one strongly connected component (BFS)."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[0] != start:
                        path.insert(0, prev[path[0]])
                    return [*path, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no circle")


def test_graph_reads_module_level_function_level_relative_and_skips_type_checking(tmp_path):
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from nemo_rl_fp16 import b\n",
        "b.py": "def f():\n    from nemo_rl_fp16.sub import thing\n    from nemo_rl_fp16.sub import c\n",
        "sub/__init__.py": "from .c import thing\n",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nemo_rl_fp16 import a\n"
                    "import nemo_rl_fp16.b\nthing = 1\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    mods = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    g = import_graph(mods)
    assert g == {"nemo_rl_fp16": set(), "nemo_rl_fp16.a": {"nemo_rl_fp16.b"},
                 "nemo_rl_fp16.b": {"nemo_rl_fp16.sub", "nemo_rl_fp16.sub.c"}, "nemo_rl_fp16.sub": {"nemo_rl_fp16.sub.c"},
                 "nemo_rl_fp16.sub.c": {"nemo_rl_fp16.b"}}
    assert find_cycles(g) == [["nemo_rl_fp16.b", "nemo_rl_fp16.sub", "nemo_rl_fp16.sub.c", "nemo_rl_fp16.b"],
                              ["nemo_rl_fp16.b", "nemo_rl_fp16.sub.c", "nemo_rl_fp16.b"]]
    g["nemo_rl_fp16.sub.c"] = set()
    assert find_cycles(g) == []


def test_graph_sees_the_package():
    g = import_graph()
    assert "nemo_rl_fp16.precision.audit" in g and "nemo_rl_fp16.precision.policy" in g["nemo_rl_fp16.precision.audit"]
    assert len(g) > 40 and sum(map(len, g.values())) > 80


def test_no_import_circles_in_the_package():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
