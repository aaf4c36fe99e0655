"""The backend's state, with one owner: the image, the superblock, the allocator, the inode table, the orphan tree,
the log chain and the unify bookkeeping.

Guarantees:
- Only the commit (``backend/commit.py``) and the load (``replay.py``) change this state; the frontend reaches it
  through a narrow interface that never changes anything on disk: inode-table reads (``lookup_inode``), extent
  lookups for reads (``dtree``, read-only for the frontend), block reads, space figures (``free``,
  ``unify_estimate``) and inode numbers (``new_inum``, ``inode_gone``).
- Between two commits the trees and the bitmap hold exactly the last committed delta (plus the tree nodes a unify
  has still to write): the replay invariant (``replaycheck.py``) compares them with what a mount rebuilds.
- The tree store (``read_block``, ``alloc_meta``, ``free_meta``, ``write_meta``): a tree node a commit writes goes
  to the write buffer of that commit (``writes``, handed over by ``CommitJob`` with ``take_writes``); one that
  leaves its tree stays allocated until the next unify (``unify_frees``), since the trees on disk point at it.
- Every tree it makes (``tree``) checks each node it reads (``validity.node_check``): no pointer read from disk
  leads outside the allocatable area, and a new inode number is one no inode of the table holds (``new_inum``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import format as fmt
from ..alloc import Allocator
from ..device import Device
from ..validity import node_check
from .btree import BTree

if TYPE_CHECKING:
    from ..inode import Inode


class Backend:
    def __init__(self, path: str, dev: Device, sb: fmt.Super, alloc: Allocator, readonly: bool) -> None:
        self.path = path
        self.dev = dev
        self.sb = sb
        self.readonly = readonly
        self.blocksize = bs = sb.blocksize
        self.leaf_capacity = fmt.leaf_capacity(bs)  # bytes of entries one btree leaf holds
        self.alloc = alloc
        self.bitmap_damage: list[tuple[int, int, str]] = []  # a read-only load's corrupt bitmap blocks
        first = fmt.reserved_blocks(bs) + 2 * sb.bitmap_blocks
        alloc.meta_goal = first  # metadata from the front, data from a sixteenth of the way in
        alloc.goal = first + (sb.volblocks - first) // 16
        self.itable = self.tree(fmt.KIND_ILEAF, sb.itree_root)
        self.otree = self.tree(fmt.KIND_OLEAF, sb.otree_root)
        self.log_blocks: list[int] = []  # the log chain since the last unify, oldest first
        self.deltas_since_unify = sb.seq - sb.unify_seq
        self.unflushed: dict[int, Inode] = {}  # inodes whose extent tree has changes only the log holds
        self.unify_frees: list[int] = []  # tree nodes dropped since the last unify; the trees on disk use them
        self.unify_nodes = 0  # extent tree nodes the next unify writes (at most)
        self.used_inodes = sb.used_inodes
        self.next_inum = sb.next_inum
        self.writes: list[tuple[int, bytes | bytearray]] = []  # the write buffer of the commit in flight

    def reset(self, alloc: Allocator) -> None:
        """The trees and the bitmap as the last unify wrote them, before any log record (a replay starts here)."""
        self.alloc = alloc
        self.itable = self.tree(fmt.KIND_ILEAF, self.sb.itree_root)
        self.otree = self.tree(fmt.KIND_OLEAF, self.sb.otree_root)
        self.unflushed = {}
        self.unify_frees = []
        self.unify_nodes = 0

    # -- the tree store --------------------------------------------------------------------------------------------

    def tree(self, kind: bytes, root: int, owner: str = "") -> BTree:
        """The tree of leaf ``kind`` rooted at block ``root`` (0: empty), every node it reads checked; ``owner``
        ("inode 12") starts what a check finds wrong."""
        return BTree(self, kind, root, node_check(self.sb, kind, owner))

    def read_block(self, block: int) -> bytes:
        return self.dev.read_block(block)

    def alloc_meta(self) -> int:
        return self.alloc.alloc_run(1, meta=True)[0]

    def alloc_log_block(self) -> int:
        start, _ = self.alloc.alloc_run(1, meta=True)
        self.alloc.records.pop()  # a log block's own allocation is implied by the chain
        return start

    def free_meta(self, block: int) -> None:
        """A tree node left its tree: the trees on disk point at it until the next unify, which frees it."""
        self.unify_frees.append(block)

    def write_meta(self, block: int, data: bytearray) -> None:
        self.writes.append((block, data))

    def take_writes(self, writes: list) -> None:
        """The commit in flight collects the tree nodes written from now on in ``writes``."""
        self.writes = writes

    # -- what the frontend may ask ---------------------------------------------------------------------------------

    def lookup_inode(self, ino: int) -> bytes | None:
        """The inode table's record of ``ino`` as of the last commit (packed), or None."""
        return self.itable.lookup(ino)

    def dtree(self, inode: Inode) -> BTree:
        """The extent tree of ``inode`` (loaded on first use; the frontend only looks blocks up in it)."""
        if inode.dtree is None:
            inode.dtree = self.tree(fmt.KIND_DLEAF, inode.rec.dtree_root, f"inode {inode.ino}")
        return inode.dtree

    def inums_left(self) -> bool:
        """Is an inode number left to hand out (``MAX_INUM`` is the last)?"""
        return self.next_inum <= fmt.MAX_INUM

    def new_inum(self) -> int:
        """A new inode number, counted in use; CorruptBlock when the inode table holds it already (a superblock
        whose ``next_inum`` is not above every inode: fsck.tux3 sets it right)."""
        ino = self.next_inum
        if self.itable.lookup(ino) is not None:
            raise fmt.CorruptBlock(self.sb.itree_root, "ileaf", f"the next inode number {ino} is in use")
        self.next_inum += 1
        self.used_inodes += 1
        return ino

    def inode_gone(self) -> None:
        """An inode created and removed before any commit wrote it: it no longer counts."""
        self.used_inodes -= 1

    @property
    def free(self) -> int:
        """Blocks free in the bitmap (those freed by deltas not yet durable not included)."""
        return self.alloc.free

    def unify_estimate(self) -> int:
        """Blocks the next unify may need for the tree nodes changed since the last one (a generous bound)."""
        return self.unify_nodes + self.itable.dirty_nodes + self.otree.dirty_nodes

    def space_pending(self) -> bool:
        """Would a commit (a unify when ``unify_frees`` or ``unflushed``) make blocks free?"""
        return bool(self.alloc.pending or self.unify_frees or self.unify_nodes)

    def needs_unify(self) -> bool:
        return bool(self.unify_frees or self.unflushed)
