"""A one-line progress bar on stderr: long jobs (preprocessing, generation, prediction) show signs of life."""

from __future__ import annotations

import sys
import time


class Progress:
    """`done/total, rate, eta`, redrawn in place on a terminal and every 10% in a log file."""

    def __init__(self, total: int, label: str, unit: str = "images") -> None:
        self.total, self.label, self.unit = total, label, unit
        self.done = 0
        self.start = self.last_draw = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.next_log = 0.1

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty and now - self.last_draw > 0.2:
            self._draw(now, end="\r")
        elif not self.tty and self.total and self.done / self.total >= self.next_log:
            self.next_log += 0.1
            self._draw(now, end="\n")

    def close(self) -> float:
        """Draw the final line; returns the elapsed seconds."""
        now = time.perf_counter()
        self._draw(now, end="\n")
        return now - self.start

    def _draw(self, now: float, end: str) -> None:
        self.last_draw = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        print(f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} {rate:,.0f}/s "
              f"{elapsed:.0f}s elapsed, {eta:.0f}s left   ", end=end, file=sys.stderr, flush=True)
