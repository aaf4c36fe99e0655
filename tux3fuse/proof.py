"""The proof that a delta's blocks reached the disk (docs/FORMAT.md §10): the digest a superblock carries, and the
blocks a delta's log names.

Guarantees:
- ``DeltaDigest`` is xxh3-64 over the 16-byte records (block number, xxh3-64 of the block) of every block, added
  in increasing block order; its value is never 0 (0 in a superblock means: no proof needed).
- ``delta_blocks`` (the commit's, over records it made itself) and ``named_blocks`` (a mount's, over records read
  from disk) give the same blocks for the same records, applied in order: an allocation adds its range, a free
  takes it out.
- ``named_blocks`` trusts nothing it reads: a record naming blocks outside the volume's allocatable area raises
  ``ValueError``, and it holds one bit per block of the volume whatever the records say (never a set sized by a
  count read from disk).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Iterator

import xxhash

from . import format as fmt
from . import logrecord as logrec

_SET = re.compile(rb"[^\x00]")


class DeltaDigest:
    """The superblock's proof that a delta's blocks reached the disk: xxh3-64 over (block number, xxh3-64 of the
    block) for every block, added in block order. Never 0 (0 means: no proof needed)."""

    def __init__(self) -> None:
        self.h = xxhash.xxh3_64()

    def add(self, block: int, data: bytes | bytearray | memoryview) -> None:
        self.h.update(struct.pack("<QQ", block, xxhash.xxh3_64_intdigest(data)))

    def value(self) -> int:
        return self.h.intdigest() or 1


def delta_digest(blocks: dict[int, bytes | bytearray | memoryview]) -> int:
    """``DeltaDigest`` of every block of ``blocks``, in block order."""
    digest = DeltaDigest()
    for block in sorted(blocks):
        digest.add(block, blocks[block])
    return digest.value()


def delta_blocks(records: list[tuple], out: set[int] | None = None) -> set[int]:
    """Blocks a delta allocated and still holds, from the log records a commit made, in order (added to ``out``,
    which holds the result of the records before these, when given)."""
    if out is None:
        out = set()
    for rec in records:
        code = rec[0]
        if code == logrec.LOG_ALLOC:
            out.update(range(rec[1], rec[1] + rec[2]))
        elif code == logrec.LOG_FREE:
            out.difference_update(range(rec[1], rec[1] + rec[2]))
    return out


class BlockSet:
    """Block numbers below ``volblocks`` as a bitmap: one bit per block of the volume, whatever ranges go in."""

    def __init__(self, volblocks: int) -> None:
        self.volblocks = volblocks
        self.bits = bytearray(-(-volblocks // 8))

    def set(self, start: int, count: int, on: bool) -> None:
        bits, end, b = self.bits, start + count, start
        while b < end and b & 7:
            self._bit(b, on)
            b += 1
        full = (end - b) >> 3
        bits[b >> 3: (b >> 3) + full] = (b"\xff" if on else b"\0") * full
        b += full << 3
        while b < end:
            self._bit(b, on)
            b += 1

    def _bit(self, b: int, on: bool) -> None:
        if on:
            self.bits[b >> 3] |= 1 << (b & 7)
        else:
            self.bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF

    def __contains__(self, block: int) -> bool:
        return 0 <= block < self.volblocks and bool(self.bits[block >> 3] >> (block & 7) & 1)

    def __iter__(self) -> Iterator[int]:
        """The blocks in the set, in increasing order."""
        for m in _SET.finditer(self.bits):
            byte, value = m.start(), self.bits[m.start()]
            for bit in range(8):
                if value >> bit & 1:
                    yield byte * 8 + bit


def named_blocks(records: Iterable[tuple], logs: Iterable[int], sb: fmt.Super) -> BlockSet:
    """The blocks a delta wrote, as its log read from disk names them (``records`` oldest first, and its log
    blocks ``logs``); ValueError when a record or log block lies outside the allocatable area of ``sb``."""
    out = BlockSet(sb.volblocks)
    for rec in records:
        if rec[0] in (logrec.LOG_ALLOC, logrec.LOG_FREE):
            if sb.outside(rec[1], rec[2]):
                raise ValueError(f"log record for blocks {rec[1]}+{rec[2]} outside the allocatable area")
            out.set(rec[1], rec[2], rec[0] == logrec.LOG_ALLOC)
    for block in logs:
        if sb.outside(block):
            raise ValueError(f"log block {block} outside the allocatable area")
        out.set(block, 1, True)
    return out
