"""The filesystem mounted for real through FUSE on an image file: POSIX behaviour, persistence, errors."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile

import pytest
from conftest import ROOT, fsck

pytestmark = [pytest.mark.mounted, pytest.mark.timeout(300)]

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


def renameat2(old: str, new: str, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def write_file(path: str, data: bytes, fsync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("blocksize", [512, 4096, 65536])
def test_files_and_directories_persist_across_remount(make_mount, blocksize):
    m = make_mount(size="64M", blocksize=blocksize)
    data = os.urandom(300_000)
    os.makedirs(m.path("a", "b", "c"))
    write_file(m.path("a", "b", "c", "big"), data)
    for i in range(200):
        write_file(m.path("a", f"small{i}"), b"%d" % i * (i + 1))
    os.symlink("b/c/big", m.path("a", "link"))
    os.link(m.path("a", "small5"), m.path("hard"))
    m.umount()
    assert fsck(m.image).returncode == 0
    m.start()
    assert read_file(m.path("a", "b", "c", "big")) == data
    assert all(read_file(m.path("a", f"small{i}")) == b"%d" % i * (i + 1) for i in range(200))
    assert os.readlink(m.path("a", "link")) == "b/c/big"
    assert read_file(m.path("a", "link")) == data
    assert os.stat(m.path("hard")).st_nlink == 2
    assert os.stat(m.path("a")).st_nlink == 3  # ".", its name, and b's ".."
    assert sorted(os.listdir(m.path("a"))) == sorted([f"small{i}" for i in range(200)] + ["b", "link"])
    st = os.statvfs(m.mnt)
    assert st.f_bsize == blocksize and st.f_namemax == 255


@pytest.mark.parametrize("options", ["", "nowriteback"])
def test_sparse_file_reads_holes_as_zeros_up_to_a_terabyte(make_mount, options):
    m = make_mount(options=options)
    path = m.path("sparse")
    tib = 1 << 40
    with open(path, "wb") as f:
        f.write(b"start")
        f.seek(tib - 5)
        f.write(b"end!!")
    assert os.stat(path).st_size == tib
    with open(path, "rb") as f:
        assert f.read(5) == b"start"
        f.seek(1 << 30)
        assert f.read(8192) == bytes(8192)
        f.seek(tib - 5)
        assert f.read(100) == b"end!!"
    assert os.stat(path).st_blocks * 512 < 1 << 20  # holes take no space
    m.umount()
    m.start()
    with open(path, "rb") as f:
        f.seek(tib - 10)
        assert f.read() == bytes(5) + b"end!!"


def test_special_files(make_mount):
    m = make_mount()
    os.mkfifo(m.path("fifo"), 0o640)
    assert stat.S_ISFIFO(os.stat(m.path("fifo")).st_mode)
    s = socket.socket(socket.AF_UNIX)
    s.bind(m.path("sock"))
    s.close()
    assert stat.S_ISSOCK(os.lstat(m.path("sock")).st_mode)
    os.mknod(m.path("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(m.path("blk"), stat.S_IFBLK | 0o600, os.makedev(7, 0))
    m.umount()
    m.start()
    st = os.lstat(m.path("null"))
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_ISBLK(os.lstat(m.path("blk")).st_mode)
    assert stat.S_IMODE(os.stat(m.path("fifo")).st_mode) == 0o640
    assert stat.S_ISSOCK(os.lstat(m.path("sock")).st_mode)


def test_rename_replaces_noreplace_and_exchange(make_mount):
    m = make_mount()
    write_file(m.path("a"), b"A")
    write_file(m.path("b"), b"B")
    os.rename(m.path("a"), m.path("b"))
    assert read_file(m.path("b")) == b"A" and not os.path.exists(m.path("a"))
    write_file(m.path("c"), b"C")
    with pytest.raises(FileExistsError):
        renameat2(m.path("c"), m.path("b"), 1)  # RENAME_NOREPLACE
    os.mkdir(m.path("d"))
    write_file(m.path("d", "x"), b"X")
    renameat2(m.path("c"), m.path("d"), 2)  # RENAME_EXCHANGE: a file and a directory swap
    assert read_file(m.path("c", "x")) == b"X"
    assert read_file(m.path("d")) == b"C"
    os.mkdir(m.path("e"))
    os.rename(m.path("d"), m.path("e", "moved"))  # across directories
    os.mkdir(m.path("empty"))
    os.rename(m.path("c"), m.path("empty"))  # a directory over an empty directory
    assert os.listdir(m.path("empty")) == ["x"]
    os.mkdir(m.path("full"))
    write_file(m.path("full", "f"), b"")
    os.mkdir(m.path("other"))
    with pytest.raises(OSError) as e:
        os.rename(m.path("other"), m.path("full"))
    assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(OSError) as e:
        os.rename(m.path("empty"), m.path("empty", "inside"))
    assert e.value.errno == errno.EINVAL
    m.umount()
    m.start()
    assert sorted(os.listdir(m.mnt)) == ["b", "e", "empty", "full", "other"]
    assert read_file(m.path("e", "moved")) == b"C"
    assert os.stat(m.mnt).st_nlink == 2 + 4


def test_unlinked_open_file_lives_until_last_close(make_mount):
    m = make_mount(size="64M")
    data = os.urandom(8 << 20)
    free_before = os.statvfs(m.mnt).f_bfree
    with open(m.path("f"), "w+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.unlink(m.path("f"))
        assert not os.path.exists(m.path("f"))
        dirfd = os.open(m.mnt, os.O_RDONLY)
        os.fsync(dirfd)  # commits the unlink: the inode is now an orphan on disk
        os.close(dirfd)
        f.seek(0)
        assert f.read() == data
    os.sync()
    m.umount()
    m.start()
    assert os.listdir(m.mnt) == []
    assert os.statvfs(m.mnt).f_bfree >= free_before - 16


def test_attributes_chmod_chown_utimens_nanoseconds(make_mount):
    m = make_mount()
    p = m.path("f")
    write_file(p, b"x")
    os.chmod(p, 0o4751)
    os.chown(p, 1234, 5678)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o751  # chown clears set-user-ID, as on ext4
    os.chmod(p, 0o4751)
    os.utime(p, ns=(1_000_000_001, 2_000_000_002))
    os.mkdir(m.path("d"), 0o700)
    m.umount()
    m.start()
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o4751
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_atime_ns == 1_000_000_001 and st.st_mtime_ns == 2_000_000_002
    assert stat.S_IMODE(os.stat(m.path("d")).st_mode) == 0o700


@pytest.mark.parametrize("options", ["", "nowriteback"])
def test_truncate_down_up_and_o_trunc(make_mount, options):
    m = make_mount(options=options)
    p = m.path("f")
    data = os.urandom(100_000)
    write_file(p, data, fsync=True)
    os.truncate(p, 5000)
    assert read_file(p) == data[:5000]
    os.truncate(p, 70_000)
    assert read_file(p) == data[:5000] + bytes(65_000)
    with open(p, "r+b") as f:
        f.seek(10)
        f.write(b"hello")
        f.truncate(12)
    assert read_file(p) == data[:10] + b"he"
    with open(p, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert read_file(p) == b"new"
    m.umount()
    m.start()
    assert read_file(p) == b"new"


def test_statfs_counts_real_blocks_and_inodes(make_mount):
    m = make_mount(size="128M")
    before = os.statvfs(m.mnt)
    write_file(m.path("f"), os.urandom(16 << 20), fsync=True)
    for i in range(50):
        write_file(m.path(f"g{i}"), b"")
    after = os.statvfs(m.mnt)
    used = (before.f_bfree - after.f_bfree) * after.f_frsize
    assert 16 << 20 <= used < 20 << 20
    assert before.f_files - before.f_ffree + 51 == after.f_files - after.f_ffree


def test_errors_enospc_enametoolong_enotempty_eexist(make_mount):
    m = make_mount(size="16M")
    with pytest.raises(OSError) as e:
        write_file(m.path("x" * 256), b"")
    assert e.value.errno == errno.ENAMETOOLONG
    write_file(m.path("y" * 255), b"ok")
    os.mkdir(m.path("d"))
    write_file(m.path("d", "f"), b"")
    with pytest.raises(OSError) as e:
        os.rmdir(m.path("d"))
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(m.path("d"))
    keep = os.urandom(1 << 20)
    write_file(m.path("keep"), keep, fsync=True)
    with pytest.raises(OSError) as e:
        with open(m.path("fill"), "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
                f.flush()
            os.fsync(f.fileno())
    assert e.value.errno == errno.ENOSPC
    os.unlink(m.path("fill"))  # a full volume still deletes
    os.sync()
    write_file(m.path("after"), os.urandom(1 << 20), fsync=True)  # and the space comes back
    assert read_file(m.path("keep")) == keep
    m.umount()
    m.start()
    assert read_file(m.path("keep")) == keep


def test_xattrs_only_with_the_option(make_mount):
    m = make_mount()
    write_file(m.path("f"), b"")
    with pytest.raises(OSError) as e:
        os.setxattr(m.path("f"), "user.k", b"v")
    assert e.value.errno in (errno.EOPNOTSUPP, errno.ENOSYS)
    m.umount()
    m.start(options="xattr")
    os.setxattr(m.path("f"), "user.k", b"v")
    os.setxattr(m.path("f"), "trusted.t", b"w" * 100)
    assert os.getxattr(m.path("f"), "user.k") == b"v"
    m.umount()
    m.start(options="xattr")
    assert sorted(os.listxattr(m.path("f"))) == ["trusted.t", "user.k"]
    os.removexattr(m.path("f"), "user.k")
    with pytest.raises(OSError) as e:
        os.getxattr(m.path("f"), "user.k")
    assert e.value.errno == errno.ENODATA


def test_tar_round_trip_of_a_source_tree(make_mount, tmp_path):
    m = make_mount()
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as t:
        t.add(ROOT / "tux3fuse", arcname="src")
    subprocess.run(["tar", "-xf", str(archive), "-C", str(m.mnt)], check=True)
    m.umount()
    m.start()
    for dirpath, _, files in os.walk(ROOT / "tux3fuse"):
        if "__pycache__" in dirpath:
            continue
        rel = os.path.relpath(dirpath, ROOT / "tux3fuse")
        for name in files:
            assert read_file(m.path("src", rel, name)) == read_file(os.path.join(dirpath, name))


@pytest.mark.parametrize("options", ["commit=0.02,stable=fork", "commit=0.02,stable=wait",
                                     "nowriteback,commit=0.02,stable=fork", "nowriteback,commit=0.02,stable=wait"])
def test_fsx_with_mmap(make_mount, options):
    m = make_mount(options=options)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fsx.py"), "-q", "-N", "20000", "-S", "42",
                        "-l", "600000", m.path("fsxfile")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "20000 ops passed" in r.stdout


@pytest.mark.parametrize("options", ["", "commit=0.02,stable=fork", "commit=0.02,stable=wait"])
def test_fio_write_verify(make_mount, options):
    m = make_mount(size="1G", options=options)
    r = subprocess.run(["fio", "--name=verify", f"--directory={m.mnt}", "--rw=randwrite", "--bsrange=4k-1m",
                        "--size=256M", "--verify=crc32c", "--verify_fatal=1", "--ioengine=psync", "--end_fsync=1",
                        "--do_verify=1", "--verify_state_save=0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify" in r.stdout and "err= 0" in r.stdout
    if "stable=fork" in options:
        assert m.stat_json()["waits"] == 0


def test_sigkill_keeps_everything_fsynced(make_mount):
    m = make_mount(options="auto_unmount,commit=60")
    synced = {f"s{i}": os.urandom(10_000 * (i + 1)) for i in range(10)}
    for name, data in synced.items():
        write_file(m.path(name), data, fsync=True)
    for i in range(20):  # more work that is not synced
        write_file(m.path(f"u{i}"), os.urandom(50_000))
    m.kill(signal.SIGKILL)
    r = fsck(m.image, "-n")
    assert r.returncode == 0, r.stdout
    m.start()
    for name, data in synced.items():
        assert read_file(m.path(name)) == data


def test_fsync_goes_ahead_of_a_large_delta_and_survives_sigkill(make_mount):
    m = make_mount(options="auto_unmount,commit=60,nowriteback")  # nowriteback: the daemon holds the big file
    write_file(m.path("log"), b"first", fsync=True)
    big = os.urandom(8 << 20)
    with open(m.path("big"), "wb") as f:
        f.write(big)  # dirty in the daemon, not synced
    with open(m.path("log"), "ab") as f:
        f.write(b" second")
        f.flush()
        os.fsync(f.fileno())
    s = m.stat_json()
    assert s["commits_ahead"] == 1  # only the log file's blocks were committed
    m.kill(signal.SIGKILL)
    r = fsck(m.image, "-n")
    assert r.returncode == 0, r.stdout
    m.start()
    assert read_file(m.path("log")) == b"first second"
    assert not os.path.exists(m.path("big"))  # created in the delta the fsync went ahead of


def test_sigterm_commits_everything(make_mount):
    m = make_mount(options="commit=3600")
    data = os.urandom(3 << 20)
    write_file(m.path("f"), data)
    m.kill(signal.SIGTERM)
    assert fsck(m.image, "-n").returncode == 0
    m.start()
    assert read_file(m.path("f")) == data


def test_stat_reports_counters(make_mount):
    m = make_mount()
    write_file(m.path("f"), b"x" * 100_000, fsync=True)
    s = m.stat_json()
    for key in ("forks", "waits", "wait_seconds", "commits", "blocks_written", "flushes", "forked_pages_live",
                "forked_pages_peak"):
        assert key in s
    assert s["commits"] >= 1 and s["blocks_written"] >= 25 and s["flushes"] >= 2


def test_dirty_limit_throttles_writers_and_keeps_the_data(make_mount):
    m = make_mount(size="512M", options="dirty_limit=4M,commit=3600")
    data = os.urandom(48 << 20)
    write_file(m.path("big"), data, fsync=True)
    s = m.stat_json()
    assert s["throttled"] >= 1 and s["commits"] >= 3
    m.umount()
    m.start()
    assert read_file(m.path("big")) == data
