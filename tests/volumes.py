"""Helpers the damage tests share: files to lose, blocks to find, bits to flip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tux3fuse import format as fmt
from tux3fuse.fs import Volume
from tux3fuse.fsck import fsck

BS = 4096
NO_UNIFY = {"unify_deltas": 1 << 30, "unify_log_blocks": 1 << 30}  # every delta stays in the log
FILES = 10
SIZE = 100 * 1024


def write_files(vol: Volume, content: Callable[[int], bytes], base: str = "f") -> None:
    """``FILES`` files named BASE0, BASE1, ... in the root, file i holding ``content(i)``."""
    for i in range(FILES):
        a = vol.create(1, f"{base}{i}".encode(), 0o644)
        vol.write(a.ino, 0, content(i))
        vol.release(a.ino)


def data_block(vol: Volume, name: bytes, index: int = 3) -> int:
    """Physical block of logical block ``index`` of ``name`` in the root, as the loaded volume maps it."""
    inode = vol.iget(vol.lookup(1, name).ino)
    for key, value in vol.dtree(inode).items():
        physical, csums = fmt.unpack_extent(value)
        if key <= index < key + len(csums):
            return physical + index - key
    raise AssertionError(f"{name!r} has no block {index}")


def flip_bit(path: Path | str, byte: int, bit: int = 0) -> None:
    """Flip one bit of the image at byte offset ``byte``."""
    with open(path, "r+b") as f:
        f.seek(byte)
        b = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([b ^ (1 << bit)]))


def unmount_clean(vol: Volume) -> None:
    """Unmount a volume that must not have failed, and require a clean fsck of its image."""
    failed = vol.failed
    vol.unmount()
    assert failed is None, failed
    assert fsck(vol.path).status == 0
