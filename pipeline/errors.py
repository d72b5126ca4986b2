"""User-facing errors: one line naming what is wrong and how to fix it, exit code 2."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input (config, data, paths); never a bug in the engine."""


class ConfigError(UserError):
    """An invalid or impossible configuration value."""


class DataError(UserError):
    """A data file that is missing, malformed or inconsistent with the model."""


def exit_with(error: UserError) -> NoReturn:
    """Print the error as one line on stderr and exit with code 2."""
    message = " ".join(str(error).split("\n"))
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
