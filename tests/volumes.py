"""Helpers the damage tests share: files to lose, blocks to find, bits to flip, a log of several deltas to
damage."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from conftest import opened

from tux3fuse import format as fmt
from tux3fuse.fs import Volume
from tux3fuse.fsck import fsck

BS = 4096
NO_UNIFY = {"unify_deltas": 1 << 30, "unify_log_blocks": 1 << 30}  # every delta stays in the log
LOGGED = {"unify_deltas": 1 << 30, "unify_log_blocks": 1 << 30, "one_flush": False}
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
    for key, value in vol.backend.dtree(inode).items():
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


class History:
    """A volume with several logged deltas: what it held, and which log blocks each delta wrote."""

    def __init__(self, image: str, deltas: int = 6, **options) -> None:
        self.image = image
        self.states: dict[int, dict[bytes, bytes]] = {}
        self.logs: dict[int, list[int]] = {}
        self.inodes: dict[int, set[int]] = {}
        vol = opened(image, **{**LOGGED, **options})
        vol.commit(unify=True)  # the log starts empty here: every later delta is in it
        self.base = vol.backend.sb.seq
        self.states[self.base] = {}
        rnd = random.Random(13)
        content: dict[bytes, bytes] = {}
        for k in range(deltas):
            touched = set()
            name = b"f%d" % k
            f = vol.create(1, name, 0o644)
            content[name] = rnd.randbytes(3000 + 2500 * k)
            vol.write(f.ino, 0, content[name])
            touched.add(f.ino)
            if k == 2:  # rewrite a block of an older file
                ino = vol.lookup(1, b"f0").ino
                patch = rnd.randbytes(100)
                vol.write(ino, 50, patch)
                content[b"f0"] = content[b"f0"][:50] + patch + content[b"f0"][150:]
                touched.add(ino)
            if k == 3:
                touched.add(vol.lookup(1, b"f1").ino)
                vol.unlink(1, b"f1")
                del content[b"f1"]
            if k == 4:
                touched.add(vol.lookup(1, b"f2").ino)
                vol.rename(1, b"f2", 1, b"g2")
                content[b"g2"] = content.pop(b"f2")
            before = list(vol.backend.log_blocks)
            vol.commit()
            seq = vol.backend.sb.seq
            self.logs[seq] = [b for b in vol.backend.log_blocks if b not in before]
            self.states[seq] = dict(content)
            self.inodes[seq] = touched
        self.seqs = sorted(self.logs)
        vol.close_files()  # a crash: the log is not folded into the trees

    def dropped_inodes(self, good: int) -> set[int]:
        return set().union(*(self.inodes[s] for s in self.seqs if s > good))


def flip(image: str, block: int, at: int) -> None:
    """Damage that no single flipped bit explains (fsck restores a single bit instead of rolling back:
    tests/model/test_bitflip_fuzz.py), so that only a rollback helps."""
    with open(image, "r+b") as f:
        f.seek(block * BS + at)
        byte = f.read(1)[0]
        f.seek(block * BS + at)
        f.write(bytes([byte ^ 0x90]))
