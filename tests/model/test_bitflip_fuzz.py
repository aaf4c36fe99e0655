"""One flipped bit anywhere a volume keeps something is never a silent loss.

Ten files are written and made durable, then the volume stops (a crash: no unmount; or a clean unmount), and one
random bit of a block the volume uses (a superblock copy, a log block, a tree node, a bitmap block, a data block)
is flipped. Whatever fsck.tux3 -n then says, it must be true: "clean" (exit 0) only if the volume mounts and every
file reads back exactly as synced; otherwise it exits non-zero, and fsck.tux3 (repair) leaves a volume that checks
clean and mounts. ``TUX3FUSE_FUZZ_IMAGES`` sets the number of images per case (the suite uses a few dozen).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import read_all

from mkfs import mkfs
from tux3fuse import format as fmt
from tux3fuse.checker import FSCK_OK, Checker
from tux3fuse.fs import Options, Volume, VolumeError
from tux3fuse.fsck import fsck

IMAGES = int(os.environ.get("TUX3FUSE_FUZZ_IMAGES", "25"))
FILES = 10
SIZE = 100 * 1024


def content(i: int) -> bytes:
    rng = random.Random(i)
    return rng.randbytes(SIZE - 13 * i)


def make_base(path: Path, clean: bool) -> None:
    mkfs(str(path), 4096, 16 << 20)
    vol = Volume(str(path), Options(unify_deltas=1 << 30, unify_log_blocks=1 << 30))
    vol.mount()
    for i in range(FILES):
        a = vol.create(1, f"f{i}".encode(), 0o644)
        vol.write(a.ino, 0, content(i))
        vol.release(a.ino)
        vol.forget(a.ino, 1)
        if i % 4 == 3:
            vol.commit()  # several deltas in the log
    vol.commit()  # the sync that promised every file
    if clean:
        vol.unmount()
    else:
        vol.close_files()  # a crash right after the sync


def used_places(path: Path) -> list[tuple[int, int]]:
    """(byte offset, length) of everything the volume uses: the superblock copies and every block it owns."""
    vol = Volume(str(path), Options(readonly=True))
    try:
        checker = Checker(vol)
        checker.run()
        bs = vol.blocksize
        blocks = set(checker.owner) | set(vol.backend.log_blocks)
        start = vol.backend.sb.bitmap_start[vol.backend.sb.bitmap_cur]
        blocks |= set(range(start, start + vol.backend.sb.bitmap_blocks))
        return [(offset, fmt.SUPER_SIZE) for offset in fmt.SUPER_OFFSETS] + [(b * bs, bs) for b in sorted(blocks)]
    finally:
        vol.close_files()


def files_intact(path: Path) -> bool:
    try:
        vol = Volume(str(path), Options())
        vol.mount()
    except (VolumeError, OSError):
        return False
    try:
        return all(read_all(vol, f"f{i}".encode()) == content(i) for i in range(FILES))
    except OSError:
        return False
    finally:
        vol.unmount()


@pytest.mark.parametrize("clean", [False, True], ids=["after-a-crash", "after-a-clean-unmount"])
def test_a_flipped_bit_is_never_a_silent_loss(tmp_path, clean: bool) -> None:
    base = tmp_path / "base.img"
    make_base(base, clean)
    places = used_places(base)
    rng = random.Random(1234 + clean)
    outcomes = {"clean and intact": 0, "reported": 0, "repaired, nothing lost": 0, "not repairable": 0}
    for trial in range(IMAGES):
        img = tmp_path / "fuzz.img"
        shutil.copyfile(base, img)
        offset, length = rng.choice(places)
        byte = offset + rng.randrange(length)
        with open(img, "r+b") as f:
            f.seek(byte)
            old = f.read(1)[0]
            f.seek(byte)
            f.write(bytes([old ^ (1 << rng.randrange(8))]))
        where = f"trial {trial}: bit at byte {byte}"
        report = fsck(str(img))
        if report.status == FSCK_OK:
            assert files_intact(img), f"{where}: fsck -n said clean but the files are not intact"
            outcomes["clean and intact"] += 1
            continue
        outcomes["reported"] += 1
        repaired = fsck(str(img), repair=True)
        assert repaired.status in (1, 4), f"{where}: repair exited {repaired.status}: {repaired.lines}"
        if repaired.status == 1:
            again = fsck(str(img))
            assert again.status == FSCK_OK, f"{where}: after repair: {again.lines}"
            # one flipped bit is found and flipped back (or the bitmap rebuilt): the repair loses nothing
            assert files_intact(img), f"{where}: repaired, but files were lost: {repaired.lines}"
            outcomes["repaired, nothing lost"] += 1
        else:  # what repair cannot fix it must say, in one line naming what to do
            assert any("fsck.tux3" in line or "backup" in line for line in repaired.lines), repaired.lines
            outcomes["not repairable"] += 1
    print(f"{IMAGES} images {'after a clean unmount' if clean else 'after a crash'}: {outcomes}")
    assert outcomes["reported"], outcomes  # the fuzz reached damage that matters
