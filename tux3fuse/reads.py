"""Reads beside the event loop: the daemon's reads, which never make other requests wait behind the device.

Guarantees:
- A read returns what a read on the loop (``Files.read``) would return at the moment it completes: it plans on the
  loop (cached pages taken, holes zeros), reads the blocks of the rest in worker threads, several at once, and back
  on the loop keeps a block only if the file still maps it to the block read with the same checksum and no page has
  come into the cache for it meanwhile (a writer's page is newer); otherwise it plans again. A checksum mismatch
  with an unchanged mapping is a ``CorruptBlock``, as on the loop. A read whose pages are all cached never leaves
  the loop (no checkpoint).
- A read that needs a block another read (or readahead, ``readahead.py``) is reading waits for that one instead of
  reading it too; a read fetches its own blocks before it waits for others', so two reads never wait on each other.
  Every run registered in flight is released (its ``done`` set) whatever happens: a plan that fails after it
  registered some (a tree node or a block it reads on the loop fails) releases them before the error goes on.
- A read holds the loop for the device only where a worker thread would cost more than it saves: blocks the host's
  page cache holds (``Device.pread_cached``), and blocks of a device whose recent reads took less than
  ``Options.read_inline_max`` (one block at any time, more only while no request waits in the kernel). A trip
  through a worker thread and back costs about 100-140 us of CPU on a small machine, more than a quick disk's
  4 KiB read; a slow device's reads (NBD over a network, a busy disk) go to the threads, several at once.
- Worker threads touch no state of the volume: they read and checksum; what they read is counted and inserted on
  the loop.
- Every read the device fails, a readahead's too, is counted and logged (``Device.read_errors``, which holds back
  repeated lines); the error reaches the reader whose read it was (EIO), never one that only waited for a
  readahead: that one reads the blocks itself.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import format as fmt
from .backend import extents
from .backend.store import Backend
from .cache import Page
from .device import Buffer
from .fileio import gather
from .format import CorruptBlock
from .inode import Inode
from .inodes import InodeCache
from .options import Options
from .readahead import Readahead
from .runner import Runner

READ_THREADS = 8  # runs of uncached blocks read at once, each by a worker thread
LOOP_PIECE = 256  # blocks: the most one read on the event loop carries (from the host's cache, or a quick device)
READ_PIECE = 32  # blocks: the most one worker's read carries (a read waiting for part of a larger one waits less)
AHEAD_PIECE = 128  # blocks: the most one worker's read ahead carries (fewer, larger reads for a sequential reader)
READ_ROUNDS = 8  # a read whose blocks changed under it this many times reads on the event loop (``read``)


@dataclass(eq=False)
class Run:
    """Blocks [index, index + n) of inode ``ino``, mapped to physical blocks from ``physical`` with ``csums`` when
    planned; once fetched, ``data`` and the checksums of what was read (``sums``), or the ``error`` of the read.
    ``done`` is set when the run is no longer in flight."""

    ino: int
    index: int
    physical: int
    csums: list[int]
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes = b""
    sums: list[int] = field(default_factory=list)
    error: Exception | None = None
    seconds: float = 0.0  # how long the device took to read it
    ahead: bool = False  # a readahead's run

    @property
    def n(self) -> int:
        return len(self.csums)


@dataclass
class ReadPlan:
    """One round of ``Reads.plan``: the bytes asked for (``data``), or what to await before the next round:
    ``runs`` to read from the device, and the reads in flight of others (``waits``) that hold blocks it needs."""

    data: bytes | None = None
    runs: list[Run] = field(default_factory=list)
    waits: list[trio.Event] = field(default_factory=list)
    device: bool | None = None  # the round waited for the device (True), the host's cache served it (False), or
    # the page cache here did (None)


class Reads:
    """The reads in flight (``reading``), their worker threads, the device's read time, and the readahead of
    sequential readers (``readahead``)."""

    def __init__(self, backend: Backend, icache: InodeCache, runner: Runner, options: Options,
                 counters: Counter[str]) -> None:
        self.backend = backend
        self.icache = icache
        self.runner = runner  # its ``frontend_pending``: does a request wait in the kernel?
        self.counters = counters
        self.blocksize = backend.blocksize
        self.reading: dict[tuple[int, int], Run] = {}  # (ino, index) -> the run in flight that reads it
        self.limiter: trio.CapacityLimiter | None = None  # READ_THREADS worker threads (made in the event loop)
        self.read_seconds = 0.0  # the device's recent reads (a moving mean of one run each): may one hold the loop?
        self.read_inline_max = options.read_inline_max
        self.readahead = Readahead(self, options)

    async def read(self, ino: int, offset: int, size: int, fallback: Callable[[int, int, int], bytes],
                   plan: Callable[[int, int, int, list[Run] | None], ReadPlan] | None = None) -> bytes:
        """A read without holding the event loop while the device reads: rounds of ``plan`` (the volume's guarded
        ``read_plan``; by default ``Reads.plan``) on the loop, the blocks it asks for read in worker threads between
        them. Waits only when a block is not cached (never a checkpoint otherwise); after ``READ_ROUNDS`` rounds
        that found the file changed under them, ``fallback`` (``Volume.read``) reads on the loop. Feeds the
        readahead of sequential readers."""
        if plan is None:
            def plan(ino: int, offset: int, size: int, fetched: list[Run] | None) -> ReadPlan:
                return self.plan(self.icache.iget(ino), offset, size, fetched)
        inode = self.icache.inodes.get(ino)
        if inode is not None and (data := self.cached(inode, offset, size)) is not None:
            self.readahead.saw(ino, offset, size, None)
            return data
        fetched: list[Run] | None = None
        try:
            for attempt in range(READ_ROUNDS + 1):
                p = plan(ino, offset, size, fetched)
                fetched = p.runs or None
                if attempt == 0:
                    self.readahead.saw(ino, offset, size, p.device)
                if p.data is not None:
                    return p.data
                if attempt == READ_ROUNDS:
                    break
                if p.runs:  # its own runs first: taken (and released) by the next round before it waits for others
                    await self.fetch(p.runs)
                    continue
                for event in p.waits:
                    await event.wait()
                self.counters["read_waits"] += 1
        finally:
            if fetched:
                self.release(fetched)
        self.counters["read_on_loop"] += 1
        return fallback(ino, offset, size)

    def cached(self, inode: Inode, offset: int, size: int) -> bytes | None:
        """The bytes of a read whose every page is in the cache (each touched), else None (``plan`` then)."""
        end = min(offset + size, inode.rec.size)
        if offset >= end:
            return None
        bs = self.blocksize
        first, last = offset // bs, (end - 1) // bs
        get, touch, mapping = inode.mapping.get, self.icache.cache.touch, inode.mapping
        parts = []
        for index in range(first, last + 1):
            page = get(index)
            if page is None:
                return None
            parts.append(page)
        for page in parts:
            touch(mapping, page)
        return gather([page.data for page in parts], offset - first * bs, end - offset)

    def plan(self, inode: Inode, offset: int, size: int, fetched: list[Run] | None = None) -> ReadPlan:
        """One round of ``read``, on the loop: take the blocks of ``fetched`` that are still the file's
        (``take``), then gather [offset, offset + size) from the cache, the blocks just taken and holes; if all is
        there, the bytes. Otherwise the runs to read (registered in flight) and the reads of others to wait for;
        nothing gathered is kept for the next round, which gathers again after the awaits."""
        got: dict[int, memoryview] = {}
        if fetched:
            try:
                for run in fetched:
                    self.take(inode, run, True, got)
            finally:
                self.release(fetched)
        end = min(offset + size, inode.rec.size)
        if offset >= end:
            return ReadPlan(b"")
        bs = self.blocksize
        first, last = offset // bs, (end - 1) // bs
        mapping = inode.mapping
        cache = self.icache.cache
        parts: list = []
        plan = ReadPlan()
        try:  # a failure after runs were registered releases them: nobody may wait for them forever
            index = first
            while index <= last:
                page = mapping.get(index)
                if page is not None:
                    cache.touch(mapping, page)
                    parts.append(page.data)
                    index += 1
                    continue
                data = got.get(index)
                if data is not None:
                    parts.append(data)
                    index += 1
                    continue
                other = self.reading.get((inode.ino, index))
                if other is not None:
                    if not plan.waits or plan.waits[-1] is not other.done:
                        plan.waits.append(other.done)
                    index += 1
                    continue
                physical, csums, n = self._backing(inode, index, self._gap(inode, index, last + 1, got, LOOP_PIECE))
                if physical:
                    inline = self.read_inline(n)  # a quick device, and nobody waits for the loop
                    # one block read inline: one system call (whether the host's cache holds it changes nothing)
                    data = None if inline and n == 1 else self.backend.dev.pread_cached(physical, n)
                    if data is not None:
                        self.counters["read_host_cached"] += n
                        plan.device = plan.device or False
                    elif inline:
                        data = self._pread_now(inode, index, physical, n)
                        plan.device = True
                    if data is not None:  # read on the loop
                        parts.extend(self._insert_read(inode, index, physical, csums, data))
                    else:  # worker threads, in pieces: a read waiting for part of a larger one waits less
                        for at in range(0, n, READ_PIECE):
                            plan.runs.append(self._register(Run(inode.ino, index + at, physical + at,
                                                                csums[at: at + READ_PIECE])))
                else:
                    zero = memoryview(bytes(bs))  # holes share one read-only zero block until written
                    for i in range(index, index + n):
                        mapping.insert(Page(i, zero))
                        parts.append(zero)
                index += n
        except BaseException:
            self.release(plan.runs)
            raise
        if plan.runs or plan.waits:
            plan.device = True
            return plan
        plan.data = gather(parts, offset - first * bs, end - offset)
        return plan

    def plan_ahead(self, inode: Inode, first: int, n: int) -> list[Run]:
        """The runs that would bring blocks [first, first + n) into the cache (readahead): neither cached, nor in
        flight, nor holes, nor past the end of the file; registered in flight."""
        end = min(first + n, -(-inode.rec.size // self.blocksize))
        runs: list[Run] = []
        index = first
        try:
            while index < end:
                if inode.mapping.get(index) is not None or (inode.ino, index) in self.reading:
                    index += 1
                    continue
                physical, csums, k = self._backing(inode, index, self._gap(inode, index, end, {}, AHEAD_PIECE))
                if physical:
                    runs.append(self._register(Run(inode.ino, index, physical, csums, ahead=True)))
                index += k
        except BaseException:  # a tree node that cannot be read: what was registered is released
            self.release(runs)
            raise
        return runs

    def _gap(self, inode: Inode, index: int, end: int, got: dict[int, memoryview], piece: int = READ_PIECE) -> int:
        """How many blocks from ``index`` (not cached; at most ``piece``, before ``end``) are neither cached,
        taken, nor in flight."""
        mapping, reading, ino = inode.mapping, self.reading, inode.ino
        n = 1
        while n < piece and index + n < end and mapping.get(index + n) is None and index + n not in got \
                and (ino, index + n) not in reading:
            n += 1
        return n

    def _backing(self, inode: Inode, index: int, limit: int) -> tuple[int, list[int], int]:
        """What backs blocks from ``index`` now: (physical, checksums, n) for n <= limit mapped blocks, or (0, [],
        n) for a hole, what a truncate cut off (``Inode.hole_from``) included."""
        hole = min(inode.hole_from.values(), default=None)
        if hole is not None and index >= hole:
            return 0, [], limit
        physical, csums, n = extents.lookup_run(self.backend.dtree(inode), index, limit)
        if hole is not None and hole - index < n:
            n = hole - index
            csums = csums[:n]
        return physical, csums, n

    def read_inline(self, n: int) -> bool:
        """May a read of ``n`` uncached blocks hold the event loop now? Only when the device's recent reads were
        quicker than ``read_inline_max``, and, for more than one block, no request waits in the kernel that no task
        has taken. (A worker thread's round trip costs more CPU than a quick device's read of a block, also with
        several readers at once; runnable tasks do not count: pyfuse3 starts a task to take the next request
        whenever one takes a request.)"""
        return self.read_seconds < self.read_inline_max and (n == 1 or not self.runner.frontend_pending())

    def _pread_now(self, inode: Inode, index: int, physical: int, n: int) -> bytes:
        started = time.perf_counter()
        dev = self.backend.dev
        try:
            data = dev.pread_blocks(physical, n)
        except OSError as e:
            dev.read_errors.failed(e, physical, n, inode.ino, index)
            raise
        self._read_took(time.perf_counter() - started)
        self.counters["read_inline_blocks"] += n
        return data

    def _read_took(self, seconds: float) -> None:
        self.read_seconds += (seconds - self.read_seconds) / 8

    def _insert_read(self, inode: Inode, index: int, physical: int, csums: list[int], data: Buffer) -> list:
        """Blocks just read on the loop (nothing can have changed since the look-up): checked against their
        checksums (``CorruptBlock``, as ``read_pages``) and inserted as clean pages; their data, in order."""
        n = len(csums)
        self.backend.dev.stats.blocks_read += n
        bs = self.blocksize
        mv = memoryview(data)
        insert = inode.mapping.insert
        checksum = fmt.checksum
        blocks = []
        for i in range(n):
            block = mv[i * bs: (i + 1) * bs]
            if checksum(block) != csums[i]:
                self.counters["checksum_errors"] += 1
                raise CorruptBlock(physical + i, "data", f"checksum mismatch (inode {inode.ino}, block {index + i})")
            insert(Page(index + i, block))
            blocks.append(block)
        return blocks

    def _register(self, run: Run) -> Run:
        for i in range(run.index, run.index + run.n):
            self.reading[(run.ino, i)] = run
        return run

    def release(self, runs: list[Run]) -> None:
        """The runs are no longer in flight: whoever waits for them plans again (idempotent)."""
        reading = self.reading
        for run in runs:
            for i in range(run.index, run.index + run.n):
                if reading.get((run.ino, i)) is run:
                    del reading[(run.ino, i)]
            run.done.set()

    async def fetch(self, runs: list[Run]) -> None:
        """Read ``runs`` from the device in worker threads, up to ``READ_THREADS`` at once (a commit's writes go
        on meanwhile). Never raises an error of the device: a run keeps its own (``Run.error``). Cancellation
        waits for the threads."""
        if self.limiter is None:
            self.limiter = trio.CapacityLimiter(READ_THREADS)
        if len(runs) == 1:
            await self._fetch(runs[0])
            return
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(self._fetch, run)

    async def _fetch(self, run: Run) -> None:
        try:
            await trio.to_thread.run_sync(self._pread, run, limiter=self.limiter)
        finally:
            dev = self.backend.dev  # counted on the loop
            if run.data:
                dev.stats.blocks_read += run.n
                self._read_took(run.seconds)
            elif isinstance(run.error, OSError):  # a read's own error reaches it when taken (``take``)
                dev.read_errors.failed(run.error, run.physical, run.n, run.ino, run.index, run.ahead)

    def _pread(self, run: Run) -> None:
        """In a worker thread: the run's blocks and their checksums; no state of the volume is touched."""
        try:
            started = time.perf_counter()
            data = self.backend.dev.pread_blocks(run.physical, run.n)
            run.seconds = time.perf_counter() - started
            bs = self.blocksize
            mv = memoryview(data)
            run.sums = [fmt.checksum(mv[i * bs: (i + 1) * bs]) for i in range(run.n)]
            run.data = data
        except Exception as e:  # handed to the loop, which decides whether it still matters
            run.error = e

    def take(self, inode: Inode, run: Run, strict: bool, got: dict[int, memoryview]) -> int:
        """Insert into the cache, as clean pages, the blocks of a fetched run that the file still maps to the
        block read, with the same checksum, and that no page holds meanwhile (a newer one); each one inserted is
        in ``got`` too. A block whose content does not match its unchanged checksum, or a read that failed, raises
        the error when ``strict`` (``CorruptBlock``, as ``read_pages``) and is left out otherwise. Returns how many
        blocks were inserted."""
        if self.icache.inodes.get(inode.ino) is not inode:  # forgotten meanwhile: nothing to insert into
            return 0
        mapping = inode.mapping
        bs = self.blocksize
        end = min(run.index + run.n, -(-inode.rec.size // bs))
        data = memoryview(run.data)
        inserted = stale = 0
        index = run.index
        while index < end:
            physical, csums, n = self._backing(inode, index, end - index)
            k = index - run.index
            for j in range(n):
                if not physical or physical + j != run.physical + k + j or csums[j] != run.csums[k + j]:
                    stale += 1
                    continue
                if mapping.get(index + j) is not None:
                    continue
                if run.error is not None:
                    if strict:
                        raise run.error
                    continue
                if run.sums[k + j] != csums[j]:
                    if not strict:
                        continue
                    self.counters["checksum_errors"] += 1
                    raise CorruptBlock(physical + j, "data", f"checksum mismatch (inode {inode.ino}, "
                                                             f"block {index + j})")
                page = Page(index + j, data[(k + j) * bs: (k + j + 1) * bs])
                mapping.insert(page)
                got[index + j] = page.data
                inserted += 1
            index += n
        if stale:
            self.counters["read_stale_blocks"] += stale
        return inserted
