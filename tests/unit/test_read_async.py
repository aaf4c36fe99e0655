"""Reads that never block the event loop (``Volume.read_async``): uncached blocks are read in worker threads, and
what they read enters the cache only if the file still maps it when they return; cached reads stay on the loop."""

from __future__ import annotations

import os
import threading

import pytest
import trio
from conftest import opened

from tux3fuse.backing import Backing

BS = 4096


class HeldBacking(Backing):
    """A backing around another whose reads at the offsets in ``held`` stop, in their thread, until ``release`` is
    set; ``reached`` is set when one has stopped. No file descriptor: every read of the volume goes through it."""

    def __init__(self, inner: Backing) -> None:
        self.inner = inner
        self.name = inner.name
        self.readonly = inner.readonly
        self.held: set[int] = set()
        self.reached = threading.Event()
        self.release = threading.Event()
        self.reads: list[tuple[int, int, str]] = []  # (offset, count, thread name)

    def size(self) -> int:
        return self.inner.size()

    def pread(self, count: int, offset: int) -> bytes:
        self.reads.append((offset, count, threading.current_thread().name))
        if offset in self.held:
            self.reached.set()
            assert self.release.wait(10), "the held read was never released"
        return self.inner.pread(count, offset)

    def pwrite(self, data, offset: int, *, fua: bool = False) -> int:
        return self.inner.pwrite(data, offset, fua=fua)

    def pwritev(self, bufs, offset: int) -> int:
        return self.inner.pwritev(bufs, offset)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        pass


def held_volume(path: str, **options):
    """The volume at ``path`` opened again (nothing cached), its device reading through a ``HeldBacking``; reads
    of uncached blocks always in worker threads (``read_inline_max=0``) unless the test says otherwise."""
    options.setdefault("read_inline_max", 0.0)
    vol = opened(path, **options)
    dev = vol.backend.dev
    dev.backing = HeldBacking(dev.backing)
    return vol, dev.backing


def physical(vol, ino: int, index: int) -> int:
    from tux3fuse.backend import extents

    return extents.physical_at(vol.backend.dtree(vol.iget(ino)), index)


@pytest.fixture
def files(make_vol):
    """A volume with file "a" of 8 blocks of b"a" and file "b" of 2 blocks of b"b", committed; then reopened."""
    vol = make_vol()
    a = vol.create(1, b"a", 0o644)
    vol.write(a.ino, 0, b"a" * 8 * BS)
    b = vol.create(1, b"b", 0o644)
    vol.write(b.ino, 0, b"b" * 2 * BS)
    vol.release(a.ino)
    vol.release(b.ino)
    path = vol.path
    vol.unmount()
    return path, a.ino, b.ino


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def test_a_read_waiting_for_the_disk_lets_other_tasks_and_cached_reads_go_on(files):
    path, a, b = files
    vol, backing = held_volume(path)
    try:
        assert vol.read(b, 0, 2 * BS) == b"b" * 2 * BS  # b is cached from now on
        backing.held.add(physical(vol, a, 0) * BS)
        result = []
        ticks = 0

        async def reader():
            result.append(await vol.read_async(a, 0, 8 * BS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await in_thread(backing.reached.wait, 10)
            for _ in range(20):  # the loop is free: this task runs while the read waits for the disk
                await trio.sleep(0)
                ticks += 1
            assert await vol.read_async(b, BS, BS) == b"b" * BS
            assert not result
            backing.release.set()
        assert ticks == 20
        assert result == [b"a" * 8 * BS]
        held = [r for r in backing.reads if r[0] == physical(vol, a, 0) * BS]
        assert held and all(name != threading.main_thread().name for _, _, name in held)
        assert vol.stats()["blocks_read"] >= 8
    finally:
        backing.release.set()
        vol.unmount()


async def test_a_read_of_cached_pages_and_holes_is_not_a_checkpoint(files):
    path, a, b = files
    vol, backing = held_volume(path)
    try:
        vol.setattr(b, size=64 * BS)  # blocks 2.. of b are a hole
        assert vol.read(a, 0, 8 * BS)
        done = []
        with trio.CancelScope() as scope:
            scope.cancel()  # any checkpoint below raises Cancelled
            done.append(await vol.read_async(a, 100, 3 * BS))
            done.append(await vol.read_async(b, 10 * BS, 20 * BS))
        assert done == [b"a" * 3 * BS, bytes(20 * BS)]
        cold = []
        with trio.CancelScope() as scope:  # the control: an uncached block is read in a thread, a checkpoint
            scope.cancel()
            cold.append(await vol.read_async(b, 0, BS))
        assert cold == [] and scope.cancelled_caught
        assert vol.reads.reading == {}  # the cancelled read left nothing in flight
        assert await vol.read_async(b, 0, BS) == b"b" * BS
    finally:
        vol.unmount()


async def racing(path, a, index, change, expect_data, expect_size):
    """Read blocks [0, 8) of ``a`` while its read of block ``index``'s run is held, make ``change(vol)`` on the
    loop meanwhile, then let the read go: it must return what the volume holds when it completes."""
    vol, backing = held_volume(path, cache_bytes=64 * BS)
    try:
        backing.held.add(physical(vol, a, index) * BS)
        result = []

        async def reader():
            result.append(await vol.read_async(a, 0, 8 * BS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await in_thread(backing.reached.wait, 10)
            change(vol)
            backing.held.clear()
            backing.release.set()
        assert vol.failed is None, vol.failed
        assert result == [expect_data[:expect_size]]
        assert vol.read(a, 0, 8 * BS) == expect_data[:expect_size]  # and no stale page was left in the cache
        assert vol.reads.reading == {}
        return vol
    finally:
        backing.release.set()
        vol.unmount()


async def test_a_read_racing_a_write_returns_the_written_page(files):
    path, a, _ = files

    def write(vol):
        vol.write(a, 3 * BS + 100, b"W" * 10)

    model = bytearray(b"a" * 8 * BS)
    model[3 * BS + 100: 3 * BS + 110] = b"W" * 10
    await racing(path, a, 0, write, bytes(model), 8 * BS)


async def test_a_read_racing_a_truncate_returns_zeros_past_the_cut(files):
    path, a, _ = files

    def cut_and_grow(vol):
        vol.setattr(a, size=2 * BS + 7)
        vol.setattr(a, size=8 * BS)

    model = b"a" * (2 * BS + 7) + bytes(6 * BS - 7)
    await racing(path, a, 0, cut_and_grow, model, 8 * BS)


async def test_a_read_racing_a_shrink_returns_only_what_is_left(files):
    path, a, _ = files
    await racing(path, a, 0, lambda vol: vol.setattr(a, size=3 * BS - 1), b"a" * (3 * BS - 1), 3 * BS - 1)


async def test_a_read_racing_a_commit_that_moves_and_reuses_its_block_reads_the_new_block(files):
    """The held read is of blocks whose extent a commit remaps; the old blocks are freed, the page of the new
    data is evicted, and later commits may reuse the old blocks for another file: the read must not take the old
    block's bytes (nor report them as corrupt), but read the block the file maps now."""
    path, a, _ = files
    new = os.urandom(8 * BS)
    reused = []

    def rewrite_commit_evict(vol):
        old = {physical(vol, a, i) for i in range(8)}
        vol.write(a, 0, new)
        vol.commit()
        assert {physical(vol, a, i) for i in range(8)}.isdisjoint(old)
        other = vol.create(1, b"other", 0o644)
        vol.backend.alloc.goal = min(old)  # the freed blocks are free again now that the remap is durable
        vol.write(other.ino, 0, os.urandom(64 * BS))
        vol.commit()
        reused.extend(old & {physical(vol, other.ino, i) for i in range(64)})
        vol.read(other.ino, 0, 64 * BS)  # 64 pages through a cache of 64: the clean pages of "a" are evicted
        assert all(vol.iget(a).mapping.get(i) is None for i in range(8))

    vol = await racing(path, a, 0, rewrite_commit_evict, new, 8 * BS)
    assert vol.counters["read_stale_blocks"] >= 8
    assert vol.counters["checksum_errors"] == 0
    assert reused, "the test wants the old blocks reused by the other file"


async def test_a_flipped_bit_under_an_unchanged_mapping_is_still_a_corrupt_block(files):
    path, a, _ = files
    vol, backing = held_volume(path)
    try:
        block = physical(vol, a, 5)
        fd = backing.inner.fd
        os.pwrite(fd, bytes([os.pread(fd, 1, block * BS + 9)[0] ^ 1]), block * BS + 9)
        with pytest.raises(OSError) as e:
            await vol.read_async(a, 0, 8 * BS)
        assert e.value.errno == 5 and "checksum" in str(e.value)
        assert vol.failed is not None and vol.counters["checksum_errors"] == 1
        assert vol.reads.reading == {}
    finally:
        vol.close_files()


async def test_reads_of_many_runs_go_to_several_threads_at_once(files):
    path, a, _ = files
    vol, backing = held_volume(path)
    try:
        # block 0 held: the reads of the other runs of the same request do not wait for it
        vol.write(a, 2 * BS, b"x" * BS)
        vol.write(a, 5 * BS, b"y" * BS)  # cached pages split the uncached blocks into runs [0, 2), [3, 5), [6, 8)
        backing.held.add(physical(vol, a, 0) * BS)
        result = []

        async def reader():
            result.append(await vol.read_async(a, 0, 8 * BS))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await in_thread(backing.reached.wait, 10)
            with trio.fail_after(10):
                while len(backing.reads) < 3:  # the other two runs are read while the first is held
                    await trio.sleep(0.01)
            backing.release.set()
        assert result == [b"a" * 2 * BS + b"x" * BS + b"a" * 2 * BS + b"y" * BS + b"a" * 2 * BS]
    finally:
        backing.release.set()
        vol.unmount()


async def test_a_read_beside_a_commit_whose_write_is_held_does_not_wait_for_it(files):
    path, a, b = files
    vol, backing = held_volume(path)
    try:
        vol.write(b, 0, b"B" * 4 * BS)
        job = vol.flusher.start_commit()
        target = physical(vol, b, 0)  # where the commit writes b's new block 0
        reached, release = vol.backend.dev.hold(target)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, job.write)
            await in_thread(reached.wait, 10)
            with trio.fail_after(5):  # the commit's write stays held throughout
                assert await vol.read_async(a, 0, 8 * BS) == b"a" * 8 * BS
                assert await vol.read_async(b, 0, 4 * BS) == b"B" * 4 * BS
            assert not release.is_set()
            release.set()
        job.complete()
        assert vol.read(b, 0, 4 * BS) == b"B" * 4 * BS
    finally:
        vol.unmount()


@pytest.mark.parametrize("case", ["idle", "request waiting", "slow device"])
async def test_an_uncached_read_holds_the_loop_only_when_nobody_waits_and_the_device_is_quick(files, case):
    """With nothing else waiting for the loop and a device whose reads are quick, the read is done on the loop (a
    worker thread's round trip costs more); a request waiting in the kernel (for a read of more than one block),
    or a device whose recent reads were slow, send it to a worker thread."""
    path, a, b = files
    vol, backing = held_volume(path, read_inline_max=0.0005)
    try:
        vol.runner.frontend_pending = lambda: case == "request waiting"
        if case == "slow device":
            vol.reads.read_seconds = 0.002
        first = physical(vol, a, 0) * BS
        assert await vol.read_async(a, 0, 8 * BS) == b"a" * 8 * BS
        names = {name for offset, _, name in backing.reads if offset == first}
        on_loop = names == {threading.current_thread().name}
        assert on_loop == (case == "idle"), names
        assert (vol.counters["read_inline_blocks"] == 8) == (case == "idle")
        if case == "request waiting":  # one block from a quick device: on the loop all the same
            before = vol.counters["read_inline_blocks"]
            assert await vol.read_async(b, BS, BS) == b"b" * BS
            assert vol.counters["read_inline_blocks"] == before + 1
        assert vol.reads.read_seconds > 0  # every read, on the loop or in a thread, is measured
    finally:
        vol.unmount()


async def test_a_read_whose_plan_fails_after_registering_runs_leaves_none_in_flight(files, monkeypatch):
    """A round registers the runs it will read before it has looked at every block; when a later block fails (its
    extent tree node cannot be read), the runs already registered are released: a read that needs their blocks
    later reads them, instead of waiting forever for a read nobody makes."""
    import errno

    path, a, _ = files
    vol, _ = held_volume(path)
    try:
        assert vol.read(a, 3 * BS, BS) == b"a" * BS  # block 3 cached: blocks 0-2 and 4-7 are two runs apart
        real = vol.reads._backing
        calls = []

        def failing(inode, index, limit):
            calls.append(index)
            if len(calls) == 2:
                raise OSError(errno.EIO, "an extent tree node cannot be read")
            return real(inode, index, limit)

        monkeypatch.setattr(vol.reads, "_backing", failing)
        with pytest.raises(OSError) as info:
            await vol.read_async(a, 0, 8 * BS)
        assert info.value.errno == errno.EIO and calls == [0, 4]
        assert vol.reads.reading == {}  # blocks 0-2 were registered first: released again
        monkeypatch.undo()
        with trio.fail_after(60):  # a hang detector, not a time asserted
            assert await vol.read_async(a, 0, 8 * BS) == b"a" * 8 * BS
    finally:
        vol.unmount()
