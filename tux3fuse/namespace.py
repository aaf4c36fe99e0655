"""Namespace operations: names in directories, links, renames, extended attributes, and the lifetime of inodes
(kernel references, opens, and the end of an inode nothing names or holds).

Guarantees:
- Every operation checks everything it can refuse (names, types, emptiness, loops of directories, space) and reads
  every block it will change (the directory blocks its entries are in or go to: ``DirIndex.place``,
  ``DirIndex.block_of``) before it changes anything, and then makes all of its changes within one delta: a
  rename, a link or an unlink is atomic on disk (the delta is). A device error therefore fails an operation
  before its first change, with EIO and nothing else; should anything fail after it, the delta is never
  committed (``Deltas.on_abort``: the volume turns read-only).
- Directory blocks are pages of the directory's file, changed through ``Files.write_page`` like file data (so a
  directory block under writeback is forked, or waited for, like any page).
- An inode with no name, no kernel reference and not open is dead (``maybe_dead``): created within the current
  delta, it is dropped at once (``DirtyLists.done``, counted as ``inodes_discarded``); otherwise it is dirtied for
  the current delta, whose commit destroys it (only the last delta that dirtied it does, ``CommitJob``).
- A readdir position stays valid while names come and go: a listing resumed from any position it returned neither
  repeats nor skips a name; with ``dots`` it begins with "." and ".." (``readdir``).
- A link count is never taken below what the names need: an inode a name reaches has at least one link (a
  directory two), and a directory that loses a subdirectory had at least three. An inode read from disk that
  breaks this (``_named``, ``_losing_subdir``) is a ``CorruptDir``/``CorruptBlock``, raised before anything changes,
  never a negative count in a commit.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator

from . import format as fmt
from .backend.store import Backend
from .delta import Deltas
from .dir import CorruptDir, DirIndex, Place
from .dirty import DirtyLists
from .failure import Health, err
from .fileio import Files
from .format import ROOT_INO, CorruptBlock, InodeRecord
from .inode import Inode
from .inodes import Attr, InodeCache
from .space import Space

DT_OF_MODE = {stat.S_IFREG: fmt.DT_REG, stat.S_IFDIR: fmt.DT_DIR, stat.S_IFCHR: fmt.DT_CHR,
              stat.S_IFBLK: fmt.DT_BLK, stat.S_IFIFO: fmt.DT_FIFO, stat.S_IFSOCK: fmt.DT_SOCK,
              stat.S_IFLNK: fmt.DT_LNK}
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
DOT_POSITIONS = 2  # readdir positions of "." and "..", before those of the entries (``readdir``)


class Namespace:
    def __init__(self, backend: Backend, icache: InodeCache, files: Files, deltas: Deltas, dirty: DirtyLists,
                 space: Space, health: Health, counters: Counter[str]) -> None:
        self.backend = backend
        self.icache = icache
        self.files = files
        self.deltas = deltas
        self.dirty = dirty
        self.space = space
        self.health = health
        self.counters = counters
        self.blocksize = backend.blocksize

    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel holds n more references (lookup count)."""
        self.icache.iget(ino).lookups += n

    def forget(self, ino: int, n: int) -> None:
        inode = self.icache.inodes.get(ino)
        if inode is None:
            return
        inode.lookups -= n
        self.maybe_dead(inode)

    def maybe_dead(self, inode: Inode) -> None:
        if inode.dead and inode.ino != ROOT_INO and self.health.writable:
            with self.deltas.change() as delta:
                if not inode.on_disk and inode.dirty_deltas <= {delta}:
                    # created and gone within the current delta: nothing of it is written, not even a table entry
                    self.dirty.done(inode, delta)
                    self.backend.inode_gone()
                    self.icache.forget_inode(inode)
                    self.counters["inodes_discarded"] += 1
                else:
                    self.dirty.mark(inode, delta)

    def release(self, ino: int) -> None:
        inode = self.icache.inodes.get(ino)
        if inode is not None:
            inode.opens -= 1
            self.maybe_dead(inode)


    def dir(self, inode: Inode) -> DirIndex:
        if not inode.is_dir:
            raise err(errno.ENOTDIR)
        if inode.dir is None:
            inode.dir = DirIndex(inode.ino, self.blocksize, inode.rec.size // self.blocksize,
                                 lambda block: self.files.page(inode, block).data)
        return inode.dir

    def _read_entry_block(self, dirnode: Inode, name: bytes) -> None:
        """Bring the block holding the entry ``name`` into the cache, before a change that writes it."""
        self.files.page(dirnode, self.dir(dirnode).block_of(name))

    def _dir_writer(self, inode: Inode, delta: int):
        def write(block: int) -> bytearray:
            fill = block * self.blocksize < inode.rec.size
            return self.files.write_page(inode, block, delta, fill=fill).data
        return write

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > fmt.NAME_MAX:
            raise err(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name:
            raise err(errno.EINVAL)
        if name in (b".", b".."):
            raise err(errno.EEXIST)

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Find a name; the kernel now holds one more reference to the inode."""
        if len(name) > fmt.NAME_MAX:
            raise err(errno.ENAMETOOLONG)
        dirnode = self.icache.iget(parent)
        if name == b".":
            ino = parent
        elif name == b"..":
            ino = dirnode.rec.parent or ROOT_INO
        else:
            entry = self.dir(dirnode).get(name)
            if entry is None:
                raise err(errno.ENOENT)
            ino = entry[0]
        inode = self.icache.iget(ino) if name in (b".", b"..") else self._named(dirnode, entry)
        inode.lookups += 1
        return self.icache.attr(inode)

    def _named(self, dirnode: Inode, entry: tuple[int, int, int, int]) -> Inode:
        """The inode a directory entry names: CorruptDir when it has fewer links than a name needs (one; a
        directory two), which no commit leaves."""
        inode = self.icache.iget(entry[0])
        if inode.rec.nlink < (2 if inode.is_dir else 1):
            raise CorruptDir(dirnode.ino, entry[2], f"names inode {inode.ino}, whose link count is {inode.rec.nlink}")
        return inode

    def _losing_subdir(self, dirnode: Inode) -> None:
        """A directory about to lose a subdirectory has at least three links (its name, its ``.``, that ``..``)."""
        if dirnode.rec.nlink < 3:
            raise CorruptBlock(self.backend.itable.leaf_block(dirnode.ino), "ileaf", f"inode {dirnode.ino}: "
                               f"directory with a subdirectory and link count {dirnode.rec.nlink}")

    def _make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0, extra: int = 0
              ) -> Inode:
        """A new inode named ``name`` in ``parent``; ``extra``: pages its creator fills at once (reserved here,
        with the rest, before anything changes)."""
        self.health.check_writable()
        self._check_name(name)
        if not (0 <= uid <= fmt.ID_MAX and 0 <= gid <= fmt.ID_MAX and 0 <= rdev < 1 << 64):
            raise err(errno.EINVAL, f"uid {uid}, gid {gid} or device {rdev} out of range")
        dirnode = self.icache.iget(parent)
        index = self.dir(dirnode)
        if dirnode.rec.nlink == 0:
            raise err(errno.ENOENT)
        if index.get(name) is not None:
            raise err(errno.EEXIST)
        if stat.S_ISDIR(mode) and dirnode.rec.nlink >= fmt.DIR_LINK_MAX:
            raise err(errno.EMLINK)
        if not self.backend.inums_left():  # every inode number the format holds has been handed out
            raise err(errno.ENOSPC, "no inode number left")
        self.files.must_wait(dirnode)
        self.space.reserve(2 + extra)
        where = index.place(name)  # reads the block the entry goes to, before anything changes
        with self.deltas.change() as delta:
            now = time.time_ns()
            ino = self.backend.new_inum()
            is_dir = stat.S_ISDIR(mode)
            rec = InodeRecord(mode=mode, uid=uid, gid=gid, nlink=2 if is_dir else 1, rdev=rdev, atime_ns=now,
                              mtime_ns=now, ctime_ns=now, parent=parent if is_dir else 0)
            if dirnode.rec.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
                rec.gid = dirnode.rec.gid
                if is_dir:
                    rec.mode |= stat.S_ISGID
            inode = self.icache.new_inode(ino, rec, on_disk=False)
            self.dirty.mark(inode, delta)
            self.add_entry(dirnode, name, inode, delta, where)
            if is_dir:
                prec = self.dirty.mark(dirnode, delta)
                prec.nlink += 1
        inode.lookups += 1
        return inode

    def add_entry(self, dirnode: Inode, name: bytes, inode: Inode, delta: int, where: Place | None = None) -> None:
        """Name ``inode`` in ``dirnode`` within ``delta``, at ``where`` (``DirIndex.place``, read before the
        change began; found here when not given)."""
        index = self.dir(dirnode)
        rec = self.dirty.mark(dirnode, delta)
        if index.add(name, inode.ino, DT_OF_MODE.get(stat.S_IFMT(inode.rec.mode), 0),
                     self._dir_writer(dirnode, delta), where):
            rec.size = index.nblocks * self.blocksize
        rec.mtime_ns = rec.ctime_ns = time.time_ns()

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, uid: int = 0, gid: int = 0) -> Attr:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_IFMT(mode) not in DT_OF_MODE or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise err(errno.EINVAL)
        return self.icache.attr(self._make(parent, name, mode, uid, gid, rdev))

    def create(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        """Create and open a regular file."""
        inode = self._make(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        inode.opens += 1
        return self.icache.attr(inode)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        return self.icache.attr(self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid))

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Attr:
        if len(target) > fmt.SYMLINK_MAX:
            raise err(errno.ENAMETOOLONG)
        inode = self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, extra=-(-len(target) // self.blocksize))
        with self.deltas.change() as delta:
            bs = self.blocksize
            for at in range(0, len(target), bs):
                page = self.files.write_page(inode, at // bs, delta, fill=False)
                chunk = target[at: at + bs]
                page.data[: len(chunk)] = chunk
            self.dirty.mark(inode, delta).size = len(target)
        return self.icache.attr(inode)

    def readlink(self, ino: int) -> bytes:
        inode = self.icache.iget(ino)
        if not stat.S_ISLNK(inode.rec.mode):
            raise err(errno.EINVAL)
        return self.files.read(inode, 0, inode.rec.size)

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        self.health.check_writable()
        self._check_name(name)
        inode = self.icache.iget(ino)
        if inode.is_dir:
            raise err(errno.EPERM)
        dirnode = self.icache.iget(parent)
        if self.dir(dirnode).get(name) is not None:
            raise err(errno.EEXIST)
        if inode.rec.nlink >= fmt.LINK_MAX:
            raise err(errno.EMLINK)
        self.files.must_wait(dirnode)
        self.space.reserve(1)
        where = self.dir(dirnode).place(name)
        with self.deltas.change() as delta:
            self.add_entry(dirnode, name, inode, delta, where)
            rec = self.dirty.mark(inode, delta)
            rec.nlink += 1
            rec.ctime_ns = time.time_ns()
        inode.lookups += 1
        return self.icache.attr(inode)

    def _drop_link(self, inode: Inode, delta: int, now: int) -> None:
        rec = self.dirty.mark(inode, delta)
        rec.nlink = 0 if inode.is_dir else rec.nlink - 1
        rec.ctime_ns = now

    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, is_dir=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, is_dir=True)

    def _remove(self, parent: int, name: bytes, is_dir: bool) -> None:
        self.health.check_writable()
        if len(name) > fmt.NAME_MAX:
            raise err(errno.ENAMETOOLONG)
        if name in (b".", b".."):
            raise err(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
        dirnode = self.icache.iget(parent)
        index = self.dir(dirnode)
        entry = index.get(name)
        if entry is None:
            raise err(errno.ENOENT)
        inode = self._named(dirnode, entry)
        if is_dir and not inode.is_dir:
            raise err(errno.ENOTDIR)
        if not is_dir and inode.is_dir:
            raise err(errno.EISDIR)
        if is_dir and len(self.dir(inode)):
            raise err(errno.ENOTEMPTY)
        if is_dir:
            self._losing_subdir(dirnode)
        self.files.must_wait(dirnode)
        self._read_entry_block(dirnode, name)
        with self.deltas.change() as delta:
            now = time.time_ns()
            index.remove(name, self._dir_writer(dirnode, delta))
            prec = self.dirty.mark(dirnode, delta)
            prec.mtime_ns = prec.ctime_ns = now
            if is_dir:
                prec.nlink -= 1
            self._drop_link(inode, delta, now)
        self.maybe_dead(inode)

    def _is_ancestor(self, ino: int, of: int) -> bool:
        """Is directory ``ino`` the directory ``of`` or one of its ancestors?"""
        cur = of
        for _ in range(1 << 16):
            if cur == ino:
                return True
            if cur == ROOT_INO or cur == 0:
                return False
            cur = self.icache.iget(cur).rec.parent
        return False

    def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int = 0) -> None:
        self.health.check_writable()
        self._check_name(new)
        if len(old) > fmt.NAME_MAX:
            raise err(errno.ENAMETOOLONG)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise err(errno.EINVAL)
        sdir, ddir = self.icache.iget(old_parent), self.icache.iget(new_parent)
        sidx, didx = self.dir(sdir), self.dir(ddir)
        sentry = sidx.get(old)
        if sentry is None:
            raise err(errno.ENOENT)
        src = self._named(sdir, sentry)
        dentry = didx.get(new)
        dst = self._named(ddir, dentry) if dentry is not None else None
        if src.is_dir and sdir is not ddir:
            self._losing_subdir(sdir)
            if ddir.rec.nlink >= fmt.DIR_LINK_MAX:
                raise err(errno.EMLINK)
        if dst is not None and dst.is_dir and sdir is not ddir and sdir.rec.nlink >= fmt.DIR_LINK_MAX:
            raise err(errno.EMLINK)  # an exchange moves it into the source directory
        if dst is not None and dst.is_dir and dst is not src:
            self._losing_subdir(ddir)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise err(errno.EEXIST)
        self.files.must_wait(sdir)
        self.files.must_wait(ddir)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise err(errno.ENOENT)
            if src.is_dir and self._is_ancestor(src.ino, ddir.ino) and src is not dst:
                raise err(errno.EINVAL)
            if dst.is_dir and self._is_ancestor(dst.ino, sdir.ino) and src is not dst:
                raise err(errno.EINVAL)
            self._read_entry_block(sdir, old)
            self._read_entry_block(ddir, new)
            self._exchange(sdir, old, src, ddir, new, dst)
            return
        if dst is src:
            return  # both names are links to the same inode: nothing to do
        if src.is_dir and self._is_ancestor(src.ino, ddir.ino):
            raise err(errno.EINVAL)
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise err(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise err(errno.EISDIR)
            if dst.is_dir and len(self.dir(dst)):
                raise err(errno.ENOTEMPTY)
            self._read_entry_block(ddir, new)
            where = None
        else:
            self.space.reserve(1)
            where = didx.place(new)
        self._read_entry_block(sdir, old)
        with self.deltas.change() as delta:
            now = time.time_ns()
            dtype = DT_OF_MODE.get(stat.S_IFMT(src.rec.mode), 0)
            if dst is not None:
                didx.retarget(new, src.ino, dtype, self._dir_writer(ddir, delta))
                drec = self.dirty.mark(ddir, delta)
                drec.mtime_ns = drec.ctime_ns = now
                self._drop_link(dst, delta, now)
                if dst.is_dir:
                    drec.nlink -= 1
            else:
                self.add_entry(ddir, new, src, delta, where)
            sidx.remove(old, self._dir_writer(sdir, delta))
            srec = self.dirty.mark(sdir, delta)
            srec.mtime_ns = srec.ctime_ns = now
            rec = self.dirty.mark(src, delta)
            rec.ctime_ns = now
            if src.is_dir and sdir is not ddir:
                srec.nlink -= 1
                self.dirty.mark(ddir, delta).nlink += 1
                rec.parent = ddir.ino
        if dst is not None:
            self.maybe_dead(dst)

    def _exchange(self, sdir: Inode, old: bytes, src: Inode, ddir: Inode, new: bytes, dst: Inode) -> None:
        with self.deltas.change() as delta:
            now = time.time_ns()
            sidx, didx = self.dir(sdir), self.dir(ddir)
            sidx.retarget(old, dst.ino, DT_OF_MODE.get(stat.S_IFMT(dst.rec.mode), 0), self._dir_writer(sdir, delta))
            didx.retarget(new, src.ino, DT_OF_MODE.get(stat.S_IFMT(src.rec.mode), 0), self._dir_writer(ddir, delta))
            for d in (sdir, ddir):
                r = self.dirty.mark(d, delta)
                r.mtime_ns = r.ctime_ns = now
            for node, new_parent in ((src, ddir), (dst, sdir)):
                r = self.dirty.mark(node, delta)
                r.ctime_ns = now
                if node.is_dir and sdir is not ddir:
                    r.parent = new_parent.ino
            if sdir is not ddir and src.is_dir != dst.is_dir:
                moved = 1 if src.is_dir else -1  # a directory moved from sdir to ddir
                self.dirty.mark(sdir, delta).nlink -= moved
                self.dirty.mark(ddir, delta).nlink += moved

    def readdir(self, ino: int, start: int, dots: bool = False) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode number, next position) from position ``start`` (0: the beginning). With ``dots`` (what
        POSIX readdir returns) the listing starts with "." (the directory) and ".." (its parent; the root's is the
        root) at positions 0 and 1, and every entry's position is its place in the directory (``DirIndex``) plus
        ``DOT_POSITIONS``: any position returned resumes the listing after what came before it, neither repeating
        nor skipping a name."""
        inode = self.icache.iget(ino)
        index = self.dir(inode)
        shift = 0
        if dots:
            if start <= 0:
                yield b".", ino, 1
            if start <= 1:
                yield b"..", inode.rec.parent or ROOT_INO, DOT_POSITIONS
            shift, start = DOT_POSITIONS, max(start - DOT_POSITIONS, 0)
        for name, child, _, nxt in index.entries(start, lambda block: self.files.page(inode, block).data):
            yield name, child, nxt + shift

    # -- extended attributes -------------------------------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.icache.iget(ino).rec.xattrs.get(name)
        if value is None:
            raise err(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self.icache.iget(ino).rec.xattrs)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self.health.check_writable()
        if not (name.startswith(b"user.") or name.startswith(b"trusted.") or name.startswith(b"security.")):
            raise err(errno.EOPNOTSUPP)
        if len(name) > 255:
            raise err(errno.ERANGE)
        inode = self.icache.iget(ino)
        xattrs = inode.rec.xattrs
        if flags & os.XATTR_CREATE and name in xattrs:
            raise err(errno.EEXIST)
        if flags & os.XATTR_REPLACE and name not in xattrs:
            raise err(errno.ENODATA)
        size = len(inode.rec.pack()) - (fmt.xattr_cost(name, xattrs[name]) if name in xattrs else 0)
        if size + fmt.xattr_cost(name, value) > fmt.max_inode_record(self.blocksize):
            raise err(errno.ENOSPC, "extended attributes do not fit in the inode")
        self.space.reserve(1)
        with self.deltas.change() as delta:
            rec = self.dirty.mark(inode, delta)
            rec.xattrs[name] = bytes(value)
            rec.ctime_ns = time.time_ns()

    def removexattr(self, ino: int, name: bytes) -> None:
        self.health.check_writable()
        inode = self.icache.iget(ino)
        if name not in inode.rec.xattrs:
            raise err(errno.ENODATA)
        with self.deltas.change() as delta:
            rec = self.dirty.mark(inode, delta)
            del rec.xattrs[name]
            rec.ctime_ns = time.time_ns()
