"""Every `nemo-rl-fp16 ...` command shown in README.md and docs/ parses and plans (dry run)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _doc_commands():
    cmds = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", md.read_text(), flags=re.S):
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("nemo-rl-fp16 ") and line.split()[1] in ("rl", "mismatch", "demo", "launch", "rehearse"):
                    cmds.append((md.name, line.split()[1:]))
    return cmds


def test_docs_show_commands():
    assert len(_doc_commands()) >= 8


@pytest.mark.parametrize("doc,args", _doc_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:60])
def test_documented_command_dry_runs(doc, args, tmp_path):
    # model.name_or_path / data.path in docs point at the user's files: the dry run may refuse those
    # (environment) lines only; config, layout and precision must pass
    if args[0] == "launch":  # writes the sbatch script under tmp_path, never submits
        args = [a for a in args if not a.startswith("submit=")]
        r = subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", *args, "submit=false"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, f"{doc}: {' '.join(args)}\n{r.stderr}"
        assert "\nsbatch " in r.stdout
        return
    r = subprocess.run([sys.executable, "-m", "nemo_rl_fp16.cli", *args, "dry_run=true"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if r.returncode == 2:  # the dry run checks what the run needs: only this machine may lack it
        env_only = ("does not exist; allowed:", "which is not installed;", "torch sees no CUDA device")
        lines = r.stderr.strip().splitlines()
        assert lines and all(any(m in line for m in env_only) for line in lines), f"{doc}: {' '.join(args)}\n{r.stderr}"
        return
    assert r.returncode == 0, f"{doc}: {' '.join(args)}\n{r.stderr}"
    assert "# plan" in r.stdout
