"""Crash consistency: every crash point recovers to a committed delta, and the harness can tell when not."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, fsck

from mkfs import mkfs
from tux3fuse import alloc, fs, replay
from tux3fuse.backend.commit import CommitJob
from tux3fuse.checker import Checker

spec = importlib.util.spec_from_file_location("crashtest", ROOT / "scripts" / "crashtest.py")
crashtest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crashtest)

pytestmark = pytest.mark.timeout(600)


def run(capsys, *args: str) -> tuple[int, int]:
    crashtest.main(["-q", *args])
    out = capsys.readouterr().out
    m = re.search(r"^(\d+) crash points, (\d+) inconsistent$", out, re.M)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("args", [["--seed", "1", "--size", "1"], ["--seed", "2", "--size", "8"],
                                  ["--seed", "3", "--size", "2", "--blocksize", "512"]])
def test_every_crash_point_recovers_to_a_committed_delta(capsys, args):
    """The default workload: the single caller and three more, with commits prepared in steps between their
    operations, unlinked files whose last reference goes late, and fsyncs ahead of their delta."""
    crashtest.main([*args, "--points", "150", "--ops", "400"])
    out = capsys.readouterr().out
    m = re.search(r"^(\d+) crash points, (\d+) inconsistent$", out, re.M)
    assert m, out
    assert int(m.group(1)) >= 100 and int(m.group(2)) == 0, out
    work = re.search(r"3 callers .* (\d+) prepared in steps with (\d+) operations between them", out)
    assert work and int(work.group(1)) >= 5 and int(work.group(2)) >= 10, out


def run_callers(path: str, seed: int, ops: int = 600, callers: int = 4):
    """The crash harness's workload with several callers and commits prepared in steps between their operations,
    on a live volume (no write log); returns the workload once the volume is unmounted, and why the volume
    failed if it did."""
    mkfs(path, 4096, 8 << 20)
    vol = fs.Volume(path, fs.Options(unify_deltas=5, fsync_ahead_bytes=0))
    vol.mount()
    load = crashtest.Workload(vol, random.Random(seed), callers)
    try:
        for _ in range(ops):
            load.step()
        load.finish()
    except fs.VolumeError as e:
        vol.close_files()
        return load, str(e)
    vol.unmount()
    return load, None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_callers_with_commits_in_flight_keep_the_used_inode_count_exact_after_every_commit(tmp_path, seed):
    """Unlinks of files still open, renames over files the kernel still knows, fsyncs of one file and of the
    delta, and the last references dropped late, some between two prepare steps of the delta that unlinked
    them: after every commit the superblock counts exactly the inodes of the inode table, and the volume is
    clean and holds the state of its last delta."""
    path = str(tmp_path / "a.img")
    load, failed = run_callers(path, seed)
    assert failed is None
    st = load.stats
    assert st["stepped"] >= 10 and st["ops_in_prepare"] >= 50 and st["ops_in_write_or_complete"] >= 1, st
    assert st["ahead"] >= 1, st
    assert st["late_drops_in_prepare"] >= 1, st  # the order that used to destroy an inode twice
    assert st["commits"] >= len(load.states) - 1
    assert load.count_errors == []
    vol = fs.Volume(path, fs.Options(readonly=True, lock=False))
    try:
        report = Checker(vol).run()
        assert report.errors == [] and report.orphans == []
        assert crashtest.snapshot(vol) == load.states[vol.backend.sb.seq]
    finally:
        vol.close_files()


def destroy_when_no_reference_is_left(monkeypatch) -> None:
    """The destroy rule before the fix: an unlinked inode with no reference left is destroyed by whichever commit
    flushes it, also by the delta before the one in which it died."""
    flush = CommitJob._flush_inode

    def flush_inode(self, inode):
        if inode.attrs_for(self.delta).nlink == 0 and inode.lookups <= 0 and inode.opens <= 0:
            self._destroy(inode)
            return
        yield from flush(self, inode)

    monkeypatch.setattr(CommitJob, "_flush_inode", flush_inode)


def test_harness_catches_an_inode_destroyed_by_two_commits(tmp_path, capsys, monkeypatch):
    """An inode whose last reference went between two prepare steps of the delta that unlinked it, destroyed by
    that commit and the next: the count after the commit is wrong, and crash points do not replay or fsck."""
    destroy_when_no_reference_is_left(monkeypatch)
    monkeypatch.setenv("TUX3FUSE_VERIFY_LOG", "0")  # the harness's own checks, not the volume's replay check
    load, failed = run_callers(str(tmp_path / "a.img"), 2)
    assert load.count_errors and "used inode count" in load.count_errors[0], failed
    points, bad = run(capsys, "--seed", "2", "--points", "40", "--size", "8")
    assert bad > 1


def test_harness_catches_a_superblock_written_with_its_delta_without_proof(capsys, monkeypatch):
    """One flush for the blocks and the superblock is safe only because a mount checks the superblock's proof;
    without the check, crash points recover to deltas whose blocks never landed."""
    monkeypatch.setattr(replay, "delta_landed", lambda fd, sb: True)
    points, bad = run(capsys, "--seed", "1", "--points", "150", "--size", "8")
    assert bad > 0


def test_harness_catches_blocks_reused_before_the_delta_that_freed_them_is_durable(capsys, monkeypatch):
    def eager_free(self, start, count):
        self._set_range(start, count, False)
        self.free += count
        self.records.append((alloc.LOG_FREE, start, count))

    monkeypatch.setattr(alloc.Allocator, "free_later", eager_free)
    points, bad = run(capsys, "--seed", "1", "--points", "300", "--size", "1", "--ops", "600")
    assert bad > 0


@pytest.mark.mounted
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_a_random_moment_under_fio_and_fsx(make_mount, seed):
    rng = random.Random(seed)
    m = make_mount(size="512M", options="auto_unmount,commit=0.2")
    os.mkdir(m.path("synced"))
    fio = subprocess.Popen(["fio", "--name=load", f"--directory={m.mnt}", "--rw=randwrite", "--bs=4k", "--size=64M",
                            "--ioengine=psync", "--runtime=30", "--time_based", "--fsync=16"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fsx = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "fsx.py"), "-q", "-N", "100000", "-S", str(seed),
                            m.path("fsxfile")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    synced = {}
    deadline = time.monotonic() + rng.uniform(1.0, 3.0)
    i = 0
    while time.monotonic() < deadline:
        data = os.urandom(rng.randrange(1, 64 * 1024))
        path = m.path("synced", f"f{i}")
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        synced[path] = data
        i += 1
    m.kill(signal.SIGKILL)
    for proc in (fio, fsx):
        proc.kill()
        proc.wait()
    r = fsck(m.image, "-n")
    assert r.returncode == 0, r.stdout  # an image that was not unmounted: replayed in memory, clean
    m.start()
    for path, data in synced.items():
        with open(path, "rb") as f:
            assert f.read() == data, path
    assert len(synced) > 0


@pytest.mark.mounted
def test_write_log_of_a_mount_replays_to_the_same_image(make_mount, tmp_path):
    from tux3fuse.writelog import read_log

    m = make_mount(size="64M")
    m.umount()
    base = m.image.read_bytes()
    log = tmp_path / "writes.log"
    m.start(options=f"writelog={log}")
    for i in range(20):
        with open(m.path(f"f{i}"), "wb") as f:
            f.write(os.urandom(5000 * i + 1))
    os.mkdir(m.path("d"))
    os.rename(m.path("f3"), m.path("d", "g"))
    m.umount()
    image = bytearray(base)
    flushes = 0
    for kind, offset, data in read_log(str(log)):
        if kind == "W":
            image[offset: offset + len(data)] = data
        else:
            flushes += 1
    assert flushes >= 4
    assert bytes(image) == m.image.read_bytes()
