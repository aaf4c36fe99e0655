"""Committing a delta: delayed allocation, extent and inode-table updates, the log or a unify, the superblock.

Guarantees:
- The superblock copy naming delta N is written only after every other block of delta N is durable (flush,
  superblock write, flush), so after a crash the volume is at delta N or at the delta before it.
- Nothing a committed state references is overwritten: data, tree nodes and log blocks go to blocks that were
  free in the last committed state, and blocks freed by delta N are reusable only after N is durable.
- The backend reads the attributes of its own delta (``Inode.attrs_for``) and writes only that delta's pages.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import format as fmt
from ..cache.page import Page
from ..format import checksum
from . import extents
from .log import bitmap_block, write_log

if TYPE_CHECKING:
    from ..fs import Volume
    from ..inode import Inode


def commit_delta(vol: Volume, delta: int, *, unify: bool = False, state: int | None = None) -> bool:
    """Write delta ``delta`` (already transitioned). Returns False when there was nothing to write."""
    started = time.perf_counter()
    dirty = vol.dirty_inodes.pop(delta, {})
    if not dirty and not unify and state is None and not vol.alloc.records:
        vol.deltas.committed_to(delta)
        return False
    writes = vol.writes = []
    blocks_before = vol.dev.stats.blocks_written
    for ino in sorted(dirty):
        _flush_inode(vol, dirty[ino], delta)
    sb = vol.sb
    sb.itree_root = vol.itable.flush(delta)
    sb.otree_root = vol.otree.flush(delta)

    vol.deltas_since_unify += 1
    est_log = -(-len(vol.alloc.records) // fmt.log_capacity(vol.blocksize))
    if (unify or vol.deltas_since_unify >= vol.unify_deltas
            or sb.log_count + est_log > vol.unify_log_blocks):
        _unify(vol, delta)
    else:
        head, blocks = write_log(vol.alloc.take_records(), vol.blocksize, sb.log_head, delta,
                                 vol.alloc_log_block, vol.write_meta)
        sb.log_head = head
        sb.log_count += len(blocks)
        vol.log_blocks.extend(blocks)

    sb.seq = delta
    sb.free_blocks = vol.alloc.free + vol.alloc.pending_count()
    sb.used_inodes = vol.used_inodes
    sb.next_inum = vol.next_inum
    if state is not None:
        sb.state = state
    dev = vol.dev
    dev.write_blocks(writes)
    dev.flush()
    dev.write_at(fmt.SUPER_OFFSETS[delta % 2], sb.pack())
    dev.flush()
    vol.writes = []
    vol.alloc.release_pending()
    vol.deltas.committed_to(delta)
    for inode in dirty.values():
        inode.committed(delta)
    c = vol.counters
    c["commits"] += 1
    c["blocks_written"] += dev.stats.blocks_written - blocks_before
    c["commit_seconds"] += time.perf_counter() - started
    return True


def _unify(vol: Volume, delta: int) -> None:
    """Fold the log into the bitmap: write the stale bitmap blocks to the other region and start a new log."""
    sb, alloc = vol.sb, vol.alloc
    for block in vol.log_blocks:
        alloc.free_later(block, 1)
    vol.log_blocks = []
    alloc.take_records()
    region = 1 - sb.bitmap_cur
    base = sb.bitmap_start[region]
    for index in sorted(alloc.stale[region]):
        vol.writes.append((base + index, bitmap_block(alloc, index, base + index, vol.blocksize, delta)))
    alloc.stale[region].clear()
    sb.bitmap_cur = region
    sb.log_head = 0
    sb.log_count = 0
    sb.unify_seq = delta
    vol.deltas_since_unify = 0
    vol.counters["unifies"] += 1


def _flush_inode(vol: Volume, inode: Inode, delta: int) -> None:
    if inode.dead:
        _destroy(vol, inode)
        return
    rec = inode.attrs_for(delta)
    pages = inode.mapping.take_dirty(delta)
    hole = inode.hole_from.get(delta)
    tree = vol.dtree(inode)
    free = vol.alloc.free_later
    if hole is not None:
        rec.blocks -= extents.unmap(tree, hole, None, free)
    bs = vol.blocksize
    end = -(-rec.size // bs)
    run: list[Page] = []
    for index in sorted(pages):
        page = pages[index]
        if index >= end:  # past the size of this delta: nothing to write
            inode.mapping.mark_clean(page)
            continue
        if run and index != run[-1].index + 1:
            _write_run(vol, inode, rec, tree, run, delta)
            run = []
        run.append(page)
    if run:
        _write_run(vol, inode, rec, tree, run, delta)
    rec.dtree_root = tree.flush(delta)
    vol.itable.insert(inode.ino, rec.pack())
    inode.on_disk = True
    if rec.nlink == 0:
        if vol.otree.lookup(inode.ino) is None:
            vol.otree.insert(inode.ino, b"")
    vol.counters["inodes_written"] += 1


def _write_run(vol: Volume, inode: Inode, rec: fmt.InodeRecord, tree, run: list[Page], delta: int) -> None:
    bs = vol.blocksize
    last = run[-1]
    tail = rec.size - last.index * bs
    if 0 < tail < bs and any(last.data[tail:]):  # zero what lies past the size of this delta
        last.mutable()[tail:] = bytes(bs - tail)
    done = 0
    while done < len(run):
        physical, count = vol.alloc.alloc_run(len(run) - done)
        pages = run[done: done + count]
        csums = [checksum(p.data) for p in pages]
        vol.writes.extend(zip(range(physical, physical + count), (p.data for p in pages), strict=True))
        inode.mapping.mark_clean_many(pages)
        dropped = extents.map_run(tree, pages[0].index, physical, csums, vol.alloc.free_later, bs)
        rec.blocks += count - dropped
        done += count
    vol.counters["data_blocks_written"] += len(run)


def _destroy(vol: Volume, inode: Inode) -> None:
    """Reclaim an inode that has no name and no user: its blocks, its table entry, its orphan entry."""
    tree = vol.dtree(inode)
    extents.unmap(tree, 0, None, vol.alloc.free_later)
    tree.free_all()
    vol.itable.delete(inode.ino)
    vol.used_inodes -= 1
    vol.otree.delete(inode.ino)
    vol.forget_inode(inode)
    vol.counters["inodes_destroyed"] += 1
