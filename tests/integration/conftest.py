"""Every test under tests/integration carries the `integration` marker.

Integration tests run a whole recipe, a CLI subprocess or a torchrun launch end to end. They are
part of the README's test command (`python -m pytest -q`, which `.ci/run` runs verbatim); select or
skip them with `-m integration` / `-m 'not integration'`.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
