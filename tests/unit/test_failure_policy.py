"""The failure policy belongs to the volume: every caller of the embedded API gets the same answer.

An OSError is the caller's answer. A corrupt block, or any other exception raised inside an operation (a bug),
turns the volume read-only and reaches the caller as EIO; later changes get EROFS, reads of healthy data still
work, and the image keeps its last commit. The log says it in one line naming the block for a corrupt block, and
with the stack for a bug.
"""

from __future__ import annotations

import errno
import logging

import pytest
from conftest import read_all

from tux3fuse import format as fmt
from tux3fuse.fs import Options, Volume


def test_an_unexpected_exception_inside_an_operation_is_eio_and_a_read_only_volume(make_vol, monkeypatch,
                                                                                   caplog) -> None:
    vol = make_vol()
    a = vol.create(1, b"kept", 0o644)
    vol.write(a.ino, 0, b"committed data")
    vol.release(a.ino)
    vol.commit()

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(type(vol.names), "add_entry", broken)
    with caplog.at_level(logging.ERROR, logger="tux3fuse"), pytest.raises(OSError) as info:
        vol.create(1, b"new", 0o644)
    assert info.value.errno == errno.EIO
    assert "create(1, b'new', 420) failed after it began changing delta" in vol.failed  # the operation, named
    assert "KeyError" in vol.failed
    assert any(r.exc_info for r in caplog.records), "the stack must be in the log"
    monkeypatch.undo()
    with pytest.raises(OSError) as info:
        vol.create(1, b"other", 0o644)
    assert info.value.errno == errno.EROFS
    assert read_all(vol, b"kept") == b"committed data"
    vol.close_files()
    again = Volume(vol.path, Options(readonly=True))
    try:
        assert read_all(again, b"kept") == b"committed data"
        with pytest.raises(OSError):
            again.lookup(1, b"new")
    finally:
        again.close_files()


def test_a_corrupt_block_read_by_an_operation_is_eio_and_a_read_only_volume(make_vol, caplog) -> None:
    vol = make_vol()
    for i in range(3):
        a = vol.create(1, b"f%d" % i, 0o644)
        vol.write(a.ino, 0, b"x" * 20000)
        vol.release(a.ino)
        vol.forget(a.ino, 1)
    vol.unmount()  # a unify: the extent trees are on disk
    vol = Volume(vol.path, Options())
    vol.mount()
    try:
        ino = vol.lookup(1, b"f1").ino
        root = fmt.InodeRecord.unpack(vol.backend.itable.lookup(ino)).dtree_root
        vol.forget(ino, 1)
        with open(vol.path, "r+b") as f:
            f.seek(root * vol.blocksize + 100)
            f.write(b"\xff\xfe\xfd")
        with caplog.at_level(logging.ERROR, logger="tux3fuse"), pytest.raises(OSError) as info:
            vol.read(ino, 0, 4096)
        assert info.value.errno == errno.EIO
        assert "corrupt" in vol.failed
        (line,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert f"block {root}" in line.getMessage() and not line.exc_info  # one line: the block and why
        assert read_all(vol, b"f0") == b"x" * 20000  # healthy data still reads
        with pytest.raises(OSError) as info:
            vol.unlink(1, b"f0")
        assert info.value.errno == errno.EROFS
    finally:
        vol.close_files()


def test_errors_the_caller_owns_pass_through_and_leave_the_volume_writable(make_vol) -> None:
    vol = make_vol()
    with pytest.raises(OSError) as info:
        vol.lookup(1, b"missing")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(OSError) as info:
        vol.unlink(1, b"missing")
    assert info.value.errno == errno.ENOENT
    assert list(vol.readdir(1, 0)) == []
    assert vol.failed is None
    vol.create(1, b"ok", 0o644)
