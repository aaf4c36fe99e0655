"""In-core inodes: attributes with per-delta snapshots, kernel references, open counts, the page cache.

Guarantee: the backend committing delta N reads the attributes as they were at the end of delta N
(``attrs_for``), never changes made in a later delta: the first attribute change in a new delta saves a snapshot
of the old delta's attributes first (an attribute fork).
"""

from __future__ import annotations

import stat
from dataclasses import replace

from .cache import AddressSpace
from .format import InodeRecord


class Inode:
    def __init__(self, ino: int, rec: InodeRecord, mapping: AddressSpace, on_disk: bool) -> None:
        self.ino = ino
        self.rec = rec  # live attributes (frontend view)
        self.mapping = mapping
        self.on_disk = on_disk  # the inode table holds a record for it
        self.lookups = 0  # kernel references (lookup count)
        self.opens = 0
        self.attr_delta = -1  # delta whose changes the live attributes hold
        self.snapshots: dict[int, InodeRecord] = {}  # attributes of older deltas still to commit
        self.dirty_deltas: set[int] = set()
        self.dirtied = 0.0  # DirtyLists.clock() when it entered (or was last touched on) its delta's dirty list
        self.hole_from: dict[int, int] = {}  # delta -> lowest block index truncated away in it
        self.dtree = None  # extent tree, loaded on demand
        self.dir = None  # directory index, loaded on demand

    @property
    def mode(self) -> int:
        return self.rec.mode

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.rec.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.rec.mode)

    def attr_dirty(self, delta: int) -> bool:
        """Prepare to change attributes in ``delta`` (then change ``rec``); True when this forked the attributes
        of an older delta that is still to be committed."""
        forked = False
        if self.attr_delta != delta:
            if self.attr_delta >= 0 and self.attr_delta in self.dirty_deltas:
                self.snapshots[self.attr_delta] = replace(self.rec, xattrs=dict(self.rec.xattrs))
                forked = True
            self.attr_delta = delta
        return forked

    def attrs_for(self, delta: int) -> InodeRecord:
        """Attributes as of the end of ``delta`` (the backend's view)."""
        return self.snapshots.get(delta, self.rec)

    def committed(self, delta: int) -> None:
        self.snapshots.pop(delta, None)
        self.dirty_deltas.discard(delta)
        self.hole_from.pop(delta, None)

    @property
    def dead(self) -> bool:
        """No name, no kernel reference, not open: its blocks can be reclaimed."""
        return self.rec.nlink == 0 and self.lookups <= 0 and self.opens <= 0
