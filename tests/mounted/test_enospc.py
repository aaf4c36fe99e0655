"""A writer that fills the volume gets ENOSPC from write(), with the writeback cache as without it, within a bounded
overshoot (what its write() calls took beyond what the volume stores); the file then shows the size the volume
stores, after the close and after a remount, every stored byte reads back, and deleting the file makes room again.

The writer is scripts/enospc.py's (a pattern whose every 8-byte word holds its own index, so a byte in the wrong
place is seen); ``dd`` is run as a user runs it. A subprocess timeout is only a hang detector.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from conftest import load_script, tool

from tux3fuse.mounts import mount_device
from tux3fuse.options import Options

pytestmark = [pytest.mark.mounted, pytest.mark.timeout(300)]
MiB = 1 << 20
MODES = ["writeback", "nowriteback"]
enospc = load_script("enospc")


def kernel_limit(m) -> tuple[int, int | None]:
    """(the kernel's dirty limit for the mount as the daemon set it, 0 if it could not; the kernel's limit as its
    sysfs file says, None if unreadable). A daemon run by root must have been able to."""
    ours = m.stat_json()["kernel_dirty_limit"]
    device = mount_device(os.path.realpath(m.mnt))
    try:
        with open(f"/sys/class/bdi/{device}/max_bytes") as f:
            kernels = int(f.read())
    except (OSError, ValueError):
        return ours, None
    assert ours or os.geteuid() != 0, "the daemon, run by root, left the kernel's dirty limit for the mount alone"
    return ours, kernels


def overshoot_bound(m, mode: str, block: int) -> int:
    """What a writer may be told was written beyond what the volume stores: nothing without the writeback cache;
    with it, the kernel's dirty limit for the mount twice over (the least the daemon lowers it to as the volume
    fills, else the kernel's own) plus two write() calls (the one in progress when the volume refused a WRITE)."""
    if mode == "nowriteback":
        return 0
    ours, kernels = kernel_limit(m)
    limit = Options().kernel_dirty if ours else kernels or 1 << 30
    return 2 * limit + 2 * block


def capacity(m) -> int:
    st = os.statvfs(m.mnt)
    return st.f_bavail * st.f_frsize


def write_again(m, name: str = "again", size: int = 8 * MiB) -> None:
    """After the fill is deleted the volume takes writes again."""
    data = enospc.pattern(0, size)
    with open(m.path(name), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    with open(m.path(name), "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("mode", MODES)
def test_dd_until_full_ends_with_enospc_and_the_file_shows_what_was_stored(make_mount, mode):
    m = make_mount(size="64M", options="" if mode == "writeback" else mode)
    free = capacity(m)
    fill = m.path("fill")
    r = subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=1M"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
    stored = os.stat(fill).st_size
    assert free - 4 * MiB <= stored <= free  # the volume is full (dd says how much it wrote only if close succeeds)
    with open(fill, "rb") as f:
        assert f.read() == bytes(stored)
    m.umount()
    m.start()
    assert os.stat(fill).st_size == stored
    os.unlink(fill)
    write_again(m)


@pytest.mark.parametrize("mode", MODES)
def test_a_writer_that_fills_the_volume_gets_enospc_from_write_and_every_stored_byte_reads_back(make_mount, mode):
    m = make_mount(size="64M", options="" if mode == "writeback" else mode)
    free = capacity(m)
    path = m.path("fill")
    filled = enospc.fill(path, MiB, limit=4 * 64 * MiB)
    assert filled.created and filled.error == errno.ENOSPC, filled
    stored = os.stat(path).st_size
    assert free - 4 * MiB <= stored <= filled.accepted
    assert filled.accepted - stored <= overshoot_bound(m, mode, MiB)
    assert enospc.first_wrong_byte(path, stored) is None
    if mode == "writeback":
        ours, kernels = kernel_limit(m)
        if ours and kernels is not None:  # the daemon lowered the kernel's dirty limit as the volume filled
            assert kernels <= 2 * MiB
    m.umount()
    m.start()
    assert os.stat(path).st_size == stored
    assert enospc.first_wrong_byte(path, stored) is None
    os.unlink(path)
    write_again(m)


def test_several_writers_filling_the_volume_and_writing_on_it_full_each_end_with_enospc(make_mount):
    m = make_mount(size="64M")
    free = capacity(m)
    for round, names in enumerate((["a", "b", "c", "d"], ["e", "f", "g", "h"])):  # an empty volume, then a full one
        paths = [m.path(name) for name in names]
        results = enospc.fill_together(paths, MiB, limit=4 * 64 * MiB)
        bound = overshoot_bound(m, "writeback", MiB)
        for f in results:
            assert errno.ENOSPC in (f.error, f.close_error), f
            if not f.created:  # creating a file on the full volume: ENOSPC
                assert round == 1 and not os.path.exists(f.path)
                continue
            stored = os.stat(f.path).st_size
            assert stored <= f.accepted and f.accepted - stored <= bound, f
            assert enospc.first_wrong_byte(f.path, stored) is None
        if round == 0:
            assert sum(os.stat(p).st_size for p in paths) >= free - 4 * MiB
    names = sorted(os.listdir(m.mnt))
    sizes = {name: os.stat(m.path(name)).st_size for name in names}
    m.umount()
    m.start()
    assert {name: os.stat(m.path(name)).st_size for name in names} == sizes
    for name in names:
        os.unlink(m.path(name))
    write_again(m)


def test_while_a_refusal_stands_stat_and_write_fail_and_after_the_last_close_the_file_shows_what_was_stored(
        make_mount):
    """With the writeback cache, after the volume refused a WRITE of the file: its attributes (fstat, stat) and
    every write() through the kernel's inode of it give ENOSPC, even once space is freed, until its last close;
    then it shows the size the volume stores, and a new open of it writes again."""
    m = make_mount(size="64M")
    with open(m.path("keep"), "wb") as f:
        f.write(os.urandom(8 * MiB))
    path = m.path("fill")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    written = 0
    with pytest.raises(OSError) as refused:
        while written < 4 * 64 * MiB:
            written += os.write(fd, enospc.pattern(written, MiB))
    assert refused.value.errno == errno.ENOSPC
    for attempt in (lambda: os.fstat(fd), lambda: os.stat(path), lambda: os.write(fd, b"x")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.ENOSPC
    os.unlink(m.path("keep"))
    subprocess.run([tool("tux3"), "sync", str(m.mnt)], check=True, timeout=60)
    with pytest.raises(OSError) as e:  # the kernel's inode still holds the refused data: not written after it
        os.write(fd, b"x")
    assert e.value.errno == errno.ENOSPC
    try:
        os.close(fd)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    stored = os.stat(path).st_size
    assert 0 < stored < written and enospc.first_wrong_byte(path, stored) is None
    with open(path, "ab") as f:
        f.write(enospc.pattern(stored, 64 * 1024))
        os.fsync(f.fileno())
    assert os.stat(path).st_size == stored + 64 * 1024
    assert enospc.first_wrong_byte(path, stored + 64 * 1024) is None
