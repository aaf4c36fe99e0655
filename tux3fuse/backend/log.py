"""The forward log: per delta, the allocation records that the on-disk bitmap does not hold yet.

Guarantees:
- Between two unifies the bitmap on disk is never rewritten; the log blocks chained from the superblock
  (newest first) hold every allocation and free since the last unify, in order.
- Replay applies them oldest first on top of the bitmap region named by the superblock, and marks the log blocks
  themselves used, reproducing the allocation state of the last committed delta exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import format as fmt
from ..alloc import Allocator


def write_log(records: list[tuple[int, int, int]], blocksize: int, head: int, delta: int,
              alloc_block: Callable[[], int], write: Callable[[int, bytearray], None]) -> tuple[int, list[int]]:
    """Write records into new log blocks chained after ``head``; return (new head, blocks written)."""
    cap = fmt.log_capacity(blocksize)
    written = []
    for at in range(0, len(records), cap):
        block = alloc_block()
        write(block, fmt.pack_log(blocksize, head, records[at: at + cap], block, delta))
        written.append(block)
        head = block
    return head, written


def read_chain(read_block: Callable[[int], bytes], head: int, count: int) -> list[tuple[int, list]]:
    """The log blocks from ``head`` back ``count`` blocks, oldest first: (block, records)."""
    chain = []
    block = head
    for _ in range(count):
        if not block:
            raise fmt.CorruptBlock(0, "log", f"log chain ends after {len(chain)} of {count} blocks")
        buf = read_block(block)
        _, _, n, _ = fmt.unseal(buf, block, (fmt.KIND_LOG,))
        try:
            prev, records = fmt.unpack_log(buf, n)
        except (ValueError, IndexError) as e:
            raise fmt.CorruptBlock(block, "log", str(e)) from None
        chain.append((block, records))
        block = prev
    chain.reverse()
    return chain


def replay(alloc: Allocator, chain: list[tuple[int, list]]) -> None:
    for block, records in chain:
        alloc.mark_used(block, 1)
        for code, start, count in records:
            if start + count > alloc.volblocks or start <= 0:
                raise fmt.CorruptBlock(block, "log", f"record for blocks {start}+{count} outside the volume")
            if code == fmt.LOG_ALLOC:
                alloc.mark_used(start, count)
            else:
                alloc.mark_free(start, count)
    alloc.recount()


def load_bitmap(read_block: Callable[[int], bytes], sb: fmt.Super) -> Allocator:
    """The allocation bitmap as the last unify wrote it."""
    bpb = fmt.bitmap_bits_per_block(sb.blocksize)
    start = sb.bitmap_start[sb.bitmap_cur]
    bits = bytearray()
    for i in range(sb.bitmap_blocks):
        buf = read_block(start + i)
        fmt.unseal(buf, start + i, (fmt.KIND_BITMAP,))
        bits += buf[fmt.HEADER_SIZE:]
    alloc = Allocator(sb.volblocks, bpb, bits[: -(-sb.volblocks // 8)])
    alloc.stale[1 - sb.bitmap_cur].update(range(sb.bitmap_blocks))  # the other region is of unknown age
    return alloc


def bitmap_block(alloc: Allocator, index: int, blocknr: int, blocksize: int, delta: int) -> bytearray:
    buf = bytearray(blocksize)
    buf[fmt.HEADER_SIZE:] = alloc.image(index)
    return fmt.seal(buf, fmt.KIND_BITMAP, 0, 0, blocknr, delta)
