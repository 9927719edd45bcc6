"""The export's errors: bad input (exit code 2 in the CLI) and a failed verification (exit code 1)."""
from __future__ import annotations

from longtrain.errors import UserError


class ExportError(UserError, ValueError):
    """A checkpoint or output that cannot be exported; the message says which path and what to do."""


class VerificationError(ExportError):
    """The written folder does not reproduce the checkpoint's model (exit code 1 in the CLI)."""
