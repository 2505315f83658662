"""Ray's and MLflow's own log lines during a search go to driver.log in its run folder, not onto the
console, where the search's live view is (`run --verbose` leaves them on the console).

Lines logged before Tune has made the run folder (Ray starting, the MLflow store being created) are
held and written once it has: a run folder that exists already is refused, so nothing may create it
earlier. A run that ends before then shows its held warnings on the console instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

LIBRARY_LOGGERS = ("ray", "mlflow", "alembic")
OWN = "ich_tune.driver_log"  # ich_tune's lines for the file alone: worker output that is no message
FILE_NAME = "driver.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def driver_log() -> logging.Logger:
    """The logger whose lines go to driver.log alone during a search."""
    return logging.getLogger(OWN)


class _Held(logging.Handler):
    """Keeps records until there is a file to write them to."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class DriverLog:
    """While entered, the libraries' loggers (and `driver_log()`) write to a held buffer, then to the
    file that `open` names; their own handlers come back on exit."""

    def __init__(self) -> None:
        self._held = _Held()
        self._file: logging.FileHandler | None = None
        self._saved: dict[str, tuple[list[logging.Handler], bool, int]] = {}
        self.path: Path | None = None

    def __enter__(self) -> DriverLog:
        for name in (*LIBRARY_LOGGERS, OWN):
            logger = logging.getLogger(name)
            self._saved[name] = (logger.handlers[:], logger.propagate, logger.level)
            logger.handlers = [self._held]
            logger.propagate = False
        driver_log().setLevel(logging.INFO)
        return self

    def open(self, path: Path) -> None:
        """From now on into `path` (appended: a --resume adds to it), the held lines first."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.FileHandler(path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(FORMAT))
        for record in self._held.records:
            self._file.handle(record)
        self._held.records.clear()
        for name in self._saved:
            logging.getLogger(name).handlers = [self._file]
        self.path = path

    def __exit__(self, *exc) -> None:
        for name, (handlers, propagate, level) in self._saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate, logger.level = handlers, propagate, level
        for record in self._held.records:  # the run ended before its folder existed
            if record.levelno >= logging.WARNING:
                logging.getLogger(record.name).handle(record)
        if self._file is not None:
            self._file.close()
