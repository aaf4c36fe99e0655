"""The image device (tux3fuse.device.Device): hole filling around written blocks of a sparse image."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
from conftest import drive
from hypothesis import given, settings
from hypothesis import strategies as st

from tux3fuse import device
from tux3fuse.device import Device

BS = 4096
CHUNK_BLOCKS = 16
CHUNKS = 8
VOLBLOCKS = CHUNK_BLOCKS * CHUNKS


def holes(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The host's holes in [start, end) of the file, in bytes."""
    out = []
    at = start
    while at < end:
        hole = os.lseek(fd, at, os.SEEK_HOLE)
        if hole >= end:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:
            data = end
        out.append((hole, min(data, end)))
        at = data
    return out


def sparse_image(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(VOLBLOCKS * BS)


def block(byte: int) -> bytes:
    return bytes([byte]) * BS


@settings(max_examples=60, deadline=None)
@given(before=st.dictionaries(st.integers(0, VOLBLOCKS - 1), st.integers(1, 255), max_size=12),
       batches=st.lists(st.dictionaries(st.integers(0, VOLBLOCKS - 1), st.integers(1, 255), min_size=1,
                                        max_size=20), min_size=1, max_size=6))
def test_filling_holes_keeps_every_byte_and_leaves_no_hole_in_a_written_chunk(before, batches):
    """Blocks written earlier (flushed, as every commit is) and blocks of each batch read back exactly, every
    other block reads as zeros, a chunk that was written to holds no hole afterwards, and a chunk never written
    to stays a hole."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "img")
        sparse_image(path)
        fd = os.open(path, os.O_RDWR)
        for b, byte in before.items():
            os.pwrite(fd, block(byte), b * BS)
        os.fdatasync(fd)
        os.close(fd)
        model = dict(before)
        dev = Device(path, BS, VOLBLOCKS, fill_chunk=CHUNK_BLOCKS * BS)
        assert dev.fill_holes
        touched: set[int] = set()
        for batch in batches:
            dev.write_blocks([(b, block(byte)) for b, byte in batch.items()])
            dev.flush()
            model.update(batch)
            touched |= {b // CHUNK_BLOCKS for b in batch}
        for b in range(VOLBLOCKS):
            assert dev.read_block(b) == block(model.get(b, 0)), f"block {b}"
        for chunk in range(CHUNKS):
            start, end = chunk * CHUNK_BLOCKS * BS, (chunk + 1) * CHUNK_BLOCKS * BS
            if chunk in touched:
                assert holes(dev.fd, start, end) == [], f"chunk {chunk} still has holes"
            elif not any(b // CHUNK_BLOCKS == chunk for b in before):
                assert holes(dev.fd, start, end) == [(start, end)], f"chunk {chunk} was filled unasked"
        assert dev.stats.fill_bytes <= len(touched) * CHUNK_BLOCKS * BS
        filled = dev.stats.fill_bytes
        again = min(touched) * CHUNK_BLOCKS
        dev.write_blocks([(again, block(model.get(again, 0) ^ 1))])
        assert dev.stats.fill_bytes == filled  # a filled chunk gets no more zeros
        dev.close()


@pytest.mark.parametrize("failing", ["lseek", "pwrite"])
def test_a_host_that_cannot_fill_still_gets_every_block(tmp_path, monkeypatch, failing):
    """No SEEK_HOLE on the host, or the host is full: filling stops for good and the blocks are written all
    the same."""
    path = str(tmp_path / "img")
    sparse_image(path)
    dev = Device(path, BS, VOLBLOCKS, fill_chunk=CHUNK_BLOCKS * BS)
    real = getattr(os, failing)

    def refuse(*args):
        if failing == "pwrite" and any(args[1]):  # data writes of the blocks themselves go through pwritev
            return real(*args)
        raise OSError(errno.EINVAL if failing == "lseek" else errno.ENOSPC, "refused")

    monkeypatch.setattr(os, failing, refuse)
    dev.write_blocks([(3, block(7)), (40, block(9))])
    monkeypatch.undo()
    dev.flush()
    assert not dev.fill_holes
    assert dev.read_block(3) == block(7) and dev.read_block(40) == block(9) and dev.read_block(4) == block(0)
    dev.write_blocks([(5, block(1))])
    assert dev.read_block(5) == block(1)
    dev.close()


def test_a_read_only_device_never_fills(tmp_path):
    path = str(tmp_path / "img")
    sparse_image(path)
    assert not Device(path, BS, VOLBLOCKS, readonly=True).fill_holes


def test_no_write_system_call_carries_more_than_a_piece(tmp_path, monkeypatch):
    """Data runs and hole fills are cut into writes of at most ``write_piece`` bytes (a long write would hold a CPU
    in the kernel), and every block still lands where it belongs."""
    path = str(tmp_path / "img")
    sparse_image(path)
    dev = Device(path, BS, VOLBLOCKS, write_piece=3 * BS, fill_chunk=CHUNK_BLOCKS * BS)
    sizes: list[int] = []
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd, data, offset):
        sizes.append(len(data))
        return real_pwrite(fd, data, offset)

    def pwritev(fd, bufs, offset):
        sizes.append(sum(len(b) for b in bufs))
        return real_pwritev(fd, bufs, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    batch = {b: b % 251 + 1 for b in [*range(5, 45), 70, 71, 100]}
    dev.write_blocks([(b, block(byte)) for b, byte in batch.items()])
    monkeypatch.undo()
    dev.flush()
    assert sizes and max(sizes) <= 3 * BS
    assert dev.stats.fill_bytes > 0  # the holes around the blocks were filled, in pieces too
    for b in range(VOLBLOCKS):
        assert dev.read_block(b) == block(batch.get(b, 0)), f"block {b}"
    for chunk in {b // CHUNK_BLOCKS for b in batch}:
        start = chunk * CHUNK_BLOCKS * BS
        assert holes(dev.fd, start, start + CHUNK_BLOCKS * BS) == []
    dev.close()


def test_a_held_block_stops_its_run_there_and_the_rest_follows_on_release(tmp_path):
    """The hold a test puts on one block of a run: the blocks before it are on the image when the hold is
    reached, the held block and those after it only once it is released."""
    import threading

    path = str(tmp_path / "img")
    sparse_image(path)
    dev = Device(path, BS, VOLBLOCKS, fill_chunk=CHUNK_BLOCKS * BS)
    batch = {b: b + 1 for b in range(10, 20)}
    reached, release = dev.hold(14)
    writer = threading.Thread(target=dev.write_blocks, args=([(b, block(x)) for b, x in batch.items()],))
    writer.start()
    assert reached.wait(10)
    assert [dev.read_block(b) == block(batch[b]) for b in range(10, 20)] == [True] * 4 + [False] * 6
    release.set()
    writer.join(10)
    assert all(dev.read_block(b) == block(batch[b]) for b in batch) and not dev.holds
    dev.close()


def test_planning_checks_every_block_and_yields_as_it_goes(tmp_path):
    path = str(tmp_path / "img")
    sparse_image(path)
    dev = Device(path, BS, VOLBLOCKS, fill_chunk=CHUNK_BLOCKS * BS)
    writes = [(b, block(1)) for b in range(0, 100, 2)]
    yields, plan = drive(dev.plan_steps(writes, step=8))
    assert yields == len(writes) // 8
    assert [start for start, _ in plan.runs] == list(range(0, 100, 2))
    with pytest.raises(device.OutOfRange):
        dev.plan([(5, block(1)), (VOLBLOCKS, block(1))])
    dev.close()


def test_every_read_error_is_counted_and_a_failing_device_cannot_flood_the_log(caplog):
    """``ReadErrors``: one line per failure naming the blocks, the inode and the error; the same line again only
    after ``repeat`` seconds, at most ``burst`` lines per ``interval``; the next line says how many were held back."""
    now = [0.0]
    stats = device.IOStats()
    errors = device.ReadErrors("img", stats, clock=lambda: now[0], burst=3, interval=5.0, repeat=60.0)
    eio = OSError(errno.EIO, os.strerror(errno.EIO))
    caplog.set_level("ERROR", logger="tux3fuse")
    for _ in range(20):  # a reader trying the same bad block again and again
        errors.failed(eio, 812, ino=12, index=3)
    assert caplog.messages == ["read error on img block 812 (inode 12, block 3): Input/output error"]
    now[0] = 61.0
    errors.failed(eio, 812, ino=12, index=3)
    assert caplog.messages[-1].endswith("Input/output error (19 more read error(s) not logged)")
    caplog.clear()
    for block in range(100, 110):  # a dying device: many blocks at once
        errors.failed(eio, block, 4, ahead=True)
    assert caplog.messages == [f"read error on img blocks {b}-{b + 3} (readahead): Input/output error"
                               for b in (100, 101)]  # the burst of this interval had one line already
    now[0] = 70.0
    errors.failed(eio, 5)
    assert caplog.messages[-1] == "read error on img block 5: Input/output error (8 more read error(s) not logged)"
    assert (stats.read_errors, stats.readahead_errors) == (32, 10)
