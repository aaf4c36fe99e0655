"""The flusher's promises, in process on real images: coalescing, group commit, dirty expiry on a mock clock,
touch and done on the dirty-inode lists, background writeback, and the cache limit under a large write."""

from __future__ import annotations

import errno
import threading

import pytest
import trio
import trio.testing

from tux3fuse.cache.page import CLEAN
from tux3fuse.flusher import Flusher
from tux3fuse.fs import Options, Volume, VolumeError
from tux3fuse.fsck import fsck

BS = 4096


def fill(byte: int, n: int = BS) -> bytes:
    return bytes([byte]) * n


def committed(vol: Volume) -> Volume:
    """The state on the image, read beside the live volume."""
    return Volume(vol.path, Options(readonly=True, lock=False))


def listed(vol: Volume) -> list[int]:
    """The current delta's dirty list, in order."""
    return list(vol.dirty.lists.get(vol.deltas.current, {}))


async def settle(vol: Volume) -> None:
    """Let every task run until all wait, and any commit in flight end."""
    await trio.testing.wait_all_tasks_blocked()
    while vol.runner.job is not None:
        await vol.runner.wait_job(vol.runner.job)
        await trio.testing.wait_all_tasks_blocked()


def gate_flush(vol: Volume, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hold the first flush of the device (in the commit's worker thread) until released."""
    reached, release = threading.Event(), threading.Event()
    real = vol.backend.dev.flush

    def flush() -> None:
        if not release.is_set():
            reached.set()
            release.wait()
        real()

    monkeypatch.setattr(vol.backend.dev, "flush", flush)
    return reached, release


# -- coalescing and group commit ------------------------------------------------------------------------------------

async def test_syncs_for_the_same_delta_share_one_commit(make_vol):
    vol = make_vol()
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1))
    commits = vol.counters["commits"]
    async with trio.open_nursery() as nursery:
        flusher = Flusher(vol, interval=0)
        await nursery.start(flusher.run)
        async with trio.open_nursery() as syncs:
            for _ in range(5):
                syncs.start_soon(vol.sync)
        assert vol.counters["commits"] == commits + 1
        assert vol.counters["flusher_items"] == 1 and vol.counters["flusher_coalesced"] == 4
        await vol.sync()  # nothing changed since: durable already, no item, no commit
        assert vol.counters["commits"] == commits + 1 and vol.counters["flusher_items"] == 1
        nursery.cancel_scope.cancel()
    assert committed(vol).read(f.ino, 0, BS) == fill(1)


async def test_sync_for_a_newer_delta_while_a_commit_is_in_flight_is_queued_once(make_vol, monkeypatch):
    vol = make_vol(inline_commit_blocks=0)  # every commit's I/O in the worker thread, where the gate holds it
    f = vol.create(1, b"f", 0o644)
    g = vol.create(1, b"g", 0o644)
    vol.write(f.ino, 0, fill(1))
    reached, release = gate_flush(vol, monkeypatch)
    commits = vol.counters["commits"]
    async with trio.open_nursery() as nursery:
        flusher = Flusher(vol, interval=0)
        await nursery.start(flusher.run)
        async with trio.open_nursery() as syncs:
            try:
                syncs.start_soon(vol.sync)
                assert await trio.to_thread.run_sync(reached.wait, 30)  # the commit of delta d is in flight, held
                d = flusher.inflight_delta
                assert vol.runner.job is not None and vol.runner.job.delta == d and not listed(vol)
                syncs.start_soon(vol.sync)  # nothing new since: covered by the commit in flight
                await trio.testing.wait_all_tasks_blocked()
                assert flusher.inflight.waiters == 2 and not flusher.queue
                assert vol.counters["flusher_items"] == 1 and vol.counters["flusher_coalesced"] == 1
                vol.write(g.ino, 0, fill(2))  # delta d + 1
                for _ in range(3):
                    syncs.start_soon(vol.sync)
                await trio.testing.wait_all_tasks_blocked()
                assert [(item.delta, item.waiters) for item in flusher.queue] == [(d + 1, 3)]
                assert vol.counters["flusher_items"] == 2 and vol.counters["flusher_coalesced"] == 3
            finally:
                release.set()  # a failed assertion must not leave the commit held
        assert vol.counters["commits"] == commits + 2 and vol.deltas.committed == d + 1
        nursery.cancel_scope.cancel()
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(1) and snap.read(g.ino, 0, BS) == fill(2)


async def test_concurrent_fsyncs_share_commits_and_every_file_is_durable(make_vol):
    vol = make_vol()
    n, rounds = 50, 2
    commits = vol.counters["commits"]

    async def writer(i: int) -> None:
        f = vol.create(1, b"file%d" % i, 0o644)
        for r in range(rounds):
            await vol.call(vol.write, f.ino, r * BS, fill((i + r) % 251 + 1))
            await vol.sync()
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        await nursery.start(Flusher(vol, interval=30).run)
        async with trio.open_nursery() as writers:
            for i in range(n):
                writers.start_soon(writer, i)
        nursery.cancel_scope.cancel()
    assert vol.counters["commits"] - commits <= n * rounds // 5
    assert vol.counters["flusher_coalesced"] >= n * rounds - (vol.counters["commits"] - commits)
    vol.close_files()  # no last commit: only what the syncs made durable is on the image
    again = Volume(vol.path, Options(readonly=True))
    try:
        for i in range(n):
            ino = again.lookup(1, b"file%d" % i).ino
            assert again.read(ino, 0, rounds * BS) == b"".join(fill((i + r) % 251 + 1) for r in range(rounds))
    finally:
        again.close_files()


async def test_failed_commit_wakes_every_waiter_with_volume_error(make_vol, monkeypatch):
    vol = make_vol()
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1))

    def broken_flush() -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(vol.backend.dev, "flush", broken_flush)
    outcomes = []

    async def sync() -> None:
        try:
            await vol.sync()
            outcomes.append("ok")
        except VolumeError:
            outcomes.append("VolumeError")

    async with trio.open_nursery() as nursery:
        await nursery.start(Flusher(vol, interval=0).run)
        for _ in range(3):
            nursery.start_soon(sync)
    assert outcomes == ["VolumeError"] * 3 and vol.failed is not None and not vol.flusher.running
    with pytest.raises(OSError) as e:
        await vol.sync()
    assert e.value.errno == errno.EROFS


async def test_sync_without_a_flusher_commits_by_itself(make_vol):
    vol = make_vol()
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(7))
    await vol.sync()
    assert vol.deltas.committed == vol.deltas.current - 1
    assert committed(vol).read(f.ino, 0, BS) == fill(7)


# -- dirty expiry, touch, done --------------------------------------------------------------------------------------

async def test_delta_is_committed_interval_after_its_oldest_dirty_inode(make_vol, mock_clock):
    vol = make_vol()
    f = vol.create(1, b"f", 0o644)
    vol.commit()
    async with trio.open_nursery() as nursery:
        await nursery.start(Flusher(vol, interval=5).run)
        mock_clock.jump(100)  # nothing dirty: no commit however long it sleeps
        await settle(vol)
        base, commits = trio.current_time(), vol.counters["commits"]
        await vol.call(vol.write, f.ino, 0, fill(1))
        assert vol.icache.inodes[f.ino].dirtied == base
        mock_clock.jump(4.9)
        await settle(vol)
        assert vol.counters["commits"] == commits and listed(vol) == [f.ino]
        mock_clock.jump(0.11)
        await settle(vol)
        assert vol.counters["commits"] == commits + 1 and not listed(vol)
        mock_clock.jump(100)
        await settle(vol)
        assert vol.counters["commits"] == commits + 1
        nursery.cancel_scope.cancel()
    assert committed(vol).read(f.ino, 0, BS) == fill(1)


async def test_touched_inode_moves_to_the_tail_without_postponing_expiry(make_vol, mock_clock):
    vol = make_vol()
    a, b = vol.create(1, b"a", 0o644), vol.create(1, b"b", 0o644)
    vol.commit()
    assert vol.options.touch_after == 1.0
    async with trio.open_nursery() as nursery:
        await nursery.start(Flusher(vol, interval=5).run)
        t0, commits = trio.current_time(), vol.counters["commits"]
        vol.write(a.ino, 0, fill(1))
        mock_clock.jump(0.5)
        vol.write(b.ino, 0, fill(2))
        mock_clock.jump(0.4)
        vol.write(a.ino, BS, fill(3))  # 0.9 s after a was dirtied: below touch_after, stays in place
        assert listed(vol) == [a.ino, b.ino] and vol.icache.inodes[a.ino].dirtied == t0
        mock_clock.jump(1.1)
        vol.write(a.ino, 2 * BS, fill(4))  # 2 s: touched, to the tail with a new time
        assert listed(vol) == [b.ino, a.ino] and vol.icache.inodes[a.ino].dirtied == t0 + 2
        assert vol.icache.inodes[b.ino].dirtied == t0  # the new head carries the oldest pending change
        mock_clock.jump(2.9)  # t0 + 4.9
        await settle(vol)
        assert vol.counters["commits"] == commits
        mock_clock.jump(0.11)  # t0 + 5.01: expiry of a's first change, not of b's (5.5) or a's touch (7)
        await settle(vol)
        assert vol.counters["commits"] == commits + 1
        nursery.cancel_scope.cancel()


async def test_file_created_and_removed_in_one_delta_leaves_the_dirty_list(make_vol):
    vol = make_vol()
    used = vol.backend.used_inodes
    f = vol.create(1, b"tmp", 0o644)
    dirty = vol.icache.cache.dirty_pages  # the directory's block
    vol.write(f.ino, 0, fill(1, 3 * BS))
    assert f.ino in listed(vol) and vol.icache.cache.dirty_pages == dirty + 3
    vol.release(f.ino)
    vol.unlink(1, b"tmp")
    assert f.ino in listed(vol)  # the caller still holds a reference
    vol.forget(f.ino, 1)
    assert f.ino not in listed(vol) and listed(vol) == [1]  # done; the directory is still to be written
    assert vol.icache.cache.dirty_pages == dirty and vol.backend.used_inodes == used and f.ino not in vol.icache.inodes
    assert vol.counters["inodes_discarded"] == 1
    kept = vol.create(1, b"kept", 0o644)  # one that reached the image is written again, as deleted
    vol.commit()
    vol.release(kept.ino)
    vol.unlink(1, b"kept")
    vol.forget(kept.ino, 1)
    assert kept.ino in listed(vol) and vol.counters["inodes_discarded"] == 1
    await vol.sync()
    snap = committed(vol)
    for ino in (f.ino, kept.ino):
        with pytest.raises(OSError):
            snap.getattr(ino)
    assert snap.backend.sb.used_inodes == used
    vol.unmount()
    assert fsck(vol.path).status == 0


async def test_truncating_away_dirty_pages_keeps_the_inode_listed_for_its_new_size(make_vol):
    vol = make_vol()
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1))
    vol.commit()
    vol.write(f.ino, BS, fill(2, 2 * BS))
    delta = vol.deltas.current
    vol.setattr(f.ino, size=BS)
    inode = vol.icache.inodes[f.ino]
    assert not inode.mapping.dirty.get(delta)  # its only dirty pages are gone ...
    assert f.ino in listed(vol)  # ... but the truncate changed the size and the times, which must be written
    mtime = inode.rec.mtime_ns
    await vol.sync()
    attr = committed(vol).getattr(f.ino)
    assert attr.size == BS and attr.mtime_ns == mtime


# -- background writeback and the cache limit -----------------------------------------------------------------------

async def test_dirty_data_over_background_bytes_commits_before_expiry(make_vol, mock_clock):
    vol = make_vol(background_bytes=16 * BS)
    f = vol.create(1, b"f", 0o644)
    vol.commit()
    async with trio.open_nursery() as nursery:
        await nursery.start(Flusher(vol, interval=5).run)
        t0, commits = trio.current_time(), vol.counters["commits"]
        await vol.call(vol.write, f.ino, 0, fill(1, 8 * BS))
        await settle(vol)
        assert vol.counters["commits"] == commits  # below the threshold: waits for expiry
        await vol.call(vol.write, f.ino, 8 * BS, fill(2, 9 * BS))
        await settle(vol)
        assert vol.counters["commits"] == commits + 1 and trio.current_time() == t0
        assert vol.icache.cache.dirty_pages == 0
        nursery.cancel_scope.cancel()
    assert committed(vol).read(f.ino, 0, 17 * BS) == fill(1, 8 * BS) + fill(2, 9 * BS)


async def test_throttled_writer_waits_for_a_commit_the_flusher_starts(make_vol):
    vol = make_vol(dirty_limit=8 * BS, background_bytes=1 << 30)
    f = vol.create(1, b"f", 0o644)
    vol.commit()
    started_by = []
    flusher = Flusher(vol, interval=30)
    real = flusher.commit_async

    async def commit_async(**kw):
        started_by.append(trio.lowlevel.current_task().name)
        return await real(**kw)

    flusher.commit_async = commit_async
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.run, name="flusher")
        await vol.call(vol.write, f.ino, 0, fill(1, 8 * BS))  # at the limit
        await vol.call(vol.write, f.ino, 8 * BS, fill(2, 4 * BS))  # over it: waits for a commit
        assert vol.counters["throttled"] == 1 and vol.counters["flusher_items"] == 1
        assert started_by == ["flusher"] and vol.icache.cache.dirty_pages == 4
        nursery.cancel_scope.cancel()
    assert committed(vol).read(f.ino, 0, 8 * BS) == fill(1, 8 * BS)


async def test_cache_limit_holds_while_a_file_twice_the_cache_is_written_and_read_back(make_vol):
    limit, chunk = 64, 4  # pages
    vol = make_vol(cache_bytes=limit * BS, background_bytes=16 * BS, dirty_limit=32 * BS)
    cache = vol.icache.cache
    assert cache.limit_pages == limit
    f = vol.create(1, b"big", 0o644)
    npages = 2 * limit
    data = b"".join(i.to_bytes(4, "little") * (BS // 4) for i in range(npages))
    worst = {"clean": 0, "other": 0}
    done = trio.Event()

    def check() -> None:
        # PageCache: clean pages are bounded by the limit; dirty pages and pages under writeback are never
        # evicted, and the flusher (background) and the dirty limit (throttled writers) bound those.
        resident = [p for m in vol.icache.registry.values() for p in m.pages.values()]
        clean = sum(1 for p in resident if p.delta == CLEAN and not p.writeback)
        assert len(cache.clean) <= limit and clean <= limit
        assert len(resident) - clean <= 2 * 32 + chunk  # the current delta's and the committing delta's
        worst["clean"] = max(worst["clean"], clean)
        worst["other"] = max(worst["other"], len(resident) - clean)

    async def monitor() -> None:
        while not done.is_set():
            check()
            await trio.sleep(0.0005)

    async with trio.open_nursery() as nursery:
        await nursery.start(Flusher(vol, interval=30).run)
        nursery.start_soon(monitor)
        for i in range(0, npages, chunk):
            await vol.call(vol.write, f.ino, i * BS, data[i * BS: (i + chunk) * BS])
            check()
        await vol.sync()
        evicted = cache.evictions
        back = []
        for i in range(0, npages, 2 * chunk):
            back.append(vol.read(f.ino, i * BS, 2 * chunk * BS))
            check()
            await trio.sleep(0)
        done.set()
        nursery.cancel_scope.cancel()
    assert b"".join(back) == data
    assert vol.counters["throttled"] + vol.counters["commits"] > 2 and cache.evictions > evicted
    assert worst["clean"] == limit  # the cache was full, and stayed at its limit


@pytest.mark.parametrize("pending", [False, True])
async def test_a_lone_fsync_writes_inline_unless_requests_wait_for_the_loop(make_vol, pending):
    """One fsync of a small commit does its I/O on the event loop (no thread hop), but not while requests wait in
    the kernel: then the I/O goes to a thread, so that the loop keeps taking them meanwhile."""
    vol = make_vol()
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1))
    await vol.sync()
    vol.runner.frontend_pending = lambda: pending
    inline = vol.counters["commits_inline"]
    loop_thread = threading.get_ident()
    seen: list[int] = []
    real = vol.backend.dev.flush

    def flush() -> None:
        seen.append(threading.get_ident())
        real()

    vol.backend.dev.flush = flush
    async with trio.open_nursery() as nursery:
        await nursery.start(Flusher(vol, interval=0).run)
        vol.write(f.ino, 0, fill(2))
        await vol.fsync(f.ino)
        nursery.cancel_scope.cancel()
    assert seen and all((t == loop_thread) != pending for t in seen)
    assert vol.counters["commits_inline"] - inline == (0 if pending else 1)
