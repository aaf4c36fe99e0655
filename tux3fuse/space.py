"""Space accounting: what a write may take, and what ``statfs`` shows. (Blocks themselves are found by the
allocator, ``alloc.py``, when a commit maps them.)

Guarantees:
- A write never over-commits space: blocks are reserved before a page is dirtied (``reserve``), so a commit never
  fails for lack of space. The reservation counts every dirty page, a generous bound on the metadata its commit
  writes, the tree nodes the next unify writes, and a slack kept back for deletes and truncates (which must work
  on a full volume).
- Only blocks free in the bitmap count. Blocks that unlinks and truncates free are reusable once the commit that
  frees them is durable: when a write needs them, ``reserve`` raises ``WaitFor`` (the commit in flight holds them)
  or ``NeedSpace`` (a commit, a unify when tree nodes are to be freed, would free them), and never commits itself;
  the caller waits for that commit and tries once more (``last_try``), when ENOSPC is final.
- ``statfs`` shows what a user could write: free blocks, plus what the deltas not yet committed free (``freeing``),
  minus the reservation of the dirty data, minus the slack.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import format as fmt
from .backend.store import Backend
from .dirty import DirtyLists
from .failure import NeedSpace, WaitFor, err
from .inode import Inode
from .inodes import InodeCache

if TYPE_CHECKING:
    from .runner import Runner


class Space:
    def __init__(self, backend: Backend, icache: InodeCache, dirty: DirtyLists, runner: Runner) -> None:
        self.backend = backend
        self.icache = icache
        self.dirty = dirty
        self.runner = runner
        self.final = False  # ``last_try``: a commit was made for this write already

    @contextlib.contextmanager
    def last_try(self) -> Iterator[None]:
        """Within: ``reserve`` raises ENOSPC where it would raise ``NeedSpace`` (the commit was made already)."""
        self.final = True
        try:
            yield
        finally:
            self.final = False

    def meta_estimate(self, dirty_pages: int, dirty_inodes: int) -> int:
        """Blocks a commit may need for metadata beyond the data blocks (a generous upper bound)."""
        leaf = self.backend.leaf_capacity
        return 16 + 12 * dirty_inodes + (dirty_pages * 64) // leaf + (dirty_inodes * 160) // leaf

    def dirty_reservation(self, dead: int = 0) -> int:
        """Blocks the dirty pages and the commits of them may take; ``dead``: dirty inodes whose commit only drops
        them (they write no record)."""
        pages = self.icache.cache.dirty_pages
        inodes = max(0, self.dirty.count() - dead)
        return pages + self.meta_estimate(pages, inodes) + self.backend.unify_estimate()

    def slack(self) -> int:
        """Blocks kept back for deletes and truncates, which must work on a full volume."""
        return max(8, self.backend.sb.volblocks // 512)

    def room(self) -> int:
        """Blocks new dirty pages may take now without waiting for a commit: the free blocks less the reservation of
        the dirty data and the slack (``statfs`` adds what the deltas not yet committed free)."""
        return max(0, self.backend.free - self.dirty_reservation() - self.slack())

    def reserve(self, new_pages: int) -> None:
        """Make sure ``new_pages`` more dirty pages can be committed, or raise before anything changes."""
        be = self.backend
        need = self.dirty_reservation() + new_pages + self.meta_estimate(new_pages, 1)
        if need + self.slack() <= be.free:
            return
        if not self.final and (be.space_pending() or self.icache.cache.dirty_pages or self.dirty.count()):
            if self.runner.job is not None:  # the commit in flight holds the space: wait for it
                raise WaitFor(self.runner.job)
            raise NeedSpace(unify=be.needs_unify())
        raise err(errno.ENOSPC)

    def _mapped_from(self, inode: Inode, index: int) -> int:
        """Blocks the extent tree of ``inode`` maps at logical ``index`` and beyond."""
        tree = self.backend.dtree(inode)
        n = 0
        first = tree.floor(index)
        if first is not None and first[0] < index:
            n += max(0, first[0] + fmt.extent_head(first[1])[1] - index)
        for _, value in tree.items(index, None):
            n += fmt.extent_head(value)[1]
        return n

    def freeing(self) -> tuple[int, int]:
        """(blocks, inodes): blocks that the deltas not yet committed (the one in flight included) free: those
        freed already and waiting for their commit to be durable, the data of unlinked inodes that nothing holds
        open (and the dirty pages of theirs that no commit will write), and what truncates cut off; and how many
        of the dirty inodes are such unlinked ones (their commit only drops them)."""
        total, dead = self.backend.alloc.pending_count(), 0
        seen: dict[int, Inode] = {}
        for dirty in self.dirty.lists.values():
            seen.update(dirty)
        if self.runner.job is not None:
            seen.update((inode.ino, inode) for inode in self.runner.job.inodes)
        inodes = self.icache.inodes
        for ino, inode in seen.items():
            if inodes.get(ino) is not inode:  # destroyed by the commit in flight: its blocks are pending
                continue
            if inode.rec.nlink == 0 and inode.opens <= 0:
                total += inode.rec.blocks + inode.mapping.dirty_count()
                dead += 1
            elif inode.hole_from:
                total += self._mapped_from(inode, min(inode.hole_from.values()))
        return total, dead

    def statfs(self) -> dict[str, int]:
        be = self.backend
        freeing, dead = self.freeing()
        free = max(0, be.free + freeing - self.dirty_reservation(dead) - self.slack())
        per_block = max(1, be.blocksize // 128)
        ffree = max(0, min(free * per_block, fmt.MAX_INUM + 1 - be.next_inum))  # and inode numbers left
        return {
            "bsize": be.blocksize, "frsize": be.blocksize, "blocks": be.sb.volblocks,
            "bfree": free, "bavail": free, "files": be.used_inodes + ffree,
            "ffree": ffree, "namemax": fmt.NAME_MAX,
        }
