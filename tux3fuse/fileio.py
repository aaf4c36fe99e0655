"""File I/O: reads through the page cache, writes into pages of the current delta, truncate, and the faults of
shared mappings.

Guarantees:
- A read returns the bytes of the newest change, from the page cache or from the blocks the extent tree maps
  (each checked against its checksum: a mismatch is a ``CorruptBlock``, never wrong data); a hole, and what a
  truncate cut off, reads as zeros.
- A change goes into pages dirty for the current delta. A page the backend owns is handled by the fork mechanism
  (``cache/fork.py``): forked, or with stable=wait waited for before anything changes (``WaitFor``), or with
  stable=none changed in place.
- Nothing is changed before space is reserved (``Space.reserve``) or before the writer has waited what it must
  (``Throttled`` over the dirty limit); the exceptions that say so are raised first.
- Nothing is changed before every block a change reads is read (the partial first and last pages of a write, the
  page a truncate cuts into, the page a mapping faults in: ``read_first``): a device error fails the operation
  before its first change, with EIO and nothing else.
- Every value an attribute change takes fits the format (docs/FORMAT.md §5) before it is stored, so that no
  commit can fail on it: a time outside the format's range is clamped to it (``format.clamp_time``, as the kernel
  clamps to a superblock's range); an id outside 32 bits, a negative size or offset is EINVAL; a size or write
  past the largest file is EFBIG.
- The daemon reads through ``reads.py``, which never holds the event loop while the device reads and returns what
  ``read`` would return when it completes.
- Truncate during writeout never waits and never copies (``cache/fork.py:truncate_for_writeout``); the cut is
  remembered per delta (``Inode.hole_from``) so that reads past it see zeros until the commit unmaps the blocks.
"""

from __future__ import annotations

import errno
import stat
import time
from collections import Counter
from collections.abc import Callable

from . import format as fmt
from .backend import extents
from .backend.store import Backend
from .cache import Page
from .cache.fork import WAIT, ForkRegistry, make_writable, must_wait, truncate_for_writeout
from .cache.mmap import SharedMapping
from .delta import Deltas
from .dirty import DirtyLists
from .failure import Health, Throttled, WaitFor, err
from .format import CorruptBlock
from .inode import Inode
from .inodes import InodeCache
from .options import Options
from .runner import Runner
from .space import Space

MAX_FILE_SIZE = fmt.MAX_FILE_SIZE


def gather(parts: list, lo: int, length: int) -> bytes:
    """``length`` bytes from byte ``lo`` of the whole pages ``parts``, copied once."""
    if len(parts) == 1:
        return bytes(parts[0][lo: lo + length])
    tail = lo + length - (len(parts) - 1) * len(parts[0])  # bytes wanted of the last page
    parts[0] = memoryview(parts[0])[lo:]
    parts[-1] = memoryview(parts[-1])[:tail]
    return b"".join(parts)


class Files:
    def __init__(self, backend: Backend, icache: InodeCache, deltas: Deltas, dirty: DirtyLists, space: Space,
                 runner: Runner, forks: ForkRegistry, health: Health, options: Options,
                 counters: Counter[str]) -> None:
        self.backend = backend
        self.icache = icache
        self.deltas = deltas
        self.dirty = dirty
        self.space = space
        self.runner = runner
        self.forks = forks
        self.health = health
        self.options = options
        self.counters = counters
        self.blocksize = backend.blocksize
        self.stable = options.stable
        self.on_background: Callable[[], None] | None = None  # dirty data passed Options.background_bytes
        self.on_truncate: Callable[[int], None] | None = None  # a file was cut short (readahead stops)

    # -- pages -----------------------------------------------------------------------------------------------------

    def read_pages(self, inode: Inode, index: int, limit: int) -> list[Page]:
        """Bring up to ``limit`` pages from ``index`` into the cache (at least one)."""
        mapping = inode.mapping
        page = mapping.get(index)
        cache = self.icache.cache
        if page is not None:
            cache.touch(mapping, page)
            return [page]
        bs = self.blocksize
        hole = min((h for d, h in inode.hole_from.items()), default=None)
        tree = self.backend.dtree(inode)
        limit = min(limit, max(1, -(-inode.rec.size // bs) - index))
        for i in range(1, limit):  # stop at the next cached page
            if mapping.get(index + i) is not None:
                limit = i
                break
        if hole is not None and index >= hole:
            physical, csums, n = 0, [], 1
        else:
            physical, csums, n = extents.lookup_run(tree, index, limit)
            if hole is not None:
                n = max(1, min(n, hole - index))
        pages = []
        if physical:
            data = memoryview(self.backend.dev.read_blocks(physical, n, inode.ino, index))
            for i in range(n):
                block = data[i * bs: (i + 1) * bs]
                if fmt.checksum(block) != csums[i]:
                    self.counters["checksum_errors"] += 1
                    raise CorruptBlock(physical + i, "data", f"checksum mismatch (inode {inode.ino}, "
                                                            f"block {index + i})")
                pages.append(Page(index + i, block))
        else:
            zero = memoryview(bytes(bs))  # holes share one read-only zero block until written
            pages = [Page(index + i, zero) for i in range(n)]
        for page in pages:
            mapping.insert(page)
        return pages

    def page(self, inode: Inode, index: int) -> Page:
        return self.read_pages(inode, index, 1)[0]

    def read_first(self, inode: Inode, index: int) -> None:
        """Bring page ``index`` into the cache unless it is there: called before a change that fills it from the
        volume (``write_page`` with ``fill``), so that the change reads nothing."""
        if inode.mapping.get(index) is None:
            self.read_pages(inode, index, 1)

    def write_page(self, inode: Inode, index: int, delta: int, fill: bool = True) -> Page:
        """The page at ``index`` made ready to change in ``delta`` (read first when ``fill``), by the decision
        table of cache/fork.py: dirtied, forked, or (stable=none) left under writeback to change in place."""
        mapping = inode.mapping
        page = mapping.get(index)
        if page is None:
            page = self.page(inode, index) if fill else Page(index, bytearray(self.blocksize))
            if not fill:
                mapping.insert(page)
        job = self.runner.job
        return make_writable(mapping, page, delta, self.stable, job is not None and job.written, self.forks,
                             self.counters, inode.is_dir)

    def must_wait(self, inode: Inode, first: int = 0, last: int | None = None) -> None:
        """stable=wait: raise WaitFor before changing anything if a page in [first, last] is the backend's and not
        written yet (once the commit's blocks are written its pages change in place, as after Linux's
        end_page_writeback: the wait is for the page's I/O, never for the flush)."""
        job = self.runner.job
        if self.stable != WAIT or job is None or job.written:
            return
        if must_wait(inode.mapping, self.deltas.current, first, last):
            raise WaitFor(job, written=True)

    # -- shared mappings -------------------------------------------------------------------------------------------

    def page_for_mapping(self, inode: Inode, index: int) -> Page:
        """Read fault of a shared mapping: the page the index holds."""
        return self.page(inode, index)

    def page_mkwrite(self, smap: SharedMapping, index: int) -> list:
        """Write fault of a shared mapping: make the page writable for the current delta (forking it if the
        backend owns it) and map it writable in ``smap``; returns the page-table entry."""
        self.health.check_writable()
        inode = smap.inode
        self.must_wait(inode, index, index)
        page = inode.mapping.get(index)
        if page is None or page.delta != self.deltas.current:
            self.space.reserve(1)
        self.read_first(inode, index)
        with self.deltas.change() as delta:
            page = self.write_page(inode, index, delta)
            rec = self.dirty.mark(inode, delta)
            rec.mtime_ns = rec.ctime_ns = time.time_ns()
        pte = smap.ptes[index] = [page, True]
        return pte

    # -- data ------------------------------------------------------------------------------------------------------

    def read(self, inode: Inode, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise err(errno.EINVAL)
        end = min(offset + size, inode.rec.size)
        if offset >= end:
            return b""
        bs = self.blocksize
        first, last = offset // bs, (end - 1) // bs
        parts = []
        index = first
        while index <= last:
            for page in self.read_pages(inode, index, last - index + 1):
                parts.append(page.data)
                index += 1
        return gather(parts, offset - first * bs, end - offset)

    def write(self, inode: Inode, offset: int, data: bytes) -> int:
        self.health.check_writable()
        if offset < 0:
            raise err(errno.EINVAL)
        if offset + len(data) > MAX_FILE_SIZE:
            raise err(errno.EFBIG)
        if not data:
            return 0
        bs = self.blocksize
        first, last = offset // bs, (offset + len(data) - 1) // bs
        mapping = inode.mapping
        self.must_wait(inode, first, last)
        mine = mapping.dirty.get(self.deltas.current)
        npages = last - first + 1
        new = npages if not mine else npages - sum(1 for i in range(first, last + 1) if i in mine)
        limit = self.options.dirty_limit
        cache = self.icache.cache
        if limit and new and cache.dirty_pages and (cache.dirty_pages + new) * bs > limit:
            raise Throttled()  # the caller waits for a commit (Volume.call, or the volume's embedded mode)
        self.space.reserve(new)
        size = inode.rec.size
        end = offset + len(data)
        lo = offset - first * bs
        head = bool(lo or end - first * bs < bs)  # a partial first page
        if head and not (lo == 0 and end >= size):
            self.read_first(inode, first)
        if end % bs and last > first and last * bs < size:  # a partial last page, filled from the volume
            self.read_first(inode, last)
        with self.deltas.change() as delta:
            mv = memoryview(data)
            index, pos = first, 0
            if head:
                n = min(bs - lo, len(data))
                page = self.write_page(inode, first, delta, fill=not (lo == 0 and end >= size))
                page.data[lo: lo + n] = mv[:n]
                index, pos = first + 1, n
            whole_end = (end // bs) if end % bs else last + 1  # pages fully covered by the write
            if whole_end <= last and whole_end >= index:  # a partial last page: before the whole pages, which
                n = end - whole_end * bs  # may push the page read for it out of the cache
                page = self.write_page(inode, whole_end, delta, fill=whole_end * bs < size)
                page.data[:n] = mv[len(data) - n:]
            if index < whole_end:
                mapping.write_pages(index, mv[pos: pos + (whole_end - index) * bs], delta,
                                    lambda i: self.write_page(inode, i, delta, fill=False))
            rec = self.dirty.mark(inode, delta)
            now = time.time_ns()
            if end > rec.size:
                rec.size = end
            if self.on_background is not None and cache.dirty_pages * bs >= self.options.background_bytes:
                self.on_background()
            rec.mtime_ns = rec.ctime_ns = now
            if rec.mode & (stat.S_ISUID | stat.S_ISGID):
                rec.mode &= ~stat.S_ISUID & ~(stat.S_ISGID if rec.mode & stat.S_IXGRP else 0)
        return len(data)

    def truncate(self, inode: Inode, size: int, delta: int) -> None:
        """Set the size within ``delta`` (the caller holds it): pages past the end go (``->truncatepage``)."""
        rec = inode.rec
        bs = self.blocksize
        if size < rec.size:
            if self.on_truncate is not None:
                self.on_truncate(inode.ino)
            keep = -(-size // bs)
            truncate_for_writeout(inode.mapping, keep, delta, self.forks)
            old = inode.hole_from.get(delta)
            inode.hole_from[delta] = keep if old is None else min(old, keep)
            if size % bs:
                page = self.write_page(inode, size // bs, delta)
                page.data[size % bs:] = bytes(bs - size % bs)
        rec.size = size

    def setattr(self, inode: Inode, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                ctime_ns: int | None = None) -> None:
        self.health.check_writable()
        for ident in (uid, gid):
            if ident is not None and not 0 <= ident <= fmt.ID_MAX:
                raise err(errno.EINVAL, f"user or group id {ident} outside [0, {fmt.ID_MAX}]")
        atime_ns, mtime_ns, ctime_ns = (None if t is None else fmt.clamp_time(t) for t in (atime_ns, mtime_ns,
                                                                                              ctime_ns))
        if size is not None:
            if inode.is_dir:
                raise err(errno.EISDIR)
            if size < 0:
                raise err(errno.EINVAL)
            if size > MAX_FILE_SIZE:
                raise err(errno.EFBIG)
            if size > inode.rec.size and size % self.blocksize:
                self.space.reserve(1)
            if size < inode.rec.size:
                self.must_wait(inode, size // self.blocksize)
                if size % self.blocksize:
                    self.read_first(inode, size // self.blocksize)  # the page the cut goes through
        with self.deltas.change() as delta:
            rec = self.dirty.mark(inode, delta)
            now = time.time_ns()
            if size is not None and size != rec.size:
                self.truncate(inode, size, delta)
                rec.mtime_ns = now
            if mode is not None:
                rec.mode = stat.S_IFMT(rec.mode) | (mode & 0o7777)
            if uid is not None:
                rec.uid = uid
            if gid is not None:
                rec.gid = gid
            if atime_ns is not None:
                rec.atime_ns = atime_ns
            if mtime_ns is not None:
                rec.mtime_ns = mtime_ns
            rec.ctime_ns = ctime_ns if ctime_ns is not None else now
