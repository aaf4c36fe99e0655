"""The background I/O thread: the write stage of a commit that nobody waits for, at the lowest CPU priority.

A commit's write stage copies every block of the delta into the host's page cache, fills holes and waits for the
flush: about a millisecond of CPU for a delta of 600 KiB, spent in system calls. On a machine with few cores that
CPU is taken from the threads that serve requests: the event loop, and the processes whose requests wait for it.
Measured on two cores (``scripts/bench_fork.py``-style writer beside a 32 MB/s stream, commits every 10 ms): the
writer waited 320 ms in the run queue over 5 s with the I/O at normal priority, 128 ms at nice 19.

So the periodic and background commits write in one long-lived thread at nice 19 (Linux sets the nice value of
one thread by its id): whatever else wants the CPU preempts it, and when the CPU is free the I/O runs as fast as
before. A commit that someone waits for (fsync), and every commit with ``stable=wait`` (where any writer may wait
for its I/O), runs in trio's worker threads at the process's priority instead (``Runner.run``), so a busy
CPU never holds up an fsync. A writer throttled at the dirty limit waits on whichever commit is in flight.

Guarantees:
- ``run`` returns only after the function has returned or raised in the thread, with its result or exception;
  cancellation does not interrupt it (the caller's work is handed over and always ends).
- One function at a time, in the order handed over; ``close`` waits for the thread to end.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

NICE = 19  # the thread's nice value: the lowest priority an unprivileged process can give a thread
T = TypeVar("T")

log = logging.getLogger("tux3fuse")


class IOThread:
    """One worker thread at nice ``NICE``, started on first use."""

    def __init__(self, name: str = "tux3-commit-io") -> None:
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.nice: int | None = None  # the thread's nice value once it runs (None: not started, or not lowered)

    def _serve(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
            self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        except OSError as e:  # no per-thread nice here: the I/O runs at the process's priority
            log.warning("the commit I/O thread keeps normal priority: %s", e)
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, deliver = item
            try:
                outcome = (True, fn())
            except BaseException as e:  # handed back to the awaiting task, which raises it
                outcome = (False, e)
            deliver(outcome)

    async def run(self, fn: Callable[[], T]) -> T:
        """Call ``fn()`` in the thread and return what it returns (or raise what it raises)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[bool, object]] = []

        def deliver(outcome: tuple[bool, object]) -> None:
            box.append(outcome)
            token.run_sync_soon(done.set)

        self._queue.put((fn, deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        ok, value = box[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]

    def close(self) -> None:
        """End the thread (after the function it runs, if any)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
