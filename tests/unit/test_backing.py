"""Backings (tux3fuse/backing.py): an image file and an NBD export served by nbdkit hold the same bytes after the
same writes; a batch with several writes in flight lands as if written in order; a server that goes away is an
EIO OSError naming the export; the "in use" lock of an export refuses a second user on this machine."""

from __future__ import annotations

import errno
import random
import signal

import pytest
from conftest import Nbdkit, require_nbd

from tux3fuse import backing as bk
from tux3fuse.backing import FileBacking, InUse, NbdBacking, open_backing
from tux3fuse.device import Device

SIZE = 8 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def memory_server(tmp_path):
    """nbdkit's memory plugin on a Unix socket in tmp_path; killed by its PID at the end."""
    require_nbd()
    server = Nbdkit(tmp_path, "memory", f"size={SIZE}")
    yield server
    server.stop()


def batch(rnd: random.Random, n: int) -> list[tuple[int, list[bytes]]]:
    """``n`` runs at random offsets, some overlapping, of one to four buffers of up to 8 KiB."""
    runs = []
    for _ in range(n):
        offset = rnd.randrange(0, SIZE - 40000)
        runs.append((offset, [rnd.randbytes(rnd.randint(1, 8192)) for _ in range(rnd.randint(1, 4))]))
    return runs


def apply(model: bytearray, runs: list[tuple[int, list[bytes]]]) -> None:
    for offset, bufs in runs:
        data = b"".join(bufs)
        model[offset: offset + len(data)] = data


def test_a_uri_opens_an_nbd_backing_and_anything_else_a_file(tmp_path, memory_server):
    image = tmp_path / "img"
    image.write_bytes(bytes(4096))
    with open_backing(memory_server.uri) as nbd, open_backing(str(image)) as f:
        assert isinstance(nbd, NbdBacking) and isinstance(f, FileBacking)
        assert nbd.size() == SIZE and f.size() == 4096
        assert nbd.name == memory_server.uri and nbd.fd == -1 and not nbd.regular
        assert f.regular and f.fd >= 0


def test_a_file_and_an_export_hold_the_same_bytes_after_the_same_writes(tmp_path, memory_server):
    rnd = random.Random(7)
    image = tmp_path / "img"
    image.write_bytes(bytes(SIZE))
    model = bytearray(SIZE)
    with open_backing(memory_server.uri) as nbd, open_backing(str(image)) as f:
        for _ in range(5):
            runs = batch(rnd, 60)
            nbd.write_runs(runs)
            f.write_runs(runs)
            apply(model, runs)
            offset = rnd.randrange(SIZE - 4096)
            nbd.pwrite(b"single", offset, fua=True)
            f.pwrite(b"single", offset, fua=True)
            model[offset: offset + 6] = b"single"
            nbd.flush()
            f.flush()
        for at in range(0, SIZE, 1 << 20):
            assert nbd.pread(1 << 20, at) == f.pread(1 << 20, at) == model[at: at + (1 << 20)], f"at {at}"
        assert nbd.pread(100, SIZE - 10) == f.pread(100, SIZE - 10) == model[-10:]  # short past the end


def test_a_batch_with_writes_in_flight_lands_as_if_written_in_order(memory_server):
    """Many runs over the same few blocks: a run that overlaps one in flight waits for it, so the last written
    wins everywhere, as with one write after another."""
    rnd = random.Random(3)
    model = bytearray(1 << 16)
    runs = []
    for i in range(400):
        offset = rnd.randrange(0, (1 << 16) - 4096)
        runs.append((offset, [bytes([i % 251 + 1]) * rnd.randint(1, 4096)]))
    apply(model, runs)
    with open_backing(memory_server.uri) as nbd:
        seen = []
        real = nbd.h.aio_pwrite

        def counting(buf, offset, *args):
            seen.append(nbd.h.aio_in_flight())
            return real(buf, offset, *args)

        nbd.h.aio_pwrite = counting
        nbd.write_runs(runs)
        assert nbd.h.aio_in_flight() == 0
        assert nbd.pread(1 << 16, 0) == model
    # runs that do not overlap go out together: some were issued with others still in flight
    disjoint = [(i * 8192, [bytes([i + 1]) * 4096]) for i in range(64)]
    with open_backing(memory_server.uri) as nbd:
        seen = []
        real = nbd.h.aio_pwrite
        nbd.h.aio_pwrite = counting
        nbd.write_runs(disjoint)
        assert max(seen) > 1 and max(seen) <= bk.WINDOW - 1
        assert all(nbd.pread(4096, i * 8192) == bytes([i + 1]) * 4096 for i in range(64))


def test_a_server_that_goes_away_is_an_eio_naming_the_export(memory_server):
    nbd = open_backing(memory_server.uri)
    try:
        nbd.pwrite(b"x" * 4096, 0)
        memory_server.stop(signal.SIGKILL)
        for attempt in (lambda: nbd.write_runs([(0, [b"y" * 4096]), (8192, [b"z" * 4096])]),
                        lambda: nbd.pread(4096, 0), nbd.flush):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EIO
            assert e.value.strerror.startswith(f"{memory_server.uri}: ")
    finally:
        nbd.close()


def test_an_export_that_cannot_be_reached_is_an_eio_naming_it(tmp_path):
    require_nbd()
    uri = f"nbd+unix:///?socket={tmp_path}/none.sock"
    with pytest.raises(OSError) as e:
        open_backing(uri)
    assert e.value.errno == errno.EIO and e.value.strerror.startswith(f"{uri}: ")


def test_the_lock_of_an_export_refuses_a_second_user_and_is_released_on_close(memory_server):
    first, second = open_backing(memory_server.uri), open_backing(memory_server.uri)
    try:
        first.lock(exclusive=True)
        with pytest.raises(InUse):
            second.lock(exclusive=False)
        first.close()
        second.lock(exclusive=True)
    finally:
        first.close()
        second.close()


def test_a_superblock_after_a_flush_is_a_fua_write_and_saves_the_flush(memory_server):
    """The unify's pattern (flush, superblock, flush): on an export that can do FUA the second flush is not sent;
    on a file every flush is."""
    with open_backing(memory_server.uri) as nbd:
        assert nbd.can_fua
        sent = []
        real = nbd.h.flush
        nbd.h.flush = lambda *a: (sent.append(1), real(*a))[1]
        dev = Device(nbd, 4096, SIZE // 4096)
        dev.write_blocks([(10, bytes([1]) * 4096)])
        dev.flush()
        dev.write_at(65536, b"super")
        dev.flush()
        assert len(sent) == 1 and dev.stats.flushes == 1 and dev.stats.fua_writes == 1
        dev.write_blocks([(11, bytes([2]) * 4096)])  # data written since: the next flush is sent
        dev.write_at(65536, b"super")
        dev.flush()
        assert len(sent) == 2 and dev.stats.fua_writes == 1
        assert nbd.pread(5, 65536) == b"super" and nbd.pread(4096, 11 * 4096) == bytes([2]) * 4096
        dev.close()
        assert nbd.h is not None  # the device leaves a backing it did not open to its owner
