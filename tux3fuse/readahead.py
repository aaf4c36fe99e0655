"""Readahead: the blocks a sequential reader will ask for next, read into the page cache before it asks.

A stream is one file read sequentially: a read that starts where the previous read of that file ended. The first
read of a file only starts a stream; each read after it that continues the stream, while the stream's reads wait
for the device (an image whose host serves them from its own page cache is not read ahead here: that would only
add work), keeps blocks read ahead of it for a window that starts at ``INITIAL_WINDOW`` bytes (at most) and
doubles, each time more is read ahead, up to ``window_for`` (``Options.readahead``; by default ``AUTO_WINDOW`` on
an NBD export and none on an image file or block device, which the host's kernel reads ahead itself: measured by
scripts/bench_reads.py, the daemon's readahead only slowed a local image down) and a quarter of the page cache.
More is read ahead once less than half a window is left ahead of the reader.

Guarantees:
- What is read ahead goes through the read path's own revalidation (``Reads.take``): a block enters the cache,
  as a clean page, only if the file still maps it to the block read with the same checksum and no page holds it
  meanwhile; a truncate, a write or a commit that moved the block while it was read leaves nothing stale behind.
  A block that does not match its checksum is left out: the read that asks for it reports it. A block the device
  fails to read is left out too, counted and logged (``readahead_errors``, ``Device.read_errors``); the read that
  asks for it reads it again.
- A read that needs a block being read ahead waits for that read (``Reads.reading``) rather than reading it too.
- The bytes in flight are bounded (four windows of the largest size, for all streams); readahead inserts clean
  pages only, so the page cache's bound holds and a dirty page is never evicted for it.
- A stream stops, its reads in flight cancelled, at a read that does not continue it, at the release of the
  file's last open, at a truncate of the file, and when the daemon stops (``run`` returns).
- Readahead runs only while ``run`` serves (the daemon's nursery); without it (the embedded API) reads never
  start any.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .options import Options

if TYPE_CHECKING:
    from .reads import Reads

log = logging.getLogger("tux3fuse")

INITIAL_WINDOW = 128 << 10  # bytes read ahead when a stream is first seen to be sequential
AUTO_WINDOW = 2 << 20  # bytes: the largest window by default where the host does not read ahead (NBD)


def window_for(options: Options, has_fd: bool) -> int:
    """The largest readahead window: ``Options.readahead`` when set; otherwise none for a backing the host reads
    through its own page cache (a file or block device: its kernel reads ahead), ``AUTO_WINDOW`` for one it does
    not (an NBD export)."""
    if options.readahead is not None:
        return options.readahead
    return 0 if has_fd else AUTO_WINDOW


@dataclass(eq=False)
class Stream:
    """One sequential reader of a file: where its last read ended, its window, and how far readahead has gone."""

    end: int  # byte offset where the last read ended
    window: int = INITIAL_WINDOW  # bytes
    ahead: int = 0  # blocks: readahead is issued up to this block
    device: bool = False  # its last read the caches did not serve waited for the device (else the host's cache
    # served it: the host reads ahead for us, and readahead here would only add work)
    scopes: set[trio.CancelScope] = field(default_factory=set)  # its reads ahead in flight

    def stop(self) -> None:
        for scope in self.scopes:
            scope.cancel()


class Readahead:
    def __init__(self, reads: Reads, options: Options) -> None:
        self.reads = reads
        self.blocksize = reads.blocksize
        self.max_window = window_for(options, reads.backend.dev.fd >= 0)
        self.max_in_flight = 4 * self.max_window  # bytes being read ahead at once, all streams together
        self.streams: dict[int, Stream] = {}
        self.in_flight = 0  # bytes
        self.nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve readahead until cancelled; every stream stops when this returns."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.nursery = None
            for stream in self.streams.values():
                stream.stop()
            self.streams.clear()

    def stop(self, ino: int) -> None:
        """The stream of ``ino`` (if any) stops and its reads ahead are cancelled (truncate, last release)."""
        stream = self.streams.pop(ino, None)
        if stream is not None:
            stream.stop()

    def closed(self, ino: int) -> None:
        """A release of ``ino``: its stream stops with the last open."""
        inode = self.reads.icache.inodes.get(ino)
        if inode is None or inode.opens <= 0:
            self.stop(ino)

    def saw(self, ino: int, offset: int, size: int, device: bool | None = True) -> None:
        """A read of [offset, offset + size) of ``ino`` was served or started: follow its stream, and read ahead
        of it if it is sequential and its reads wait for the device. ``device``: the read waited for the device
        (True), the host's page cache served it (False), or the page cache here did (None: nothing learnt). Never a
        checkpoint."""
        if self.nursery is None or self.max_window <= 0 or size <= 0:
            return
        stream = self.streams.get(ino)
        end = offset + size
        if stream is None or offset != stream.end:
            if stream is not None:
                stream.stop()
            self.streams[ino] = Stream(end, min(INITIAL_WINDOW, self.max_window), device=bool(device))
            return
        stream.end = end
        if device is not None:
            stream.device = device
        if not stream.device:
            return
        inode = self.reads.icache.inodes.get(ino)
        if inode is None:
            return
        bs = self.blocksize
        here = -(-end // bs)  # the first block after the read
        stream.ahead = max(stream.ahead, here)
        if (stream.ahead - here) * bs > stream.window // 2:  # enough is ahead already
            return
        last = min(here + stream.window // bs, -(-inode.rec.size // bs))
        n = min(last - stream.ahead, (self.max_in_flight - self.in_flight) // bs)
        if n <= 0:
            return
        scope = trio.CancelScope()
        stream.scopes.add(scope)
        self.in_flight += n * bs
        self.nursery.start_soon(self._read_ahead, stream, scope, ino, stream.ahead, n)
        stream.ahead += n
        cap = max(INITIAL_WINDOW, self.reads.icache.cache.limit_pages * bs // 4)
        stream.window = min(stream.window * 2, self.max_window, cap)

    async def _read_ahead(self, stream: Stream, scope: trio.CancelScope, ino: int, first: int, n: int) -> None:
        reads = self.reads
        runs = []
        try:
            with scope:
                inode = reads.icache.inodes.get(ino)
                if inode is None or scope.cancel_called:
                    return
                runs = reads.plan_ahead(inode, first, n)
                if not runs:
                    return
                await reads.fetch(runs)
                if scope.cancel_called or reads.icache.inodes.get(ino) is not inode:
                    return
                got: dict = {}
                for run in runs:
                    reads.take(inode, run, False, got)
                reads.counters["readahead_blocks"] += len(got)
        except Exception:  # readahead is a hint: the read that needs the block reads it and reports what fails
            log.warning("readahead of inode %d failed", ino, exc_info=True)
        finally:
            reads.release(runs)
            stream.scopes.discard(scope)
            self.in_flight -= n * self.blocksize
