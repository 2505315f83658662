"""Files written all or nothing: a reader (another trial, a resumed search, the user) never sees half
a file, and a write that fails or is interrupted leaves none."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` once the block ends without an
    error, removed otherwise. The name holds the process id, so two writers never share one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
