"""scripts/check_docstrings.py: the package's public functions document Args/Returns/Raises."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _checker():
    spec = importlib.util.spec_from_file_location("check_docstrings", ROOT / "scripts" / "check_docstrings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_package_public_functions_document_their_interface(capsys):
    assert _checker().main([]) == 0, capsys.readouterr().out


def test_checker_finds_each_kind_of_gap(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(textwrap.dedent('''
        from contextlib import contextmanager

        def no_args(x):
            """Summary only."""

        def no_returns(x):
            """Summary.

            Args:
                x: a value.
            """
            return x + 1

        def no_raises():
            """Summary."""
            raise ValueError("bad")

        def reraise_only():
            """A bare re-raise is not an explicit raise."""
            try:
                pass
            except OSError:
                raise

        @contextmanager
        def scope():
            """Summary."""
            yield

        def complete(x) -> int:
            """Summary.

            Args:
                x: a value.

            Returns:
                x.

            Raises:
                ValueError: never for ints.
            """
            if not isinstance(x, int):
                raise ValueError(x)
            return x

        def stub(x) -> int:
            """An abstract stub that only raises NotImplementedError needs no Raises section.

            Args:
                x: a value.

            Returns:
                x, in an implementation.
            """
            raise NotImplementedError

        class Thing:
            """A thing.

            Args:
                n: size.
            """

            def __init__(self, n):
                self.n = n

            @property
            def size(self) -> int:
                """The size (properties need no Returns section)."""
                return self.n

            def grow(self, by):
                return self.n + by

        class _Private:
            def hidden(self, x):
                return x
    '''))
    gaps = {name: missing for _, _, name, missing in _checker().check_file(src, root=tmp_path)}
    assert gaps == {
        "no_args": ["Args"],
        "no_returns": ["Returns"],
        "no_raises": ["Raises"],
        "scope": ["Yields"],
        "Thing.grow": ["docstring", "Args", "Returns"],
    }
