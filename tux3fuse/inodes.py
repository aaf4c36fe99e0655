"""The inode cache: the in-core inodes of a volume by number, each with its address space, and their attributes
as the embedded API returns them.

Guarantees:
- One ``Inode`` object per inode number while the inode is in memory (``iget`` loads it from the inode table of
  the last commit the first time); an inode with dirty state or a kernel reference is never dropped.
- An inode record read from the table is checked before use (``validity.read_inode``): one that fails is a
  ``CorruptBlock`` naming its leaf, the inode and why, and no inode is made of it.
- ``forget_inode`` drops an inode with its pages, dirty ones included: only for an inode that nothing will write
  any more (destroyed by a commit, or created and removed within the current delta).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from .backend.store import Backend
from .cache import AddressSpace, PageCache
from .failure import err
from .format import CorruptBlock, InodeRecord
from .inode import Inode
from .validity import read_inode


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class InodeCache:
    def __init__(self, backend: Backend, cache_bytes: int) -> None:
        self.backend = backend
        self.blocksize = backend.blocksize
        self.inodes: dict[int, Inode] = {}
        self.registry: dict[int, AddressSpace] = {}  # every address space, by inode number (the LRU evicts by it)
        self.cache = PageCache(cache_bytes, backend.blocksize)

    def iget(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is not None:
            return inode
        be = self.backend
        raw = be.lookup_inode(ino)
        if raw is None:
            raise err(errno.ENOENT, f"inode {ino}")
        try:
            rec = read_inode(ino, raw, be.sb, be.next_inum)
        except ValueError as e:
            raise CorruptBlock(be.itable.leaf_block(ino), "ileaf", f"inode {ino}: {e}") from None
        return self.new_inode(ino, rec, on_disk=True)

    def new_inode(self, ino: int, rec: InodeRecord, on_disk: bool) -> Inode:
        mapping = AddressSpace(ino, self.cache, self.registry)
        self.registry[ino] = mapping
        inode = Inode(ino, rec, mapping, on_disk)
        self.inodes[ino] = inode
        return inode

    def forget_inode(self, inode: Inode) -> None:
        inode.mapping.drop_all()
        self.inodes.pop(inode.ino, None)

    def clear(self) -> None:
        """Forget every inode (a replay starts over)."""
        self.inodes = {}

    def attr(self, inode: Inode) -> Attr:
        r = inode.rec
        pending = inode.mapping.dirty_count()
        return Attr(inode.ino, r.mode, r.nlink, r.uid, r.gid, r.rdev, r.size,
                    (r.blocks + pending) * (self.blocksize // 512), self.blocksize, r.atime_ns, r.mtime_ns,
                    r.ctime_ns)
