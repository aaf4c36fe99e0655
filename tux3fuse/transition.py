"""The delta transition: the moment delta N stops taking changes and is handed to the backend as it stands.

Guarantees:
- ``transition`` makes N+1 current (``Deltas.transition``: never while a change holds a pin), takes N's dirty-inode
  list, and before the frontend runs again write-protects N's pages in every shared mapping and gives the backend
  a private copy of every pinned page (``AddressSpace.protect_for_writeout``), so that a store or a pin write made
  after the transition can only land in N+1.
- A commit of one file ahead of its delta (an fsync): with ``only``, the changes of every other inode move to N+1
  right after the transition (``split``), so N holds only those of ``only``. Only inodes for which
  ``can_commit_ahead`` holds may be in ``only``: regular files whose names are all committed, so that a state with
  only their data and attributes newer is one the namespace allows (ext4's fast-commit eligibility).
- ``Taken.used_inodes`` counts the inodes in use as of N: new inodes moved to N+1 by a split are not counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .backend.store import Backend
from .delta import Deltas
from .dirty import DirtyLists
from .format import InodeRecord
from .inode import Inode
from .inodes import InodeCache
from .options import Options


@dataclass
class Taken:
    """What a transition hands to the commit of ``delta``."""

    delta: int
    dirty: dict[int, Inode]
    used_inodes: int


class Transition:
    def __init__(self, deltas: Deltas, dirty: DirtyLists, backend: Backend, icache: InodeCache, options: Options,
                 counters: Counter[str]) -> None:
        self.deltas = deltas
        self.dirty = dirty
        self.backend = backend
        self.icache = icache
        self.options = options
        self.counters = counters

    def transition(self, only: set[int] | None = None) -> Taken:
        """Transition the current delta (with ``only``: split first) and take it for its commit."""
        delta = self.deltas.transition()
        uncounted = self.split(delta, only) if only is not None else 0
        dirty = self.dirty.take(delta)
        current = self.deltas.current
        bs = self.backend.blocksize
        for inode in dirty.values():
            moved = inode.mapping.protect_for_writeout(delta, current)
            if moved:  # pinned pages moved to the new delta: the inode is dirty there too
                self.dirty.mark(inode, current)
                self.counters["pinned_copies"] += moved
                self.counters["bytes_copied"] += moved * bs
        return Taken(delta, dirty, self.backend.used_inodes - uncounted)

    def can_commit_ahead(self, ino: int) -> bool:
        """May this inode's changes in the current delta be committed before the rest of the delta? Yes for a
        regular file whose names are all committed already: the inode table holds it with the same link count."""
        inode = self.icache.inodes.get(ino)
        if inode is None or not inode.is_reg or not inode.on_disk or inode.rec.nlink == 0:
            return False
        raw = self.backend.lookup_inode(ino)
        return raw is not None and InodeRecord.unpack(raw).nlink == inode.rec.nlink

    def commit_ahead_pays(self, only: set[int]) -> bool:
        """Commit ``only`` ahead of its delta when every one may be, and the rest of the delta holds more than
        ``Options.fsync_ahead_bytes`` of dirty data (below that, one commit of the whole delta costs about the
        same and also makes the other files durable, which group commit of many fsyncing files relies on)."""
        delta = self.deltas.current
        dirty = self.dirty.get(delta)
        if self.options.fsync_ahead_bytes < 0 or len(dirty) <= len(only):  # nothing else (the usual fsync)
            return False
        rest = sum(len(inode.mapping.dirty.get(delta, ())) for ino, inode in dirty.items() if ino not in only)
        return (rest * self.backend.blocksize > self.options.fsync_ahead_bytes
                and all(map(self.can_commit_ahead, only)))

    def split(self, delta: int, only: set[int]) -> int:
        """Right after the transition of ``delta``: move the changes of every inode not in ``only`` to the delta
        now current (which has none yet), so that ``delta`` holds only those of ``only``. Costs one pass over the
        moved inodes' dirty pages. Returns how many of the moved inodes were created and not yet committed."""
        later = self.deltas.current
        lists = self.dirty.lists
        dirty = lists.pop(delta, {})
        kept = {ino: inode for ino, inode in dirty.items() if ino in only}
        moved = {ino: inode for ino, inode in dirty.items() if ino not in only}
        if later in lists or any(later in inode.dirty_deltas for inode in moved.values()):
            raise AssertionError(f"delta {later} changed before the split of delta {delta}")
        if kept:
            lists[delta] = kept
        if moved:
            lists[later] = moved
        for inode in moved.values():
            inode.dirty_deltas.discard(delta)
            inode.dirty_deltas.add(later)
            if inode.attr_delta == delta:
                inode.attr_delta = later
            if delta in inode.hole_from:
                inode.hole_from[later] = inode.hole_from.pop(delta)
            inode.mapping.retag(delta, later)
        self.counters["commits_ahead"] += 1
        self.counters["inodes_moved_by_split"] += len(moved)
        return sum(not inode.on_disk for inode in moved.values())  # created, not yet committed
