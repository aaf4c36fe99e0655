"""Crafted images, as an attacker hands them over: every checksum valid, the values hostile.

Each image is a small volume with a value changed (scripts/reseal.py then recomputes every checksum, so the value
reaches the code that reads it), met with the real commands: ``fsck.tux3 -n`` and the mount (``tux3fuse -f``).
Both finish and say what is wrong in one line, never a traceback: a superblock the format does not allow is
refused before anything is read or written; a deeper structure that is wrong refuses the mount (a log that does not
replay, a root directory that does not load) or, once mounted, answers EIO, turns the volume read-only and logs
one line naming the block or inode. Every command runs with its address space limited (``LIMIT``), so that a
regression fails the test instead of exhausting the machine; the subprocess timeouts only detect a hang.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import Mount, address_space, is_mounted, load_script, opened, read_all, require_fuse, tool
from volumes import NO_UNIFY

from mkfs import mkfs
from tux3fuse import format as fmt
from tux3fuse import logrecord as logrec
from tux3fuse.fs import Options, Volume

LIMIT = 2 << 30  # bytes of address space a command may map
HANG = 120  # seconds after which a command counts as hung
reseal = load_script("reseal")


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=HANG,
                       preexec_fn=address_space(LIMIT))
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def volume(tmp_path: Path, clean: bool = False) -> Path:
    """A 1 MiB volume of 4 KiB blocks: /d/f (10000 bytes) and /g, written in two deltas; a crash leaves both in the
    log (two log blocks), a clean unmount folds them into the trees."""
    img = tmp_path / "v.img"
    mkfs(str(img), 4096, 1 << 20)
    vol = opened(str(img), **NO_UNIFY)
    d = vol.mkdir(1, b"d", 0o755).ino
    f = vol.create(d, b"f", 0o644).ino
    vol.write(f, 0, b"x" * 10000)
    vol.release(f)
    vol.commit()
    g = vol.create(1, b"g", 0o644).ino
    vol.write(g, 0, b"y" * 100)
    vol.release(g)
    vol.commit()
    if clean:
        vol.unmount()
    else:
        vol.close_files()
    return img


def newest(image: bytearray) -> int:
    """The superblock copy a mount loads."""
    return max((0, 1), key=lambda c: reseal.super_fields(image, c)["seq"])


def crafted(img: Path, patch) -> bytes:
    """Apply ``patch(image)`` to the image file and reseal it; returns the bytes before."""
    before = img.read_bytes()
    image = bytearray(before)
    patch(image)
    img.write_bytes(reseal.reseal(image, 4096))
    return before


def refused(tmp_path: Path, img: Path, said: str) -> str:
    """fsck.tux3 -n exits 4 and a mount exits 1, each with one line saying ``said``; the image is unchanged."""
    before = img.read_bytes()
    r = run("fsck.tux3", "-n", str(img))
    assert r.returncode == 4 and said in r.stdout + r.stderr, r.stdout + r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    r = run("tux3fuse", "-f", str(img), str(mnt))
    assert r.returncode == 1 and said in one_line(r.stderr), r.stderr
    assert not is_mounted(str(mnt))
    assert img.read_bytes() == before, "a refused mount wrote to the image"
    return r.stderr


def start(tmp_path: Path, img: Path) -> Mount:
    """The real daemon on ``img``, with its address space limited."""
    require_fuse()
    return Mount(img, tmp_path / "mnt", memory=LIMIT).start()


@pytest.fixture
def mounts():
    started: list[Mount] = []
    yield started
    for m in started:
        m.cleanup()


# ---------------------------------------------------------------------------------------------------------------
# the superblock: values the format does not allow are refused before anything is read or written


def test_a_log_block_naming_itself_with_a_count_of_2_32_minus_1_is_refused_in_one_line(tmp_path) -> None:
    img = volume(tmp_path)

    def patch(image: bytearray) -> None:
        copy = newest(image)
        head = reseal.super_fields(image, copy)["log_head"]
        struct.pack_into("<Q", image, head * 4096 + 32, head)
        reseal.set_super(image, log_count=(1 << 32) - 1)
    crafted(img, patch)
    refused(tmp_path, img, f"log of {(1 << 32) - 1} blocks")


@pytest.mark.parametrize("loop", ["itself", "two blocks"])
def test_a_log_chain_that_loops_within_the_volume_refuses_the_mount_naming_the_loop(tmp_path, loop) -> None:
    img = volume(tmp_path)

    def patch(image: bytearray) -> None:
        copy = newest(image)
        head = reseal.super_fields(image, copy)["log_head"]
        prev = struct.unpack_from("<Q", image, head * 4096 + 32)[0]
        assert prev, "the volume has a log of two blocks"
        if loop == "itself":
            struct.pack_into("<Q", image, head * 4096 + 32, head)
        else:
            struct.pack_into("<Q", image, prev * 4096 + 32, head)
        reseal.set_super(image, (copy,), log_count=200)
    crafted(img, patch)
    refused(tmp_path, img, "the log chain loops")


@pytest.mark.parametrize("field, value, said", [
    ("bitmap_blocks", 0, "bitmap regions of 0 blocks"),
    ("volblocks", 14, "14 blocks: a volume of 4096-byte blocks has 64 to"),
    ("next_inum", (1 << 64) - 1, f"next inode number {(1 << 64) - 1} outside"),
    ("itree_root", 1, "itree_root 1 outside the allocatable blocks"),
])
def test_a_superblock_whose_layout_or_counts_the_format_refuses_leaves_the_volume_untouched(tmp_path, field, value,
                                                                                          said) -> None:
    img = volume(tmp_path, clean=True)
    crafted(img, lambda image: reseal.set_super(image, **{field: value}))
    refused(tmp_path, img, said)


def test_fsck_of_a_random_file_or_an_ext4_image_exits_8_saying_it_is_not_a_volume(tmp_path) -> None:
    noise = tmp_path / "random.img"
    noise.write_bytes(os.urandom(1 << 20))
    ext4 = tmp_path / "ext4.img"
    if shutil.which("mkfs.ext4"):
        with open(ext4, "wb") as f:
            f.truncate(4 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4)], check=True, capture_output=True)
    else:  # the ext2/3/4 signature at byte 1080, as mkfs.ext4 leaves it
        ext4.write_bytes(bytes(1080) + b"\x53\xef" + bytes((4 << 20) - 1082))
    for img in (noise, ext4):
        for args in (["-n"], []):
            r = run("fsck.tux3", *args, str(img))
            assert r.returncode == 8 and r.stdout == "", r.stdout + r.stderr
            assert one_line(r.stderr) == f"fsck.tux3: {img}: not a tux3fuse volume (no signature found)"


# ---------------------------------------------------------------------------------------------------------------
# deeper structures: the load refuses them, or a mounted volume answers EIO and turns read-only


def test_a_log_record_allocating_2_32_minus_1_blocks_is_refused_in_one_line(tmp_path) -> None:
    img = volume(tmp_path)

    def patch(image: bytearray) -> None:
        head = reseal.super_fields(image, newest(image))["log_head"]
        at = head * 4096 + 44
        assert image[at] == logrec.LOG_ALLOC  # the first record of the newest log block allocates its data
        struct.pack_into("<I", image, at + 9, (1 << 32) - 1)
    crafted(img, patch)
    refused(tmp_path, img, "outside the allocatable area")


def test_a_root_directory_of_2_62_bytes_refuses_the_mount_and_fsck_finishes(tmp_path) -> None:
    img = volume(tmp_path, clean=True)

    def patch(image: bytearray) -> None:
        root = reseal.super_fields(image, newest(image))["itree_root"]
        vol = Volume(str(img), Options(readonly=True))
        try:
            assert vol.backend.itable.root.level == 0 and vol.backend.itable.root.blocknr == root
        finally:
            vol.close_files()
        _, off, _ = struct.unpack_from("<QHH", image, root * 4096 + 32)  # the first entry: inode 1
        struct.pack_into("<Q", image, root * 4096 + off + 16, 1 << 62)
    crafted(img, patch)
    refused(tmp_path, img, f"inode 1: directory size {1 << 62}")


def test_an_extent_naming_a_superblock_block_is_eio_and_read_only_and_block_1_stays(tmp_path, mounts) -> None:
    img = volume(tmp_path, clean=True)
    vol = Volume(str(img), Options(readonly=True))
    try:
        ino = vol.lookup(1, b"g").ino
        leaf = vol.iget(ino).rec.dtree_root
    finally:
        vol.close_files()

    def patch(image: bytearray) -> None:
        _, off, _ = struct.unpack_from("<QHH", image, leaf * 4096 + 32)
        struct.pack_into("<Q", image, leaf * 4096 + off, 1)  # physical block 1: superblock copy 0
        struct.pack_into("<Q", image, leaf * 4096 + off + 12, fmt.checksum(image[4096: 8192]))
    crafted(img, patch)
    r = run("fsck.tux3", "-n", str(img))
    assert r.returncode == 4 and f"block {leaf}" in r.stdout and "outside the allocatable area" in r.stdout, r.stdout
    block1 = img.read_bytes()[4096: 8192]
    m = start(tmp_path, img)
    mounts.append(m)
    with pytest.raises(OSError) as e:
        with open(m.path("g"), "rb") as f:
            f.read()
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        with open(m.path("g"), "r+b") as f:  # a rewrite of the block: refused, nothing freed
            f.write(b"z")
            f.flush()
            os.fsync(f.fileno())
    assert e.value.errno in (errno.EIO, errno.EROFS)
    with open(m.path("d", "f"), "rb") as f:
        assert f.read() == b"x" * 10000  # the rest is served
    assert m.stat_json()["read_only"] == 1
    assert m.umount(expect_ok=False) == 1
    log = m.log.read_text()
    errors = log.splitlines()
    assert all(" ERROR: " in line for line in errors) and "Traceback" not in log, log  # one line each, no stack
    assert "read-only" in errors[0] and f"block {leaf}" in errors[0] and f"inode {ino}" in errors[0], errors[0]
    assert img.read_bytes()[4096: 8192] == block1  # superblock copy 0 as it was


def test_a_volume_with_every_inode_number_handed_out_answers_enospc_to_create(tmp_path, mounts) -> None:
    img = volume(tmp_path, clean=True)
    crafted(img, lambda image: reseal.set_super(image, next_inum=fmt.MAX_INUM + 1))
    r = run("fsck.tux3", "-n", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    m = start(tmp_path, img)
    mounts.append(m)
    with pytest.raises(OSError) as e:
        open(m.path("new"), "w").close()
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:
        os.mkdir(m.path("newdir"))
    assert e.value.errno == errno.ENOSPC
    with open(m.path("g"), "ab") as f:  # the volume is not read-only: everything else works
        f.write(b"more")
    os.unlink(m.path("d", "f"))
    assert os.statvfs(m.mnt).f_ffree == 0
    assert m.stat_json()["read_only"] == 0
    m.umount()
    assert "Traceback" not in m.log.read_text() and "ERROR" not in m.log.read_text()
    vol = opened(str(img))
    try:
        assert read_all(vol, b"g") == b"y" * 100 + b"more"
    finally:
        vol.unmount()


def test_a_bitmap_that_frees_a_block_in_use_is_repaired_before_anything_can_reuse_the_block(tmp_path) -> None:
    img = volume(tmp_path, clean=True)
    vol = Volume(str(img), Options(readonly=True))
    try:
        ino = vol.lookup(1, b"g").ino
        (_, value), = vol.backend.dtree(vol.iget(ino)).items()
        block = fmt.unpack_extent(value)[0]
        sb = vol.backend.sb
        bitmap = sb.bitmap_start[sb.bitmap_cur]
    finally:
        vol.close_files()

    def patch(image: bytearray) -> None:
        image[bitmap * 4096 + 32 + block // 8] &= ~(1 << block % 8) & 0xFF
    crafted(img, patch)
    r = run("fsck.tux3", "-n", str(img))
    assert r.returncode == 4 and f"block {block} is used by inode {ino} but marked free" in r.stdout, r.stdout
    r = run("fsck.tux3", str(img))
    assert r.returncode == 1, r.stdout + r.stderr
    assert run("fsck.tux3", "-n", str(img)).returncode == 0
    vol = opened(str(img))
    try:
        for i in range(8):  # allocations after the repair: none of them takes the block of /g
            f = vol.create(1, b"new%d" % i, 0o644).ino
            vol.write(f, 0, b"n" * 9000)
            vol.release(f)
        vol.commit()
        assert read_all(vol, b"g") == b"y" * 100
    finally:
        vol.unmount()
    assert run("fsck.tux3", "-n", str(img)).returncode == 0
