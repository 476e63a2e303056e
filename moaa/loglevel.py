"""$MOAA_LOG_LEVEL, the one level setting of every moaa process: the servers' logs, the CLI's, and whether a
command's progress display is shown (above INFO it is not)."""
from __future__ import annotations

import logging
import os

from moaa.errors import UserError

LEVEL_ENV = "MOAA_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def env_level() -> int | None:
    """The level $MOAA_LOG_LEVEL names (any case), None when unset; anything else is a usage error."""
    value = os.environ.get(LEVEL_ENV, "").strip()
    if not value:
        return None
    if value.upper() not in LEVELS:
        raise UserError(f"{LEVEL_ENV}={value!r} is not a log level: use one of {', '.join(LEVELS)}")
    return getattr(logging, value.upper())
