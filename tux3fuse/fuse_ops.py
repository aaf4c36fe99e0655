"""The pyfuse3 adapter: kernel requests in, Volume calls, errno out. Nothing else.

Guarantees:
- No exception other than FUSEError leaves a handler. An OSError becomes its errno, a VolumeError EIO. The volume
  itself turns a corrupt block or an unexpected exception into a read-only volume, a logged stack and EIO
  (``fs.guarded``), for embedded callers as for the mount; what escapes the adapter's own code gets the same.
- What readers see is what the volume keeps, and a writer gets ENOSPC under the writeback cache too: the adapter
  calls ``coherence.py`` (``KernelCache``), which keeps the kernel's caches coherent with the volume and decides
  which WRITEs and GETATTRs are refused, at the points a request changes what the kernel caches (every WRITE
  goes through it).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import Counter

import pyfuse3

from .coherence import KernelCache
from .fs import Attr, Volume, VolumeError

log = logging.getLogger("tux3fuse")
TIMEOUT = 300.0  # every change goes through the kernel, so its caches may be trusted for long


def _translate(fn):
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        self.requests[name] += 1
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except VolumeError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as e:  # the volume's policy (fs.guarded) for what escapes the adapter's own code
            log.exception("unexpected error in %s", fn.__name__)
            self.vol.fail(f"unexpected {type(e).__name__} in {fn.__name__}: {e}")
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, vol: Volume, writeback: bool = True, xattr: bool = False) -> None:
        super().__init__()
        self.vol = vol
        self.enable_writeback_cache = writeback
        self.xattr = xattr
        self.kernel = KernelCache(vol, writeback)  # what the kernel caches, kept coherent with the volume
        self.requests: Counter[str] = Counter()  # requests answered, by operation (``tux3 stat``: fuse.NAME)

    def entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = TIMEOUT
        e.attr_timeout = self.kernel.attr_timeout(a.ino, TIMEOUT)
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    # -- names -----------------------------------------------------------------------------------------------------

    @_translate
    async def lookup(self, parent_inode, name, ctx=None):
        return self.entry(await self.kernel.looked_up(parent_inode, name, self.vol.lookup(parent_inode, name)))

    async def forget(self, inode_list):
        self.requests["forget"] += 1
        for ino, n in inode_list:
            try:
                self.vol.forget(ino, n)
            except Exception:  # forget must not fail
                log.exception("forget of inode %d", ino)
            self.kernel.forgotten(ino)

    @_translate
    async def getattr(self, inode, ctx=None):
        self.kernel.check_attributes(inode)
        return self.entry(self.vol.getattr(inode))

    @_translate
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if getattr(fields, "update_ctime", False):
            kw["ctime_ns"] = attr.st_ctime_ns
        return self.entry(await self.vol.call(self.vol.setattr, inode, **kw))

    @_translate
    async def readlink(self, inode, ctx):
        return self.vol.readlink(inode)

    @_translate
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self.entry(self.kernel.seen(parent_inode, name, await self.vol.call(
            self.vol.mknod, parent_inode, name, mode & ~ctx.umask, rdev, ctx.uid, ctx.gid)))

    @_translate
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self.entry(await self.vol.call(self.vol.mkdir, parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid))

    @_translate
    async def unlink(self, parent_inode, name, ctx):
        await self.vol.call(self.vol.unlink, parent_inode, name)

    @_translate
    async def rmdir(self, parent_inode, name, ctx):
        await self.vol.call(self.vol.rmdir, parent_inode, name)

    @_translate
    async def symlink(self, parent_inode, name, target, ctx):
        return self.entry(await self.vol.call(self.vol.symlink, parent_inode, name, target, ctx.uid, ctx.gid))

    @_translate
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.vol.call(self.vol.rename, parent_inode_old, name_old, parent_inode_new, name_new, flags)
        self.kernel.renamed(parent_inode_old, name_old, parent_inode_new, name_new)

    @_translate
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self.entry(self.kernel.seen(new_parent_inode, new_name,
                                           await self.vol.call(self.vol.link, inode, new_parent_inode, new_name)))

    # -- files -----------------------------------------------------------------------------------------------------

    @_translate
    async def open(self, inode, flags, ctx):
        attr = await self.vol.call(self.vol.open, inode, truncate=bool(flags & os.O_TRUNC))
        if stat.S_ISDIR(attr.mode):
            self.vol.release(inode)
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_translate
    async def create(self, parent_inode, name, mode, flags, ctx):
        attr = await self.vol.call(self.vol.create, parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=attr.ino, keep_cache=True), self.entry(self.kernel.seen(parent_inode, name, attr))

    @_translate
    async def read(self, fh, off, size):
        return await self.vol.read_async(fh, off, size)

    @_translate
    async def write(self, fh, off, buf):
        return await self.kernel.write(fh, off, buf)

    async def flush(self, fh):
        # Data reaches the image by commits; fsync and umount report their errors. ENOSYS tells the kernel that
        # no close needs a FLUSH request (it stops sending them; errors of its own writeback still reach close).
        self.requests["flush"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translate
    async def release(self, fh):
        self.vol.release(fh)
        self.kernel.released(fh)

    @_translate
    async def fsync(self, fh, datasync):
        await self.vol_sync(fh)

    @_translate
    async def fsyncdir(self, fh, datasync):
        await self.vol_sync()

    async def vol_sync(self, ino: int | None = None) -> None:
        if self.vol.failed is not None:
            raise pyfuse3.FUSEError(errno.EIO)
        if not self.vol.readonly:
            await (self.vol.sync() if ino is None else self.vol.fsync(ino))

    # -- directories -----------------------------------------------------------------------------------------------

    @_translate
    async def opendir(self, inode, ctx):
        if not stat.S_ISDIR(self.vol.getattr(inode).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_translate
    async def readdir(self, fh, start_id, token):
        for name, ino, nxt in self.vol.readdir(fh, start_id, dots=True):
            # READDIRPLUS: the kernel takes a lookup reference for every entry of the reply but "." and ".."
            # (fs/fuse/readdir.c, fuse_direntplus_link), and keeps no name for those two
            dot = name in (b".", b"..")
            a = self.vol.getattr(ino) if dot else self.kernel.seen(fh, name, self.vol.getattr(ino))
            if not pyfuse3.readdir_reply(token, name, self.entry(a), nxt):
                break
            if not dot:
                self.vol.ref(ino)
        await self.kernel.settled()

    async def releasedir(self, fh):
        self.requests["releasedir"] += 1
        return None

    @_translate
    async def statfs(self, ctx):
        s = self.vol.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = s["bsize"], s["frsize"]
        out.f_blocks, out.f_bfree, out.f_bavail = s["blocks"], s["bfree"], s["bavail"]
        out.f_files, out.f_ffree, out.f_favail = s["files"], s["ffree"], s["ffree"]
        out.f_namemax = s["namemax"]
        return out

    # -- extended attributes (off unless mounted with -o xattr) ----------------------------------------------------

    def _xattr_on(self) -> None:
        if not self.xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translate
    async def getxattr(self, inode, name, ctx):
        self._xattr_on()
        return self.vol.getxattr(inode, name)

    @_translate
    async def setxattr(self, inode, name, value, ctx):
        self._xattr_on()
        await self.vol.call(self.vol.setxattr, inode, name, value)

    @_translate
    async def listxattr(self, inode, ctx):
        self._xattr_on()
        return self.vol.listxattr(inode)

    @_translate
    async def removexattr(self, inode, name, ctx):
        self._xattr_on()
        await self.vol.call(self.vol.removexattr, inode, name)
