"""Committing a delta: delayed allocation, tree updates, the log or a unify, the superblock — beside the frontend.

A commit is a ``CommitJob`` in three stages:
1. ``prepare`` (on the event loop, never waiting): reads the delta's attribute snapshots and dirty pages, allocates
   blocks, updates the trees in memory and records the changes in the log (a unify writes the changed tree nodes
   instead) and marks the delta's pages under writeback (the transition before it write-protected them in every
   shared mapping, ``transition.py``). After it
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
- The job works on the backend's state (``Backend``) and on the inodes and pages it was handed at the transition
  (``transition.py``); what must change in the page cache at a stage is done by the cache's own code
  (``AddressSpace.start_writeback``, ``end_writeback``, ``drop_from_delta``). The runner (``runner.py``) drives the
  stages; the flusher (``flusher.py``) is the one place a job is made.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .. import format as fmt
from .. import logrecord as logrec
from ..cache.page import CLEAN, Page
from ..device import WritePlan
from ..format import checksum
from ..proof import DeltaDigest, delta_blocks
from . import extents
from .log import bitmap_block, split_log_steps, write_log
from .store import Backend

if TYPE_CHECKING:
    from ..inode import Inode
    from ..options import Options


PROOF_STEP = 32  # log records or blocks the delta digest takes between two yields
RUN_PAGES = 32  # pages written and mapped in one step of the prepare stage (runs on disk still merge into extents)


class CommitJob:
    """One delta's commit. ``dirty``: the delta's dirty inodes, taken at its transition; ``used_inodes``: the
    inodes in use as of this delta; ``forget``: drops a destroyed inode from the inode cache."""

    def __init__(self, backend: Backend, delta: int, dirty: dict[int, Inode], used_inodes: int, *,
                 forget: Callable[[Inode], None], options: Options, counters: Counter[str], unify: bool = False,
                 state: int | None = None, urgent: bool = False,
                 ended: Callable[[CommitJob], None] | None = None) -> None:
        self.backend = backend
        self.ended = ended  # called by the last step of stage 3: the delta is durable, the job no longer in flight
        self.forget = forget
        self.options = options
        self.counters = counters
        self.delta = delta
        self.unify = unify
        self.urgent = urgent  # someone waits (fsync): a unify that is merely due waits for a later commit
        self.state = state
        self.writes: list[tuple[int, bytes | bytearray | memoryview]] = []
        self.pages: list[tuple[Inode, Page]] = []  # pages under writeback for this delta
        self.dirty = dirty
        self.inodes: list[Inode] = list(dirty.values())
        self.super_bytes = b""
        self.cursor = 0  # writes done so far
        self.plan: WritePlan | None = None  # the system calls of stage 2, made in stage 1 (on the event loop)
        self.span = [0, 0]  # blocks allocated for the inode being flushed and not given to a page yet: first, count
        self.unplaced = 0  # pages of that inode not given a block yet
        self.empty = False
        self.used_inodes = used_inodes
        self.records: list[logrec.LogRecord] = []  # tree changes for the log, in the order replay applies them
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

    def prepare_steps(self) -> Iterator[None]:
        """Stage 1 as a generator that yields at safe points, so the event loop can serve the frontend while a
        large delta is prepared. A page of this delta that the frontend touches meanwhile is dirty for an older
        delta, and the decision table forks it."""
        be, delta, opts = self.backend, self.delta, self.options
        dirty = self.dirty
        if not dirty and not self.unify and self.state is None and not be.alloc.records:
            self.empty = True
            return
        be.take_writes(self.writes)  # the tree nodes written from here on belong to this commit
        try:
            for ino in sorted(dirty):
                yield from self._flush_inode(dirty[ino])
                yield
            sb = be.sb
            be.deltas_since_unify += 1
            records = be.alloc.take_records() + self.records
            groups = yield from split_log_steps(records, be.blocksize)
            log_blocks = len(groups)
            yield
            if (self.unify or (be.deltas_since_unify >= opts.unify_deltas and not self.urgent)
                    or (sb.log_count + log_blocks) * be.blocksize > opts.unify_log_blocks * logrec.LOG_UNIT):
                yield from self._unify()
                sb.delta_csum = 0
            else:
                head, blocks = yield from write_log(groups, be.blocksize, sb.log_head, delta, be.alloc_log_block,
                                                    be.write_meta)
                sb.log_head = head
                sb.log_count += len(blocks)
                be.log_blocks.extend(blocks)
                yield
                sb.delta_csum = yield from self._proof(records, blocks)
        finally:
            be.take_writes([])
        sb.seq = delta
        sb.free_blocks = be.alloc.free + be.alloc.pending_count()
        sb.used_inodes = self.used_inodes
        sb.next_inum = be.next_inum
        if self.state is not None:
            sb.state = self.state
        self.super_bytes = sb.pack()
        self.writes.sort(key=lambda w: w[0])
        yield
        self.plan = yield from be.dev.plan_steps(self.writes)

    def _proof(self, records: list[tuple[int, int, int]], log_blocks: list[int]) -> Iterator[None]:
        """The digest that lets the superblock go out with the delta's blocks under one flush: a mount checks
        it against the blocks the delta's log names, and falls back to the other superblock copy if any of them
        did not reach the disk. 0 (two flushes) when the log does not name exactly the blocks written."""
        if not self.options.one_flush or not log_blocks:  # no log names the delta's blocks
            return 0
        if self.options.stable == "none":  # blocks changed during I/O would fail the proof and roll the delta back;
            return 0  # with two flushes they stay on disk, and their checksums show them torn
        written = dict(self.writes)
        yield
        named: set[int] = set()
        for at in range(0, len(records), PROOF_STEP):
            delta_blocks(records[at: at + PROOF_STEP], named)
            yield
        named.update(log_blocks)
        if named != written.keys():
            return 0
        yield
        digest = DeltaDigest()
        for i, block in enumerate(sorted(written)):
            digest.add(block, written[block])
            if i % PROOF_STEP == PROOF_STEP - 1:
                yield
        yield
        return digest.value()

    def _unify(self) -> Iterator[None]:
        """Fold the log into the trees and the bitmap: write every tree node changed since the last unify (each
        to a new block), the stale bitmap blocks to the other region, and start a new log."""
        be, sb, alloc, delta = self.backend, self.backend.sb, self.backend.alloc, self.delta
        for i, ino in enumerate(sorted(be.unflushed)):
            if i % 16 == 15:
                yield  # the frontend only reads trees, and every inode with unwritten nodes stays in memory
            inode = be.unflushed[ino]
            root = be.dtree(inode).flush(delta)
            if root == inode.rec.dtree_root:
                continue
            for r in (inode.rec, *inode.snapshots.values()):  # a backend-owned field, in every view
                r.dtree_root = root
            raw = be.itable.lookup(ino)
            if raw is not None:  # the table holds the attributes of the inode's last commit: patch only the root
                rec = fmt.InodeRecord.unpack(raw)
                rec.dtree_root = root
                be.itable.insert(ino, rec.pack())
        be.unflushed.clear()
        be.unify_nodes = 0
        sb.itree_root = be.itable.flush(delta)
        sb.otree_root = be.otree.flush(delta)
        yield
        for block in be.log_blocks + be.unify_frees:  # nothing on disk references these any more
            alloc.free_later(block, 1)
        be.log_blocks = []
        be.unify_frees = []
        alloc.take_records()
        region = 1 - sb.bitmap_cur
        base = sb.bitmap_start[region]
        for index in sorted(alloc.stale[region]):
            self.writes.append((base + index, bitmap_block(alloc, index, base + index, be.blocksize, self.delta)))
        alloc.stale[region].clear()
        sb.bitmap_cur = region
        sb.log_head = 0
        sb.log_count = 0
        sb.unify_seq = self.delta
        be.deltas_since_unify = 0
        self.counters["unifies"] += 1

    def _flush_inode(self, inode: Inode) -> Iterator[None]:
        be, delta = self.backend, self.delta
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
        tree = be.dtree(inode)
        nodes_before = tree.dirty_nodes
        free = be.alloc.free_later
        blocks = inode.rec.blocks
        if hole is not None:
            blocks -= extents.unmap(tree, hole, None, free)
        changes: list[logrec.LogRecord] = [] if hole is None else [(logrec.LOG_UNMAP, inode.ino, hole)]
        end = -(-size // be.blocksize)
        run: list[Page] = []
        first = True
        self.unplaced = sum(1 for index in pages if index < end)  # pages of this inode still without a block
        yield  # the pages not written yet are still dirty for this delta: a write to one forks it
        for index in sorted(pages):
            page = pages[index]
            if index >= end:  # past the size of this delta: nothing to write
                inode.mapping.drop_from_delta(page)
                continue
            if run and (index != run[-1].index + 1 or len(run) >= RUN_PAGES):
                blocks += self._write_run(inode, size, tree, run, changes, first)
                run, first = [], False
                yield  # after every run: the caller decides by the clock whether the frontend gets a turn
            run.append(page)
        if run:
            blocks += self._write_run(inode, size, tree, run, changes, first)
        assert not self.span[1] and not self.unplaced, "blocks allocated for an inode and left unused"
        if changes:
            be.unflushed[inode.ino] = inode  # its extent tree has changes the next unify writes
            be.unify_nodes += tree.dirty_nodes - nodes_before
        if blocks < 0:  # the record read from disk counted fewer blocks than its tree maps: never a negative count
            raise fmt.CorruptBlock(tree.root_block, "dleaf", f"inode {inode.ino} maps more blocks than the "
                                   f"{inode.rec.blocks} its record counts")
        rec = inode.attrs_for(delta)
        for r in {id(rec): rec, id(inode.rec): inode.rec}.values():  # a backend-owned field, in every view
            r.blocks = blocks
        packed = rec.pack()
        be.itable.insert(inode.ino, packed)
        self.records.append((logrec.LOG_INODE, inode.ino, packed))  # first: replay maps extents of a known inode
        self.records.extend(changes)
        inode.on_disk = True
        if rec.nlink == 0 and be.otree.lookup(inode.ino) is None:
            be.otree.insert(inode.ino, b"")
            self.records.append((logrec.LOG_ORPHAN, inode.ino))
        self.counters["inodes_written"] += 1

    def _write_run(self, inode: Inode, size: int, tree, run: list[Page], changes: list[logrec.LogRecord],
                   first: bool) -> int:
        """Allocate, checksum and map one run of contiguous dirty pages. The inode's first run of the delta goes
        right after the block before it on disk when it can (a file written at its end stays contiguous); later
        runs follow the one before, so a delta's scattered pages of one file land together in file order. The
        blocks come from one allocation for all of the inode's pages (``span``), so a scattered rewrite costs one
        search of the bitmap, not one per page."""
        be = self.backend
        bs = be.blocksize
        last = run[-1]
        tail = size - last.index * bs
        last_copy = None  # what this delta writes of its last page, when that is not the page itself
        if 0 < tail < bs and any(last.data[tail:]):  # zero what lies past the size of this delta
            if last.redirty != CLEAN:  # stable=none: a later delta changed the page in place (an append): its
                # bytes past this delta's size stay in the page, and this delta writes a copy with them zeroed
                last_copy = bytearray(last.data)
                last_copy[tail:] = bytes(bs - tail)
            else:
                last.mutable()[tail:] = bytes(bs - tail)
        none_mode = self.options.stable == "none"
        added = 0
        done = 0
        goal = None
        if first and run[0].index:  # continue right after the block before, so the file's extent grows in place
            before = extents.physical_at(tree, run[0].index - 1)
            goal = before + 1 if before else None
        while done < len(run):
            if not self.span[1]:  # one allocation for all the inode's pages left, when the space allows
                self.span = list(be.alloc.alloc_run(max(self.unplaced, len(run) - done), goal))
            goal = None
            physical = self.span[0]
            count = min(self.span[1], len(run) - done)
            self.span = [physical + count, self.span[1] - count]
            self.unplaced -= count
            pages = run[done: done + count]
            inode.mapping.start_writeback(pages, in_place=none_mode)
            self.pages.extend((inode, page) for page in pages)
            datas = [last_copy if p is last and last_copy is not None else p.data for p in pages]
            csums = [checksum(d) for d in datas]
            self.writes.extend(zip(range(physical, physical + count), datas, strict=True))
            dropped = extents.map_run(tree, pages[0].index, physical, csums, be.alloc.free_later, bs)
            step = logrec.log_map_blocks(bs)
            for at in range(0, count, step):
                changes.append((logrec.LOG_MAP, inode.ino, pages[0].index + at, physical + at, csums[at: at + step]))
            added += count - dropped
            done += count
        self.counters["data_blocks_written"] += len(run)
        return added

    def _destroy(self, inode: Inode) -> None:
        """Reclaim an inode that has no name and no user: its blocks, its table entry, its orphan entry."""
        be = self.backend
        tree = be.dtree(inode)
        extents.unmap(tree, 0, None, be.alloc.free_later)
        tree.free_all()
        if inode.on_disk:
            self.records.append((logrec.LOG_DESTROY, inode.ino))
        be.unflushed.pop(inode.ino, None)
        be.itable.delete(inode.ino)
        be.used_inodes -= 1
        self.used_inodes -= 1
        be.otree.delete(inode.ino)
        self.forget(inode)
        self.counters["inodes_destroyed"] += 1

    # -- stage 2 ---------------------------------------------------------------------------------------------------

    def write_some(self, n: int) -> bool:
        """Write the next n blocks; True when every block is written (tests drive I/O with this)."""
        end = min(len(self.writes), self.cursor + n)
        if end > self.cursor:
            self.backend.dev.write_blocks(self.writes[self.cursor: end])
        self.cursor = end
        return self.cursor >= len(self.writes)

    def write_super(self) -> None:
        """The commit point. With a proof in the superblock (``delta_csum``) the superblock goes out with the
        delta's blocks and one flush makes them durable together; without one (a unify), the blocks are flushed
        first, then the superblock is written and flushed."""
        dev, sb = self.backend.dev, self.backend.sb
        clock, c = time.perf_counter, self.counters
        started = clock()
        if not sb.delta_csum:
            dev.flush()
        copy = 1 - sb.copy  # never the copy that names the last durable delta
        written = clock()
        dev.write_at(fmt.SUPER_OFFSETS[copy], self.super_bytes)
        flushing = clock()
        dev.flush()
        sb.copy = copy
        c["commit_super_seconds"] += flushing - written
        c["commit_flush_seconds"] += clock() - flushing + written - started

    def write(self, on_written: Callable[[], None] | None = None) -> None:
        """All of stage 2 (blocking: run it in a worker thread). Between the blocks and the superblock it calls
        ``on_written`` (default ``mark_written``; from a worker thread, one that hands it to the event loop)."""
        if self.empty:
            return
        started = time.perf_counter()
        self.write_data()
        self.counters["commit_data_seconds"] += time.perf_counter() - started
        (on_written or self.mark_written)()
        self.write_super()

    def write_data(self) -> None:
        """Every block of the delta not written yet, but not the superblock."""
        if self.plan is not None and self.cursor == 0:
            self.backend.dev.write_plan(self.plan)
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
        clean, and no new commit can start. The last step ends the job (``ended``: ``Runner.end``)."""
        for at in range(0, len(self.pages), step):
            batch: dict[int, tuple[Inode, list[Page]]] = {}
            for inode, page in self.pages[at: at + step]:
                batch.setdefault(inode.ino, (inode, []))[1].append(page)
            for inode, pages in batch.values():
                inode.mapping.end_writeback(pages)
            if at + step < len(self.pages):
                yield
        if not self.empty:
            yield from self.backend.alloc.release_pending_steps(16)
        for inode in self.inodes:
            inode.committed(self.delta)
        c = self.counters
        if not self.empty:
            c["commits"] += 1
            c["blocks_written"] += len(self.writes)
            c["commit_seconds"] += time.perf_counter() - self.started
        if self.ended is not None:
            self.ended(self)

    def wake_waiters(self) -> None:
        """Wake every task waiting for this job: it completed, or it failed."""
        for event in self.waiters + self.written_waiters:
            event.set()
