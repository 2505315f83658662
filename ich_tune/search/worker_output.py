"""A Ray worker's own output (its progress lines, warnings, tracebacks) into a file of its own.

Ray forwards what a worker writes to its stdout and stderr to the driver's console, where the lines
of concurrent trials interleave with Ray's. Here the file descriptors themselves are redirected, so
the output of C extensions and child processes (data loader workers) lands in the file too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

STDOUT, STDERR = 1, 2


@contextlib.contextmanager
def output_to(path: Path, errors: Path | None = None, echo: bool = False) -> Iterator[None]:
    """This process's stdout into `path` and its stderr into `errors` (default: `path` too), both
    appended; with `echo` also where they went before (Ray's forwarding, under `run --verbose`).
    An exception leaving the block is written there first; the descriptors are restored on exit."""
    targets = {STDOUT: path, STDERR: errors or path}
    files = {target: open(target, "ab", buffering=0) for target in set(targets.values())}  # noqa: SIM115
    _flush()
    saved = {fd: os.dup(fd) for fd in targets}
    copiers = []
    try:
        for fd, target in targets.items():
            if echo:
                copiers.append(_tee(fd, files[target].fileno(), saved[fd]))
            else:
                os.dup2(files[target].fileno(), fd)
        try:
            yield
        except Exception:
            traceback.print_exc()
            raise
    finally:
        _flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
        for copier in copiers:  # the pipe ends with the restore, unless a child process still holds it
            copier.join(timeout=5)
        for original in saved.values():
            os.close(original)
        for file in files.values():
            file.close()


def _tee(fd: int, *destinations: int) -> threading.Thread:
    """`fd` becomes a pipe whose bytes a thread copies to each destination until the pipe closes."""
    read, write = os.pipe()
    os.dup2(write, fd)
    os.close(write)

    def copy() -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                for destination in destinations:
                    os.write(destination, chunk)

    copier = threading.Thread(target=copy, name=f"output-tee-{fd}", daemon=True)
    copier.start()
    return copier


def _flush() -> None:
    """What Python still buffers goes where it was written to, before the descriptors change."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
