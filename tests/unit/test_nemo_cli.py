"""`nemo llm rl ...` (nemo-run's `nemo` command) behaves like `nemo-rl-fp16 rl ...`.

The end-to-end tests need the `nemo` extra and the package pip-installed (the `nemo_run.cli`
entry point `llm` lives in the installed metadata); they skip when nemo_run is not importable.
"""

from __future__ import annotations

import importlib
import sys

import pytest


def test_import_without_nemo_run_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo_run", None)  # makes `import nemo_run` fail
    monkeypatch.delitem(sys.modules, "nemo_rl_fp16.nemo_cli", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'nemo-rl-fp16\[nemo\]'"):
        importlib.import_module("nemo_rl_fp16.nemo_cli")
