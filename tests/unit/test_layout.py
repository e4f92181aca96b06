"""The test suite's layout is a contract (issue 15).

- `tests/unit` mirrors the package: `tests/unit/<pkg path>/test_<module>.py` for every module with
  logic, or an entry in `TESTED_ELSEWHERE` saying which test file covers it;
- end-to-end runs (a whole recipe, a CLI subprocess, torchrun, a generated launcher script) live in
  `tests/integration`, every file marked `integration`; unit test files start no subprocess;
- CI (`.ci/run`, the README's test command) runs the integration tests too, and fails on pytest's
  exit code 5 (no test collected);
- every `tests/...` path the docs cite exists.
"""

import ast
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "nemo_rl_fp16"
UNIT, INTEGRATION = ROOT / "tests" / "unit", ROOT / "tests" / "integration"

# module (path under nemo_rl_fp16/) -> the test file(s) that cover it, where the mirror file does not exist
TESTED_ELSEWHERE = {
    "cli.py": ["tests/integration/test_cli_commands.py"],  # the CLI is its subprocess behaviour
    # thin commands (argument to function, exit code): their behaviour is the subprocess run
    "commands/doctor.py": ["tests/integration/test_doctor_command.py"],
    "commands/preflight.py": ["tests/integration/test_preflight_cli.py"],
    "commands/validate.py": ["tests/integration/test_validation_cli.py", "tests/unit/test_validation.py"],
    "data/problem.py": ["tests/unit/data/test_datasets.py"],  # a frozen dataclass
    "distributed/ray_engines.py": ["tests/unit/distributed/test_ray_run.py", "tests/integration/test_ray_runs.py"],
    "doctor_report.py": ["tests/unit/test_doctor.py"],
    "plan.py": ["tests/unit/test_validation.py"],  # the validation stage (plan.check_run)
    "plan_lines.py": ["tests/unit/test_validation.py", "tests/unit/policy/test_megatron_plan.py"],  # the plan's lines
    "policy/memory.py": ["tests/unit/policy/test_megatron_plan.py"],
    # megatron-core parallel state (init + the DP view): every megatron test runs through it, TP/EP in torchrun
    "policy/megatron/parallel.py": ["tests/integration/test_megatron_parallel.py",
                                    "tests/unit/policy/megatron/test_policy.py"],
    # HF export from a distributed checkpoint needs one written by 2 ranks (torchrun)
    "policy/megatron/dist_export.py": ["tests/integration/test_megatron_dist_checkpoint.py"],
    "rollout/vllm_engine.py": ["tests/vllm/test_vllm_engine.py"],  # needs vLLM: the separate job
    "rollout/vllm_worker.py": ["tests/vllm/test_vllm_engine.py"],
    "distributed/workers.py": ["tests/unit/distributed/test_ray_run.py", "tests/integration/test_ray_runs.py"],
    "doctor_probes.py": ["tests/unit/test_doctor.py", "tests/unit/policy/test_megatron_doctor.py"],
    "policy/megatron/pipeline.py": ["tests/integration/test_megatron_pipeline.py"],  # PP=2 needs 2 ranks (torchrun)
    "policy/megatron/adapter.py": ["tests/unit/policy/megatron/test_policy.py"],  # the policy's scoring path
    # finalize_model_grads over TP/DP: 2 ranks (torchrun)
    "policy/megatron/grad_sync.py": ["tests/integration/test_megatron_grad_sync.py"],
    "policy/megatron/refit_stream.py": ["tests/integration/test_megatron_refit_memory.py"],  # TP/EP=2 (torchrun)
    "rollout/refit_check.py": ["tests/vllm/test_vllm_engine.py"],  # the self-check runs on a live vLLM engine
    "rollout/vllm_refit.py": ["tests/vllm/test_vllm_engine.py", "tests/unit/rollout/test_vllm_sleep.py"],
    "trainer.py": ["tests/integration/test_rl_loop.py", "tests/unit/test_errors.py"],  # the loop needs a run
}
# unit test files that may start a subprocess, and why (nothing of the package runs in it)
SUBPROCESS_OK = {"test_launch.py": "`bash -n`: a syntax check of the generated batch script",
                 "test_layout.py": "bash runs the exit-status lines of .ci/run"}


def _has_logic(path: Path) -> bool:
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body)


def test_unit_folders_mirror_the_package():
    folders = {p.relative_to(UNIT) for p in UNIT.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert folders, "tests/unit has no sub-folders"
    stray = sorted(str(f) for f in folders if not (PKG / f / "__init__.py").exists())
    assert not stray, f"tests/unit folders with no package of that name under nemo_rl_fp16/: {stray}"


def test_every_module_with_logic_has_a_test_file():
    missing, covered = [], set()
    for mod in sorted(PKG.rglob("*.py")):
        rel = mod.relative_to(PKG)
        if mod.name == "__init__.py" or not _has_logic(mod):
            continue
        if (UNIT / rel.parent / f"test_{mod.stem}.py").exists():
            continue
        if str(rel) in TESTED_ELSEWHERE:
            covered.add(str(rel))
            gone = [t for t in TESTED_ELSEWHERE[str(rel)] if not (ROOT / t).exists()]
            assert not gone, f"{rel}: TESTED_ELSEWHERE names missing files {gone}"
            continue
        missing.append(f"{rel} (write tests/unit/{rel.parent / f'test_{mod.stem}.py'} or list it in TESTED_ELSEWHERE)")
    assert not missing, "modules with logic and no test file: " + "; ".join(missing)
    stale = sorted(set(TESTED_ELSEWHERE) - covered)
    assert not stale, f"TESTED_ELSEWHERE entries that now have a mirror test file or no module: {stale}"


def _pytestmark(tree: ast.Module) -> str | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return ast.unparse(node.value)
    return None


def test_integration_files_are_marked():
    files = sorted(INTEGRATION.glob("test_*.py"))
    assert len(files) >= 10, files
    unmarked = [f.name for f in files if _pytestmark(ast.parse(f.read_text())) != "pytest.mark.integration"]
    assert not unmarked, f"tests/integration files without `pytestmark = pytest.mark.integration`: {unmarked}"
    assert not list(INTEGRATION.rglob("conftest.py"))  # a second `conftest` module shadows tests/unit/policy's


def test_unit_tests_start_no_subprocess():
    offenders = []
    for f in sorted(UNIT.rglob("test_*.py")):
        tree = ast.parse(f.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        if imported & {"subprocess", "multiprocessing"} and f.name not in SUBPROCESS_OK:
            offenders.append(str(f.relative_to(ROOT)))
    assert not offenders, f"end-to-end tests belong in tests/integration: {offenders}"


def _pytest_ini() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def _selected(expr: str, markers: set[str]) -> bool:
    """Evaluate a `-m` expression (names, not/and/or, parentheses) for an item carrying `markers`."""
    tokens = re.findall(r"\(|\)|[\w.-]+", expr)
    py = " ".join(t if t in ("(", ")", "not", "and", "or") else str(t in markers) for t in tokens)
    return eval(py, {"__builtins__": {}})  # noqa: S307 - only True/False/not/and/or/parentheses


def test_integration_marker_is_registered_strict_and_selected_by_default():
    ini = _pytest_ini()
    assert any(m.startswith("integration:") for m in ini["markers"])
    addopts = ini["addopts"]
    assert "--strict-markers" in addopts.split()
    m = re.search(r"-m\s+'([^']*)'", addopts)
    expr = m.group(1) if m else ""
    assert _selected(expr, {"integration"}) and _selected(expr, set())  # the plain command runs both
    assert not _selected(expr, {"gpu"}) and not _selected("not integration", {"integration"})  # the evaluator works
    assert any(INTEGRATION == ROOT / p or INTEGRATION.is_relative_to(ROOT / p) for p in ini["testpaths"])


def test_ci_runs_the_readme_command_and_fails_when_no_test_ran(tmp_path):
    ci = (ROOT / ".ci" / "run").read_text()
    readme_cmd = re.findall(r"```bash\n(python3 -m venv .*)\n```", (ROOT / "README.md").read_text())[1]
    assert readme_cmd.endswith("python -m pytest -q") and readme_cmd in ci.splitlines()
    # the lines after the test command decide the exit status: run them for each pytest outcome
    tail = ci.split(readme_cmd, 1)[1].split("\n", 1)[1]
    assert "rc=$?" in tail.splitlines()[0]
    verdict = "\n".join(tail.splitlines()[1:])
    for rc, want in ((0, 0), (1, 1), (2, 2), (5, 1)):
        script = tmp_path / "tail.sh"
        script.write_text(f"start=$(date +%s)\n(exit {rc}); rc=$?\n{verdict}\n")
        got = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=10)
        assert got.returncode == want, (rc, got.stdout, got.stderr)
        assert ("no tests were collected" in got.stderr) == (rc == 5)


def test_test_paths_cited_in_the_docs_exist():
    cited = set()
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        cited |= {(md.name, p) for p in re.findall(r"\btests/[\w/.-]*\w", md.read_text())}
    gone = sorted(f"{doc}: {p}" for doc, p in cited if not (ROOT / p).exists())
    assert not gone, f"docs cite test paths that do not exist: {gone}"
