"""Directories: ext2-style entries in the directory's own data blocks, with an in-memory name index.

Guarantees:
- Entries never move once written, so a readdir position (``block * blocksize + offset``) stays valid while
  other entries are created and removed; a removed entry is merged into the entry before it (or, first in its
  block, keeps its space with inode number 0).
- Every change goes through the directory's pages, dirtied for the current delta like file data, so a directory
  block is committed (and forked) by the same mechanism as file data.
- A malformed entry is reported as ``CorruptDir`` naming the directory and block; it is never skipped silently.
- Finding where a change goes is apart from making it: ``place`` (for a new entry) and ``block_of`` (for one that
  is removed or retargeted) name the block a change will write, after reading what they must, so that the caller
  can read every block before its change begins; ``add`` given a place, ``remove`` and ``retarget`` change only
  that block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from .format import DIRENT, DIRENT_HEADER, decode_rec_len, encode_rec_len, rec_len


class CorruptDir(Exception):
    def __init__(self, ino: int, block: int, reason: str) -> None:
        super().__init__(f"corrupt directory {ino}, block {block}: {reason}")
        self.ino, self.block, self.reason = ino, block, reason


Entry = tuple[int, int, int, int]  # inum, type, block, offset


class Place(NamedTuple):
    """Where a new entry goes: the entry at ``offset`` of ``block`` whose record (``rec_len`` bytes, ``used`` of
    them by its own name) has room for it; ``block`` == the directory's block count: a new block."""

    block: int
    offset: int
    rec_len: int
    used: int


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
    """Name -> entry index of one directory, built from its blocks on first use.

    ``room[block]`` is an upper bound of the largest free run in a block (exact after the block was scanned) and
    ``hint[block]`` the offset of the entry that had it, so adding a name usually reads one entry, not a block."""

    def __init__(self, ino: int, blocksize: int, nblocks: int, read: Callable[[int], Any]) -> None:
        self.ino = ino
        self.bs = blocksize
        self.nblocks = nblocks
        self.read = read
        self.names: dict[bytes, Entry] = {}
        self.room: dict[int, int] = {}
        self.hint: dict[int, int] = {}
        for block in range(nblocks):
            for off, rl, inum, dtype, name in parse_block(ino, block, read(block)):
                if inum:
                    if name in self.names:
                        raise CorruptDir(ino, block, f"duplicate name {name!r}")
                    self.names[name] = (inum, dtype, block, off)
                self._note(block, off, rl - rec_len(len(name)) if inum else rl)

    def _note(self, block: int, off: int, free: int) -> None:
        if free > self.room.get(block, 0):
            self.room[block] = free
            self.hint[block] = off

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: bytes) -> Entry | None:
        return self.names.get(name)

    def _fit(self, block: int, need: int) -> tuple[int, int, int] | None:
        """(offset, record length, bytes used) of an entry in block with ``need`` free bytes."""
        data = self.read(block)
        off = self.hint.get(block)
        if off is not None and off + DIRENT_HEADER <= self.bs:
            inum, raw, nlen, _ = DIRENT.unpack_from(data, off)
            rl = decode_rec_len(raw)
            used = rec_len(nlen) if inum else 0
            if rl - used >= need and off + rl <= self.bs:
                return off, rl, used
        best, found = 0, None  # the hint was stale: scan the block, and make room and hint exact
        self.hint.pop(block, None)
        for eoff, rl, inum, _, name in parse_block(self.ino, block, data):
            used = rec_len(len(name)) if inum else 0
            if rl - used > best:
                best, self.hint[block] = rl - used, eoff
            if found is None and rl - used >= need:
                found = (eoff, rl, used)
        self.room[block] = best
        return found

    def place(self, name: bytes) -> Place:
        """Where ``add`` will put ``name``: an entry with room for it in one of the directory's blocks (read here,
        so that the change itself reads nothing), or a new block at the end. Changes nothing but the index's hints
        of where room is."""
        need = rec_len(len(name))
        last = self.nblocks - 1
        candidates = [last] if self.room.get(last, 0) >= need else []
        candidates += [b for b, free in self.room.items() if free >= need and b != last]
        for block in candidates:
            fit = self._fit(block, need)
            if fit is not None:
                return Place(block, *fit)
        return Place(self.nblocks, 0, self.bs, 0)

    def add(self, name: bytes, inum: int, dtype: int, write: Callable[[int], bytearray],
            where: Place | None = None) -> bool:
        """Add an entry at ``where`` (from ``place``, called now if not given); ``write(block)`` returns the
        block's data dirtied for the current delta. Returns True when a new block was appended to the directory."""
        if where is None:
            where = self.place(name)
        block, off, rl, used = where
        if block >= self.nblocks:
            if block != self.nblocks:
                raise AssertionError(f"directory {self.ino}: new block {block} placed past block {self.nblocks}")
            self.nblocks += 1
            data = write(block)
            self._put(data, 0, self.bs, name, inum, dtype)
            self.names[name] = (inum, dtype, block, 0)
            self.room[block] = self.bs - rec_len(len(name))
            self.hint[block] = 0
            return True
        data = write(block)
        if used:
            DIRENT.pack_into(data, off, int.from_bytes(data[off: off + 8], "little"), encode_rec_len(used),
                             data[off + 10], data[off + 11])
            off, rl = off + used, rl - used
        self._put(data, off, rl, name, inum, dtype)
        self.names[name] = (inum, dtype, block, off)
        self.hint[block] = off
        return False

    @staticmethod
    def _put(data: bytearray, off: int, rl: int, name: bytes, inum: int, dtype: int) -> None:
        DIRENT.pack_into(data, off, inum, encode_rec_len(rl), len(name), dtype)
        data[off + DIRENT_HEADER: off + DIRENT_HEADER + len(name)] = name

    def block_of(self, name: bytes) -> int:
        """The block that holds the entry ``name`` (which must exist)."""
        return self.names[name][2]

    def remove(self, name: bytes, write: Callable[[int], bytearray]) -> Entry:
        entry = self.names[name]
        _, _, block, off = entry
        data = write(block)
        del self.names[name]
        prev = None
        for eoff, rl, _, _, ename in parse_block(self.ino, block, data):
            if eoff == off:
                if prev is None:
                    DIRENT.pack_into(data, off, 0, encode_rec_len(rl), 0, 0)
                    self.room[block] = max(self.room.get(block, 0), rl)
                    self.hint[block] = off
                else:
                    poff, prl, pused = prev
                    data[poff + 8: poff + 10] = encode_rec_len(prl + rl).to_bytes(2, "little")
                    self.room[block] = max(self.room.get(block, 0), prl + rl - pused)
                    self.hint[block] = poff  # never leave a hint on the entry that is gone
                break
            prev = (eoff, rl, rec_len(len(ename)) if ename else 0)
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
