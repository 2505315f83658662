"""Worker processes that decode DICOM slices: the cache build's and predict's reader's.

Decoding costs milliseconds of CPU per slice, and one process would leave the other cores idle.
Workers fork from a forkserver that imported the caller's module once (not from the caller, whose
threads, Ray's or torch's, a fork would copy mid-lock), keep to one thread each, and never import
torch: a slice only torch can resize is left to the parent (see `channels.interpolates`), as
torch's import costs each process about 1.2 s of CPU, the decoding of some 400 slices.

Tasks run in order with at most `ahead` in flight, so that decoded slices never pile up while
their consumer is slower. Large results come back through shared memory (`shared`), or a
memory-mapped file, and only a few bytes per task through the pool's result pipe: pickled through
that pipe, a chunk of slices takes many reads to arrive, and all that while the pool's
worker-watching thread, which also waits on the pipe, finds it readable and spins. On 2 cores the
pool then read 0.6x one process's images/s at 10 ms of CPU per image, against 1.8x at 4 ms
through shared memory.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

AHEAD = 4  # tasks in flight per worker: keeps the workers busy while their results wait

Runner = Callable[[Callable, Iterable], Iterator]


@dataclass
class Workers:
    """Worker processes that run tasks in order, at most `ahead` in flight."""

    pool: multiprocessing.pool.Pool
    ahead: int

    def __call__(self, function: Callable, tasks: Iterable) -> Iterator:
        pending = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(function, (task,)))
            if len(pending) >= self.ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextmanager
def workers(count: int | None, module: str) -> Iterator[Runner]:
    """run(function, tasks) -> results in task order: `count` processes (default: one per usable
    core), or this one for 1. `module` holds the functions they run: the forkserver imports it once,
    rather than every worker."""
    count = count or len(os.sched_getaffinity(0))  # usable cores, as a cpuset limits them
    if count == 1:
        yield map
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module])  # no effect once this process's forkserver runs
    with context.Pool(count, initializer=_one_thread) as pool:
        yield Workers(pool, AHEAD * count)


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # one process per core already


@dataclass(frozen=True)
class Slot:
    """The shape of one task's output in shared memory."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def view(self, memory: SharedMemory, index: int) -> np.ndarray:
        return np.ndarray(self.shape, self.dtype, memory.buf, offset=index * self.bytes)


def shared(run: Workers, function: Callable[[Any, np.ndarray], Any], tasks: Iterable,
           slot: Slot) -> Iterator[tuple[np.ndarray, Any]]:
    """(output, result) of `function(task, output)` in the workers for each task, in order, where
    `output` is one of `run.ahead` slots of shared memory, yielded as a copy (no view may outlive
    the memory). A slot is reused only once its task's output has been copied, as `run` submits a
    task only after taking the result `ahead` tasks before it. The memory is gone once the reading
    ends, however it ends."""
    memory = SharedMemory(create=True, size=run.ahead * slot.bytes)
    try:
        jobs = ((function, task, slot, memory.name, index % run.ahead) for index, task in enumerate(tasks))
        for index, result in enumerate(run(_into_slot, jobs)):
            yield slot.view(memory, index % run.ahead).copy(), result
    finally:
        memory.close()
        memory.unlink()


_attached: dict[str, SharedMemory] = {}  # in a worker: the shared memory of the reading under way


def _into_slot(job: tuple[Callable, Any, Slot, str, int]) -> Any:
    function, task, slot, name, index = job
    if name not in _attached:  # a new reading: the previous one's memory is no longer needed
        for memory in _attached.values():
            memory.close()
        _attached.clear()
        _attached[name] = SharedMemory(name)
    return function(task, slot.view(_attached[name], index))
