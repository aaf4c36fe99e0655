"""The forward log: per delta, the changes that the bitmap and the btrees on disk do not hold yet.

Between two unifies neither the bitmap nor any btree node on disk is rewritten. A delta writes its data blocks
and log blocks only; the log records say what changed: allocations and frees (for the bitmap), and, for the
trees, each changed inode's record, the extents mapped and unmapped, inodes destroyed and orphans added. The
changed tree nodes stay dirty in memory until the next unify writes them (Tux3's deferred btree updates).

Guarantees:
- The log blocks chained from the superblock (newest first) hold every change since the last unify, in order.
- ``replay`` applies the allocation records oldest first on top of the bitmap region named by the superblock and
  marks the log blocks themselves used; ``replay_trees`` applies the tree records on top of the trees as the last
  unify wrote them. Together they reproduce the state of the last committed delta exactly.
- A tree node that a change removes stays allocated until the next unify (``Volume.unify_frees``): the trees on
  disk still point at it, and replay reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from .. import format as fmt
from ..alloc import Allocator
from ..steps import run_steps
from . import extents

if TYPE_CHECKING:
    from ..fs import Volume


LOG_STEP = 32  # records split or packed between two yields of a commit's prepare stage


def split_log(records: list[fmt.LogRecord], blocksize: int) -> list[list[fmt.LogRecord]]:
    """Records grouped into log blocks, in order."""
    return run_steps(split_log_steps(records, blocksize))


def split_log_steps(records: list[fmt.LogRecord], blocksize: int
                    ) -> Generator[None, None, list[list[fmt.LogRecord]]]:
    """``split_log`` yielding every ``LOG_STEP`` records."""
    room = fmt.log_room(blocksize)
    size_of = fmt.log_record_size
    blocks: list[list[fmt.LogRecord]] = []
    used = room
    for i, rec in enumerate(records):
        size = size_of(rec)
        if used + size > room:
            blocks.append([])
            used = 0
        blocks[-1].append(rec)
        used += size
        if i % LOG_STEP == LOG_STEP - 1:
            yield
    return blocks


def write_log(groups: list[list[fmt.LogRecord]], blocksize: int, head: int, delta: int,
              alloc_block: Callable[[], int], write: Callable[[int, bytearray], None]
              ) -> Generator[None, None, tuple[int, list[int]]]:
    """Write record groups (from ``split_log``) into new log blocks chained after ``head``, yielding every
    ``LOG_STEP`` records packed and after each block; return (new head, blocks written)."""
    written = []
    for group in groups:
        parts = []
        for at in range(0, len(group), LOG_STEP):
            parts.append(fmt.pack_log_records(group[at: at + LOG_STEP]))
            yield
        block = alloc_block()
        write(block, fmt.seal_log(blocksize, head, b"".join(parts), len(group), block, delta))
        written.append(block)
        head = block
        yield
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
        for rec in records:
            code = rec[0]
            if code not in (fmt.LOG_ALLOC, fmt.LOG_FREE):
                continue
            _, start, count = rec
            if start + count > alloc.volblocks or start <= 0:
                raise fmt.CorruptBlock(block, "log", f"record for blocks {start}+{count} outside the volume")
            if code == fmt.LOG_ALLOC:
                alloc.mark_used(start, count)
            else:
                alloc.mark_free(start, count)
    alloc.recount()


def _ignore(start: int, count: int) -> None:
    """Replayed tree changes free nothing: the allocation records did that already."""


def replay_trees(vol: Volume, chain: list[tuple[int, list]]) -> None:
    """Apply the tree records of the log, oldest first, to the trees as the last unify left them. The changed
    nodes stay dirty in memory for the next unify, exactly as they were before the crash or unmount."""
    bs = vol.blocksize
    for block, records in chain:
        for rec in records:
            code = rec[0]
            if code in (fmt.LOG_ALLOC, fmt.LOG_FREE):
                continue
            ino = rec[1]
            try:
                if code == fmt.LOG_INODE:
                    vol.itable.insert(ino, rec[2])
                    inode = vol.inodes.get(ino)
                    if inode is not None:
                        inode.rec = fmt.InodeRecord.unpack(rec[2])
                elif code == fmt.LOG_ORPHAN:
                    vol.otree.insert(ino, b"")
                elif code == fmt.LOG_DESTROY:
                    inode = vol.iget(ino)
                    tree = vol.dtree(inode)
                    extents.unmap(tree, 0, None, _ignore)
                    tree.free_all()
                    vol.itable.delete(ino)
                    vol.otree.delete(ino)
                    vol.unflushed.pop(ino, None)
                    vol.forget_inode(inode)
                else:
                    inode = vol.iget(ino)
                    tree = vol.dtree(inode)
                    before = tree.dirty_nodes
                    if code == fmt.LOG_MAP:
                        _, _, logical, physical, csums = rec
                        if physical <= 0 or physical + len(csums) > vol.sb.volblocks:
                            raise ValueError(f"blocks {physical}+{len(csums)} outside the volume")
                        extents.map_run(tree, logical, physical, csums, _ignore, bs)
                    else:
                        extents.unmap(tree, rec[2], None, _ignore)
                    vol.unflushed[ino] = inode
                    vol.unify_nodes += tree.dirty_nodes - before
            except (ValueError, IndexError, OSError) as e:
                raise fmt.CorruptBlock(block, "log", f"record {code} for inode {ino} does not apply: {e}") from None


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
