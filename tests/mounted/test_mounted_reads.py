"""Reads through a real mount: uncached blocks are read beside the event loop, a sequential reader is read ahead
of, and what both bring into the cache is the file's, after a truncate too."""

from __future__ import annotations

import os
import random
import threading

import pytest

pytestmark = [pytest.mark.mounted, pytest.mark.timeout(300)]

MIB = 1 << 20


def drop_kernel_cache(path: str) -> None:
    """Make the kernel forget the file's pages (so that reads reach the daemon): POSIX_FADV_DONTNEED."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_sequential_read_of_a_cold_file_is_read_ahead_and_returns_the_file(make_mount):
    m = make_mount(size="256M", options="readahead=2M")  # (by default an image file is left to the host's own)
    data = os.urandom(16 * MIB)
    with open(m.path("f"), "wb") as f:
        f.write(data)
    m.umount()
    drop_kernel_cache(str(m.image))  # the host forgets the image too: the reads wait for the device
    m.start()
    before = m.stat_json()
    with open(m.path("f"), "rb") as f:
        got = b"".join(iter(lambda: f.read(128 << 10), b""))
    assert got == data
    s = m.stat_json()
    assert s["readahead_blocks"] > 0, s
    assert s["blocks_read"] - before["blocks_read"] >= len(data) // 4096
    assert s["read_only"] == 0


def test_random_readers_beside_a_writer_and_truncates_read_what_was_written(make_mount):
    m = make_mount(size="256M", options="cache=1M")
    size = 8 * MIB
    data = bytearray(os.urandom(size))
    path = m.path("f")
    with open(path, "wb") as f:
        f.write(data)
    m.umount()
    m.start()
    errors: list[str] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(m.path("g"), os.O_RDONLY)
        try:
            while not stop.is_set():
                off = rng.randrange(0, size - 8192)
                if os.pread(fd, 8192, off) != bytes(g[off: off + 8192]):
                    errors.append(f"g at {off}")
                    return
        finally:
            os.close(fd)

    g = os.urandom(size)  # a second file that only readers touch, read while f changes beside it
    with open(m.path("g"), "wb") as f:
        f.write(g)
    os.sync()
    drop_kernel_cache(m.path("g"))
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        rng = random.Random(1)
        fd = os.open(path, os.O_RDWR)
        try:
            for step in range(60):
                what = rng.randrange(3)
                if what == 0:
                    off = rng.randrange(0, size - 65536)
                    chunk = os.urandom(rng.randrange(1, 65536))
                    os.pwrite(fd, chunk, off)
                    data[off: off + len(chunk)] = chunk
                elif what == 1:
                    cut = rng.randrange(0, size)
                    os.ftruncate(fd, cut)
                    os.ftruncate(fd, size)
                    data[cut:] = bytes(size - cut)
                else:
                    os.fsync(fd)
                drop_kernel_cache(path)
                off = rng.randrange(0, size - 262144)
                assert os.pread(fd, 262144, off) == bytes(data[off: off + 262144]), f"step {step}"
        finally:
            os.close(fd)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    drop_kernel_cache(path)
    with open(path, "rb") as f:
        assert f.read() == bytes(data)
    assert m.stat_json()["read_only"] == 0

