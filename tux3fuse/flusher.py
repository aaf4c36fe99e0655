"""The flusher: the one task that decides when the current delta is committed, and starts every commit.

It is the userspace counterpart of Tux3's fs-writeback hook. Requests are items on a work queue, each naming the
delta it needs durable:

| kind           | made by                                                                 | commit I/O    |
|----------------|-------------------------------------------------------------------------|---------------|
| ``periodic``   | the flusher, when the oldest dirty inode is ``interval`` old            | worker thread |
| ``background`` | the flusher, over ``Options.background_bytes``; a throttled writer      | worker thread |
| ``sync``       | fsync, fsyncdir, ``tux3 sync`` (``Volume.sync``)                        | loop if small |

Guarantees:
- Only the flusher starts commits while it runs (``Volume.sync`` and ``Volume.call`` hand it their request and
  wait), and at most one commit is in flight.
- A request returns once the delta it names is durable, or raises: ``VolumeError`` when the commit failed (the
  volume is read-only from then on), EROFS when the volume had already failed. A request names the current delta
  if that holds a change, otherwise the delta before it: a sync with nothing new to commit causes no commit.
- Coalescing: a request is covered by the commit in flight when that commit's delta is at least the one it names
  (and, for a commit ahead of its delta, holds the requesting file), and by any queued item (a queued item commits
  the delta current when it starts, which is at least the one any request names now). A covered request merges
  into that item (``flusher_coalesced``); otherwise it becomes a new item (``flusher_items``). So the queue never
  holds more than one item, and N concurrent syncs share commits: those that arrive while a commit is in flight
  share the next one (group commit).
- Dirty expiry: ``vol.dirty_inodes[delta]`` is ordered by ``Inode.dirtied`` (``Volume.clock()``) and its head's
  ``dirtied`` is never later than the oldest change still pending in the delta. The flusher sleeps until
  ``head.dirtied + interval`` (no fixed timer) and then commits, so a change is durable at most ``interval`` plus
  one commit after it was made, if no commit was in flight when its deadline came. Nothing dirty, no wake-ups.
- Touch: an inode dirtied again at least ``Options.touch_after`` (1 s) after its ``dirtied`` time moves to the
  tail with a new time (one O(1) move per second for a file being written, not one per write); if it was the head,
  the new head takes over its age, so touching never postpones expiry.
- Done: an inode leaves its delta's list when nothing of it is left to write for that delta. Every frontend change
  that dirties pages or truncates also changes the size or the times, which must be written, so the one case is an
  inode created and removed within the current delta (a temporary file): its pages are dropped and it never
  reaches the inode table (``Volume._maybe_dead``, counted as ``inodes_discarded``).
- Background writeback: once dirty data passes ``Options.background_bytes`` the flusher commits at once instead of
  waiting for expiry, so one commit never prepares much more than that (the prepare stage runs on the event loop).
- Time is ``trio.current_time`` while the flusher runs (``Volume.clock``), so tests drive it with a MockClock.

- fsync of one file (``sync(ino)``) names that file: a queued item of such requests carries the set of files, and
  its commit goes ahead of the rest of the delta with only those files when ``Volume.commit_ahead_pays`` says so
  (their names are committed, and the rest of the delta is large); a request for the whole delta turns the item
  into a whole-delta one.

Cancellation: a caller cancelled while it waits only stops waiting; a commit once started always ends. When the
flusher task ends, every request still waiting gets ``VolumeError`` and the volume goes back to embedded mode
(``Volume.sync`` commits by itself).
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
import time

import trio

from .fs import Volume, VolumeError

log = logging.getLogger("tux3fuse")


class Kind(enum.IntEnum):
    """What asked for a commit; a merged item keeps the most urgent kind."""

    PERIODIC = 0
    BACKGROUND = 1
    SYNC = 2


class Item:
    """One queued (or in-flight) request: the callers waiting on it are woken when ``delta`` is durable."""

    def __init__(self, kind: Kind, delta: int, inodes: set[int] | None = None) -> None:
        self.kind = kind
        self.delta = delta
        self.inodes = inodes  # fsyncs of these files only (the commit may go ahead of the delta); None: all
        self.waiters = 0
        self.done = trio.Event()
        self.error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()

    async def wait(self) -> None:
        self.waiters += 1
        await self.done.wait()
        if self.error is not None:
            raise self.error

    def __repr__(self) -> str:
        return f"<Item {self.kind.name.lower()} delta {self.delta} waiters {self.waiters}>"


def has_changes(vol: Volume, delta: int) -> bool:
    return bool(vol.dirty_inodes.get(delta)) or bool(vol.alloc.records)


class Flusher:
    """The work queue and its one worker task (``run``) for one volume."""

    def __init__(self, vol: Volume, interval: float | None = None) -> None:
        self.vol = vol
        # the age at which dirty state is committed (<= 0: never); default Options.commit_interval (commit=)
        self.interval = vol.options.commit_interval if interval is None else interval
        self.queue: list[Item] = []  # waiting for the next commit (coalescing keeps it to one item)
        self.inflight: Item | None = None  # the item whose commit is running
        self.inflight_delta = 0  # the delta that commit makes durable
        self.kick = trio.Event()
        self.running = False
        for key in ("flusher_items", "flusher_coalesced"):
            vol.counters[key] += 0

    # -- requests (any task) ---------------------------------------------------------------------------------------

    def target(self) -> int:
        """The delta that holds every change made so far."""
        vol = self.vol
        current = vol.deltas.current
        return current if has_changes(vol, current) else current - 1

    def request(self, kind: Kind, delta: int, ino: int | None = None) -> Item | None:
        """Queue a request for ``delta`` to be durable (with ``ino``: only that file's changes in it), or merge it
        into an item that covers it. None when it is durable already. Never waits."""
        vol = self.vol
        if delta <= vol.deltas.committed:
            return None
        if not self.running:
            raise VolumeError("the flusher is not running")
        inflight = self.inflight
        if inflight is not None and self.inflight_delta >= delta and (
                inflight.inodes is None or (ino is not None and ino in inflight.inodes)):
            item = inflight
        elif self.queue:
            item = self.queue[0]
            item.kind = max(item.kind, kind)
            if ino is None:
                item.inodes = None
            elif item.inodes is not None:
                item.inodes.add(ino)
        else:
            item = Item(kind, delta, None if ino is None else {ino})
            self.queue.append(item)
            vol.counters["flusher_items"] += 1
            self.kick.set()
            return item
        vol.counters["flusher_coalesced"] += 1
        return item

    async def sync(self, ino: int | None = None) -> None:
        """Return once everything changed before the call is durable (fsyncdir, ``tux3 sync``), or with ``ino``
        everything changed in that file (fsync). Waits for at most two commits: the one in flight and the next."""
        vol = self.vol
        vol.check_writable()
        if ino is None:
            item = self.request(Kind.SYNC, self.target())
        else:
            inode = vol.inodes.get(ino)
            if inode is None or not inode.dirty_deltas:
                return
            item = self.request(Kind.SYNC, max(inode.dirty_deltas), ino)
        if item is not None:
            await item.wait()

    async def throttle(self) -> None:
        """A writer over ``Options.dirty_limit`` waits here until the current delta is committed."""
        self.vol.check_writable()
        item = self.request(Kind.BACKGROUND, self.vol.deltas.current)
        if item is not None:
            await item.wait()

    # -- policy ----------------------------------------------------------------------------------------------------

    def deadline(self) -> float:
        """When the current delta expires: its oldest dirty inode's time plus the interval (inf: nothing dirty)."""
        vol = self.vol
        dirty = vol.dirty_inodes.get(vol.deltas.current)
        if not dirty or self.interval <= 0 or vol.failed is not None or vol.readonly:
            return math.inf
        head = next(iter(dirty.values()))
        return head.dirtied + self.interval

    def over_background(self) -> bool:
        vol = self.vol
        return vol.cache.dirty_pages * vol.blocksize >= vol.options.background_bytes

    def policy(self) -> Kind | None:
        """Whether to commit the current delta now, and why (None: sleep until ``deadline()`` or a kick)."""
        vol = self.vol
        if vol.failed is not None or vol.readonly or not has_changes(vol, vol.deltas.current):
            return None
        if self.over_background():
            return Kind.BACKGROUND
        if trio.current_time() >= self.deadline():
            return Kind.PERIODIC
        return None

    # -- the worker ------------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        self.kick.set()

    def _attach(self) -> None:
        vol = self.vol
        shift = trio.current_time() - vol.clock()
        for dirty in vol.dirty_inodes.values():  # keep the ages of inodes dirtied before the flusher started
            for inode in dirty.values():
                inode.dirtied += shift
        vol.clock = trio.current_time
        vol.on_background = vol.on_dirty = self._wake
        vol.flusher = self
        self.running = True

    def _detach(self) -> None:
        vol = self.vol
        self.running = False
        if vol.flusher is self:
            vol.flusher = None
            vol.on_background = vol.on_dirty = None
            shift = time.monotonic() - trio.current_time()
            for dirty in vol.dirty_inodes.values():
                for inode in dirty.values():
                    inode.dirtied += shift
            vol.clock = time.monotonic
        stopped = VolumeError(vol.failed or "the flusher stopped")
        for item in self.queue if self.inflight is None else [self.inflight, *self.queue]:
            item.finish(stopped)
        self.inflight, self.queue = None, []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve the queue until cancelled (start it with ``nursery.start``: it is attached once that returns)."""
        self._attach()
        task_status.started()
        try:
            while True:
                if not self.queue:
                    kind = self.policy()
                    if kind is not None:
                        self.request(kind, self.vol.deltas.current)
                if not self.queue:
                    with trio.move_on_at(self.deadline()):
                        await self.kick.wait()
                    self.vol.turn_started = time.perf_counter()
                    self.kick = trio.Event()
                    continue
                if not await self._commit():
                    return
        finally:
            self._detach()

    async def _commit(self) -> bool:
        """Commit for every queued item; False once the volume has failed."""
        vol = self.vol
        while vol.job is not None:  # a commit started before the flusher (or by a test): let it end first
            await vol.wait_job(vol.job)
            vol.turn_started = time.perf_counter()
        item = self.queue.pop(0)
        if vol.failed is not None or vol.readonly:
            item.finish(OSError(errno.EROFS, os.strerror(errno.EROFS)))
            return vol.failed is None
        # no checkpoint from here to the transition in commit_async: the delta it commits is the current one
        self.inflight, self.inflight_delta = item, vol.deltas.current
        try:
            urgent = item.kind is Kind.SYNC
            await vol.commit_async(inline_small=urgent and item.waiters <= 1, urgent=urgent, only=item.inodes)
        except VolumeError as e:
            log.error("commit of delta %d failed; the volume is read-only now", self.inflight_delta)
            self.inflight = None
            item.finish(e)
            for queued in self.queue:
                queued.finish(e)
            self.queue = []
            return False
        self.inflight = None
        item.finish()
        return True
