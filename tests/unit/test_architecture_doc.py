"""The docs describe the code that exists: every module is listed, every link and path resolves.

- README's "What is where" lists every module of `nemo_rl_fp16/` and no module that is gone;
- every relative Markdown link in README.md and docs/*.md reaches a file, and its `#anchor` a
  heading of that file (GitHub's slug rule);
- every repository path the docs name in backticks exists;
- nothing in the repository cites an upper-case `*.md` file the repository does not hold;
- docs/architecture.md's "How to add an engine" names every method of both engine protocols.
"""

import inspect
import re
from pathlib import Path

import pytest

from nemo_rl_fp16.interfaces import PolicyEngine, RolloutEngine

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "nemo_rl_fp16"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH_ROOTS = ("nemo_rl_fp16/", "tests/", "docs/", "scripts/", "benchmarks/", "recipes/", "launchers/", ".ci/")


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next `## ` heading or the end)."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def _modules() -> set[str]:
    return {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py") if p.name != "__init__.py"}


def test_readme_what_is_where_lists_every_module():
    section = _section((ROOT / "README.md").read_text(), "What is where")
    listed = set(re.findall(r"`([A-Za-z0-9_/]+\.py)`", section))
    missing = sorted(_modules() - listed)
    assert not missing, f"modules missing from README's What is where: {missing}"
    gone = sorted(listed - _modules())
    assert not gone, f"README's What is where lists modules that do not exist: {gone}"
    assert "(docs/architecture.md)" in section


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    out, seen = set(), {}
    in_code = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def _links():
    for md in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if not re.match(r"[a-z]+:", target):  # http(s):, mailto:
                yield md, target


def test_slug_rule():
    assert _slug("CPU numerics defined by the package: the same on every CPU") == \
        "cpu-numerics-defined-by-the-package-the-same-on-every-cpu"
    assert _slug("Megatron backend (`policy.backend=megatron`)") == "megatron-backend-policybackendmegatron"


@pytest.mark.parametrize("md,target", list(_links()), ids=lambda x: x.name if isinstance(x, Path) else x)
def test_doc_link_resolves(md, target):
    path, _, anchor = target.partition("#")
    dest = (md.parent / path).resolve() if path else md
    assert dest.exists(), f"{md.relative_to(ROOT)}: link to {target}: {path} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{md.relative_to(ROOT)}: link to {target}: no such heading in {path}"


def test_docs_link_somewhere():
    assert len(list(_links())) >= 10


def test_paths_named_in_docs_exist():
    stale = []
    for md in DOCS:
        for token in re.findall(r"`([^`\s]+)`", md.read_text()):
            path = token.split("::")[0].rstrip(".,;:")
            if path.startswith(PATH_ROOTS) and "*" not in path and "{" not in path and "<" not in path:
                if not (ROOT / path).exists():
                    stale.append(f"{md.relative_to(ROOT)}: {token}")
    assert not stale, stale


def test_no_citation_of_files_outside_the_repo():
    """An upper-case Markdown file name (a design or platform note) cited anywhere must be in the repo."""
    held = {p.name for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    texts = [*DOCS, *ROOT.glob("*.toml")]
    for folder in ("nemo_rl_fp16", "tests", "scripts", "benchmarks", "launchers", ".ci"):
        texts += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".md", "")]
    cited = []
    for f in texts:
        for name in set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", f.read_text(errors="replace"))):
            if name not in held:
                cited.append(f"{f.relative_to(ROOT)}: {name}")
    assert not cited, cited


def _protocol_methods(proto: type) -> set[str]:
    return {n for n, v in vars(proto).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_architecture_names_every_protocol_method():
    text = (ROOT / "docs" / "architecture.md").read_text()
    how = _section(text, "How to add an engine")
    for proto in (PolicyEngine, RolloutEngine):
        methods = _protocol_methods(proto)
        assert methods, proto
        missing = sorted(m for m in methods if f"`{m}`" not in how)
        assert not missing, f"docs/architecture.md 'How to add an engine' misses {proto.__name__}.{missing}"


def test_every_protocol_method_has_a_google_docstring():
    """The protocol is the contract: each method says what it returns (or raises) in its own section."""
    for proto in (PolicyEngine, RolloutEngine):
        for name in _protocol_methods(proto):
            doc = inspect.getdoc(getattr(proto, name)) or ""
            assert re.search(r"^(Returns|Raises|Args):$", doc, flags=re.M), f"{proto.__name__}.{name}: {doc[:60]!r}"
