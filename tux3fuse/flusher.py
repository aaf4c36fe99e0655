"""The flusher: decides when the current delta is committed, and is the one place a commit starts.

It is the userspace counterpart of Tux3's fs-writeback hook. Requests are items on a work queue, each naming the
delta it needs durable:

| kind           | made by                                                                 | commit I/O    |
|----------------|-------------------------------------------------------------------------|---------------|
| ``periodic``   | the flusher, when the oldest dirty inode is ``interval`` old            | worker thread |
| ``background`` | the flusher, over ``Options.background_bytes``; a throttled writer; a   | worker thread |
|                | writer that needs space freed by earlier deltas (then maybe a unify)    |               |
| ``sync``       | fsync, fsyncdir, ``tux3 sync`` (``Volume.sync``)                        | loop if small |

Guarantees:
- Every commit starts in ``Flusher.start_commit`` (the transition, ``transition.py``, and the job, which the
  runner, ``runner.py``, drives), and at most one commit is in flight. While the worker task runs (``run``: the
  daemon) only it commits: ``Volume.sync``, ``Volume.fsync`` and a writer that must wait (``Volume.call``:
  ``Throttled``) hand it their request and wait. A volume used without a worker (embedded use, mount, unmount,
  repairs) drives the same code synchronously (``commit_now``) or from its caller's task (``sync``, ``throttle``):
  one policy either way.
- A request returns once the delta it names is durable, or raises: ``VolumeError`` when the commit failed (the
  volume is read-only from then on), EROFS when the volume had already failed. A request names the current delta
  if that holds a change, otherwise the delta before it: a sync with nothing new to commit causes no commit.
- Coalescing: a request is covered by the commit in flight when that commit's delta is at least the one it names
  (and, for a commit ahead of its delta, holds the requesting file), and by any queued item (a queued item commits
  the delta current when it starts, which is at least the one any request names now). A covered request merges
  into that item (``flusher_coalesced``); otherwise it becomes a new item (``flusher_items``). So the queue never
  holds more than one item, and N concurrent syncs share commits: those that arrive while a commit is in flight
  share the next one (group commit).
- Dirty expiry: the dirty-inode lists (``dirty.py``, with their touch and done rules) keep the head of a delta's
  list no later than its oldest pending change. The flusher sleeps until ``head.dirtied + interval`` (no fixed
  timer) and then commits, so a change is durable at most ``interval`` plus one commit after it was made, if no
  commit was in flight when its deadline came. Nothing dirty, no wake-ups.
- Background writeback: once dirty data passes ``Options.background_bytes`` the flusher commits at once instead of
  waiting for expiry, so one commit never prepares much more than that (the prepare stage runs on the event loop).
- Time is ``trio.current_time`` while the flusher runs (``DirtyLists.clock``), so tests drive it with a MockClock.

- fsync of one file (``sync(ino)``) names that file: a queued item of such requests carries the set of files, and
  its commit goes ahead of the rest of the delta with only those files when ``Transition.commit_ahead_pays`` says so
  (their names are committed, and the rest of the delta is large); a request for the whole delta turns the item
  into a whole-delta one.

Cancellation: a caller cancelled while it waits only stops waiting; a commit once started always ends. When the
worker task ends, every request still waiting gets ``VolumeError`` and the volume goes back to its own flusher,
which commits from its callers (embedded mode).
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
import time
from typing import TYPE_CHECKING

from .backend.commit import CommitJob
from .failure import VolumeError

if TYPE_CHECKING:
    from .fs import Volume

log = logging.getLogger("tux3fuse")


class Kind(enum.IntEnum):
    """What asked for a commit; a merged item keeps the most urgent kind."""

    PERIODIC = 0
    BACKGROUND = 1
    SYNC = 2


class Item:
    """One queued (or in-flight) request: the callers waiting on it are woken when ``delta`` is durable."""

    def __init__(self, kind: Kind, delta: int, inodes: set[int] | None = None, unify: bool = False) -> None:
        self.kind = kind
        self.delta = delta
        self.unify = unify  # the commit must be a unify (a writer waits for the tree nodes it frees)
        self.inodes = inodes  # fsyncs of these files only (the commit may go ahead of the delta); None: all
        self.waiters = 0
        import trio

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
    return bool(vol.dirty.lists.get(delta)) or bool(vol.backend.alloc.records)


class Flusher:
    """The work queue and its one worker task (``run``) for one volume; every commit starts here."""

    def __init__(self, vol: Volume, interval: float | None = None) -> None:
        self.vol = vol
        # the age at which dirty state is committed (<= 0: never); default Options.commit_interval (commit=)
        self.interval = vol.options.commit_interval if interval is None else interval
        self.queue: list[Item] = []  # waiting for the next commit (coalescing keeps it to one item)
        self.inflight: Item | None = None  # the item whose commit is running
        self.inflight_delta = 0  # the delta that commit makes durable
        self.kick = None  # a trio.Event while the worker runs: set to wake it
        self.running = False
        self.previous: Flusher | None = None  # the volume's own flusher while this one's worker runs
        for key in ("flusher_items", "flusher_coalesced"):
            vol.counters[key] += 0

    # -- starting a commit: the one place ----------------------------------------------------------------------

    def start_commit(self, *, unify: bool = False, state: int | None = None, prepare: bool = True,
                     urgent: bool = False, only: set[int] | None = None) -> CommitJob:
        """Transition the current delta and make its commit the one in flight (stage 1 done with ``prepare``;
        otherwise the runner or a test steps ``job.prepare_steps()``). With ``only`` (inodes for which
        ``Transition.can_commit_ahead`` holds) the delta is split first, and the commit holds only theirs."""
        vol = self.vol
        vol.health.check_writable()
        runner = vol.runner
        if runner.job is not None:
            raise AssertionError("a commit is already in flight")
        taken = vol.transition.transition(only)
        job = runner.job = CommitJob(vol.backend, taken.delta, taken.dirty, taken.used_inodes,
                                     forget=vol.icache.forget_inode, options=vol.options, counters=vol.counters,
                                     unify=unify, state=state, urgent=urgent, ended=runner.end)
        if prepare:
            runner.prepare(job)
        return job

    def commit_now(self, *, unify: bool = False, state: int | None = None, only: set[int] | None = None) -> bool:
        """Commit the current delta synchronously (embedded use without an event loop, mount, unmount, repairs).
        Returns True if anything was written; False on a read-only volume."""
        vol = self.vol
        if vol.readonly:
            return False
        if vol.runner.job is not None:
            raise AssertionError("synchronous commit while a commit is in flight")
        return vol.runner.run_sync(self.start_commit(unify=unify, state=state, only=only))

    async def commit_async(self, *, unify: bool = False, state: int | None = None, inline_small: bool = False,
                           only: set[int] | None = None, urgent: bool | None = None) -> int:
        """Commit the current delta beside the frontend (the runner: prepare and complete in slices on the loop,
        the I/O in a thread); returns the delta committed. Waits for a commit already in flight first. ``only``:
        as in ``start_commit``, re-checked once the commit in flight has ended (a whole-delta commit if it no
        longer pays)."""
        vol = self.vol
        await vol.runner.idle()
        if only is not None and not vol.transition.commit_ahead_pays(only):
            only = None
        urgent = inline_small if urgent is None else urgent
        job = self.start_commit(unify=unify, state=state, prepare=False, urgent=urgent, only=only)
        return await vol.runner.run(job, inline_small=inline_small, urgent=urgent)

    # -- requests (any task) ---------------------------------------------------------------------------------------

    def target(self) -> int:
        """The delta that holds every change made so far."""
        vol = self.vol
        current = vol.deltas.current
        return current if has_changes(vol, current) else current - 1

    def request(self, kind: Kind, delta: int, ino: int | None = None, unify: bool = False) -> Item | None:
        """Queue a request for ``delta`` to be durable (with ``ino``: only that file's changes in it; with
        ``unify``: by a unify), or merge it into an item that covers it. None when it is durable already. Never
        waits."""
        vol = self.vol
        if delta <= vol.deltas.committed:
            return None
        if not self.running:
            raise VolumeError("the flusher is not running")
        inflight = self.inflight
        if inflight is not None and self.inflight_delta >= delta and not unify and (
                inflight.inodes is None or (ino is not None and ino in inflight.inodes)):
            item = inflight
        elif self.queue:
            item = self.queue[0]
            item.kind = max(item.kind, kind)
            item.unify = item.unify or unify
            if ino is None:
                item.inodes = None
            elif item.inodes is not None:
                item.inodes.add(ino)
        else:
            item = Item(kind, delta, None if ino is None else {ino}, unify)
            self.queue.append(item)
            vol.counters["flusher_items"] += 1
            self._wake()
            return item
        vol.counters["flusher_coalesced"] += 1
        return item

    async def sync(self, ino: int | None = None) -> None:
        """Return once everything changed before the call is durable (fsyncdir, ``tux3 sync``), or with ``ino``
        everything changed in that file (fsync). Waits for at most two commits: the one in flight and the next.
        Without a worker the caller's task commits (``_sync_here``)."""
        vol = self.vol
        vol.check_writable()
        if not self.running:
            await self._sync_here(ino)
            return
        if ino is None:
            item = self.request(Kind.SYNC, self.target())
        else:
            inode = vol.icache.inodes.get(ino)
            if inode is None or not inode.dirty_deltas:
                return
            item = self.request(Kind.SYNC, max(inode.dirty_deltas), ino)
        if item is not None:
            await item.wait()

    async def throttle(self, unify: bool = False) -> None:
        """A writer over ``Options.dirty_limit``, or one that needs space earlier deltas free, waits here until the
        current delta is committed (by a unify with ``unify``). Without a worker the caller's task commits."""
        vol = self.vol
        vol.check_writable()
        if vol.runner.job is not None:  # the commit in flight may be enough: the writer tries again after it
            await vol.runner.wait_job(vol.runner.job)
            return
        if not self.running:
            await self.commit_async(unify=unify)
            return
        item = self.request(Kind.BACKGROUND, vol.deltas.current, unify=unify)
        if item is not None:
            await item.wait()

    async def _sync_here(self, ino: int | None) -> None:
        """``sync`` without a worker: the same decisions, the commits made from the caller's task."""
        vol = self.vol
        if ino is not None:
            inode = vol.icache.inodes.get(ino)
            if inode is None:
                return
            while vol.runner.job is not None and inode.dirty_deltas:
                await vol.runner.wait_job(vol.runner.job)
            if not inode.dirty_deltas:
                return
            if vol.deltas.current in inode.dirty_deltas and vol.transition.commit_ahead_pays({ino}):
                await self.commit_async(inline_small=True, only={ino})
                return
        target = vol.deltas.current
        while vol.deltas.committed < target:
            vol.check_writable()
            if vol.runner.job is not None:
                await vol.runner.wait_job(vol.runner.job)
                continue
            if not has_changes(vol, vol.deltas.current) and vol.deltas.committed >= target - 1:
                return  # nothing was changed in the delta we would commit
            await self.commit_async(inline_small=True)

    # -- policy ----------------------------------------------------------------------------------------------------

    def deadline(self) -> float:
        """When the current delta expires: its oldest dirty inode's time plus the interval (inf: nothing dirty)."""
        vol = self.vol
        head = vol.dirty.head(vol.deltas.current)
        if head is None or self.interval <= 0 or vol.failed is not None or vol.readonly:
            return math.inf
        return head.dirtied + self.interval

    def over_background(self) -> bool:
        vol = self.vol
        return vol.icache.cache.dirty_pages * vol.blocksize >= vol.options.background_bytes

    def policy(self) -> Kind | None:
        """Whether to commit the current delta now, and why (None: sleep until ``deadline()`` or a kick)."""
        vol = self.vol
        if vol.failed is not None or vol.readonly or not has_changes(vol, vol.deltas.current):
            return None
        if self.over_background():
            return Kind.BACKGROUND
        import trio

        if trio.current_time() >= self.deadline():
            return Kind.PERIODIC
        return None

    # -- the worker ------------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self.kick is not None:
            self.kick.set()

    def _attach(self) -> None:
        import trio

        vol = self.vol
        if vol.flusher.running:
            raise AssertionError("a flusher is running already")
        dirty = vol.dirty
        dirty.shift(trio.current_time() - dirty.clock())  # keep the ages of inodes dirtied before the start
        dirty.clock = trio.current_time
        vol.files.on_background = dirty.on_dirty = self._wake
        self.previous, vol.flusher = vol.flusher, self
        self.kick = trio.Event()
        self.running = True

    def _detach(self) -> None:
        import trio

        vol = self.vol
        self.running = False
        if vol.flusher is self:
            vol.flusher = self.previous or Flusher(vol)
            dirty = vol.dirty
            vol.files.on_background = dirty.on_dirty = None
            dirty.shift(time.monotonic() - trio.current_time())
            dirty.clock = time.monotonic
        stopped = VolumeError(vol.failed or "the flusher stopped")
        for item in self.queue if self.inflight is None else [self.inflight, *self.queue]:
            item.finish(stopped)
        self.inflight, self.queue = None, []

    async def run(self, *, task_status=None) -> None:
        """Serve the queue until cancelled (start it with ``nursery.start``: it is attached once that returns)."""
        import trio

        self._attach()
        if task_status is not None:
            task_status.started()
        try:
            while True:
                if not self.queue:
                    kind = self.policy()
                    if kind is not None:
                        self.request(kind, self.vol.deltas.current)
                if not self.queue:
                    deadline = self.deadline()
                    if deadline == math.inf:  # nothing dirty: no timer (a cancel scope costs each fsync's commit)
                        await self.kick.wait()
                    else:
                        with trio.move_on_at(deadline):
                            await self.kick.wait()
                    self.vol.runner.turn_started = time.perf_counter()
                    self.kick = trio.Event()
                    continue
                if not await self._commit():
                    return
        finally:
            self._detach()

    async def _commit(self) -> bool:
        """Commit for every queued item; False once the volume has failed."""
        vol = self.vol
        await vol.runner.idle()  # a commit started before the worker (or by a test): let it end first
        item = self.queue.pop(0)
        if vol.failed is not None or vol.readonly:
            item.finish(OSError(errno.EROFS, os.strerror(errno.EROFS)))
            return vol.failed is None
        # no checkpoint from here to the transition in commit_async: the delta it commits is the current one
        self.inflight, self.inflight_delta = item, vol.deltas.current
        try:
            urgent = item.kind is Kind.SYNC
            await self.commit_async(inline_small=urgent and item.waiters <= 1, urgent=urgent, only=item.inodes,
                                    unify=item.unify)
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
