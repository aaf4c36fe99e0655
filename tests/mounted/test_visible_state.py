"""What a user sees through the mount is what the volume keeps: after a write the volume refused (ENOSPC; with the
writeback cache the kernel has taken some writes past what the volume stores by then), and in ``df`` right after
unlinks and truncates."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from conftest import tool

pytestmark = [pytest.mark.mounted, pytest.mark.timeout(300)]
MiB = 1 << 20


def sync(mnt) -> None:
    r = subprocess.run([tool("tux3"), "sync", str(mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_until_refused(path: str, chunks: list[bytes]) -> OSError | None:
    """write() the chunks until one fails, then close(); the first error write() or close() gave."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    error = None
    for chunk in chunks:
        try:
            os.write(fd, chunk)
        except OSError as e:
            error = e
            break
    try:
        os.close(fd)
    except OSError as e:
        error = error or e
    return error


def test_enospc_leaves_what_a_remount_shows(make_mount):
    m = make_mount(size="16M")
    chunks = [os.urandom(MiB) for _ in range(30)]
    err = write_until_refused(m.path("big"), chunks)
    assert err is not None and err.errno == errno.ENOSPC
    size = os.stat(m.path("big")).st_size
    data = read(m.path("big"))
    assert 0 < size < 16 * MiB  # not what the kernel had taken past the end of the volume
    assert len(data) == size and data == b"".join(chunks)[:size]
    m.umount()
    m.start()
    assert os.stat(m.path("big")).st_size == size
    assert read(m.path("big")) == data


def test_enospc_with_the_file_open_elsewhere_shows_the_kept_size_after_the_last_close(make_mount):
    m = make_mount(size="16M")
    reader = os.open(m.path("big"), os.O_CREAT | os.O_RDONLY, 0o644)
    chunks = [os.urandom(MiB) for _ in range(30)]
    err = write_until_refused(m.path("big"), chunks)
    assert err is not None and err.errno == errno.ENOSPC
    os.close(reader)
    size = os.stat(m.path("big")).st_size
    assert 0 < size < 16 * MiB
    assert read(m.path("big")) == b"".join(chunks)[:size]
    m.umount()
    m.start()
    assert os.stat(m.path("big")).st_size == size


def test_df_shows_the_space_of_unlinked_files_at_once_and_writes_can_use_it(make_mount):
    m = make_mount(size="64M", options="commit=0")  # no periodic commit: only the unlinks can free the space
    for i in range(48):
        with open(m.path(f"f{i}"), "wb") as f:
            f.write(os.urandom(MiB))
    sync(m.mnt)
    full = os.statvfs(m.mnt)
    for i in range(22):
        os.unlink(m.path(f"f{i}"))
    now = os.statvfs(m.mnt)
    sync(m.mnt)
    later = os.statvfs(m.mnt)
    assert now.f_bavail - full.f_bavail >= 22 * MiB // now.f_frsize - 16
    assert abs(now.f_bavail - later.f_bavail) <= 16
    for i in range(22, 44):
        os.unlink(m.path(f"f{i}"))
    # what df shows can be written at once (the write waits for the commit that frees the space)
    data = os.urandom(40 * MiB)
    with open(m.path("again"), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert read(m.path("again")) == data


def test_df_shows_space_a_truncate_frees_at_once(make_mount):
    m = make_mount(size="64M", options="commit=0")
    with open(m.path("big"), "wb") as f:
        f.write(os.urandom(40 * MiB))
    sync(m.mnt)
    full = os.statvfs(m.mnt)
    os.truncate(m.path("big"), MiB)
    now = os.statvfs(m.mnt)
    sync(m.mnt)
    later = os.statvfs(m.mnt)
    assert now.f_bavail - full.f_bavail >= 39 * MiB // now.f_frsize - 16
    assert abs(now.f_bavail - later.f_bavail) <= 16
    with open(m.path("fill"), "wb") as f:
        f.write(os.urandom(36 * MiB))
        os.fsync(f.fileno())


def test_a_write_into_space_an_unlink_frees_succeeds_only_through_a_commit(make_vol):
    """Embedded: statfs counts the blocks of an unlinked file at once, the bitmap does not until a commit, and a
    write that needs them commits first instead of failing or over-committing."""
    vol = make_vol()
    bs = vol.blocksize
    a = vol.create(1, b"big", 0o644)
    vol.write(a.ino, 0, os.urandom(24 * MiB))
    vol.release(a.ino)  # create opened it
    vol.commit()
    before = vol.statfs()["bavail"]
    free_before = vol.backend.alloc.free
    vol.unlink(1, b"big")
    vol.forget(a.ino, 1)  # the kernel's reference goes with its dentry
    assert vol.backend.alloc.free == free_before  # nothing reusable before the commit
    assert vol.statfs()["bavail"] - before >= 24 * MiB // bs - 16  # less the commit of the directory
    commits = vol.counters["commits"]
    b = vol.create(1, b"new", 0o644)
    vol.write(b.ino, 0, os.urandom(24 * MiB))
    assert vol.counters["commits"] > commits  # the space came from the commit of the unlink
    vol.commit()
    assert vol.read(b.ino, 0, 10) and vol.getattr(b.ino).size == 24 * MiB
