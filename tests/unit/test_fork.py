"""Page forking, deterministically: the test decides when the backend's I/O happens."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from tux3fuse.cache.fork import Action, need_fork
from tux3fuse.cache.page import CLEAN, Page
from tux3fuse.fs import Options, Volume, WaitFor

BS = 4096


@pytest.fixture
def vol(make_vol):
    return make_vol()


def written_and_committing(vol: Volume, data: bytes):
    """A file holding ``data`` whose commit has just been prepared: its pages are under writeback."""
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, data)
    return f, vol.flusher.start_commit()


def committed(vol: Volume) -> Volume:
    """The state on the image, read beside the live volume."""
    return Volume(vol.path, Options(readonly=True, lock=False))


def fill(byte: int, n: int = BS) -> bytes:
    return bytes([byte]) * n


def test_need_fork_table():
    p = Page(0, bytearray(BS))
    assert need_fork(p, 5, "fork") is Action.CAN_DIRTY
    p.delta = 5
    assert need_fork(p, 5, "fork") is Action.ALREADY
    assert need_fork(p, 6, "fork") is Action.NEED_FORK
    assert need_fork(p, 6, "wait") is Action.WAIT
    assert need_fork(p, 6, "none") is Action.IN_PLACE
    p.delta, p.writeback = CLEAN, True
    assert need_fork(p, 6, "fork") is Action.NEED_FORK
    for mode in ("fork", "wait", "none"):  # the commit's blocks are written: its pages' I/O is over
        assert need_fork(p, 6, mode, written=True) is Action.AFTER_IO
    p.delta, p.writeback = 5, False
    assert need_fork(p, 6, "wait", written=True) is Action.AFTER_IO
    assert need_fork(p, 5, "wait", written=True) is Action.ALREADY
    p.forked = True
    assert need_fork(p, 6, "fork") is Action.FORKED
    assert need_fork(p, 6, "fork", written=True) is Action.FORKED


def test_write_to_page_under_writeback_forks_without_waiting(vol):
    f, job = written_and_committing(vol, fill(1))  # the page is now under writeback, owned by the backend
    page = vol.iget(f.ino).mapping.get(0)
    assert page.writeback
    vol.write(f.ino, 0, fill(2))  # returns at once
    assert vol.counters["forks"] == 1 and vol.counters["waits"] == 0
    assert vol.iget(f.ino).mapping.get(0) is not page and page.forked
    assert bytes(page.data) == fill(1)  # the backend's copy is unchanged
    assert vol.read(f.ino, 0, BS) == fill(2)
    job.write()
    job.complete()
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(1)  # the committed delta holds the first content
    snap.close_files()
    assert vol.forks.live == 0  # released after the commit
    vol.commit()
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(2)
    snap.close_files()


def test_rewrite_within_one_delta_does_not_fork(vol):
    f = vol.create(1, b"f", 0o644)
    for i in range(10):
        vol.write(f.ino, 0, fill(i))
    assert vol.counters["forks"] == 0
    vol.commit()
    vol.write(f.ino, 0, fill(42))  # clean page after the commit: dirtied in place
    assert vol.counters["forks"] == 0


def test_held_device_write_forks_while_the_io_is_in_flight(vol):
    from tux3fuse.backend.extents import lookup_run

    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(7, 8 * BS))
    job = vol.flusher.start_commit()
    physical, _, _ = lookup_run(vol.backend.dtree(vol.iget(f.ino)), 0, 1)
    reached, release = vol.backend.dev.hold(physical)  # the backend's write of block 0 of the file stops in flight

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, job.write)
            await trio.to_thread.run_sync(reached.wait)
            with trio.fail_after(1):  # must not wait for the held I/O
                await vol.call(vol.write, f.ino, 0, fill(9, 2 * BS))
            assert vol.counters["forks"] == 2 and vol.counters["waits"] == 0
            release.set()
        job.complete()

    trio.run(main)
    snap = committed(vol)
    assert snap.read(f.ino, 0, 8 * BS) == fill(7, 8 * BS)
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    assert snap.read(f.ino, 0, 8 * BS) == fill(9, 2 * BS) + fill(7, 6 * BS)
    snap.close_files()


def test_wait_mode_waits_for_the_io_and_never_forks(make_vol):
    vol = make_vol("wait")
    f, job = written_and_committing(vol, fill(1))
    with pytest.raises(WaitFor):
        vol.write(f.ino, 0, fill(2))
    assert vol.read(f.ino, 0, BS) == fill(1)  # nothing changed before the wait
    job.write()
    job.complete()
    vol.write(f.ino, 0, fill(2))
    assert vol.counters["forks"] == 0
    vol.commit()
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(2)
    snap.close_files()


@pytest.mark.parametrize("mode", ["fork", "wait", "none"])
def test_once_the_blocks_are_written_a_write_changes_the_page_in_place(make_vol, mode):
    """Between the commit's block writes and its end (flush, superblock, completion) the page's I/O is over: a
    write neither forks nor waits nor tears the block, and lands in the next delta."""
    vol = make_vol(mode)
    f, job = written_and_committing(vol, fill(1, 2 * BS))
    page = vol.iget(f.ino).mapping.get(0)
    job.write_data()
    job.mark_written()
    vol.write(f.ino, 100, b"after")  # no WaitFor, even with stable=wait
    assert vol.runner.job is job and page.writeback  # the commit is still in flight
    assert vol.iget(f.ino).mapping.get(0) is page and not page.forked
    c = vol.counters
    assert (c["forks"], c["waits"], c["in_place_writes"], c["after_io_writes"]) == (0, 0, 0, 1)
    job.write_super()
    job.complete()
    assert page.delta == vol.deltas.current and not page.writeback  # dirty for the next delta
    snap = committed(vol)
    assert snap.read(f.ino, 0, 2 * BS) == fill(1, 2 * BS)  # the committed delta: the first content, no torn block
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    expected = bytearray(fill(1, 2 * BS))
    expected[100:105] = b"after"
    assert snap.read(f.ino, 0, 2 * BS) == expected
    snap.close_files()


@pytest.mark.parametrize("mode", ["fork", "wait", "none"])
def test_a_page_changed_in_place_then_truncated_is_released(make_vol, mode):
    """A page changed in place while the backend has it (during its I/O with stable=none, after it in every
    mode) and then dropped by a truncate is released when the commit completes, with its later change."""
    vol = make_vol(mode)
    f, job = written_and_committing(vol, fill(1, 2 * BS))
    if mode != "none":
        job.write_data()
        job.mark_written()
    vol.write(f.ino, 0, fill(2))  # in place, for the next delta
    vol.setattr(f.ino, size=0)  # the page leaves the index; the backend still writes it
    assert vol.forks.live == 2
    job.write()
    job.complete()
    assert vol.forks.live == 0 and vol.icache.cache.dirty_pages == 0
    vol.commit()
    assert vol.getattr(f.ino).size == 0 and vol.read(f.ino, 0, BS) == b""
    snap = committed(vol)
    assert snap.getattr(f.ino).size == 0
    snap.close_files()


def hold_calls(monkeypatch, obj, *names):
    """Make calls of ``obj``'s methods ``names`` (from any thread) stop until released: (reached, release)."""
    reached, release = threading.Event(), threading.Event()
    for name in names:
        method = getattr(obj, name)

        def held(*args, _method=method, **kwargs):
            reached.set()
            release.wait()
            return _method(*args, **kwargs)

        monkeypatch.setattr(obj, name, held)
    return reached, release


def test_wait_mode_waits_for_the_page_io_not_for_the_flush(make_vol, monkeypatch):
    """stable=wait as Linux's stable pages: a writer waits while the commit's block writes are held, and goes on
    while its flush is still held: it never waits for the flush or the superblock."""
    vol = make_vol("wait")
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(7, 4 * BS))
    vol.commit()
    vol.write(f.ino, 0, fill(8, 4 * BS))
    data_reached, data_release = hold_calls(monkeypatch, vol.backend.dev, "write_plan", "write_blocks")
    flush_reached, flush_release = hold_calls(monkeypatch, vol.backend.dev, "flush")
    seen = {}

    async def writer(job):
        await vol.call(vol.write, f.ino, 0, fill(9, BS))
        seen.update(job_in_flight=vol.runner.job is job, flushed=flush_release.is_set(), waits=vol.counters["waits"])

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.flusher.commit_async)
            with trio.fail_after(5):
                while not data_reached.is_set():
                    await trio.sleep(0.001)
            job = vol.runner.job
            nursery.start_soon(writer, job)
            await trio.sleep(0.05)
            assert not seen, "the writer changed a page whose block write is held"
            data_release.set()
            with trio.fail_after(5):
                while not seen:
                    await trio.sleep(0.001)
            assert flush_reached.is_set()
            flush_release.set()

    trio.run(main)
    assert seen == {"job_in_flight": True, "flushed": False, "waits": 1}
    snap = committed(vol)
    assert snap.read(f.ino, 0, 4 * BS) == fill(8, 4 * BS)  # the delta in flight: the content before the wait
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    assert snap.read(f.ino, 0, 4 * BS) == fill(9, BS) + fill(8, 3 * BS)
    snap.close_files()


def test_none_mode_tears_the_block_and_the_checksum_catches_it(make_vol):
    vol = make_vol("none")
    f, job = written_and_committing(vol, fill(1))
    vol.write(f.ino, 100, b"torn")  # changes the very buffer the backend is about to write
    job.write()
    job.complete()
    snap = committed(vol)
    with pytest.raises(Exception) as e:
        snap.read(f.ino, 0, BS)
    assert "checksum mismatch" in str(e.value)
    snap.close_files()
    vol.commit()  # the change belongs to the next delta and is committed there, with a good checksum
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS)[100:104] == b"torn"
    snap.close_files()
    vol.unmount()


def test_none_mode_append_to_a_page_of_the_committing_delta_survives_its_commit(make_vol):
    """stable=none: an append lands in place in a page its older delta has still to write; that commit zeroes what
    lies past its own size in the block it writes, never in the page, whose appended bytes the next delta keeps."""
    vol = make_vol("none")
    f = vol.create(1, b"log", 0o644)
    vol.write(f.ino, 0, fill(1, 1000))
    job = vol.flusher.start_commit(prepare=False)  # transitioned: the page is dirty for the committing delta
    vol.write(f.ino, 1000, fill(2, 500))  # appended in place, for the next delta
    assert vol.counters["in_place_writes"] == 1
    job.prepare()
    job.write()
    job.complete()
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(1, 1000)  # the committed delta: its size, its bytes, a good checksum
    snap.close_files()
    assert vol.read(f.ino, 0, BS) == fill(1, 1000) + fill(2, 500)
    vol.commit()
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(1, 1000) + fill(2, 500)
    snap.close_files()
    vol.unmount()


def test_truncate_during_commit_deletes_for_writeout_without_copy(vol):
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(5, 4 * BS))
    job = vol.flusher.start_commit()
    vol.setattr(f.ino, size=BS + 10)  # shrinks across pages the backend is writing
    assert vol.counters["forks"] == 1  # only the partial tail page is copied, to zero its tail
    assert vol.forks.live == 3  # the tail page's old copy and two pages deleted for writeout
    assert vol.read(f.ino, 0, 2 * BS) == fill(5, BS + 10)
    vol.setattr(f.ino, size=4 * BS)  # regrow: the cut part reads as zeros
    assert vol.read(f.ino, 0, 4 * BS) == fill(5, BS + 10) + bytes(3 * BS - 10)
    job.write()
    job.complete()
    snap = committed(vol)
    assert snap.read(f.ino, 0, 4 * BS) == fill(5, 4 * BS)  # the committed delta holds the old data
    snap.close_files()
    assert vol.forks.live == 0
    vol.commit()
    snap = committed(vol)
    assert snap.getattr(f.ino).size == 4 * BS
    assert snap.read(f.ino, 0, 4 * BS) == fill(5, BS + 10) + bytes(3 * BS - 10)
    snap.close_files()


def test_attributes_of_the_next_delta_do_not_leak_into_the_committing_one(vol):
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1, 3 * BS))
    vol.setattr(f.ino, mode=0o600)
    job = vol.flusher.start_commit()
    vol.setattr(f.ino, mode=0o640, uid=77)
    vol.write(f.ino, 3 * BS, fill(2, BS))
    assert vol.counters["attr_forks"] >= 1
    job.write()
    job.complete()
    snap = committed(vol)
    a = snap.getattr(f.ino)
    assert (a.mode & 0o777, a.uid, a.size) == (0o600, 0, 3 * BS)
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    a = snap.getattr(f.ino)
    assert (a.mode & 0o777, a.uid, a.size) == (0o640, 77, 4 * BS)
    snap.close_files()


@pytest.mark.parametrize("mode, written", [("fork", False), ("fork", True), ("wait", True)])
def test_directory_changes_while_its_block_is_committed(make_vol, mode, written):
    """During the block writes a directory block forks; once they are done (in any mode) it changes in place."""
    vol = make_vol(mode)
    d = vol.mkdir(1, b"d", 0o755)
    for i in range(20):
        vol.mknod(d.ino, b"old%d" % i, 0o100644)
    job = vol.flusher.start_commit()
    if written:
        job.write_data()
        job.mark_written()
    vol.mknod(d.ino, b"new", 0o100644)
    vol.unlink(d.ino, b"old3")
    if written:
        assert vol.counters["dir_forks"] == 0 and vol.counters["after_io_writes"] >= 1 and vol.runner.job is job
    else:
        assert vol.counters["dir_forks"] >= 1
    assert sorted(n for n, _, _ in vol.readdir(d.ino, 0)) == sorted(
        [b"old%d" % i for i in range(20) if i != 3] + [b"new"])
    job.write()
    job.complete()
    snap = committed(vol)
    assert sorted(n for n, _, _ in snap.readdir(d.ino, 0)) == sorted(b"old%d" % i for i in range(20))
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    names = sorted(n for n, _, _ in snap.readdir(d.ino, 0))
    assert names == sorted([b"old%d" % i for i in range(20) if i != 3] + [b"new"])
    snap.close_files()


def test_mmap_write_after_the_blocks_are_written_changes_the_page_in_every_mapping(vol):
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1, 2 * BS))
    m1, m2 = vol.mmap(f.ino), vol.mmap(f.ino)
    assert m1.read(0, 4) == m2.read(0, 4) == fill(1, 4)
    job = vol.flusher.start_commit()  # write-protects the pages in both mappings
    job.write_data()
    job.mark_written()
    m2.write(20, b"two")  # write fault: no fork, the page itself changes
    m1.write(30, b"three")
    assert vol.counters["forks"] == 0 and vol.counters["after_io_writes"] == 2
    for m in (m1, m2):
        assert m.read(0, 2 * BS) == vol.read(f.ino, 0, 2 * BS)
    job.write_super()
    job.complete()
    snap = committed(vol)
    assert snap.read(f.ino, 0, 2 * BS) == fill(1, 2 * BS)
    snap.close_files()
    m1.write(40, b"four")  # the page is dirty for the current delta now
    vol.commit()
    snap = committed(vol)
    assert snap.read(f.ino, 0, 50)[20:44] == b"two" + fill(1, 7) + b"three" + fill(1, 5) + b"four"
    snap.close_files()


def test_mmap_write_during_commit_forks_and_keeps_every_mapping_coherent(vol):
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1, 2 * BS))
    m1, m2 = vol.mmap(f.ino), vol.mmap(f.ino)
    m1.write(10, b"one")
    assert m2.read(10, 3) == b"one"
    job = vol.flusher.start_commit()
    m2.write(20, b"two")  # write fault on a write-protected page under writeback: fork
    assert vol.counters["forks"] == 1
    for m in (m1, m2):
        assert m.read(0, 2 * BS) == vol.read(f.ino, 0, 2 * BS)
    m1.write(30, b"three")  # m1 was pointed at the copy read-only: it faults, no second fork
    assert vol.counters["forks"] == 1
    assert m2.read(30, 5) == b"three"
    job.write()
    job.complete()
    snap = committed(vol)
    assert snap.read(f.ino, 0, 40)[10:40] == b"one" + fill(1, 27)
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    data = snap.read(f.ino, 0, 40)
    assert data[10:13] == b"one" and data[20:23] == b"two" and data[30:35] == b"three"
    snap.close_files()
    m1.unmap()
    m2.unmap()


def test_writes_through_a_pin_land_in_the_delta_current_when_made(vol):
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(0, BS))
    m = vol.mmap(f.ino)
    pin = m.pin(0)
    pin.write(0, b"before")  # delta N
    job = vol.flusher.start_commit()  # the backend writes a copy; the pinned page stays, now dirty for N+1
    assert vol.counters["pinned_copies"] == 1 and vol.counters["forks"] == 0
    pin.write(100, b"after")  # delta N+1: must not leak into N, must not be lost
    vol.write(f.ino, 200, b"write")  # a write(2) to the pinned page does not fork either
    assert vol.counters["forks"] == 0
    job.write()
    job.complete()
    snap = committed(vol)
    data = snap.read(f.ino, 0, BS)
    assert data[:6] == b"before" and data[100:105] == bytes(5) and data[200:205] == bytes(5)
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    data = snap.read(f.ino, 0, BS)
    assert data[:6] == b"before" and data[100:105] == b"after" and data[200:205] == b"write"
    snap.close_files()
    pin.release()
    m.unmap()


def test_forked_pages_are_released_and_counted(vol):
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, os.urandom(16 * BS))
    job = vol.flusher.start_commit()
    for i in range(16):
        vol.write(f.ino, i * BS, fill(i))
    assert vol.forks.live == 16 and vol.forks.peak == 16
    stats = vol.stats()
    assert stats["forked_pages_live"] == 16
    job.write()
    job.complete()
    assert vol.forks.live == 0 and vol.stats()["forked_pages_peak"] == 16


def test_superblock_goes_to_the_copy_that_does_not_name_the_last_durable_delta(vol):
    from tux3fuse import format as fmt

    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1))
    vol.commit()
    durable, copy = vol.backend.sb.seq, vol.backend.sb.copy
    assert not vol.commit()  # a delta with nothing to write writes no superblock (the next one is even)
    vol.write(f.ino, 0, fill(2))
    vol.commit()
    assert vol.backend.sb.copy == 1 - copy  # not chosen by delta parity: the durable copy must survive a torn write
    with open(vol.path, "rb") as img:
        img.seek(fmt.SUPER_OFFSETS[copy])
        assert fmt.Super.unpack(img.read(fmt.SUPER_SIZE), copy).seq == durable


def test_writer_over_the_dirty_limit_waits_while_other_requests_are_served(make_vol):
    vol = make_vol(dirty_limit=32 * BS)
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, fill(1, 32 * BS))  # at the limit
    job = vol.flusher.start_commit()
    reached, release = vol.backend.dev.hold(min(b for b, _ in job.writes))
    order = []

    async def main():
        async def writer():
            await vol.call(vol.write, f.ino, 32 * BS, fill(2, 8 * BS))  # over the limit while the commit is stuck
            order.append("write")

        async def stat():
            order.append(("stat", vol.getattr(f.ino).size))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, job.write)
            await trio.to_thread.run_sync(reached.wait)
            nursery.start_soon(writer)
            await trio.sleep(0.05)
            nursery.start_soon(stat)
            await trio.sleep(0.05)
            assert order == [("stat", 32 * BS)]  # served while the writer is throttled
            release.set()
            while vol.runner.job is job and not job.cursor >= len(job.writes):
                await trio.sleep(0.01)
            await trio.sleep(0.05)
            job.complete()
        assert order[-1] == "write"

    trio.run(main)
    assert vol.counters["throttled"] >= 1
    assert vol.read(f.ino, 32 * BS, 8 * BS) == fill(2, 8 * BS)
    vol.unmount()


def test_plain_embedded_writer_over_the_dirty_limit_commits_itself(make_vol):
    vol = make_vol(dirty_limit=16 * BS)
    f = vol.create(1, b"f", 0o644)
    for i in range(8):
        vol.write(f.ino, i * 8 * BS, fill(i + 1, 8 * BS))
    assert vol.icache.cache.dirty_pages * BS <= 16 * BS
    assert vol.counters["commits"] >= 3
    vol.unmount()


def test_writes_between_the_steps_of_a_completing_commit(vol):
    """Stage 3 yields every few pages: a page it has completed is clean (a write dirties it for the new delta),
    a page it has not reached is still under writeback but written (a write changes it in place and it moves to
    the new delta when reached; neither forks), and no commit can start before the last step."""
    n = 200
    f, job = written_and_committing(vol, b"".join(fill(i % 251) for i in range(n)))
    job.write()
    steps = job.complete_steps(step=64)
    next(steps)  # the first 64 pages are complete
    mapping = vol.iget(f.ino).mapping
    done, pending = mapping.get(0), mapping.get(n - 1)
    assert not done.writeback and not done.dirty and pending.writeback
    vol.write(f.ino, 0, fill(7))
    vol.write(f.ino, (n - 1) * BS, fill(8))
    assert (vol.counters["forks"], vol.counters["after_io_writes"]) == (0, 1)  # the pending page, in place
    assert mapping.get(0) is done and mapping.get(n - 1) is pending and pending.delta == job.delta
    assert vol.runner.job is job and vol.deltas.committed < job.delta
    for _ in steps:
        assert vol.runner.job is job
    assert vol.runner.job is None and vol.deltas.committed == job.delta
    assert pending.delta == vol.deltas.current and not pending.writeback
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(0) and snap.read(f.ino, (n - 1) * BS, BS) == fill((n - 1) % 251)
    snap.close_files()
    vol.commit()
    snap = committed(vol)
    assert snap.read(f.ino, 0, BS) == fill(7) and snap.read(f.ino, (n - 1) * BS, BS) == fill(8)
    snap.close_files()
    assert vol.forks.live == 0


class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of one task: each is a time it gave the loop back and got it again."""

    def __init__(self) -> None:
        self.task = None
        self.steps = 0

    def before_task_step(self, task) -> None:
        if task is self.task:
            self.steps += 1


@pytest.mark.parametrize("pending, frontend, yields", [(False, False, False), (True, False, True),
                                                        (False, True, True)])
def test_a_commit_gives_the_loop_back_only_when_the_frontend_has_work(make_vol, monkeypatch, pending, frontend,
                                                                       yields):
    """Between two slices a commit passes through the scheduler when a request waits unread (the daemon's poll
    of /dev/fuse: ``frontend_pending``) or a task is runnable; otherwise it goes on without the trip."""

    # every step ends a slice: the counts do not depend on speed
    vol = make_vol(prepare_slice=0.0, commit_yield=3600.0)
    f = vol.create(1, b"f", 0o644)
    for i in range(0, 600, 2):  # runs of one page: one prepare step each
        vol.write(f.ino, i * BS, fill(i % 251))
    vol.runner.frontend_pending = lambda: pending
    counter = StepCounter()
    frontend_turns = 0

    async def main() -> None:
        nonlocal frontend_turns
        counter.task = trio.lowlevel.current_task()
        async with trio.open_nursery() as nursery:
            if frontend:
                async def busy() -> None:  # a frontend task that is always runnable
                    nonlocal frontend_turns
                    while True:
                        frontend_turns += 1
                        await trio.sleep(0)
                nursery.start_soon(busy)
                await trio.sleep(0)
            await vol.flusher.commit_async()
            nursery.cancel_scope.cancel()

    trio.run(main, instruments=[counter])
    if yields:
        assert counter.steps >= 300 * 2  # two checkpoints after every run of the prepare stage
    else:
        assert counter.steps < 20  # the worker thread's hand-back and a few stage boundaries only
    if frontend:
        assert frontend_turns >= 300  # the runnable task ran between every two slices
    snap = committed(vol)
    assert all(snap.read(f.ino, i * BS, BS) == fill(i % 251) for i in range(0, 600, 2))
    snap.close_files()


@pytest.mark.parametrize("urgent, stable", [(False, "fork"), (True, "fork"), (False, "wait")])
def test_requests_that_arrive_while_the_frontend_runs_go_first_too(make_vol, monkeypatch, urgent, stable):
    """At a slice boundary a background commit lets requests go first until none waits unread, including those
    that reached the kernel while the frontend had its turn (a small write queued behind a large one). A commit
    that someone waits for (an fsync's; with stable=wait, any) gives the frontend one turn per boundary."""
    from tux3fuse.backend.commit import CommitJob

    # every step ends a slice; no share kept: the order alone is under test
    vol = make_vol(stable=stable, prepare_slice=0.0, urgent_slice=0.0, commit_yield=3600.0, commit_share=0.0)
    f = vol.create(1, b"f", 0o644)
    for i in range(0, 100, 2):  # runs of one page: one prepare step each
        vol.write(f.ino, i * BS, fill(i % 251))
    kernel = {"queued": 0}  # requests the kernel holds that no task has read
    left: list[int] = []  # what was still unread each time the commit went on with its next step
    real_steps = CommitJob.prepare_steps

    def prepare_steps(self):
        for _ in real_steps(self):
            kernel["queued"] = 5  # five requests arrive during this step
            yield
            left.append(kernel["queued"])

    monkeypatch.setattr(CommitJob, "prepare_steps", prepare_steps)
    vol.runner.frontend_pending = lambda: kernel["queued"] > 0

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def frontend() -> None:  # reads one request per turn
                while True:
                    if kernel["queued"]:
                        kernel["queued"] -= 1
                    await trio.sleep(0)
            nursery.start_soon(frontend)
            await trio.sleep(0)
            await vol.flusher.commit_async(urgent=urgent)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(left) >= 50
    if urgent or stable == "wait":
        assert min(left) > 0  # two checkpoints per boundary: at most two of the five requests went first
    else:
        assert set(left) == {0}
    snap = committed(vol)
    assert all(snap.read(f.ino, i * BS, BS) == fill(i % 251) for i in range(0, 100, 2))
    snap.close_files()


def test_a_steady_stream_of_requests_never_stops_a_commit(make_vol, monkeypatch):
    """Requests go first only while the commit keeps its share of the loop: with a request always waiting and a
    frontend task always runnable, the commit still takes its steps. (A commit is shielded from cancellation, so
    the frontend itself notices a commit that no longer runs, and stops the requests.)"""
    from tux3fuse.backend.commit import CommitJob

    vol = make_vol(prepare_slice=0.0, commit_yield=3600.0)
    f = vol.create(1, b"f", 0o644)
    for i in range(0, 200, 2):
        vol.write(f.ino, i * BS, fill(i % 251))
    state = {"turns": 0, "most": 0, "starved": False, "steps": 0, "prepared": False}
    real_steps = CommitJob.prepare_steps

    def prepare_steps(self):
        for _ in real_steps(self):
            state["steps"] += 1
            state["turns"] = 0
            yield
        state["prepared"] = True  # the I/O that follows runs in a thread, as long as the machine makes it

    monkeypatch.setattr(CommitJob, "prepare_steps", prepare_steps)
    vol.runner.frontend_pending = lambda: not state["starved"]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def frontend() -> None:
                while True:
                    if state["prepared"]:
                        await trio.sleep(0)
                        continue
                    state["turns"] += 1
                    state["most"] = max(state["most"], state["turns"])
                    if state["turns"] > 20_000:  # far beyond any share: the commit would never go on
                        state["starved"] = True
                    await trio.sleep(0)
            nursery.start_soon(frontend)
            await trio.sleep(0)
            await vol.flusher.commit_async()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not state["starved"], "the commit stopped taking steps while requests kept coming"
    assert state["steps"] >= 100 and state["most"] >= 2  # the frontend went first at the boundaries
    snap = committed(vol)
    assert all(snap.read(f.ino, i * BS, BS) == fill(i % 251) for i in range(0, 200, 2))
    snap.close_files()


@pytest.mark.parametrize("held", [False, True])
def test_a_commit_counts_its_first_slice_from_its_last_turn(make_vol, monkeypatch, held):
    """Work the committing task did since it last got the loop (the stage before, the commit before) belongs to
    the first slice: when that already used up a slice, a runnable task goes before the first prepare step."""
    from tux3fuse.backend.commit import CommitJob

    vol = make_vol(prepare_slice=0.5, commit_yield=3600.0)  # no slice of this small commit ends by the clock
    f = vol.create(1, b"f", 0o644)
    for i in range(0, 20, 2):
        vol.write(f.ino, i * BS, fill(i))
    events: list[str] = []
    real_steps = CommitJob.prepare_steps

    def prepare_steps(self):
        events.append("prepare")
        yield from real_steps(self)

    monkeypatch.setattr(CommitJob, "prepare_steps", prepare_steps)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def busy() -> None:  # a frontend task that is always runnable
                while True:
                    events.append("frontend")
                    await trio.sleep(0)
            nursery.start_soon(busy)
            await trio.sleep(0)
            events.clear()
            # this task got the loop now, or (held) it has run for a second since it last did
            vol.runner.turn_started = time.perf_counter() - (1.0 if held else 0.0)
            await vol.flusher.commit_async()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert events[0] == ("frontend" if held else "prepare")
    snap = committed(vol)
    assert all(snap.read(f.ino, i * BS, BS) == fill(i) for i in range(0, 20, 2))
    snap.close_files()
