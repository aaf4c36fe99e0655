"""scripts/nullfs.py, the benchmarks' do-nothing pyfuse3 filesystem, mounted for real: it keeps what is written
until the unmount, fsync succeeds (and with --fdatasync flushes the scratch file), and it exits 0 when unmounted."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import NullMount, is_mounted, load_script, require_fuse

pytestmark = [pytest.mark.mounted, pytest.mark.timeout(120)]


@pytest.mark.parametrize("variant", ["null", "fdatasync"])
def test_written_bytes_read_back_through_fsync_until_unlink(tmp_path, variant):
    require_fuse()
    scratch = tmp_path / "scratch"
    m = NullMount(tmp_path / "mnt", tmp_path / "nullfs.log",
                  ["--fdatasync", str(scratch)] if variant == "fdatasync" else [])
    try:
        path = m.mnt / "dir" / "file"
        path.parent.mkdir()
        data = os.urandom(300_000)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            assert os.pwrite(fd, data, 0) == len(data)
            os.fsync(fd)
            assert os.pwrite(fd, b"tail", 1_000_000) == 4  # beyond the end: a hole of zeros in between
            os.fdatasync(fd)
        finally:
            os.close(fd)
        st = os.stat(path)
        assert st.st_size == 1_000_004 and st.st_mode & 0o777 == 0o640
        assert path.read_bytes() == data + bytes(1_000_000 - len(data)) + b"tail"
        os.truncate(path, 10)
        assert path.read_bytes() == data[:10]
        assert os.listdir(path.parent) == ["file"]
        os.unlink(path)
        assert not path.exists() and os.listdir(path.parent) == []
        os.rmdir(path.parent)
        assert os.listdir(m.mnt) == []
        assert os.statvfs(m.mnt).f_namemax == 255
        assert m.umount() == 0, m.log.read_text()
        assert not is_mounted(str(m.mnt))
        if variant == "fdatasync":
            assert scratch.stat().st_size == 4096
    finally:
        m.cleanup()


def test_group_shares_flushes_between_concurrent_fsyncs_and_never_skips_one(tmp_path):
    """--group: concurrent fsyncs share flushes (fewer flushes than fsyncs), while fsyncs one after the other each
    get a flush of their own (none returns on a flush that started before it)."""
    import threading

    read_counts = load_script("fusecount").read_counts
    require_fuse()
    stats = tmp_path / "stats.json"
    m = NullMount(tmp_path / "mnt", tmp_path / "nullfs.log",
                  ["--fdatasync", str(tmp_path / "scratch"), "--group", "--stats", str(stats)])
    try:
        def flushes() -> int:
            stats.unlink(missing_ok=True)
            os.kill(m.proc.pid, signal.SIGUSR1)
            for _ in range(500):
                if stats.exists():
                    return read_counts(stats).get("fdatasync", 0)
                time.sleep(0.01)
            raise AssertionError("no counts dumped")

        fds = [os.open(m.mnt / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(40)]
        before = flushes()
        for fd in fds[:10]:
            os.write(fd, b"x")
            os.fsync(fd)
        assert flushes() - before == 10
        barrier = threading.Barrier(len(fds))

        def task(fd: int) -> None:
            barrier.wait()
            for _ in range(5):
                os.write(fd, b"y")
                os.fsync(fd)
        threads = [threading.Thread(target=task, args=(fd,)) for fd in fds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        done = flushes() - before - 10
        assert 5 <= done < 5 * len(fds)  # each task's five fsyncs need five flushes at least; groups share them
        for fd in fds:
            os.close(fd)
        assert m.umount() == 0, m.log.read_text()
    finally:
        m.cleanup()
