"""Volumes on NBD exports, served by nbdkit on a Unix socket that each test starts and kills by its PID.

- mkfs.tux3, tux3fuse, fsx with mmap through the mount, tux3 stat and fsck.tux3 all take the export's URI, and the
  volume they leave is clean.
- Fault injection with nbdkit's own tools (the ``error`` filter for reads and writes, the ``eval`` plugin for
  flushes) under a write + fsync load through the mount: every fsync that returned success is durable after a
  remount on a healthy server (the same file, no fault), every failure reaches the caller as EIO (and, once the
  volume has turned read-only, as EROFS), ``tux3 umount`` says that the volume failed, and fsck is clean.
- A bad stretch of the export (the ``eval`` plugin): the daemon's readahead into it is counted and logged, a
  reader's own read of it gets EIO, and once the export reads again the reader gets the right bytes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, Mount, Nbdkit, require_fuse, require_nbd, tool

pytestmark = pytest.mark.timeout(900)

SIZE = 256 << 20


def sparse(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Servers:
    """The nbdkit servers and mounts a test starts: stopped (mounts first, then servers by PID) at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Nbdkit] = []
        self.mounts: list[Mount] = []

    def serve(self, plugin: str, *args: str, filters: list[str] = (), name: str = "nbd") -> Nbdkit:
        server = Nbdkit(self.tmp_path, plugin, *args, filters=list(filters), name=name)
        self.servers.append(server)
        return server

    def mount(self, uri: str, options: str = "", name: str = "mnt") -> Mount:
        m = Mount(uri, self.tmp_path / name, options, log=self.tmp_path / f"{name}.log")
        self.mounts.append(m)
        return m.start()

    def close(self) -> None:
        for m in self.mounts:
            m.cleanup()
        for server in self.servers:
            server.stop()


@pytest.fixture
def nbd(tmp_path):
    require_fuse()
    require_nbd()
    servers = Servers(tmp_path)
    yield servers
    servers.close()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=300)


def test_mkfs_mount_fsx_with_mmap_stat_and_fsck_on_an_nbd_export(nbd, tmp_path):
    server = nbd.serve("file", f"file={sparse(tmp_path / 'img')}")
    r = run("mkfs.tux3", server.uri)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{server.uri}: tux3fuse volume, {SIZE // 4096} blocks of 4096 bytes")  # its size
    m = nbd.mount(server.uri)
    r = run("tux3", "stat", "--json", str(m.mnt))
    assert r.returncode == 0, r.stderr
    stat = json.loads(r.stdout)
    assert stat["device"] == server.uri and stat["read_only"] == 0
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fsx.py"), "-q", "-N", "50000", "-S", "15",
                        "-l", "600000", m.path("fsxfile")], capture_output=True, text=True, timeout=800)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "50000 ops passed" in r.stdout
    r = run("tux3", "stat", str(m.mnt))
    lines = [line.split() for line in r.stdout.splitlines()]
    assert r.returncode == 0 and ["device", server.uri] in lines and ["read_only", "0"] in lines, r.stdout
    r = run("fsck.tux3", "-n", server.uri)  # mounted: refused, naming where
    assert r.returncode == 8 and f"mounted at {m.mnt}" in r.stderr, r.stderr
    m.umount()
    r = run("fsck.tux3", server.uri)
    assert r.returncode == 0 and r.stdout.strip().endswith("clean"), r.stdout + r.stderr


# -- fault injection ---------------------------------------------------------------------------------------------

def eval_plugin(image: Path, trigger: Path) -> list[str]:
    """nbdkit's eval plugin serving ``image``, whose flush fails with EIO while ``trigger`` exists (the error filter
    of this nbdkit cannot fail a flush). A FUA write is emulated with a flush, so it fails too."""
    return [
        f"get_size=stat -c %s {image}",
        "can_write=exit 0", "can_flush=exit 0",
        f"pread=exec dd if={image} iflag=skip_bytes,count_bytes skip=$4 count=$3 bs=64K status=none",
        f"pwrite=exec dd of={image} oflag=seek_bytes conv=notrunc seek=$4 bs=64K status=none",
        f"flush=if [ -e {trigger} ] && [ $(od -An -N1 -tu1 /dev/urandom) -lt 40 ]; then "  # about 15 %
        "echo 'EIO injected flush error' >&2; exit 1; "
        f"fi; exec sync {image}",
    ]


FAULTS = {
    # kind: (the plugin and the parameters of the plugin and its filters, the filters) given the image and the
    # trigger file
    "write": lambda image, trigger: (["file", f"file={image}", "error-pwrite=EIO", "error-pwrite-rate=4%",
                                      f"error-pwrite-file={trigger}"], ["--filter=error"]),
    "read": lambda image, trigger: (["file", f"file={image}", "error-pread=EIO", "error-pread-rate=10%",
                                     f"error-pread-file={trigger}"], ["--filter=error"]),
    "flush": lambda image, trigger: (["eval", *eval_plugin(image, trigger)], []),
}


def make_files(m: Mount, prefix: str, count: int, rnd: random.Random) -> dict[str, bytes]:
    out = {}
    for i in range(count):
        data = rnd.randbytes(rnd.randint(1, 20000))
        with open(m.path(f"{prefix}{i}"), "wb") as f:
            f.write(data)
        out[f"{prefix}{i}"] = data
    return out


def load(m: Mount, prefix: str, ops: int, rnd: random.Random, old: dict[str, bytes], failures: list[tuple[str, int]]
         ) -> dict[str, bytes]:
    """Create, write and fsync new files (and read old ones, which the daemon has not cached): the files whose fsync
    returned success, with their bytes. Every failure is recorded; the load stops once the volume is read-only."""
    durable: dict[str, bytes] = {}
    names = sorted(old)
    for i in range(ops):
        name = f"{prefix}{i}"
        try:
            if names:
                other = names[rnd.randrange(len(names))]
                with open(m.path(other), "rb") as f:
                    assert f.read() == old[other]  # a read returns the right bytes or fails
            data = rnd.randbytes(rnd.randint(1, 3 * 4096))
            fd = os.open(m.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            durable[name] = data
        except OSError as e:
            failures.append((name, e.errno))
            if e.errno == errno.EROFS:
                break
    return durable


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_faults_of_the_export_lose_no_fsynced_data_and_reach_the_caller_as_eio(nbd, tmp_path, kind, monkeypatch):
    # the replay check after each commit reads through a connection of its own: injected read errors there would
    # be findings about the log, not about the faults
    monkeypatch.setenv("TUX3FUSE_VERIFY_LOG", "0")
    image, trigger = sparse(tmp_path / "img", 64 << 20), tmp_path / "inject"
    rnd = random.Random(f"nbd-{kind}")
    healthy = nbd.serve("file", f"file={image}", name="healthy")
    assert run("mkfs.tux3", "-q", healthy.uri).returncode == 0
    m = nbd.mount(healthy.uri, name="setup")
    old = make_files(m, "old", 40, rnd)
    m.umount()
    healthy.stop()
    durable: dict[str, bytes] = {}
    failures: list[tuple[str, int]] = []
    turned_read_only = 0
    args, filters = FAULTS[kind](image, trigger)
    faulty = nbd.serve(*args, filters=filters, name="faulty")  # one server: its faults go on from round to round
    for round_ in range(5):
        m = nbd.mount(faulty.uri, "nowriteback,commit=0", name=f"faulty{round_}")  # only fsync commits
        trigger.touch()
        before = len(failures)
        durable |= load(m, f"r{round_}-", 40, rnd, old if kind == "read" else {}, failures)
        stat = m.stat_json()
        trigger.unlink()
        if m.umount(expect_ok=False):
            assert len(failures) > before  # the daemon met errors only when a caller did
        if stat["read_only"]:
            turned_read_only += 1
            assert failures[before:] and failures[before][1] == errno.EIO, failures[before:]
            assert "turned read-only" in m.umount_stderr and faulty.uri in m.umount_stderr, m.umount_stderr
            assert len(m.umount_stderr.strip().splitlines()) == 1, m.umount_stderr
            assert any(faulty.uri in e["message"] and "read-only" in e["message"] for e in stat["recent_errors"])
    faulty.stop()
    assert failures, "no fault was injected"
    assert durable, "no fsync succeeded"
    codes = [code for _, code in failures]
    assert set(codes) <= {errno.EIO, errno.EROFS}, failures
    if kind != "read":
        assert turned_read_only, "a failed write or flush must turn the volume read-only"
    # a healthy server on the same file: every fsync that returned success is there
    healthy = nbd.serve("file", f"file={image}", name="again")
    m = nbd.mount(healthy.uri, name="check")
    lost = [name for name, data in durable.items() if not os.path.exists(m.path(name)) or
            Path(m.path(name)).read_bytes() != data]
    assert not lost, f"fsynced and lost: {lost}"
    assert all(Path(m.path(name)).read_bytes() == data for name, data in old.items())
    m.umount()
    r = run("fsck.tux3", "-n", healthy.uri)
    assert r.returncode == 0, r.stdout + r.stderr


# -- a device error in the middle of an operation ------------------------------------------------------------------

AT_FDCWD, RENAME_EXCHANGE = -100, 2


def exchange(a: str, b: str) -> None:
    """renameat2(a, b, RENAME_EXCHANGE); OSError on failure."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a)


def test_a_read_error_in_the_middle_of_a_namespace_operation_fails_it_with_eio_and_changes_nothing(nbd, tmp_path):
    """The directory index is in memory, its block is not (a small cache, 16 MiB written since): every operation
    that changes the directory must read the block, and the device fails every read. Each fails with EIO before
    its first change; the volume stays writable; once the device reads again, the same operations succeed, and
    the volume unmounts cleanly and checks clean."""
    flag = tmp_path / "FLAG"
    server = nbd.serve("file", f"file={sparse(tmp_path / 'img', 64 << 20)}", "error-pread=EIO",
                       "error-pread-rate=100%", f"error-pread-file={flag}", filters=["--filter=error"])
    assert run("mkfs.tux3", "-q", server.uri).returncode == 0
    m = nbd.mount(server.uri, "cache=2M,readahead=0")
    os.mkdir(m.path("A"))
    for i in range(50):
        Path(m.path("A", f"file{i}")).write_bytes(b"%d" % i)
    os.mkdir(m.path("A", "sub"))
    os.symlink("file0", m.path("A", "link"))
    os.mkdir(m.path("B"))
    Path(m.path("B", "x")).write_bytes(b"x")
    before = sorted(os.listdir(m.path("A"))), sorted(os.listdir(m.path("B")))
    assert run("tux3", "sync", str(m.mnt)).returncode == 0
    with open(m.path("big"), "wb") as f:  # pushes the directory blocks out of the daemon's cache
        for _ in range(16):
            f.write(os.urandom(1 << 20))
    assert run("tux3", "sync", str(m.mnt)).returncode == 0

    ops = {
        "rename": lambda: os.rename(m.path("A", "file1"), m.path("B", "moved")),
        "rename over": lambda: os.rename(m.path("A", "file2"), m.path("B", "x")),
        "exchange": lambda: exchange(m.path("A", "file3"), m.path("B", "x")),
        "rename a directory": lambda: os.rename(m.path("A", "sub"), m.path("B", "sub")),
        "create": lambda: os.close(os.open(m.path("A", "new"), os.O_CREAT | os.O_WRONLY, 0o644)),
        "mkdir": lambda: os.mkdir(m.path("A", "newdir")),
        "symlink": lambda: os.symlink("file0", m.path("A", "newlink")),
        "link": lambda: os.link(m.path("B", "x"), m.path("A", "hard")),
        "unlink": lambda: os.unlink(m.path("A", "file4")),
    }
    flag.touch()
    for name, op in ops.items():
        with pytest.raises(OSError) as info:
            op()
        assert info.value.errno == errno.EIO, f"{name}: {info.value}"
    stat = m.stat_json()
    flag.unlink()
    assert stat["read_only"] == 0, stat["recent_errors"]  # an error before any change: EIO and nothing else
    assert stat["read_errors"] >= len(ops)  # each one counted, and logged
    assert any("read error on" in e["message"] for e in stat["recent_errors"]), stat["recent_errors"]
    assert (sorted(os.listdir(m.path("A"))), sorted(os.listdir(m.path("B")))) == before
    for op in ops.values():
        op()  # the device reads again: each operation now succeeds
    assert Path(m.path("B", "moved")).read_bytes() == b"1"
    assert Path(m.path("A", "file3")).read_bytes() == b"2"  # file2 went over x, then x and file3 were exchanged
    assert not os.path.exists(m.path("A", "file1")) and not os.path.exists(m.path("A", "file4"))
    m.umount()
    r = run("fsck.tux3", "-n", server.uri)
    assert r.returncode == 0, r.stdout + r.stderr


def failing_reads(image: Path, trigger: Path, lo: int, hi: int) -> list[str]:
    """nbdkit's eval plugin serving ``image``, whose reads of bytes that touch [lo, hi) fail with EIO while
    ``trigger`` exists: a disk with a bad stretch."""
    return [
        f"get_size=stat -c %s {image}", "can_write=exit 0", "can_flush=exit 0",
        f"pread=if [ -e {trigger} ] && [ $(($4 + $3)) -gt {lo} ] && [ $4 -lt {hi} ]; then "
        "echo 'EIO injected read error' >&2; exit 1; fi; "
        f"exec dd if={image} iflag=skip_bytes,count_bytes skip=$4 count=$3 bs=64K status=none",
        f"pwrite=exec dd of={image} oflag=seek_bytes conv=notrunc seek=$4 bs=64K status=none",
        f"flush=exec sync {image}",
    ]


def test_read_errors_of_readahead_are_counted_and_logged_and_a_reader_still_gets_eio(nbd, tmp_path, monkeypatch):
    from conftest import opened

    from tux3fuse.backend import extents

    monkeypatch.setenv("TUX3FUSE_VERIFY_LOG", "0")  # the replay check would read the bad stretch too
    image, trigger = sparse(tmp_path / "img", 64 << 20), tmp_path / "inject"
    assert run("mkfs.tux3", "-q", "-f", str(image)).returncode == 0
    data = random.Random(7).randbytes(8 << 20)
    vol = opened(str(image))
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, data)
    vol.release(f.ino)
    vol.commit()
    physical, _, n = extents.lookup_run(vol.backend.dtree(vol.iget(f.ino)), 512, 512)  # from 2 MiB in the file
    vol.unmount()
    assert n >= 16
    server = nbd.serve("eval", *failing_reads(image, trigger, physical * 4096, (physical + n) * 4096))
    m = nbd.mount(server.uri)  # an NBD export: read ahead by the daemon (2 MiB)
    trigger.touch()
    with open(m.path("f"), "rb", buffering=0) as reader:
        for offset in range(0, 1536 << 10, 128 << 10):  # a sequential reader of 1.5 MiB, read ahead past 2 MiB
            assert reader.read(128 << 10) == data[offset: offset + (128 << 10)]
        deadline = time.monotonic() + 60
        while not (stat := m.stat_json())["readahead_errors"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stat["readahead_errors"] >= 1 and stat["read_errors"] >= stat["readahead_errors"], stat
        before = stat["read_errors"]
        with pytest.raises(OSError) as failed:  # a reader's own read of the bad stretch: EIO, as before
            os.pread(reader.fileno(), 4096, (512 + 8) * 4096)
        assert failed.value.errno == errno.EIO
        stat = m.stat_json()
        assert stat["read_errors"] > before and stat["read_only"] == 0
        trigger.unlink()
        assert os.pread(reader.fileno(), len(data), 0) == data  # nothing stale was kept: the disk reads again
    lines = [e["message"] for e in stat["recent_errors"]]  # the daemon's log, as tux3 stat shows it
    assert any(line.startswith(f"read error on {server.uri} block") and f"(inode {f.ino}, block" in line
               and "; readahead): " in line for line in lines), lines
    assert f"(inode {f.ino}, block {512 + 8}): " in "\n".join(lines), lines  # the reader's own read
    m.umount()
    assert f"read error on {server.uri} block" in m.log.read_text()
