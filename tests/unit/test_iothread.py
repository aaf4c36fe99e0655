"""The background I/O thread: results, errors, order, cancellation, priority, and which commits use it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from tux3fuse.backend import iothread
from tux3fuse.backend.commit import CommitJob
from tux3fuse.backend.iothread import IOThread

BS = 4096


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_run_returns_the_result_in_a_thread_at_the_lowest_priority():
    io = IOThread()
    main = threading.get_ident()
    before = thread_nice()

    async def main_task():
        return await io.run(lambda: (threading.get_ident(), thread_nice()))

    try:
        ident, nice = trio.run(main_task)
    finally:
        io.close()
    assert ident != main
    assert nice == iothread.NICE == io.nice
    assert thread_nice() == before  # only the I/O thread was lowered


def test_an_exception_in_the_thread_is_raised_by_run_and_the_thread_goes_on():
    io = IOThread()

    def fail():
        raise OSError(28, "No space left on device")

    async def main_task():
        with pytest.raises(OSError, match="No space"):
            await io.run(fail)
        return await io.run(lambda: 7)

    try:
        assert trio.run(main_task) == 7
    finally:
        io.close()


def test_functions_run_one_at_a_time_in_the_order_handed_over():
    io = IOThread()
    log: list[tuple[str, int]] = []

    def work(i: int):
        def fn():
            log.append(("start", i))
            time.sleep(0.002)
            log.append(("end", i))
            return i
        return fn

    async def main_task():
        results = []

        async def one(i: int):
            results.append(await io.run(work(i)))

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
                await trio.sleep(0)  # hand them over in this order
        return results

    try:
        results = trio.run(main_task)
    finally:
        io.close()
    assert sorted(results) == list(range(5))
    assert log == [(kind, i) for i in range(5) for kind in ("start", "end")]


def test_cancellation_waits_for_the_function_to_end():
    io = IOThread()
    release = threading.Event()
    finished = []

    def slow():
        release.wait(10)
        finished.append(True)
        return "done"

    async def main_task():
        got = None
        timer = threading.Timer(0.2, release.set)
        timer.start()
        with trio.move_on_after(0.01):
            got = await io.run(slow)  # cancelled while it waits: it still waits
        return got, bool(finished)

    try:
        got, was_finished = trio.run(main_task)
    finally:
        io.close()
    assert got == "done" and was_finished  # run returned only once the function had ended


def test_close_ends_the_thread_and_a_later_run_starts_a_new_one():
    io = IOThread()
    io.close()  # never started: nothing to do

    async def main_task():
        return await io.run(threading.current_thread)

    first = trio.run(main_task)
    io.close()
    assert not first.is_alive()
    second = trio.run(main_task)
    io.close()
    assert second is not first and not second.is_alive()


@pytest.mark.parametrize("stable, urgent, low", [("fork", False, True), ("none", False, True), ("fork", True, False),
                                                ("wait", False, False)])
def test_commits_nobody_waits_for_write_at_low_priority_the_others_at_normal(make_vol, monkeypatch, stable, urgent,
                                                                            low):
    """A periodic or background commit writes in the I/O thread at nice 19; a commit someone waits for (urgent,
    too large to write on the loop) writes in a worker thread at the process's priority, and so does every commit
    with stable=wait, where any writer may wait for the I/O. All reach the image."""
    vol = make_vol(stable)
    f = vol.create(1, b"f", 0o644)
    data = bytes(range(256)) * (64 * BS // 256)
    vol.write(f.ino, 0, data)  # 64 blocks: more than a commit writes on the loop
    seen: list[tuple[int, int]] = []
    real_write = CommitJob.write

    def write(self, on_written=None):
        seen.append((threading.get_ident(), thread_nice()))
        real_write(self, on_written)

    monkeypatch.setattr(CommitJob, "write", write)
    main = threading.get_ident()
    process_nice = thread_nice()
    trio.run(lambda: vol.flusher.commit_async(urgent=urgent))
    assert len(seen) == 1
    ident, nice = seen[0]
    assert ident != main
    assert nice == (iothread.NICE if low else process_nice)
    vol.unmount()
    from tux3fuse.fs import Options, Volume

    again = Volume(vol.path, Options(readonly=True))
    try:
        assert again.read(again.lookup(1, b"f").ino, 0, len(data)) == data
    finally:
        again.close_files()
    assert vol.runner.io_thread is None  # unmount ended the thread


def test_a_failing_write_in_the_io_thread_fails_the_commit_and_the_volume(make_vol, monkeypatch):
    """An I/O error in the low-priority thread reaches the committing task: the commit raises VolumeError, the
    volume turns read-only, and nothing is left in flight."""
    import errno

    from tux3fuse.fs import VolumeError

    vol = make_vol()
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, bytes(16 * BS))

    def broken_flush() -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(vol.backend.dev, "flush", broken_flush)

    async def main_task():
        with pytest.raises(VolumeError):
            await vol.flusher.commit_async()

    trio.run(main_task)
    assert vol.failed is not None and vol.runner.job is None
    with pytest.raises(OSError) as e:
        vol.write(f.ino, 0, b"x")
    assert e.value.errno == errno.EROFS
    assert vol.runner.io_thread is not None and vol.runner.io_thread.nice == iothread.NICE  # it ran in the I/O thread
    vol.close_files()
