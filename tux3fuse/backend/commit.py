"""Committing a delta: delayed allocation, tree updates, the log or a unify, the superblock — beside the frontend.

A commit is a ``CommitJob`` in three stages:
1. ``prepare`` (on the event loop, never waiting): reads the delta's attribute snapshots and dirty pages, allocates
   blocks, updates the trees in memory and records the changes in the log (a unify writes the changed tree nodes
   instead), write-protects the delta's pages in every shared mapping and marks them under writeback. After it
   the frontend may change anything again: a page under writeback is forked (or waited on, or changed in place,
   by the stable-page mode).
2. ``write`` (in a worker thread, or step by step in tests): writes the blocks and the superblock copy, then one
   flush (a unify: blocks, flush, superblock, flush).
3. ``complete`` (on the event loop): ends writeback, frees what the delta freed, releases forked pages.

Guarantees:
- The superblock copy naming delta N is written only after every other block of delta N is durable, so after a
  crash the volume is at delta N or at the delta before it.
- Nothing a committed state references is overwritten: data, tree nodes and log blocks go to blocks that were free
  in the last committed state, blocks freed by delta N are reusable only after N is durable, and tree nodes the
  trees on disk still use are freed only by the unify that replaces them.
- The backend writes exactly the pages dirty for its delta and the attributes as of the end of its delta.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .. import format as fmt
from ..cache.page import CLEAN, Page
from ..device import WritePlan
from ..format import checksum
from . import extents
from .log import bitmap_block, split_log_steps, write_log

if TYPE_CHECKING:
    from ..fs import Volume
    from ..inode import Inode


PROOF_STEP = 32  # log records or blocks the delta digest takes between two yields
RUN_PAGES = 32  # pages written and mapped in one step of the prepare stage (runs on disk still merge into extents)


class CommitJob:
    def __init__(self, vol: Volume, delta: int, *, unify: bool = False, state: int | None = None,
                 urgent: bool = False) -> None:
        self.vol = vol
        self.delta = delta
        self.unify = unify
        self.urgent = urgent  # someone waits (fsync): a unify that is merely due waits for a later commit
        self.state = state
        self.writes: list[tuple[int, bytes | bytearray | memoryview]] = []
        self.pages: list[tuple[Inode, Page]] = []  # pages under writeback for this delta
        self.inodes: list[Inode] = []
        self.super_bytes = b""
        self.cursor = 0  # writes done so far
        self.plan: WritePlan | None = None  # the system calls of stage 2, made in stage 1 (on the event loop)
        self.span = [0, 0]  # blocks allocated for the inode being flushed and not given to a page yet: first, count
        self.unplaced = 0  # pages of that inode not given a block yet
        self.empty = False
        self.begun = False
        self.dirty: dict[int, Inode] = {}
        self.used_inodes = 0
        self.records: list[fmt.LogRecord] = []  # tree changes for the log, in the order replay applies them
        self.waiters: list = []  # trio.Events set when the job completes
        # every block but the superblock is written: the pages' I/O is over (Linux's end_page_writeback), though
        # the flush and the commit point may still be ahead; set on the event loop (``mark_written``)
        self.written = False
        self.written_waiters: list = []  # trio.Events set when ``written`` becomes true
        self.started = time.perf_counter()

    # -- stage 1 ---------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """All of stage 1 at once."""
        deque(self.prepare_steps(), maxlen=0)

    def begin(self) -> None:
        """What must happen at the transition itself, before the frontend runs again: take the delta's dirty
        inodes, write-protect its pages in every mapping, and copy its pinned pages, so that a store or a pin
        write made after the transition can only land in the new delta."""
        if self.begun:
            return
        self.begun = True
        vol, delta = self.vol, self.delta
        self.dirty = vol.dirty_inodes.pop(delta, {})
        self.inodes = list(self.dirty.values())
        # inodes in use as of this delta: later deltas (created during the prepare, or moved by a split) excluded
        self.used_inodes = vol.used_inodes - vol.split_uncounted
        vol.split_uncounted = 0
        for inode in self.inodes:
            if not inode.mapping.mmaps:  # no page table to protect, and no pins (closing a mapping drops its pins)
                continue
            pages = inode.mapping.dirty.get(delta)
            for index, page in list((pages or {}).items()):
                if page.pins:  # never fork a pinned page: write a private copy, the page moves to the next delta
                    pages[index] = self._copy_pinned(inode, page)
                else:
                    inode.mapping.page_mkclean(page)

    def prepare_steps(self) -> Iterator[None]:
        """Stage 1 as a generator that yields at safe points, so the event loop can serve the frontend while a
        large delta is prepared. A page of this delta that the frontend touches meanwhile is dirty for an older
        delta, and the decision table forks it."""
        self.begin()
        vol, delta = self.vol, self.delta
        dirty = self.dirty
        if not dirty and not self.unify and self.state is None and not vol.alloc.records:
            self.empty = True
            return
        vol.writes = self.writes
        for ino in sorted(dirty):
            vol.writes = self.writes
            yield from self._flush_inode(dirty[ino])
            yield
        vol.writes = self.writes
        sb = vol.sb
        vol.deltas_since_unify += 1
        records = vol.alloc.take_records() + self.records
        groups = yield from split_log_steps(records, vol.blocksize)
        log_blocks = len(groups)
        yield
        if (self.unify or (vol.deltas_since_unify >= vol.options.unify_deltas and not self.urgent)
                or (sb.log_count + log_blocks) * vol.blocksize > vol.options.unify_log_blocks * fmt.LOG_UNIT):
            yield from self._unify()
            sb.delta_csum = 0
        else:
            head, blocks = yield from write_log(groups, vol.blocksize, sb.log_head, delta, vol.alloc_log_block,
                                                vol.write_meta)
            sb.log_head = head
            sb.log_count += len(blocks)
            vol.log_blocks.extend(blocks)
            yield
            sb.delta_csum = yield from self._proof(records, blocks)
        sb.seq = delta
        sb.free_blocks = vol.alloc.free + vol.alloc.pending_count()
        sb.used_inodes = self.used_inodes
        sb.next_inum = vol.next_inum
        if self.state is not None:
            sb.state = self.state
        self.super_bytes = sb.pack()
        vol.writes = []
        self.writes.sort(key=lambda w: w[0])
        yield
        self.plan = yield from vol.dev.plan_steps(self.writes)

    def _proof(self, records: list[tuple[int, int, int]], log_blocks: list[int]) -> Iterator[None]:
        """The digest that lets the superblock go out with the delta's blocks under one flush: a mount checks
        it against the blocks the delta's log names, and falls back to the other superblock copy if any of them
        did not reach the disk. 0 (two flushes) when the log does not name exactly the blocks written."""
        if not self.vol.options.one_flush or not log_blocks:  # no log names the delta's blocks
            return 0
        if self.vol.stable == "none":  # blocks changed during I/O would fail the proof and roll the delta back;
            return 0  # with two flushes they stay on disk, and their checksums show them torn
        written = dict(self.writes)
        yield
        named: set[int] = set()
        for at in range(0, len(records), PROOF_STEP):
            fmt.delta_blocks(records[at: at + PROOF_STEP], named)
            yield
        named.update(log_blocks)
        if named != written.keys():
            return 0
        yield
        digest = fmt.DeltaDigest()
        for i, block in enumerate(sorted(written)):
            digest.add(block, written[block])
            if i % PROOF_STEP == PROOF_STEP - 1:
                yield
        yield
        return digest.value()

    def _unify(self) -> Iterator[None]:
        """Fold the log into the trees and the bitmap: write every tree node changed since the last unify (each
        to a new block), the stale bitmap blocks to the other region, and start a new log."""
        vol, sb, alloc, delta = self.vol, self.vol.sb, self.vol.alloc, self.delta
        for i, ino in enumerate(sorted(vol.unflushed)):
            if i % 16 == 15:
                yield  # the frontend only reads trees, and every inode with unwritten nodes stays in memory
            inode = vol.unflushed[ino]
            root = vol.dtree(inode).flush(delta)
            if root == inode.rec.dtree_root:
                continue
            for r in (inode.rec, *inode.snapshots.values()):  # a backend-owned field, in every view
                r.dtree_root = root
            raw = vol.itable.lookup(ino)
            if raw is not None:  # the table holds the attributes of the inode's last commit: patch only the root
                rec = fmt.InodeRecord.unpack(raw)
                rec.dtree_root = root
                vol.itable.insert(ino, rec.pack())
        vol.unflushed.clear()
        vol.unify_nodes = 0
        sb.itree_root = vol.itable.flush(delta)
        sb.otree_root = vol.otree.flush(delta)
        yield
        for block in vol.log_blocks + vol.unify_frees:  # nothing on disk references these any more
            alloc.free_later(block, 1)
        vol.log_blocks = []
        vol.unify_frees = []
        alloc.take_records()
        region = 1 - sb.bitmap_cur
        base = sb.bitmap_start[region]
        for index in sorted(alloc.stale[region]):
            self.writes.append((base + index, bitmap_block(alloc, index, base + index, vol.blocksize, self.delta)))
        alloc.stale[region].clear()
        sb.bitmap_cur = region
        sb.log_head = 0
        sb.log_count = 0
        sb.unify_seq = self.delta
        vol.deltas_since_unify = 0
        vol.counters["unifies"] += 1

    def _flush_inode(self, inode: Inode) -> Iterator[None]:
        vol, delta = self.vol, self.delta
        rec = inode.attrs_for(delta)
        # Destroyed by the last delta that changes it: an inode that died after the transition (the kernel's
        # forget or release of an unlinked file came in a later delta) is dirty in that delta too, whose commit
        # destroys it; destroying it here as well would count it twice and log its destruction twice.
        if rec.nlink == 0 and inode.dead and max(inode.dirty_deltas, default=delta) <= delta:
            self._destroy(inode)
            return
        size = rec.size  # attributes are read again after any yield: the frontend may fork them meanwhile
        pages = inode.mapping.take_dirty(delta)
        hole = inode.hole_from.pop(delta, None)
        tree = vol.dtree(inode)
        nodes_before = tree.dirty_nodes
        free = vol.alloc.free_later
        blocks = inode.rec.blocks
        if hole is not None:
            blocks -= extents.unmap(tree, hole, None, free)
        changes: list[fmt.LogRecord] = [] if hole is None else [(fmt.LOG_UNMAP, inode.ino, hole)]
        end = -(-size // vol.blocksize)
        run: list[Page] = []
        first = True
        self.unplaced = sum(1 for index in pages if index < end)  # pages of this inode still without a block
        yield  # the pages not written yet are still dirty for this delta: a write to one forks it
        for index in sorted(pages):
            page = pages[index]
            if index >= end:  # past the size of this delta: nothing to write
                self._finish_page(inode, page)
                continue
            if run and (index != run[-1].index + 1 or len(run) >= RUN_PAGES):
                blocks += self._write_run(inode, size, tree, run, changes, first)
                run, first = [], False
                vol.writes = self.writes
                yield  # after every run: the caller decides by the clock whether the frontend gets a turn
            run.append(page)
        if run:
            blocks += self._write_run(inode, size, tree, run, changes, first)
        assert not self.span[1] and not self.unplaced, "blocks allocated for an inode and left unused"
        if changes:
            vol.unflushed[inode.ino] = inode  # its extent tree has changes the next unify writes
            vol.unify_nodes += tree.dirty_nodes - nodes_before
        rec = inode.attrs_for(delta)
        for r in {id(rec): rec, id(inode.rec): inode.rec}.values():  # a backend-owned field, in every view
            r.blocks = blocks
        packed = rec.pack()
        vol.itable.insert(inode.ino, packed)
        self.records.append((fmt.LOG_INODE, inode.ino, packed))  # first: replay maps extents of a known inode
        self.records.extend(changes)
        inode.on_disk = True
        if rec.nlink == 0 and vol.otree.lookup(inode.ino) is None:
            vol.otree.insert(inode.ino, b"")
            self.records.append((fmt.LOG_ORPHAN, inode.ino))
        vol.counters["inodes_written"] += 1

    def _copy_pinned(self, inode: Inode, page: Page) -> Page:
        """The reverse fork of a pinned page: the backend takes a copy, the pinned page moves to the new delta."""
        vol = self.vol
        copy = Page(page.index, bytes(page.data), inode.mapping)
        copy.delta = self.delta
        copy.forked = True
        inode.mapping.cache.dirty_pages += 1
        inode.mapping.page_mkclean(page)
        current = vol.deltas.current
        page.delta = current
        inode.mapping.dirty.setdefault(current, {})[page.index] = page
        vol.dirty_inode_for(inode, current)
        vol.counters["pinned_copies"] += 1
        vol.counters["bytes_copied"] += vol.blocksize
        return copy

    def _write_run(self, inode: Inode, size: int, tree, run: list[Page], changes: list[fmt.LogRecord],
                   first: bool) -> int:
        """Allocate, checksum and map one run of contiguous dirty pages. The inode's first run of the delta goes
        right after the block before it on disk when it can (a file written at its end stays contiguous); later
        runs follow the one before, so a delta's scattered pages of one file land together in file order. The
        blocks come from one allocation for all of the inode's pages (``span``), so a scattered rewrite costs one
        search of the bitmap, not one per page."""
        vol = self.vol
        bs = vol.blocksize
        last = run[-1]
        tail = size - last.index * bs
        if 0 < tail < bs and any(last.data[tail:]):  # zero what lies past the size of this delta
            last.mutable()[tail:] = bytes(bs - tail)
        none_mode = vol.stable == "none"
        added = 0
        done = 0
        goal = None
        if first and run[0].index:  # continue right after the block before, so the file's extent grows in place
            before = extents.physical_at(tree, run[0].index - 1)
            goal = before + 1 if before else None
        while done < len(run):
            if not self.span[1]:  # one allocation for all the inode's pages left, when the space allows
                self.span = list(vol.alloc.alloc_run(max(self.unplaced, len(run) - done), goal))
            goal = None
            physical = self.span[0]
            count = min(self.span[1], len(run) - done)
            self.span = [physical + count, self.span[1] - count]
            self.unplaced -= count
            pages = run[done: done + count]
            for page in pages:
                if none_mode:
                    page.mutable()  # in-place changes during I/O must reach the very buffer being written
                page.writeback = True
                self.pages.append((inode, page))
            csums = [checksum(p.data) for p in pages]
            self.writes.extend(zip(range(physical, physical + count), (p.data for p in pages), strict=True))
            dropped = extents.map_run(tree, pages[0].index, physical, csums, vol.alloc.free_later, bs)
            step = fmt.log_map_blocks(bs)
            for at in range(0, count, step):
                changes.append((fmt.LOG_MAP, inode.ino, pages[0].index + at, physical + at, csums[at: at + step]))
            added += count - dropped
            done += count
        vol.counters["data_blocks_written"] += len(run)
        return added

    def _finish_page(self, inode: Inode, page: Page) -> None:
        if not page.forked:
            inode.mapping.mark_clean(page)
        else:
            page.delta = CLEAN

    def _destroy(self, inode: Inode) -> None:
        """Reclaim an inode that has no name and no user: its blocks, its table entry, its orphan entry."""
        vol = self.vol
        tree = vol.dtree(inode)
        extents.unmap(tree, 0, None, vol.alloc.free_later)
        tree.free_all()
        if inode.on_disk:
            self.records.append((fmt.LOG_DESTROY, inode.ino))
        vol.unflushed.pop(inode.ino, None)
        vol.itable.delete(inode.ino)
        vol.used_inodes -= 1
        self.used_inodes -= 1
        vol.otree.delete(inode.ino)
        vol.forget_inode(inode)
        vol.counters["inodes_destroyed"] += 1

    # -- stage 2 ---------------------------------------------------------------------------------------------------

    def write_some(self, n: int) -> bool:
        """Write the next n blocks; True when every block is written (tests drive I/O with this)."""
        end = min(len(self.writes), self.cursor + n)
        if end > self.cursor:
            self.vol.dev.write_blocks(self.writes[self.cursor: end])
        self.cursor = end
        return self.cursor >= len(self.writes)

    def write_super(self) -> None:
        """The commit point. With a proof in the superblock (``delta_csum``) the superblock goes out with the
        delta's blocks and one flush makes them durable together; without one (a unify), the blocks are flushed
        first, then the superblock is written and flushed."""
        dev = self.vol.dev
        if not self.vol.sb.delta_csum:
            dev.flush()
        copy = 1 - self.vol.sb.copy  # never the copy that names the last durable delta
        dev.write_at(fmt.SUPER_OFFSETS[copy], self.super_bytes)
        dev.flush()
        self.vol.sb.copy = copy

    def write(self, on_written: Callable[[], None] | None = None) -> None:
        """All of stage 2 (blocking: run it in a worker thread). Between the blocks and the superblock it calls
        ``on_written`` (default ``mark_written``; from a worker thread, one that hands it to the event loop)."""
        if self.empty:
            return
        self.write_data()
        (on_written or self.mark_written)()
        self.write_super()

    def write_data(self) -> None:
        """Every block of the delta not written yet, but not the superblock."""
        if self.plan is not None and self.cursor == 0:
            self.vol.dev.write_plan(self.plan)
            self.cursor = len(self.writes)
        else:
            self.write_some(len(self.writes))

    def mark_written(self) -> None:
        """The delta's blocks are written: from now on a change to one of its pages goes in place, for the current
        delta (``need_fork``'s AFTER_IO), and whoever waits for the pages' I/O goes on."""
        self.written = True
        for event in self.written_waiters:
            event.set()
        self.written_waiters = []

    # -- stage 3 ---------------------------------------------------------------------------------------------------

    def complete(self) -> None:
        """All of stage 3 at once."""
        deque(self.complete_steps(), maxlen=0)

    def complete_steps(self, step: int = 32) -> Iterator[None]:
        """Stage 3 as a generator that yields every ``step`` pages, so that the frontend gets turns while a large
        delta completes. Until the last step the job stays in flight: a page not yet completed is still under
        writeback (its block is written, so a write changes it in place for the current delta), one completed is
        clean, and no new commit can start."""
        vol = self.vol
        done: dict[int, tuple[Inode, list[Page]]] = {}
        for i, (inode, page) in enumerate(self.pages):
            page.writeback = False
            target, page.redirty = page.redirty, CLEAN
            if target != CLEAN and not page.forked:  # changed during or after its I/O: dirty for that later delta
                page.delta = target
                inode.mapping.dirty.setdefault(target, {})[page.index] = page
            else:  # written; or dropped by a truncate since, when its later changes go with it
                done.setdefault(inode.ino, (inode, []))[1].append(page)
            if i % step == step - 1:
                for mapping_inode, pages in done.values():
                    mapping_inode.mapping.mark_clean_many(pages)
                done = {}
                yield
        for inode, pages in done.values():
            inode.mapping.mark_clean_many(pages)
        if not self.empty:
            yield from vol.alloc.release_pending_steps(16)
        for inode in self.inodes:
            inode.committed(self.delta)
        vol.deltas.committed_to(self.delta)
        vol.forks.poll()
        c = vol.counters
        if not self.empty:
            c["commits"] += 1
            c["blocks_written"] += len(self.writes)
            c["commit_seconds"] += time.perf_counter() - self.started
        vol.job = None
        self.wake_waiters()

    def wake_waiters(self) -> None:
        """Wake every task waiting for this job: it completed, or it failed."""
        for event in self.waiters + self.written_waiters:
            event.set()


def commit_delta(vol: Volume, delta: int, *, unify: bool = False, state: int | None = None) -> bool:
    """Commit an already transitioned delta synchronously. Returns False when there was nothing to write."""
    job = CommitJob(vol, delta, unify=unify, state=state)
    vol.job = job
    try:
        job.prepare()
        job.write()
    except BaseException:
        vol.job = None
        raise
    job.complete()
    return not job.empty
