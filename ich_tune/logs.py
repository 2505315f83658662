"""What ich_tune says to the user goes through `logging.getLogger(__name__)` in each module; this puts
one handler on the package's logger that prints those lines to stdout as they are, so the CLI (and
each Ray worker that trains a trial) shows what `print` used to show."""

from __future__ import annotations

import logging
import sys

PACKAGE = "ich_tune"


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever sys.stdout is when a line is emitted (a test may swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def to_stdout() -> None:
    """Print ich_tune's info lines and above, each message as it is; once per process."""
    logger = logging.getLogger(PACKAGE)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library that configures the root logger must not print them twice
