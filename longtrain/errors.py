"""One error convention for every ``longtrain`` command (README "Exit codes").

A :class:`UserError` is a problem the user can fix (bad input, bad config, a damaged or missing file):
its message is one line that names the file, line or config key and says what to do. Commands print
it as ``longtrain <command>: error: <message>`` without a traceback and exit with
:data:`EXIT_BAD_INPUT`. This module imports nothing heavy: data prep (which never imports torch)
uses it too.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1  # `longtrain export --verify`: the written folder does not reproduce the checkpoint
EXIT_BAD_INPUT = 2  # bad input, bad config or a damaged file: nothing was changed
EXIT_DIVERGED = 3  # `longtrain train`: training diverged (non-finite or spiking loss); checkpoints before it are kept
EXIT_INTERRUPTED = 130  # Ctrl-C


class UserError(Exception):
    """Bad input or configuration; the message names what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT
    """What the command exits with; a subclass may say otherwise (``longtrain.divergence.DivergenceError``: 3)."""


def prints_errors() -> bool:
    """Whether this process reports a user error. One line per job, not one per rank: rank 0 reports,
    and so does the first rank of every other node (a file missing on one node shows there)."""
    rank, local_rank = os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    return rank == "0" or local_rank == "0"


def report(prog: str, message: str) -> None:
    if prints_errors():
        rank = os.environ.get("RANK", "0")
        prefix = "" if rank == "0" else f"[rank {rank}] "
        print(f"{prefix}{prog}: error: {message}", file=sys.stderr, flush=True)


def run_command(prog: str, action: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a command's action; a UserError becomes one line on stderr and its exit code (2 unless the
    error class says otherwise), Ctrl-C the line ``interrupted`` and exit code 130."""
    try:
        return int(action() or 0)
    except UserError as exc:
        report(prog, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        report(prog, interrupted)
        return EXIT_INTERRUPTED
