"""Counting FUSE requests by operation: scripts/fusecount.py (which wraps the handlers of any pyfuse3 filesystem)
and scripts/nullfs.py's own --stats, mounted for real: a known workload gives known counts per opcode."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
import trio
from conftest import ROOT, NullMount, is_mounted, load_script, require_fuse

fusecount = load_script("fusecount")
benchfs = load_script("benchfs")
benchkit = load_script("benchkit")

pytestmark = pytest.mark.timeout(120)

PAYLOAD = os.urandom(4096)


def create_write_fsync(mnt: Path, n: int) -> None:
    """N new files, each: create, one 4 KiB write, fsync, close; then one mkdir and one unlink."""
    for i in range(n):
        fd = os.open(mnt / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            assert os.write(fd, PAYLOAD) == len(PAYLOAD)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.mkdir(mnt / "d")
    os.unlink(mnt / "f0")


def counts_when(read: Callable[[], dict[str, int]], done: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """The counts once DONE holds of them (a release is sent after close returns), or the last ones read."""
    deadline = time.monotonic() + 10
    counts = read()
    while not done(counts) and time.monotonic() < deadline:
        time.sleep(0.05)
        counts = read()
    return counts


def signal_and_read(pid: int, stats: Path) -> dict[str, int]:
    stats.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not stats.exists():
        assert time.monotonic() < deadline, "no counts written after SIGUSR1"
        time.sleep(0.01)
    return fusecount.read_counts(stats)


def check_workload_counts(counts: dict[str, int], n: int) -> None:
    assert counts["create"] == n and counts["write"] == n and counts["fsync"] == n
    assert counts["lookup"] >= n  # each new name is looked up (and not found) before its create
    assert counts["release"] == n
    assert counts["mkdir"] == 1 and counts["unlink"] == 1
    assert counts.get("flush", 0) <= 1  # nullfs replies ENOSYS to the first: the kernel sends no more
    assert "read" not in counts and "rmdir" not in counts


def test_nullfs_counts_every_request_by_operation_and_dumps_them_on_sigusr1(tmp_path: Path) -> None:
    require_fuse()
    stats = tmp_path / "stats.json"
    m = NullMount(tmp_path / "mnt", tmp_path / "nullfs.log", ["--stats", str(stats)])
    try:
        first = signal_and_read(m.proc.pid, stats)
        create_write_fsync(m.mnt, 7)
        counts = counts_when(lambda: signal_and_read(m.proc.pid, stats), lambda c: c.get("release", 0) >= 7)
        check_workload_counts({k: v - first.get(k, 0) for k, v in counts.items()}, 7)
        assert json.loads(stats.read_text()) == counts  # one JSON object, operation -> count
        assert m.umount() == 0, m.log.read_text()
    finally:
        m.cleanup()


def test_fusecount_runs_a_pyfuse3_script_and_counts_its_requests(tmp_path: Path) -> None:
    """fusecount.py around nullfs.py (run without --stats, so only fusecount's own wrappers dump)."""
    require_fuse()
    mnt, stats, log = tmp_path / "mnt", tmp_path / "stats.json", tmp_path / "fusecount.log"
    mnt.mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "fusecount.py"), "--stats", str(stats),
                                 str(ROOT / "scripts" / "nullfs.py"), str(mnt)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(str(mnt)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = signal_and_read(proc.pid, stats)
        create_write_fsync(mnt, 11)
        counts = counts_when(lambda: signal_and_read(proc.pid, stats), lambda c: c.get("release", 0) >= 11)
        check_workload_counts({k: v - first.get(k, 0) for k, v in counts.items()}, 11)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)
        assert proc.wait(timeout=30) == 0, log.read_text()  # the script's own exit status
    finally:
        if is_mounted(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, timeout=60)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_nullfs_reads_the_counts_and_the_daemon_cpu(tmp_path: Path) -> None:
    require_fuse()
    fs = benchfs.NullFs(tmp_path)
    try:
        fs.setup()
        pid = fs.daemon_pid()
        assert pid == fs.proc.pid
        before = fs.requests()
        create_write_fsync(fs.mnt, 5)
        after = counts_when(fs.requests, lambda c: c.get("release", 0) - before.get("release", 0) >= 5)
        check_workload_counts({k: v - before.get(k, 0) for k, v in after.items()}, 5)
        assert benchkit.cpu_seconds(pid) > 0  # importing pyfuse3 and trio alone takes CPU time
    finally:
        assert benchfs.dispose(fs) is None


class Tiny(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        raise pyfuse3.FUSEError(errno.ENOENT)


def test_count_requests_counts_own_and_inherited_handlers_whatever_they_reply() -> None:
    ops = Tiny()
    counts = fusecount.count_requests(ops)

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(pyfuse3.FUSEError):
                await ops.getattr(1)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.link(1, 1, b"x", None)  # not implemented: the base class replies ENOSYS
        assert e.value.errno == errno.ENOSYS
        await ops.forget([(2, 1), (3, 1)])  # a batch is one request

    trio.run(main)
    assert counts == {"getattr": 3, "link": 1, "forget": 1}
    assert set(fusecount.HANDLERS) >= {"lookup", "write", "read", "create", "fsync", "forget", "flush"}
    assert "init" not in fusecount.HANDLERS and "stacktrace" not in fusecount.HANDLERS
