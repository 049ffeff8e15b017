"""The autotuner's logger and warning class.

Choices are logged on the ``autotune`` logger at INFO; :func:`enable_stderr_log` (called when the provider's
``<PREFIX>_AUTOTUNE_LOG=1`` is set) attaches a stderr handler so they show without configuring logging.
Problems a user should fix (an unreadable cache, an unwritable directory) are :class:`AutotuneWarning` warnings,
each issued once per file.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("autotune")


class AutotuneWarning(UserWarning):
    """The cache or a profile could not be used as it is; the message says what was done instead."""


_handler: logging.Handler | None = None


def enable_stderr_log() -> None:
    """Show the ``autotune`` logger's INFO messages on stderr (idempotent)."""
    global _handler
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(_handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
