"""Mount options as mount(8) reads them, through the real commands: of two options that contradict each other the
later wins, and a size option is what the daemon uses (below its least it is refused: test_inputs.py); with the
periodic commit off, sync(1) commits nothing and tux3 sync does (README, Durability)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from conftest import is_mounted, mkfs, one_line, require_fuse, tool
from test_inputs import run

pytestmark = pytest.mark.timeout(120)


def mount_options(mnt) -> set[str]:
    """The options the kernel's mount table gives the mount at ``mnt``."""
    real = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        lines = [line.split() for line in f]
    (found,) = [fields[3] for fields in lines if fields[1] == real]
    return set(found.split(","))


@pytest.mark.parametrize("options, writable", [("ro,rw", True), ("rw,ro", False), ("ro,rw,ro", False)])
def test_of_ro_and_rw_the_later_wins(make_mount, options, writable):
    m = make_mount(size="32M", options=options)
    assert ("rw" if writable else "ro") in mount_options(m.mnt)
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"x")
        wrote = True
    except OSError as e:
        assert e.errno == errno.EROFS
        wrote = False
    assert wrote == writable
    assert m.stat_json()["read_only"] == int(not writable)
    m.umount()


@pytest.mark.parametrize("options, cached", [("nowriteback,writeback", True), ("writeback,nowriteback", False)])
def test_of_writeback_and_nowriteback_the_later_wins(make_mount, options, cached):
    m = make_mount(size="32M", options=options)
    with open(m.path("f"), "wb", buffering=0) as f:
        for _ in range(100):
            f.write(b"y" * 100)
        os.fsync(f.fileno())
    writes = m.stat_json()["fuse.write"]
    # under the kernel's writeback cache the 100 small writes reach the daemon gathered into a few requests
    assert (writes < 50) if cached else (writes >= 100), writes
    m.umount()


def test_the_cache_size_given_bounds_the_pages_cached(make_mount):
    m = make_mount(size="64M", options="cache=1M")
    data = os.urandom(4 << 20)
    with open(m.path("f"), "wb") as f:
        f.write(data)
    m.umount()
    m.start()  # nothing of the file is cached, here or in the kernel
    with open(m.path("f"), "rb") as f:
        assert f.read() == data
    stat = m.stat_json()
    assert stat["blocks_read"] >= len(data) // 4096
    assert stat["cached_pages"] <= (1 << 20) // 4096, stat["cached_pages"]
    m.umount()


def test_the_mount_helper_refuses_a_cache_below_its_least_with_status_32(tmp_path):
    require_fuse()
    image, mnt = tmp_path / "a.img", tmp_path / "mnt"
    mkfs(image, "32M")
    mnt.mkdir()
    r = run("mount.fuse.tux3", str(image), str(mnt), "-o", "cache=0")
    mounted = is_mounted(str(mnt))
    if mounted:  # accepted after all: take it down before failing
        subprocess.run([tool("tux3"), "umount", str(mnt)], capture_output=True, timeout=60)
    assert not mounted
    assert r.returncode == 32 and "cache=" in one_line(r) and "1 MiB" in one_line(r)


def test_sync_hands_the_daemon_the_data_but_commits_nothing_and_tux3_sync_commits(make_mount):
    """README, Durability: the kernel sends a FUSE server no SYNCFS, so sync(1) is no durability point."""
    m = make_mount(size="32M", options="commit=0")  # no periodic commit: only fsync, tux3 sync and unmount
    before = m.stat_json()
    with open(m.path("f"), "wb") as f:
        f.write(b"z" * 8192)
    subprocess.run(["sync"], check=True, timeout=120)
    synced = m.stat_json()
    assert synced["dirty_pages"] >= 2 and synced["committed"] == before["committed"], synced
    subprocess.run([tool("tux3"), "sync", str(m.mnt)], check=True, timeout=60)
    after = m.stat_json()
    assert after["committed"] > before["committed"] and after["dirty_pages"] == 0
    m.umount()
