"""The one exception type for bad user input, and how entry points report it."""

import logging
import sys
from typing import NoReturn


class UserError(Exception):
    """Bad config, data or checkpoint: the message alone tells the user what to fix (no stack trace)."""


def exit_with(error: UserError) -> NoReturn:
    """Report the error on one line (Hydra's logging sends it to the console and the run's log file) and exit
    with status 2. SystemExit passes through Hydra's own exception handler, so no stack trace is printed."""
    logger = logging.getLogger("mtmm")
    if logging.getLogger().hasHandlers():
        logger.error("error: %s", error)
    else:
        print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)
