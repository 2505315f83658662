"""Ctrl-C and SIGTERM during a search: the trials stop and the search's state is saved for --resume."""

from __future__ import annotations

import os
import signal
import threading


class GracefulStop:
    """Ctrl-C or SIGTERM during `fit`: Ray Tune's own graceful stop (SIGUSR1), which stops the trials
    and saves the search's state for --resume. A second signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set signal handlers; Tune then sets none either
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune would not tell us it was interrupted
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._before_tune)
        return self

    @staticmethod
    def _before_tune(number: int, frame) -> None:
        raise KeyboardInterrupt  # a stop before Tune has set up its own handler: nothing to save yet

    def _handle(self, number: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = number
        os.kill(os.getpid(), signal.SIGUSR1)

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
