"""Readahead (``tux3fuse/readahead.py``): a sequential reader finds the next blocks in the cache, within a bounded
window; a random reader starts none; a truncate stops it and leaves no stale page; a read of a block being read
ahead waits for that read instead of reading it again."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
from conftest import opened
from test_read_async import BS, HeldBacking, held_volume, in_thread, physical

from tux3fuse.readahead import INITIAL_WINDOW

BLOCKS = 256  # 1 MiB
WINDOW = 256 << 10  # Options.readahead of these tests: 64 blocks


def make_file(make_vol, blocks: int = BLOCKS) -> tuple[str, int, bytes]:
    vol = make_vol()
    a = vol.create(1, b"a", 0o644)
    data = os.urandom(blocks * BS)
    vol.write(a.ino, 0, data)
    vol.release(a.ino)
    path = vol.path
    vol.unmount()
    return path, a.ino, data


def cached(vol, ino: int) -> set[int]:
    return set(vol.iget(ino).mapping.pages)


async def settle(vol) -> None:
    """Wait until no read is in flight."""
    with trio.fail_after(10):
        while vol.reads.reading or vol.reads.readahead.in_flight:
            await trio.sleep(0.005)


async def test_a_sequential_reader_finds_the_next_blocks_cached_within_the_window(make_vol):
    path, a, data = make_file(make_vol)
    vol, backing = held_volume(path, readahead=WINDOW)
    ra = vol.reads.readahead
    peak = 0
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ra.run)
            offset, step = 0, 16 << 10
            ahead_seen = 0
            while offset < 160 * BS:
                assert await vol.read_async(a, offset, step) == data[offset: offset + step]
                offset += step
                peak = max(peak, ra.in_flight)
                await settle(vol)
                here = offset // BS
                have = cached(vol, a)
                beyond = {i for i in have if i >= here}
                assert max(have) < here + WINDOW // BS, "read ahead past the largest window"
                ahead_seen = max(ahead_seen, len(beyond))
                if offset >= 2 * step:  # from the second read on the stream is sequential
                    assert here in have, f"block {here} is not read ahead of the reader at {offset}"
            nursery.cancel_scope.cancel()
        assert ahead_seen > INITIAL_WINDOW // BS  # the window grew past its first size
        assert 0 < peak <= ra.max_in_flight
        assert vol.counters["readahead_blocks"] >= 100
        assert ra.streams == {} and ra.nursery is None  # stopped with the nursery
        assert vol.read(a, 0, BLOCKS * BS) == data  # what was read ahead is the file's
    finally:
        vol.unmount()


async def test_a_random_reader_starts_no_readahead(make_vol):
    path, a, data = make_file(make_vol)
    vol, backing = held_volume(path, readahead=WINDOW)
    rng = random.Random(5)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.reads.readahead.run)
            asked = set()
            for _ in range(40):
                index = rng.randrange(BLOCKS)
                if index - 1 in asked or index + 1 in asked:
                    continue
                asked.add(index)
                assert await vol.read_async(a, index * BS, BS) == data[index * BS: (index + 1) * BS]
                await settle(vol)
            nursery.cancel_scope.cancel()
        assert cached(vol, a) == asked
        assert vol.counters["readahead_blocks"] == 0
    finally:
        vol.unmount()


async def test_a_truncate_stops_readahead_and_leaves_no_stale_page(make_vol):
    path, a, data = make_file(make_vol)
    vol, backing = held_volume(path, readahead=WINDOW)
    ra = vol.reads.readahead
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ra.run)
            backing.held.add(physical(vol, a, 8) * BS)  # the first read ahead, of blocks 8..
            assert await vol.read_async(a, 0, 4 * BS) == data[: 4 * BS]
            assert await vol.read_async(a, 4 * BS, 4 * BS) == data[4 * BS: 8 * BS]
            await in_thread(backing.reached.wait, 10)
            assert ra.in_flight > 0 and a in ra.streams
            vol.setattr(a, size=2 * BS)  # the cut, then the file grows back: blocks 2.. read as zeros
            vol.setattr(a, size=BLOCKS * BS)
            assert a not in ra.streams
            backing.release.set()
            await settle(vol)
            nursery.cancel_scope.cancel()
        assert not {i for i in cached(vol, a) if i >= 8}, "a page read ahead survived the truncate"
        assert vol.counters["readahead_blocks"] == 0
        assert vol.read(a, 0, BLOCKS * BS) == data[: 2 * BS] + bytes((BLOCKS - 2) * BS)
        vol.commit()
        assert vol.read(a, 0, BLOCKS * BS) == data[: 2 * BS] + bytes((BLOCKS - 2) * BS)
    finally:
        backing.release.set()
        vol.unmount()


async def test_a_read_of_a_block_being_read_ahead_waits_for_it_instead_of_reading_it_again(make_vol):
    path, a, data = make_file(make_vol)
    vol, backing = held_volume(path, readahead=WINDOW)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.reads.readahead.run)
            held = physical(vol, a, 8) * BS
            backing.held.add(held)
            await vol.read_async(a, 0, 4 * BS)
            await vol.read_async(a, 4 * BS, 4 * BS)
            await in_thread(backing.reached.wait, 10)
            result = []

            async def reader():
                result.append(await vol.read_async(a, 8 * BS, 4 * BS))

            nursery.start_soon(reader)
            await trio.sleep(0.05)
            assert not result  # it waits for the read ahead of blocks 8..
            backing.release.set()
            await settle(vol)
            with trio.fail_after(10):
                while not result:
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
        assert result == [data[8 * BS: 12 * BS]]
        assert [r for r in backing.reads if r[0] == held] == [r for r in backing.reads if r[0] == held][:1]
        assert vol.counters["read_waits"] >= 1
    finally:
        backing.release.set()
        vol.unmount()


async def test_the_embedded_read_never_reads_ahead(make_vol):
    path, a, data = make_file(make_vol)
    vol, backing = held_volume(path, readahead=WINDOW)
    try:
        for offset in range(0, 32 * BS, 4 * BS):
            assert vol.read(a, offset, 4 * BS) == data[offset: offset + 4 * BS]
            assert await vol.read_async(a, offset, 4 * BS) == data[offset: offset + 4 * BS]
        assert max(cached(vol, a)) == 31  # no nursery serves readahead
        assert isinstance(backing, HeldBacking)
    finally:
        vol.unmount()


async def test_blocks_a_commit_moved_while_they_were_read_ahead_are_not_inserted(make_vol):
    path, a, data = make_file(make_vol)
    vol, backing = held_volume(path, readahead=WINDOW, cache_bytes=64 * BS)
    new = os.urandom(8 * BS)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.reads.readahead.run)
            backing.held.add(physical(vol, a, 8) * BS)
            await vol.read_async(a, 0, 4 * BS)
            await vol.read_async(a, 4 * BS, 4 * BS)
            await in_thread(backing.reached.wait, 10)
            vol.write(a, 8 * BS, new)  # blocks 8..15 rewritten and committed elsewhere; their pages evicted
            vol.commit()
            other = vol.create(1, b"other", 0o644)
            vol.write(other.ino, 0, bytes(64 * BS))
            vol.commit()
            vol.read(other.ino, 0, 64 * BS)
            assert not {i for i in cached(vol, a) if 8 <= i < 16}
            backing.held.clear()
            backing.release.set()
            await settle(vol)
            nursery.cancel_scope.cancel()
        assert not {i for i in cached(vol, a) if 8 <= i < 16}, "a block read ahead from where the file was"
        assert vol.read(a, 8 * BS, 8 * BS) == new
        assert vol.counters["read_stale_blocks"] >= 8
    finally:
        backing.release.set()
        vol.unmount()


async def test_a_stream_the_hosts_page_cache_serves_is_not_read_ahead_here(make_vol):
    """An image file whose blocks the host's page cache holds (just written): every read of a sequential reader is
    served from it without waiting, the host reads ahead by itself, and readahead here stays idle; once a read has
    to wait for the device the stream is read ahead."""
    from conftest import opened

    path, a, data = make_file(make_vol)
    vol = opened(path, readahead=WINDOW)
    ra = vol.reads.readahead
    try:
        if not vol.backend.dev.nowait:
            return  # no RWF_NOWAIT here: every read counts as waiting for the device
        async with trio.open_nursery() as nursery:
            await nursery.start(ra.run)
            step = 16 << 10
            for offset in range(0, 64 * BS, step):
                assert await vol.read_async(a, offset, step) == data[offset: offset + step]
                await settle(vol)
            assert vol.counters["read_host_cached"] >= 64 and vol.counters["readahead_blocks"] == 0
            assert set(cached(vol, a)) == set(range(64))  # nothing beyond what was asked for
            vol.reads.read_inline_max = 0.0  # from now on reads that miss the host's cache wait in a thread
            # the host's page cache stops serving the image (its POSIX_FADV_DONTNEED drops the pages only when it
            # can: now and then they stay): every read from now on misses it, as after the host dropped them
            vol.backend.dev.nowait = False
            for offset in range(64 * BS, 96 * BS, step):
                assert await vol.read_async(a, offset, step) == data[offset: offset + step]
                await settle(vol)
            nursery.cancel_scope.cancel()
        assert vol.counters["readahead_blocks"] > 0
    finally:
        vol.unmount()


class BadRange(HeldBacking):
    """Reads that touch bytes [lo, hi) of the volume (``bad``) fail with EIO, as a failing disk's do."""

    def __init__(self, inner, lo: int, hi: int) -> None:
        super().__init__(inner)
        self.bad = (lo, hi)

    def pread(self, count: int, offset: int) -> bytes:
        lo, hi = self.bad
        if offset < hi and offset + count > lo:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().pread(count, offset)


async def test_a_failed_readahead_is_counted_and_logged_and_a_reader_still_gets_its_own_error(make_vol, caplog):
    caplog.set_level("ERROR", logger="tux3fuse")
    path, a, data = make_file(make_vol)
    vol = opened(path, readahead=WINDOW, read_inline_max=0.0)
    dev = vol.backend.dev
    first = physical(vol, a, 16)
    assert physical(vol, a, 31) == first + 15
    dev.backing = bad = BadRange(dev.backing, first * BS, (first + 16) * BS)  # file blocks 16..31
    stats = dev.stats
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(vol.reads.readahead.run)
            for offset in range(0, 16 * BS, 4 * BS):  # a sequential reader of blocks 0..15: read ahead past 16
                assert await vol.read_async(a, offset, 4 * BS) == data[offset: offset + 4 * BS]
                await settle(vol)
            assert stats.readahead_errors >= 1 and stats.read_errors == stats.readahead_errors
            assert vol.stats()["readahead_errors"] == stats.readahead_errors
            assert not {i for i in cached(vol, a) if 16 <= i < 32}
            with pytest.raises(OSError) as failed:  # the reader's own read of a bad block: EIO, as before
                await vol.read_async(a, 16 * BS, BS)
            assert failed.value.errno == errno.EIO and stats.read_errors == stats.readahead_errors + 1
            bad.bad = (0, 0)  # the device recovers: nothing stale was cached meanwhile
            assert await vol.read_async(a, 16 * BS, 16 * BS) == data[16 * BS: 32 * BS]
            nursery.cancel_scope.cancel()
        assert vol.failed is None  # a device's read error leaves the volume writable
        lines = [m for m in caplog.messages if m.startswith("read error")]
        assert any(f"(inode {a}, blocks " in m and "; readahead): Input/output error" in m for m in lines), lines
        assert f"read error on {path} block {first} (inode {a}, block 16): Input/output error" in lines, lines
    finally:
        vol.unmount()


def test_the_readahead_mount_option_is_parsed_and_checked():
    from tux3fuse.cli import UsageError, parse_mount_options

    assert parse_mount_options("readahead=512K")["readahead"] == 512 << 10
    assert parse_mount_options("readahead=0")["readahead"] == 0
    assert parse_mount_options("")["readahead"] is None  # Options.readahead's default
    with pytest.raises(UsageError, match="readahead"):
        parse_mount_options("readahead=lots")


def test_the_read_inline_max_mount_option_is_parsed_and_checked():
    from tux3fuse.cli import UsageError, parse_mount_options

    assert parse_mount_options("read_inline_max=0")["read_inline_max"] == 0
    assert parse_mount_options("read_inline_max=2ms")["read_inline_max"] == pytest.approx(0.002)
    assert parse_mount_options("")["read_inline_max"] is None
    with pytest.raises(UsageError, match="read_inline_max"):
        parse_mount_options("read_inline_max=-1")


def test_readahead_is_on_by_default_only_where_the_host_does_not_read_ahead():
    """By default an image file or block device (read through the host's page cache, which its kernel reads ahead)
    gets no readahead here, an NBD export (no cache of the host's) a window of AUTO_WINDOW; -o readahead= wins."""
    from tux3fuse.options import Options
    from tux3fuse.readahead import AUTO_WINDOW, window_for

    assert window_for(Options(), has_fd=True) == 0
    assert window_for(Options(), has_fd=False) == AUTO_WINDOW
    assert window_for(Options(readahead=WINDOW), has_fd=True) == WINDOW
    assert window_for(Options(readahead=0), has_fd=False) == 0


def test_a_volume_on_an_image_file_reads_no_blocks_ahead_by_default(make_vol):
    vol = make_vol()
    try:
        assert vol.backend.dev.fd >= 0 and vol.reads.readahead.max_window == 0
    finally:
        vol.unmount()
