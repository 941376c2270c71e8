"""The one error convention of every `pasta-fed` command.

`pasta-fed <command>: error: <problem>` on stderr, then exit 2 when the input is bad (a
file, a config key, an argument: argparse's own code for a bad command line) and 1 when
the work itself failed or found a problem (a ledger that disagrees with its audit log).
It lives in `synth`, the bottom of the import graph, so that every package's CLI uses it.
"""
from __future__ import annotations

import sys

BAD_INPUT, FAILED = 2, 1


def fail(command: str, problem: object, code: int = BAD_INPUT) -> int:
    """Print the error line for `command` (e.g. "client ledger") and return the exit code."""
    print(f"pasta-fed {command}: error: {problem}", file=sys.stderr)
    return code
