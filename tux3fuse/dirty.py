"""The per-delta dirty-inode lists (Tux3's ``inode_writeback_done`` / ``inode_writeback_touch``).

Guarantees:
- ``lists[delta]`` holds every inode changed in ``delta`` and not yet written for it, in the order of
  ``Inode.dirtied`` (``clock()``), and its head's ``dirtied`` is never later than the oldest change still pending
  in the delta: the flusher sleeps until ``head.dirtied + interval``.
- Touch: an inode dirtied again at least ``touch_after`` after its ``dirtied`` time moves to the tail with a new
  time (one O(1) move per second for a file being written, not one per write); if it was the head, the new head
  takes over its age, so touching never postpones expiry.
- Done: an inode leaves its delta's list when nothing of it is left to write for that delta (``done``): the one
  case is an inode created and removed within the current delta, whose pages are dropped.
- ``mark`` forks the inode's attributes first when an older delta still has to write them (``Inode.attr_dirty``).
- The first inode of a delta calls ``on_dirty`` (the flusher's wake-up); ``clock`` is the flusher's while it runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from .format import InodeRecord
from .inode import Inode


class DirtyLists:
    def __init__(self, touch_after: float, counters: Counter[str]) -> None:
        self.lists: dict[int, dict[int, Inode]] = {}
        self.touch_after = touch_after
        self.counters = counters
        self.clock: Callable[[], float] = time.monotonic
        self.on_dirty: Callable[[], None] | None = None

    def mark(self, inode: Inode, delta: int) -> InodeRecord:
        """Prepare to change an inode in ``delta``: fork its attributes if needed and put it on the delta's list;
        returns the attributes to change."""
        if inode.attr_dirty(delta):
            self.counters["attr_forks"] += 1
        rec = inode.rec
        inode.dirty_deltas.add(delta)
        dirty = self.lists.get(delta)
        if dirty is None:
            dirty = self.lists[delta] = {}
            if self.on_dirty is not None:
                self.on_dirty()
        if inode.ino not in dirty:
            inode.dirtied = self.clock()
            dirty[inode.ino] = inode
        elif (now := self.clock()) - inode.dirtied >= self.touch_after:  # touch: move to the tail
            del dirty[inode.ino]
            self._inherit_head(dirty, inode.dirtied)
            inode.dirtied = now
            dirty[inode.ino] = inode
        return rec

    @staticmethod
    def _inherit_head(dirty: dict[int, Inode], dirtied: float) -> None:
        """An inode left the head of a dirty list: the new head takes over its age."""
        for head in dirty.values():
            if head.dirtied > dirtied:
                head.dirtied = dirtied
            return

    def done(self, inode: Inode, delta: int) -> None:
        """Take an inode off ``delta``'s list, nothing of it being left to write for that delta."""
        dirty = self.lists.get(delta)
        if dirty is None or dirty.pop(inode.ino, None) is None:
            return
        inode.dirty_deltas.discard(delta)
        if dirty:
            self._inherit_head(dirty, inode.dirtied)
        else:
            del self.lists[delta]

    def get(self, delta: int) -> dict[int, Inode]:
        return self.lists.get(delta) or {}

    def take(self, delta: int) -> dict[int, Inode]:
        """Hand ``delta``'s list to its commit."""
        return self.lists.pop(delta, {})

    def count(self) -> int:
        return sum(len(d) for d in self.lists.values())

    def head(self, delta: int) -> Inode | None:
        """The inode changed longest ago among those pending in ``delta``."""
        return next(iter((self.lists.get(delta) or {}).values()), None)

    def shift(self, by: float) -> None:
        """Move every ``dirtied`` time by ``by`` (the clock changes: the flusher starts or stops)."""
        for dirty in self.lists.values():
            for inode in dirty.values():
                inode.dirtied += by
