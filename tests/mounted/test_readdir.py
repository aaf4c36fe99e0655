"""readdir through a real mount, read as the C library and the kernel read it: "." and ".." come first with their
inode numbers and the directory type; a listing resumed from any position it returned (telldir and seekdir, the
end of a small getdents buffer) neither repeats nor skips a name, and rewinddir starts it again; and the kernel's
lookup references stay exact (it takes none for "." and "..": a directory listed and removed is destroyed)."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import time

import pytest
from conftest import tool

pytestmark = pytest.mark.timeout(180)

libc = ctypes.CDLL(None, use_errno=True)
DT_DIR = 4


class Dirent(ctypes.Structure):  # struct dirent of glibc on 64-bit Linux (readdir is readdir64 there)
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
libc.readdir.restype = ctypes.POINTER(Dirent)
libc.readdir.argtypes = [ctypes.c_void_p]
libc.telldir.restype = ctypes.c_long
libc.telldir.argtypes = [ctypes.c_void_p]
libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
libc.rewinddir.argtypes = [ctypes.c_void_p]
libc.closedir.argtypes = [ctypes.c_void_p]
libc.getdents64.restype = ctypes.c_ssize_t
libc.getdents64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]


def read_rest(d) -> list[tuple[bytes, int, int, int]]:
    """(name, inode number, type, telldir after it) of every entry from where the stream is to its end."""
    out = []
    while entry := libc.readdir(d):
        e = entry.contents
        out.append((e.d_name, e.d_ino, e.d_type, libc.telldir(d)))
    return out


def getdents_names(path: str, size: int) -> list[bytes]:
    """Every name getdents64 returns for ``path`` with a buffer of ``size`` bytes (a few entries per call)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    buf = ctypes.create_string_buffer(size)
    names = []
    try:
        while (n := libc.getdents64(fd, buf, size)) > 0:
            at = 0
            while at < n:
                reclen = int.from_bytes(buf.raw[at + 16: at + 18], "little")
                names.append(buf.raw[at + 19: at + reclen].split(b"\0", 1)[0])
                at += reclen
        assert n == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    return names


def test_dots_come_first_and_any_position_resumes_the_listing_without_repeat_or_skip(make_mount):
    m = make_mount(size="64M")
    d = m.path("d")
    os.mkdir(d)
    names = {f"entry-{i:03d}-{'x' * (i % 23)}".encode() for i in range(300)}
    for name in names:
        open(os.path.join(d, os.fsdecode(name)), "w").close()
    os.mkdir(os.path.join(d, "sub"))
    names.add(b"sub")
    handle = libc.opendir(d.encode())
    assert handle
    try:
        listing = read_rest(handle)
        assert [(n, i, t) for n, i, t, _ in listing[:2]] == [(b".", os.stat(d).st_ino, DT_DIR),
                                                             (b"..", os.stat(m.path()).st_ino, DT_DIR)]
        assert sorted(n for n, *_ in listing[2:]) == sorted(names)  # each name once
        sub = [e for e in listing if e[0] == b"sub"][0]
        assert sub[1] == os.stat(os.path.join(d, "sub")).st_ino and sub[2] == DT_DIR
        for k in list(range(0, len(listing), 37)) + [0, 1, len(listing) - 1]:
            libc.seekdir(handle, listing[k][3])  # resume after entry k
            assert read_rest(handle) == listing[k + 1:]
        libc.rewinddir(handle)
        assert read_rest(handle) == listing
    finally:
        libc.closedir(handle)
    for size in (64, 200):  # a few entries per getdents call: every call resumes where the last one stopped
        got = getdents_names(d, size)
        assert got[:2] == [b".", b".."] and sorted(got[2:]) == sorted(names)
    root = read_rest(handle := libc.opendir(m.path().encode()))
    libc.closedir(handle)
    root_ino = os.stat(m.path()).st_ino
    assert [(n, i) for n, i, *_ in root[:2]] == [(b".", root_ino), (b"..", root_ino)]  # the root's parent is itself
    assert sorted(os.listdir(d)) == sorted(map(os.fsdecode, names))  # the C library's callers see no change
    m.umount()


def test_a_directory_listed_and_removed_is_destroyed(make_mount):
    """The kernel takes no lookup reference for "." and "..": counting one would keep the directory alive."""
    m = make_mount(size="64M")

    def used_inodes() -> int:
        subprocess.run([tool("tux3"), "sync", str(m.mnt)], check=True, timeout=60)
        st = os.statvfs(m.mnt)
        return st.f_files - st.f_ffree

    before = used_inodes()
    os.mkdir(m.path("d"))
    open(m.path("d", "f"), "w").close()
    used_inodes()  # committed: the directory is on disk
    for size in (64, 4096):
        assert len(getdents_names(m.path("d"), size)) == 3
    assert stat.S_ISDIR(os.stat(m.path("d")).st_mode)
    os.unlink(m.path("d", "f"))
    os.rmdir(m.path("d"))
    deadline = time.monotonic() + 30  # the kernel's FORGET of the directory arrives after the rmdir, in its time
    while (used := used_inodes()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert used == before, f"{used - before} inode(s) kept alive by references the kernel never took"
    m.umount()
