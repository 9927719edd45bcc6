"""eval's bad input (a UserError: one line, exit 2 in the CLI); a ValueError too, as before."""
from __future__ import annotations

from longtrain.errors import UserError


class EvalError(UserError, ValueError):
    """A MODEL, --data or option eval cannot use; the message says which and what to do."""


class EvalLoadError(EvalError):
    """A MODEL argument could not be loaded."""
