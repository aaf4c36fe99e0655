"""A failed proof is never a silent rollback (docs/FORMAT.md §11).

A delta written whole and damaged later (one flipped bit in a data block, a log block or its superblock copy) is
reported and refuses a read-write mount, after a crash and after a clean unmount; a read-only mount serves the
delta before. A commit that did not finish (its blocks not written) is dropped with a report, and the volume
mounts at the delta before. Every drop makes ``fsck.tux3 -n`` exit non-zero naming the delta.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import fsck, opened, read_all, tool
from volumes import BS, FILES, NO_UNIFY, SIZE, data_block, flip_bit, write_files

from mkfs import mkfs
from tux3fuse import format as fmt
from tux3fuse.fs import Options, Volume, VolumeError
from tux3fuse.writelog import read_log


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "a.img"
    mkfs(str(path), BS, 32 << 20)
    return path


def content(i: int) -> bytes:
    return bytes([65 + i]) * SIZE





def synced_then_crashed(image: Path) -> tuple[int, int, int]:
    """Ten files of 100 KiB committed with one flush (a sync), then a crash. Returns (the synced delta, the delta
    before, the physical block of block 3 of f4)."""
    vol = opened(str(image), **NO_UNIFY)
    before = vol.backend.sb.seq
    write_files(vol, content)
    vol.commit()
    assert vol.backend.sb.delta_csum  # one flush: the superblock carries the proof
    seq, block = vol.backend.sb.seq, data_block(vol, b"f4")
    vol.close_files()  # the crash: no further commit
    return seq, before, block


def fsck_n(image: Path) -> subprocess.CompletedProcess:
    return fsck(image, "-n")


def assert_damage_refuses_rw(image: Path, seq: int, before: int) -> Volume:
    with pytest.raises(VolumeError, match="fsck.tux3"):
        Volume(str(image))
    vol = Volume(str(image), Options(readonly=True))
    assert vol.backend.sb.seq == before and vol.recovery.dropped == seq and vol.recovery.cause == "damaged"
    assert vol.stats()["dropped_delta"] == seq
    r = fsck_n(image)
    assert r.returncode == 4 and f"delta {seq}" in r.stdout + r.stderr, r.stdout + r.stderr
    return vol


def test_a_flipped_bit_in_a_data_block_of_a_synced_delta_after_a_crash_refuses_the_writable_mount(image) -> None:
    seq, before, block = synced_then_crashed(image)
    flip_bit(image, block * BS + 1234, 5)
    vol = assert_damage_refuses_rw(image, seq, before)
    ino = None
    try:
        assert any("one flipped bit" in b and f"(block {block})" in b for b in vol.recovery.blocks)
        ino = int(next(b for b in vol.recovery.blocks if "one flipped bit" in b).split("inode ")[1].split()[0])
        assert ino in vol.recovery.inodes and len(vol.recovery.inodes) >= FILES
    finally:
        vol.close_files()
    flip_bit(image, block * BS + 1234, 5)  # the bit back: nothing was committed over the delta, it is whole again
    vol = Volume(str(image), Options(readonly=True))
    assert vol.backend.sb.seq == seq and not vol.recovery.dropped and read_all(vol, b"f4") == content(4)
    vol.close_files()


def test_a_flipped_bit_in_a_log_block_of_a_synced_delta_after_a_crash_refuses_the_writable_mount(image) -> None:
    seq, before, _ = synced_then_crashed(image)
    vol = Volume(str(image), Options(readonly=True))
    head = vol.backend.sb.log_head
    vol.close_files()
    flip_bit(image, head * BS + 100, 3)  # inside the records
    vol = assert_damage_refuses_rw(image, seq, before)
    assert any(f"log block {head}: one flipped bit" in b for b in vol.recovery.blocks)
    vol.close_files()


def test_a_flipped_bit_in_the_newest_superblock_copy_after_a_crash_refuses_the_writable_mount(image) -> None:
    seq, before, _ = synced_then_crashed(image)
    vol = Volume(str(image), Options(readonly=True))
    copy = vol.backend.sb.copy
    vol.close_files()
    flip_bit(image, fmt.SUPER_OFFSETS[copy] + 300, 6)  # padding
    with pytest.raises(VolumeError, match=f"named delta {seq}, newer .*fsck.tux3"):
        Volume(str(image))
    vol = Volume(str(image), Options(readonly=True))
    assert vol.backend.sb.seq == before
    vol.close_files()
    r = fsck_n(image)
    assert r.returncode == 4 and f"delta {seq}" in r.stdout + r.stderr, r.stdout + r.stderr


def clean_unmount(image: Path) -> tuple[int, int, int]:
    """The ten files, then a clean unmount. Returns (the last delta, the delta before, f4's block 3)."""
    vol = opened(str(image), **NO_UNIFY)
    write_files(vol, content)
    vol.commit()
    before = vol.backend.sb.seq
    block = data_block(vol, b"f4")
    vol.unmount()
    vol = Volume(str(image), Options(readonly=True))
    sb = vol.backend.sb
    assert sb.state == fmt.STATE_CLEAN and sb.log_count == 0  # the unmount unified: no log is left
    seq = vol.backend.sb.seq
    vol.close_files()
    return seq, before, block


def test_after_a_clean_unmount_a_flipped_data_bit_loses_no_delta_and_fsck_names_the_block(image) -> None:
    seq, _, block = clean_unmount(image)
    flip_bit(image, block * BS + 7, 0)
    vol = Volume(str(image), Options(readonly=True))
    assert vol.backend.sb.seq == seq and not vol.recovery.dropped
    with pytest.raises((OSError, fmt.CorruptBlock), match="checksum"):
        read_all(vol, b"f4")
    vol.close_files()
    r = fsck_n(image)
    assert r.returncode == 4 and f"(block {block}) fails its checksum" in r.stdout


def test_after_a_clean_unmount_a_flipped_bit_in_a_tree_block_loses_no_delta_and_fsck_reports_it(image) -> None:
    """A clean unmount leaves no log: the last delta's metadata is its tree nodes."""
    seq, _, _ = clean_unmount(image)
    vol = Volume(str(image), Options(readonly=True))
    root = vol.backend.sb.itree_root
    vol.close_files()
    flip_bit(image, root * BS + 200, 1)
    fd = os.open(image, os.O_RDONLY)
    try:
        from tux3fuse.fs import find_super
        sb, found = find_super(fd, str(image))
    finally:
        os.close(fd)
    assert sb.seq == seq and not found.dropped and not found.refuse
    assert fsck_n(image).returncode != 0


def test_after_a_clean_unmount_a_flipped_bit_in_the_newest_superblock_refuses_the_writable_mount(image) -> None:
    seq, before, _ = clean_unmount(image)
    vol = Volume(str(image), Options(readonly=True))
    copy = vol.backend.sb.copy
    vol.close_files()
    flip_bit(image, fmt.SUPER_OFFSETS[copy] + 400, 2)
    with pytest.raises(VolumeError, match=f"named delta {seq}, newer .*fsck.tux3"):
        Volume(str(image))
    vol = Volume(str(image), Options(readonly=True))
    assert vol.backend.sb.seq == before and all(read_all(vol, b"f%d" % i) == content(i) for i in range(FILES))
    vol.close_files()
    r = fsck_n(image)
    assert r.returncode == 4 and f"delta {seq}" in r.stdout + r.stderr


def test_a_damaged_older_superblock_copy_is_reported_and_costs_nothing(image) -> None:
    seq, _, _ = clean_unmount(image)
    vol = Volume(str(image), Options(readonly=True))
    older = 1 - vol.backend.sb.copy
    vol.close_files()
    flip_bit(image, fmt.SUPER_OFFSETS[older] + 300, 0)
    vol = Volume(str(image))  # nothing newer was lost: a writable mount goes on, and its commit rewrites the copy
    assert vol.backend.sb.seq == seq and any(f"copy {older} is damaged" in n for n in vol.recovery.notes)
    vol.mount()
    vol.unmount()
    assert fsck_n(image).returncode == 0


def rebuild_without(image: Path, keep) -> tuple[int, int]:
    """Commit a delta with the write log on, then rebuild the image as a crash would leave it: the state before
    that delta plus its superblock and only the writes ``keep(block, data)`` accepts (a mangled copy to write
    instead, or None to leave the block unwritten). Returns (that delta, the delta before)."""
    log = image.with_suffix(".wlog")
    vol = opened(str(image), **NO_UNIFY)
    write_files(vol, content, "old")
    vol.commit()
    vol.close_files()
    base = image.read_bytes()
    vol = Volume(str(image), Options(writelog=str(log), **NO_UNIFY))
    before = vol.backend.sb.seq
    write_files(vol, content)
    vol.commit()
    assert vol.backend.sb.delta_csum
    seq = vol.backend.sb.seq
    vol.close_files()
    img = bytearray(base)
    for kind, offset, data in read_log(str(log)):
        if kind != "W":
            continue
        if offset not in fmt.SUPER_OFFSETS:
            data = keep(offset // BS, data)
            if data is None:
                continue
        img[offset: offset + len(data)] = data
    image.write_bytes(bytes(img))
    return seq, before


def assert_dropped_and_mounts_at_the_delta_before(image: Path, seq: int, before: int, log: bool = True) -> None:
    r = fsck_n(image)
    assert r.returncode == 4 and f"delta {seq} was dropped (unfinished)" in r.stdout, r.stdout + r.stderr
    vol = Volume(str(image))  # a writable mount goes on at the delta before, and says what it dropped
    assert vol.backend.sb.seq == before and vol.recovery.dropped == seq and vol.recovery.cause == "unfinished"
    assert vol.stats()["dropped_delta"] == seq
    assert len(vol.recovery.inodes) > FILES if log else vol.recovery.inodes == []  # as far as its log reads
    assert read_all(vol, b"old3") == content(3)
    with pytest.raises(OSError):
        vol.lookup(1, b"f3")
    vol.mount()
    vol.unmount()
    assert fsck_n(image).returncode == 0


def test_a_commit_whose_data_blocks_were_not_written_is_dropped_with_a_report(image) -> None:
    data_blocks = []

    def keep(block: int, data: bytes) -> bytes | None:
        if data[:4] == fmt.KIND_LOG:
            return data
        data_blocks.append(block)
        return None if len(data_blocks) % 3 else data  # two of three data writes never reached the disk

    seq, before = rebuild_without(image, keep)
    assert_dropped_and_mounts_at_the_delta_before(image, seq, before)


def test_a_commit_with_only_one_data_block_torn_is_dropped_with_a_report(image) -> None:
    """A torn block differs from what was written in whole sectors: a legitimate crash, not damage."""
    torn = []

    def keep(block: int, data: bytes) -> bytes | None:
        if data[:4] == fmt.KIND_LOG or torn:
            return data
        torn.append(block)
        return data[:512] + b"\x5a" * (len(data) - 512)  # one sector new, the rest what was there

    seq, before = rebuild_without(image, keep)
    assert_dropped_and_mounts_at_the_delta_before(image, seq, before)


def test_a_commit_whose_log_block_was_not_written_is_dropped_with_a_report(image) -> None:
    seq, before = rebuild_without(image, lambda block, data: None if data[:4] == fmt.KIND_LOG else data)
    assert_dropped_and_mounts_at_the_delta_before(image, seq, before, log=False)


@pytest.mark.mounted
def test_sigkill_after_sync_then_one_flipped_bit_refuses_the_mount_and_fsck_names_the_delta(make_mount) -> None:
    m = make_mount(size="64M")
    for i in range(FILES):
        with open(m.path(f"f{i}"), "wb") as f:
            f.write(content(i))
    r = subprocess.run([tool("tux3"), "sync", str(m.mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m.kill(signal.SIGKILL)
    vol = Volume(str(m.image), Options(readonly=True))
    seq, block = vol.backend.sb.seq, data_block(vol, b"f6")
    vol.close_files()
    flip_bit(m.image, block * BS + 99, 4)
    mnt = str(m.mnt)
    r = subprocess.run([tool("tux3fuse"), "-f", str(m.image), mnt], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "fsck.tux3" in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    r = fsck_n(m.image)
    assert r.returncode == 4 and f"delta {seq}" in r.stdout + r.stderr
    m.start("ro")
    assert m.stat_json()["dropped_delta"] == seq
    m.umount()
    flip_bit(m.image, block * BS + 99, 4)  # the bit back: the synced delta was never committed over
    m.start("")
    for i in range(FILES):
        with open(m.path(f"f{i}"), "rb") as f:
            assert f.read() == content(i)
    m.umount()
