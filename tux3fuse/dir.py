"""Directories: ext2-style entries in the directory's own data blocks, with an in-memory name index.

Guarantees:
- Entries never move once written, so a readdir position (``block * blocksize + offset``) stays valid while
  other entries are created and removed; a removed entry is merged into the entry before it (or, first in its
  block, keeps its space with inode number 0).
- Every change goes through the directory's pages, dirtied for the current delta like file data, so a directory
  block is committed (and forked) by the same mechanism as file data.
- A malformed entry is reported as ``CorruptDir`` naming the directory and block; it is never skipped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .format import DIRENT, DIRENT_HEADER, decode_rec_len, encode_rec_len, rec_len


class CorruptDir(Exception):
    def __init__(self, ino: int, block: int, reason: str) -> None:
        super().__init__(f"corrupt directory {ino}, block {block}: {reason}")
        self.ino, self.block, self.reason = ino, block, reason


Entry = tuple[int, int, int, int]  # inum, type, block, offset


def parse_block(ino: int, block: int, data: bytes | bytearray) -> Iterator[tuple[int, int, int, int, bytes]]:
    """(offset, rec_len, inum, type, name) of every entry in a directory block, empty ones included."""
    bs = len(data)
    off = 0
    while off < bs:
        if off + DIRENT_HEADER > bs:
            raise CorruptDir(ino, block, f"entry header at {off} crosses the block end")
        inum, raw, nlen, dtype = DIRENT.unpack_from(data, off)
        rl = decode_rec_len(raw)
        if rl < DIRENT_HEADER or rl & 7 or off + rl > bs or (inum and DIRENT_HEADER + nlen > rl):
            raise CorruptDir(ino, block, f"bad record length {rl} at offset {off}")
        name = bytes(data[off + DIRENT_HEADER: off + DIRENT_HEADER + nlen]) if inum else b""
        if inum and not nlen:
            raise CorruptDir(ino, block, f"empty name at offset {off}")
        yield off, rl, inum, dtype, name
        off += rl


class DirIndex:
    """Name -> entry index of one directory, built from its blocks on first use."""

    def __init__(self, ino: int, blocksize: int, nblocks: int, read: Callable[[int], Any]) -> None:
        self.ino = ino
        self.bs = blocksize
        self.nblocks = nblocks
        self.names: dict[bytes, Entry] = {}
        self.room: set[int] = set()  # blocks that may hold a free slot
        for block in range(nblocks):
            for off, rl, inum, dtype, name in parse_block(ino, block, read(block)):
                if inum:
                    if name in self.names:
                        raise CorruptDir(ino, block, f"duplicate name {name!r}")
                    self.names[name] = (inum, dtype, block, off)
                    if rl - rec_len(len(name)) >= rec_len(1):
                        self.room.add(block)
                else:
                    self.room.add(block)

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: bytes) -> Entry | None:
        return self.names.get(name)

    def add(self, name: bytes, inum: int, dtype: int, write: Callable[[int], bytearray]) -> bool:
        """Add an entry; ``write(block)`` returns the block's data dirtied for the current delta.
        Returns True when a new block was appended to the directory."""
        need = rec_len(len(name))
        for block in sorted(self.room):
            data = write(block)
            for off, rl, einum, _, ename in parse_block(self.ino, block, data):
                used = rec_len(len(ename)) if einum else 0
                if rl - used >= need:
                    if used:
                        DIRENT.pack_into(data, off, einum, encode_rec_len(used), len(ename), data[off + 11])
                        off, rl = off + used, rl - used
                    self._put(data, off, rl, name, inum, dtype)
                    self.names[name] = (inum, dtype, block, off)
                    return False
            self.room.discard(block)
        block = self.nblocks
        self.nblocks += 1
        data = write(block)
        self._put(data, 0, self.bs, name, inum, dtype)
        self.names[name] = (inum, dtype, block, 0)
        self.room.add(block)
        return True

    @staticmethod
    def _put(data: bytearray, off: int, rl: int, name: bytes, inum: int, dtype: int) -> None:
        DIRENT.pack_into(data, off, inum, encode_rec_len(rl), len(name), dtype)
        data[off + DIRENT_HEADER: off + DIRENT_HEADER + len(name)] = name

    def remove(self, name: bytes, write: Callable[[int], bytearray]) -> Entry:
        entry = self.names.pop(name)
        _, _, block, off = entry
        data = write(block)
        prev = None
        for eoff, rl, _, _, _ in parse_block(self.ino, block, data):
            if eoff == off:
                if prev is None:
                    DIRENT.pack_into(data, off, 0, encode_rec_len(rl), 0, 0)
                else:
                    poff, prl = prev
                    data[poff + 8: poff + 10] = encode_rec_len(prl + rl).to_bytes(2, "little")
                break
            prev = (eoff, rl)
        self.room.add(block)
        return entry

    def retarget(self, name: bytes, inum: int, dtype: int, write: Callable[[int], bytearray]) -> None:
        """Point an existing entry at another inode (rename over an existing name)."""
        _, _, block, off = self.names[name]
        data = write(block)
        data[off: off + 8] = inum.to_bytes(8, "little")
        data[off + 11] = dtype
        self.names[name] = (inum, dtype, block, off)

    def entries(self, start: int, read: Callable[[int], Any]) -> Iterator[tuple[bytes, int, int, int]]:
        """(name, inum, type, next position) of the entries at or after position ``start``."""
        first = start
        for block in range(first // self.bs, self.nblocks):
            for off, _, inum, dtype, name in parse_block(self.ino, block, read(block)):
                pos = block * self.bs + off
                if inum and pos >= first:
                    yield name, inum, dtype, pos + 1
