"""`nemo llm rl|mismatch|demo ...`: the package's commands under NVIDIA's `nemo` command (nemo-run).

    nemo llm rl recipe=grpo_fp16 trainer.max_steps=3 precision=bf16 dry_run=true

behaves exactly like `nemo-rl-fp16 rl ...`: the words after the command go unchanged to
`nemo_rl_fp16.cli.main`, the exit code is kept, and nothing asks "Continue? [y/N]".

How it is wired (written against nemo-run 0.11.1; the extra pins it):
- pyproject registers this module as entry point `llm` of group `nemo_run.cli`; `nemo llm ...`
  imports it, and each `@run.cli.entrypoint(namespace="llm")` below registers one command
  (name = function name). Another package's `llm` commands (nemo-toolkit) merge with these.
- `enable_executor=False` selects nemo-run's plain command (no executor options, no confirmation
  prompt, no "Configuring global options" line). That command hands the raw words (`ctx.args`) to
  `Entrypoint._execute_simple`, which would parse them against the function signature with
  nemo-run's own (fiddle) parser; `_PassThrough` overrides only that private method and passes
  the words straight on. If a nemo-run upgrade renames it, `nemo llm rl ...` fails loudly; the
  test in tests/unit/test_nemo_cli.py runs it end to end.

This is the only module that imports nemo_run; the rest of the package never needs it.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

try:
    import nemo_run as run
    from nemo_run.cli.api import Entrypoint
except ImportError as e:  # nemo-run, or one of its own imports, is missing
    raise ImportError(f"`nemo llm ...` needs nemo-run ({e}); install it with: pip install 'nemo-rl-fp16[nemo]'") from e

NEMO_RUN_VERSION_TESTED = "0.11.1"


class _PassThrough(Entrypoint):
    """A nemo-run command whose arguments go verbatim to the function; it exits with its return."""

    # Private API of nemo-run 0.11.1 (nemo_run/cli/api.py, Entrypoint._add_simple_command calls
    # `self._execute_simple(ctx.args, console)` and turns any Exception into "Error: ..." on
    # stdout with exit 1). SystemExit is not an Exception, so the exit code passes through.
    def _execute_simple(self, args: list[str], console=None) -> None:
        try:
            rc = self.fn(*args)
        except Exception:  # same as the console script: a traceback on stderr, exit 1
            traceback.print_exc()
            rc = 1
        sys.exit(rc)


def _main(command: str, args: Sequence[str]) -> int:
    from nemo_rl_fp16.cli import main

    return main([command, *args])


def _command(fn):
    return run.cli.entrypoint(fn, namespace="llm", enable_executor=False, entrypoint_cls=_PassThrough)


@_command
def rl(*args: str) -> int:
    """RL fine-tuning (GRPO and relatives) in FP16 end to end: recipe=NAME key=value ... [dry_run=true].

    Args:
        *args (str): `key=value` words, as `nemo-rl-fp16 rl`.

    Returns:
        int: the exit code (`cli.run_command`).
    """
    return _main("rl", args)


@_command
def mismatch(*args: str) -> int:
    """Offline training-inference mismatch check across precisions: recipe=NAME key=value ....

    Args:
        *args (str): `key=value` words, as `nemo-rl-fp16 mismatch`.

    Returns:
        int: the exit code (`cli.run_command`).
    """
    return _main("mismatch", args)


@_command
def demo(*args: str) -> int:
    """CPU sanity demo, fp16 vs bf16 side by side: [key=value ...].

    Args:
        *args (str): `key=value` words, as `nemo-rl-fp16 demo`.

    Returns:
        int: the exit code (`cli.run_command`).
    """
    return _main("demo", args)
