"""Arguments are checked before anything is destroyed: the real commands, run as a user runs them.

A refused mkfs leaves its target byte for byte as it was (an existing file keeps its size and content, a valid
volume still checks clean, a new name is not created); every numeric option refuses nan, inf, negative and
out-of-range values in one line that names the option and the range, and a refused mount mounts nothing.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Mount, fsck, is_mounted, mkfs, one_line, opened, read_all, require_fuse, tool

from mkfs import MAX_BLOCKS, host_file_limit
from tux3fuse.fs import Options, Volume
from tux3fuse.units import parse_size

pytestmark = pytest.mark.timeout(120)


def run(*args: str, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    r = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert "Traceback" not in r.stderr + r.stdout
    return r


def fingerprint(path: Path) -> tuple[int, int, str]:
    """Size, modification time and content hash: all three stay the same when nothing was written."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def text_file(path: Path, size: int = 589 * 1024) -> None:
    line = b"a line of someone's notes, which no mkfs may truncate before it has checked its arguments\n"
    path.write_bytes((line * (size // len(line) + 1))[:size])


# (arguments, exit status, words the one-line message must hold)
REFUSED_MKFS = [
    (["-s", "1K"], 1, ["too small", "64 blocks", "256 KiB"]),
    (["-s", "64K"], 1, ["too small", "64 blocks", "256 KiB"]),
    (["-b", "65536", "-s", "1M"], 1, ["too small", "64 blocks", "4 MiB"]),
    (["-s", "1E"], 1, ["too large", "1 EiB", f"{MAX_BLOCKS} blocks", "16 TiB"]),
    (["-s", "inf"], 2, ["-s", "'inf'", "256 KiB", "16 TiB"]),
    (["-s", "nan"], 2, ["-s", "'nan'", "256 KiB", "16 TiB"]),
    (["--size=-1M"], 2, ["-s", "'-1M'"]),
    (["-s", "0.1"], 2, ["-s", "'0.1'"]),
    (["-s", "1e999"], 2, ["-s", "'1e999'"]),
    (["-b", "3000", "-s", "1M"], 2, ["-b", "'3000'", "512 to 65536"]),
    (["-b", "nan", "-s", "1M"], 2, ["-b", "'nan'"]),
    (["-b", "inf", "-s", "1M"], 2, ["-b", "'inf'"]),
]


@pytest.mark.parametrize("args, status, words", REFUSED_MKFS, ids=[" ".join(a[0]) for a in REFUSED_MKFS])
def test_a_refused_mkfs_leaves_a_text_file_byte_identical(tmp_path, args, status, words):
    notes = tmp_path / "notes.txt"
    text_file(notes)
    before = fingerprint(notes)
    r = run("mkfs.tux3", *args, str(notes))
    line = one_line(r)
    assert r.returncode == status, line
    for word in words:
        assert word in line, line
    if status == 1:  # refused for the target: the message names it
        assert str(notes) in line
    assert fingerprint(notes) == before


@pytest.mark.parametrize("args, status, words", REFUSED_MKFS, ids=[" ".join(a[0]) for a in REFUSED_MKFS])
def test_a_refused_mkfs_of_a_new_name_leaves_no_file(tmp_path, args, status, words):
    target = tmp_path / "new.img"
    r = run("mkfs.tux3", *args, str(target))
    assert r.returncode == status, one_line(r)
    assert not os.path.lexists(target)
    assert os.listdir(tmp_path) == []


def test_a_refused_forced_mkfs_leaves_a_valid_volume_that_checks_clean(tmp_path):
    image = tmp_path / "a.img"
    mkfs(image, "32M")
    vol = opened(str(image))
    ino = vol.create(1, b"kept", 0o644).ino
    vol.write(ino, 0, b"still here" * 1000)
    vol.unmount()
    before = fingerprint(image)
    for args in (["-f", "-s", "1K"], ["-f", "-s", "1E"], ["-f", "-s", "nan"], ["-f", "-b", "3000"]):
        r = run("mkfs.tux3", *args, str(image))
        assert r.returncode in (1, 2), one_line(r)
        one_line(r)
        assert fingerprint(image) == before, args
    r = fsck(image, "-n")
    assert r.returncode == 0, r.stdout + r.stderr
    vol = Volume(str(image), Options(readonly=True))
    try:
        assert read_all(vol, b"kept") == b"still here" * 1000
    finally:
        vol.close_files()


def test_without_force_an_existing_volume_is_refused_whatever_the_size(tmp_path):
    image = tmp_path / "a.img"
    mkfs(image, "32M")
    before = fingerprint(image)
    r = run("mkfs.tux3", "-s", "1M", str(image))
    assert r.returncode == 1 and "use -f" in one_line(r)
    assert fingerprint(image) == before


def test_the_smallest_volume_is_made_and_printed_in_its_own_unit(tmp_path):
    image = tmp_path / "small.img"
    r = run("mkfs.tux3", "-s", "256K", str(image))
    assert r.returncode == 0, r.stderr
    assert "64 blocks of 4096 bytes (256 KiB)" in r.stdout
    assert os.path.getsize(image) == 256 << 10
    assert fsck(image, "-n").returncode == 0


def test_a_size_over_the_file_size_limit_creates_nothing(tmp_path):
    target = tmp_path / "limited.img"
    r = run("mkfs.tux3", "-s", "2M", str(target), limit_file_size=1 << 20)
    line = one_line(r)
    assert r.returncode == 1 and str(target) in line and "ulimit -f" in line and "1048576 bytes" in line
    assert not os.path.lexists(target)
    notes = tmp_path / "notes.txt"
    text_file(notes)
    before = fingerprint(notes)
    r = run("mkfs.tux3", "-s", "2M", str(notes), limit_file_size=1 << 20)
    assert r.returncode == 1 and "ulimit -f" in one_line(r)
    assert fingerprint(notes) == before


def test_a_size_over_the_host_file_systems_limit_is_named_and_leaves_nothing(tmp_path):
    limit = host_file_limit(str(tmp_path))
    blocks = 65536
    if limit is None or limit >= MAX_BLOCKS * blocks:
        pytest.skip("the file system of the temporary directory holds any file a volume can need")
    size = (limit // blocks + 1) * blocks  # one block more than the host holds, within what the format allows
    target = tmp_path / "huge.img"
    r = run("mkfs.tux3", "-b", str(blocks), "-s", str(size), str(target))
    line = one_line(r)
    assert r.returncode == 1 and str(target) in line and f"{limit} bytes" in line
    assert not os.path.lexists(target)
    notes = tmp_path / "notes.txt"
    text_file(notes)
    before = fingerprint(notes)
    r = run("mkfs.tux3", "-b", str(blocks), "-s", str(size), str(notes))
    assert r.returncode == 1 and f"{limit} bytes" in one_line(r)
    assert fingerprint(notes) == before


def test_a_block_device_keeps_its_size_and_a_refused_mkfs_leaves_it_as_it_was(tmp_path):
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    backing = tmp_path / "disk"
    backing.write_bytes(b"")
    os.truncate(backing, 8 << 20)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        r = run("mkfs.tux3", "-s", "16M", dev)
        line = one_line(r)
        assert r.returncode == 1 and dev in line and "8388608 bytes" in line and "16 MiB" in line
        r = run("mkfs.tux3", "-q", "-s", "4M", dev)
        assert r.returncode == 0, r.stderr
        assert os.path.getsize(backing) == 8 << 20
        vol = Volume(dev, Options(readonly=True))
        volblocks = vol.backend.sb.volblocks
        vol.close_files()
        assert volblocks == 1024  # the volume has the size asked for, the device the size it had
        for args in (["-f", "-s", "1K"], ["-f", "-s", "1E"], ["-s", "4M"]):
            r = run("mkfs.tux3", *args, dev)
            assert r.returncode == 1, one_line(r)
            one_line(r)
        assert fsck(Path(dev), "-n").returncode == 0
        assert os.path.getsize(backing) == 8 << 20
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_mkfs_on_a_mounted_image_changes_nothing(make_mount):
    m = make_mount(size="32M")
    with open(m.path("f"), "wb") as f:
        f.write(b"mounted data" * 100)
        os.fsync(f.fileno())
    size = os.path.getsize(m.image)
    for args in (["-f"], ["-f", "-s", "1M"], ["-f", "-s", "64M"]):
        r = run("mkfs.tux3", *args, str(m.image))
        assert r.returncode == 1 and "in use" in one_line(r), args
        assert os.path.getsize(m.image) == size
    with open(m.path("f"), "rb") as f:
        assert f.read() == b"mounted data" * 100
    m.umount()  # the make_mount fixture then requires a clean fsck


# (option, the words its refusal names)
REFUSED_OPTIONS = [
    ("commit=nan", ["commit=", "0", "86400", "'nan'"]),
    ("commit=inf", ["commit=", "86400", "'inf'"]),
    ("commit=-1", ["commit=", "86400", "'-1'"]),
    ("commit=1e999", ["commit=", "'1e999'"]),
    ("commit=86401", ["commit=", "86400"]),
    ("commit=", ["commit="]),
    ("cache=inf", ["cache=", "from 1 MiB to", "'inf'"]),
    ("cache=-1", ["cache=", "from 1 MiB to"]),
    ("cache=0", ["cache=", "from 1 MiB to", "'0'"]),
    ("cache=1023K", ["cache=", "from 1 MiB to", "'1023K'"]),
    ("cache=1E", ["cache=", "memory"]),
    ("dirty_limit=nan", ["dirty_limit=", "from 0 (no limit) or 1 MiB to", "'nan'"]),
    ("dirty_limit=-64M", ["dirty_limit=", "from 0 (no limit) or 1 MiB to"]),
    ("dirty_limit=4K", ["dirty_limit=", "from 0 (no limit) or 1 MiB to", "'4K'"]),
    ("readahead=1", ["readahead=", "from 0 (none) or 64 KiB to", "'1'"]),
    ("readahead=-1M", ["readahead=", "from 0 (none) or 64 KiB to"]),
    ("fsync_ahead=inf", ["fsync_ahead=", "off", "'inf'"]),
    ("fsync_ahead=nan", ["fsync_ahead=", "off", "'nan'"]),
    ("fsync_ahead=-1", ["fsync_ahead=", "off", "from 0 to"]),
    ("kernel_dirty=inf", ["kernel_dirty=", "off", "'inf'"]),
    ("kernel_dirty=4K", ["kernel_dirty=", "from 0 (off) or 64 KiB to", "'4K'"]),
    ("ro=1", ["ro takes no value"]),
    ("rw=0", ["rw takes no value"]),
]


@pytest.mark.parametrize("option, words", REFUSED_OPTIONS, ids=[o for o, _ in REFUSED_OPTIONS])
def test_a_numeric_mount_option_out_of_range_is_refused_before_mounting(tmp_path, option, words):
    image = tmp_path / "a.img"
    mkfs(image, "32M")
    before = fingerprint(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for cmd in (["tux3fuse", "-o", option], ["tux3fuse", "-o", f"commit=1,{option},nowriteback"],
                ["tux3", "mount", "-o", option]):
        r = run(*cmd, str(image), str(mnt))
        mounted = is_mounted(str(mnt))
        if mounted:  # accepted after all: take it down before failing, whatever daemon mode it ran in
            subprocess.run([tool("tux3"), "umount", str(mnt)], capture_output=True, timeout=60)
        assert not mounted, f"{cmd} mounted the volume"
        line = one_line(r)
        assert r.returncode == 2, line
        for word in words:
            assert word in line, line
    assert fingerprint(image) == before


def test_the_bounds_of_every_numeric_mount_option_are_accepted(tmp_path):
    require_fuse()
    image = tmp_path / "a.img"
    mkfs(image, "32M")
    m = Mount(image, tmp_path / "mnt", "commit=0,cache=1M,dirty_limit=0,fsync_ahead=0,readahead=0,kernel_dirty=0")
    try:
        m.start()
        with open(m.path("f"), "wb") as f:
            f.write(b"x" * 100_000)
            os.fsync(f.fileno())
        m.umount()
        m.start("commit=86400,fsync_ahead=off,cache=1M,dirty_limit=1M,readahead=64K,kernel_dirty=64K")
        with open(m.path("f"), "rb") as f:
            assert f.read() == b"x" * 100_000
        m.umount()
    finally:
        m.cleanup()
    assert fsck(image, "-n").returncode == 0


@pytest.mark.parametrize("text, size", [("4096", 4096), ("64k", 64 << 10), ("1.5K", 1536), ("2G", 2 << 30),
                                        ("1GiB", 1 << 30), ("512MB", 512 << 20), (".5M", 512 << 10), ("7B", 7)])
def test_sizes_a_user_writes_are_read_exactly(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "nan", "inf", "-1", "+1", "1e3", "1e999", "0x10", "1.1", "1 2", "M", "1Q",
                                  "1_000"])
def test_anything_else_is_not_a_size(text):
    with pytest.raises(ValueError):
        parse_size(text)
