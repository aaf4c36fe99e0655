"""scripts/nullfs.py, the benchmarks' do-nothing pyfuse3 filesystem, mounted for real: it keeps what is written
until the unmount, fsync succeeds (and with --fdatasync flushes the scratch file), and it exits 0 when unmounted."""

from __future__ import annotations

import os

import pytest
from conftest import NullMount, is_mounted, require_fuse

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
