"""Block allocation: an in-memory bitmap with deferred frees, logged per delta.

Guarantees:
- A block freed by delta N is not handed out again before delta N's commit is durable (``free_later`` keeps it
  marked used until ``release_pending``).
- A fixed block (reserved, or a bitmap region's) is never handed out: the load marks them all used whatever the
  bitmap on disk says (``backend/log.py:load_bitmap``; ``fixed_free`` lists those it had free).
- Every allocation and free made for a delta is recorded (``take_records``) so the log can rebuild the bitmap
  between unifies.
- Space is never over-committed: the frontend reserves blocks before dirtying pages (``space.py``,
  ``Space.reserve``); the backend allocates only what was reserved, so a commit never fails for lack of space.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator

from .logrecord import LOG_ALLOC, LOG_FREE

_NOT_FULL = re.compile(rb"[^\xff]")


class NoSpace(Exception):
    """No free block is left (the frontend's reservation should have prevented this)."""


class Allocator:
    def __init__(self, volblocks: int, bits_per_bitmap_block: int, bits: bytearray | None = None) -> None:
        self.volblocks = volblocks
        self.bpb = bits_per_bitmap_block
        nbytes = -(-volblocks // 8)
        self.bits = bits if bits is not None else bytearray(nbytes)
        if len(self.bits) < nbytes:
            self.bits.extend(bytes(nbytes - len(self.bits)))
        del self.bits[nbytes:]  # no bits for blocks past the volume
        # bits past the end of the volume always read as used
        for b in range(volblocks, nbytes * 8):
            self.bits[b >> 3] |= 1 << (b & 7)
        self.free = volblocks - self._count_used()
        self.goal = 0  # where data allocation continues
        self.meta_goal = 0  # where metadata allocation continues
        self.pending: list[tuple[int, int]] = []  # freed by the delta being built, released after its commit
        self.records: list[tuple[int, int, int]] = []
        self.stale: tuple[set[int], set[int]] = (set(), set())  # bitmap blocks differing from each region
        self.fixed_free: list[int] = []  # fixed blocks the bitmap on disk had free (used in memory all the same)

    def _count_used(self) -> int:
        return sum(bin(b).count("1") for b in self.bits[: self.volblocks >> 3]) + sum(
            self.is_used(b) for b in range((self.volblocks >> 3) << 3, self.volblocks))

    def is_used(self, block: int) -> bool:
        return bool(self.bits[block >> 3] & (1 << (block & 7)))

    def _set_range(self, start: int, count: int, used: bool) -> None:
        bits = self.bits
        end = start + count
        b = start
        while b < end and b & 7:
            self._set_bit(b, used)
            b += 1
        full = (end - b) >> 3
        if full:
            bits[b >> 3: (b >> 3) + full] = (b"\xff" if used else b"\0") * full
            b += full << 3
        while b < end:
            self._set_bit(b, used)
            b += 1
        first, last = start // self.bpb, (end - 1) // self.bpb
        for i in range(first, last + 1):
            self.stale[0].add(i)
            self.stale[1].add(i)

    def _set_bit(self, b: int, used: bool) -> None:
        if used:
            self.bits[b >> 3] |= 1 << (b & 7)
        else:
            self.bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF

    def mark_used(self, start: int, count: int) -> None:
        """Mark a range used without logging it (mkfs, replay)."""
        self._set_range(start, count, True)

    def mark_free(self, start: int, count: int) -> None:
        self._set_range(start, count, False)

    def recount(self) -> None:
        self.free = self.volblocks - self._count_used()

    def _run_length(self, start: int, limit: int) -> int:
        n = 0
        bits = self.bits
        b = start
        while n < limit and b < self.volblocks:
            if not b & 7 and n + 8 <= limit and bits[b >> 3] == 0:
                n += 8
                b += 8
                continue
            if bits[b >> 3] & (1 << (b & 7)):
                break
            n += 1
            b += 1
        return min(n, self.volblocks - start)

    def _find_free(self, goal: int) -> int:
        for lo in (goal >> 3, 0):
            m = _NOT_FULL.search(self.bits, lo)
            while m:
                byte = m.start()
                value = self.bits[byte]
                for bit in range(8):
                    if not value & (1 << bit):
                        b = (byte << 3) | bit
                        if b >= goal or lo == 0:
                            return b
                m = _NOT_FULL.search(self.bits, byte + 1)
        raise NoSpace()

    def alloc_run(self, want: int, goal: int | None = None, meta: bool = False) -> tuple[int, int]:
        """Allocate up to ``want`` contiguous blocks (at least one); return (start, count). Data and metadata
        (``meta``) advance separate cursors, so a file's data stays contiguous across commits."""
        if self.free <= 0:
            raise NoSpace()
        cursor = self.meta_goal if meta else self.goal
        start = self._find_free(cursor if goal is None else goal)
        count = max(1, self._run_length(start, want))
        self._set_range(start, count, True)
        self.free -= count
        if meta:
            self.meta_goal = start + count
        else:
            self.goal = start + count
        self._record(LOG_ALLOC, start, count)
        return start, count

    def _record(self, code: int, start: int, count: int) -> None:
        """Log an allocation or a free; one that continues the range of the record before it extends it."""
        records = self.records
        if records:
            last_code, last_start, last_count = records[-1]
            if last_code == code and last_start + last_count == start and last_count + count < 1 << 32:
                records[-1] = (code, last_start, last_count + count)
                return
        records.append((code, start, count))

    def claim(self, start: int, count: int) -> None:
        """Mark a range the bitmap has free as used, logged as an allocation: a repair, for blocks that the check
        found in use (a block in use and free in the bitmap would be handed out again)."""
        for b in range(start, start + count):
            if not self.is_used(b):
                self._set_range(b, 1, True)
                self.free -= 1
                self._record(LOG_ALLOC, b, 1)

    def alloc(self, goal: int | None = None) -> int:
        return self.alloc_run(1, goal)[0]

    def free_later(self, start: int, count: int) -> None:
        """Free a range once the delta being committed is durable."""
        self.pending.append((start, count))
        self._record(LOG_FREE, start, count)
        for i in range(start // self.bpb, (start + count - 1) // self.bpb + 1):  # a unify writes them as free
            self.stale[0].add(i)
            self.stale[1].add(i)

    def release_pending(self) -> None:
        """The delta that freed the pending ranges is durable: hand them out again."""
        deque(self.release_pending_steps(), maxlen=0)

    def release_pending_steps(self, step: int = 64) -> Iterator[None]:
        """``release_pending`` that yields every ``step`` ranges (free space only grows meanwhile)."""
        pending, self.pending = self.pending, []
        for i, (start, count) in enumerate(pending):
            self._set_range(start, count, False)
            self.free += count
            if i % step == step - 1:
                yield

    def take_records(self) -> list[tuple[int, int, int]]:
        records, self.records = self.records, []
        return records

    def image(self, index: int) -> bytes:
        """Bits of bitmap block ``index`` as they are once the pending frees are released."""
        lo = index * self.bpb
        hi = lo + self.bpb
        chunk = bytearray(self.bits[lo >> 3: hi >> 3])
        chunk.extend(bytes(self.bpb // 8 - len(chunk)))
        for start, count in self.pending:
            for b in range(max(start, lo), min(start + count, hi)):
                chunk[(b - lo) >> 3] &= ~(1 << ((b - lo) & 7)) & 0xFF
        return bytes(chunk)

    def pending_count(self) -> int:
        return sum(c for _, c in self.pending)
