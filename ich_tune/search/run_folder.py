"""Which run folder a `run` writes, and the lock that keeps a second driver out of it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from ich_tune.errors import UserError
from ich_tune.experiment import Search
from ich_tune.search import storage
from ich_tune.search.options import RunOptions


def resolve_run_dir(search: Search, options: RunOptions) -> str:
    """The run folder, a path or a URI: --name, the latest resumable run for --resume, or a new one."""
    search_dir = storage.join(storage.normalize(search.config.storage), search.name)
    if options.name:
        return storage.join(search_dir, options.name)
    if options.resume:
        candidates = [run for run in storage.children(search_dir) if storage.can_restore(run)]
        if not candidates:
            raise UserError(f"--resume: no search to resume under {search_dir}/; start one without "
                            "--resume, or give --name of an existing run.")
        return candidates[-1]
    return storage.join(search_dir, time.strftime("%Y%m%d-%H%M%S"))


@contextlib.contextmanager
def run_lock(run_dir: str | Path, lock_dir: Path | None = None) -> Iterator[None]:
    """Held while a driver writes `run_dir`: a second `run` of the same folder (a --resume, or the same
    --name) is refused instead of corrupting the first. The kernel drops it when the driver dies.

    The lock file sits beside a local run folder; for a URI, in `lock_dir` on this machine (a bucket
    has no locks), so it guards against a second driver here only. It holds the holder's pid, which
    the refusal names."""
    run_dir = str(run_dir)
    if storage.is_uri(run_dir):
        lock_file = lock_dir / f"{hashlib.sha1(run_dir.encode()).hexdigest()[:16]}.lock"
    else:
        lock_file = Path(run_dir).parent / f".{Path(run_dir).name}.lock"
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        held = FileLock(lock_file, on_acquired=_write_pid).acquire(blocking=False)
    except Timeout:
        raise UserError(f"{run_dir}: another `run` (pid {_holder(lock_file)}) is writing this search now; "
                        "wait for it to end, or start another with a new --name.") from None
    except OSError as err:
        raise UserError(f"{run_dir}: cannot write its lock file {lock_file} ({err.strerror}).") from None
    with held:
        yield


def _write_pid(fd: int) -> None:
    """Into the lock file, once it is held (filelock leaves a file's old contents in place)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, str(os.getpid()).encode())


def _holder(lock_file: Path) -> str:
    """The pid the holder wrote; '?' before it has."""
    with contextlib.suppress(OSError):
        return lock_file.read_text().strip() or "?"
    return "?"
