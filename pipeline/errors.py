"""User-facing errors: one line naming what is wrong and how to fix it, exit code 2."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """A mistake in the user's input (config, data, paths); never a bug in the engine."""


class ConfigError(UserError):
    """An invalid or impossible configuration value."""


class DataError(UserError):
    """A data file that is missing, malformed or inconsistent with the model."""


def say(error: Exception | str, every_rank: bool = False) -> None:
    """Print the error as one line on stderr.

    Under torchrun every rank finds the same configuration mistake; only local rank 0 says it,
    unless the error is the rank's own (`every_rank`, e.g. a peer that stopped answering).
    """
    if every_rank or os.environ.get("LOCAL_RANK", "0") == "0":
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr, flush=True)


def exit_with(error: Exception, code: int = EXIT_USER_ERROR, every_rank: bool = False) -> NoReturn:
    """Print the error as one line on stderr (see `say`) and exit (code 2: the user's mistake)."""
    say(error, every_rank)
    sys.exit(code)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def disk_error(error: OSError, run_dir: str | Path) -> str | None:
    """'no space left on device writing PATH; ...' for a full, read-only or forbidden file system, else None.

    A failed write() names no file (only open() does): the run directory stands in for it then.
    """
    if error.errno not in _FULL + _UNWRITABLE:
        return None
    fix = "free space there or pick another hydra.run.dir" if error.errno in _FULL else "pick a writable hydra.run.dir"
    return f"{os.strerror(error.errno).lower()} writing {error.filename or run_dir}; {fix}"


def run_command(command: Callable[[Any], int], args: Any) -> int:
    """A command-line tool's body: its result, or for a UserError one line on stderr and exit 2."""
    try:
        return command(args)
    except UserError as err:
        exit_with(err)
