"""The pyfuse3 adapter: kernel requests in, Volume calls, errno out. Nothing else.

Guarantees:
- No exception other than FUSEError leaves a handler. An OSError becomes its errno, a VolumeError EIO. The volume
  itself turns a corrupt block or an unexpected exception into a read-only volume, a logged stack and EIO
  (``fs.guarded``), for embedded callers as for the mount; what escapes the adapter's own code gets the same.
- What readers see is what the volume keeps. With the writeback cache the kernel takes a ``write()`` into its page
  cache and its own idea of the file size, and sends the data later (at close, fsync or writeback); when the volume
  refuses some of it (ENOSPC), the kernel still holds the refused data and the larger size. The handler of the
  refused write makes the kernel forget both before it answers: it drops the kernel's names of the inode (so the
  kernel's inode, with its size and pages, goes once no file has it open, and the next lookup brings the size the
  volume keeps) and its cached pages and attributes. A lookup that comes while the kernel still holds the old inode
  waits (a bounded time) until it is gone.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading

import pyfuse3
import trio

from .fs import Attr, Volume, VolumeError

log = logging.getLogger("tux3fuse")
TIMEOUT = 300.0  # every change goes through the kernel, so its caches may be trusted for long
NAMES_KEPT = 4  # names per inode remembered for invalidation (the kernel's dentries of it; the newest kept)
FORGET_WAIT = 1.0  # seconds a refused write or a lookup waits at most for the kernel to drop what was refused


class Forgetting:
    """The kernel is being made to forget what the volume refused for one inode: ``entries`` is set once its
    names are dropped, ``done`` once its cached pages are too and no file has the inode open any more (the
    kernel's inode, with the size it believed, is then gone)."""

    def __init__(self) -> None:
        self.entries = trio.Event()
        self.pages = False
        self.released = False
        self.done = trio.Event()

    def check(self) -> None:
        if self.pages and self.released:
            self.done.set()


def _translate(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
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
        self.names: dict[int, list[tuple[int, bytes]]] = {}  # ino -> (parent, name) the kernel may have cached
        self.forgetting: dict[int, Forgetting] = {}
        self.stale: set[int] = set()  # inodes whose kernel inode may keep refused data until their last close

    def seen(self, parent: int, name: bytes, a: Attr) -> Attr:
        """The kernel now has a dentry ``name`` in ``parent`` for the inode (kept only with the writeback cache,
        the one case that needs it: see the module's guarantees). Returns ``a``."""
        if self.enable_writeback_cache and stat.S_ISREG(a.mode):
            names = self.names.setdefault(a.ino, [])
            if (parent, name) not in names:
                names.append((parent, name))
                del names[:-NAMES_KEPT]
        return a

    def entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = TIMEOUT
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
        a = self.vol.lookup(parent_inode, name)
        pending = self.forgetting.get(a.ino)
        if pending is not None and not pending.done.is_set():
            # the kernel may still hold its inode with the size it believed (an open file, or the release that
            # holds it on its way): answered once that inode is gone, so the kernel makes a new one of this answer
            with trio.move_on_after(FORGET_WAIT):
                await pending.done.wait()
            if not pending.done.is_set():  # still open elsewhere: the kernel keeps its inode until the last close
                self.stale.add(a.ino)
            self.forgetting.pop(a.ino, None)
            a = self.vol.getattr(a.ino)
        return self.entry(self.seen(parent_inode, name, a))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            try:
                self.vol.forget(ino, n)
            except Exception:  # forget must not fail
                log.exception("forget of inode %d", ino)
            inode = self.vol.inodes.get(ino)
            if inode is None or inode.lookups <= 0:  # the kernel has no inode of it left
                self.names.pop(ino, None)
                self.stale.discard(ino)
                pending = self.forgetting.pop(ino, None)
                if pending is not None:
                    pending.released = True
                    pending.check()

    @_translate
    async def getattr(self, inode, ctx=None):
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
        return self.entry(self.seen(parent_inode, name, await self.vol.call(
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
        if self.enable_writeback_cache:  # the kernel moves its dentries likewise (both, for an exchange)
            for parent, name in ((parent_inode_new, name_new), (parent_inode_old, name_old)):
                try:
                    a = self.vol.lookup(parent, name)
                except OSError:
                    continue
                self.vol.forget(a.ino, 1)  # a look, not a reference the kernel holds
                self.seen(parent, name, a)

    @_translate
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self.entry(self.seen(new_parent_inode, new_name,
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
        return pyfuse3.FileInfo(fh=attr.ino, keep_cache=True), self.entry(self.seen(parent_inode, name, attr))

    @_translate
    async def read(self, fh, off, size):
        return self.vol.read(fh, off, size)

    @_translate
    async def write(self, fh, off, buf):
        try:
            return await self.vol.call(self.vol.write, fh, off, buf)
        except OSError as e:
            if e.errno == errno.ENOSPC and self.enable_writeback_cache:
                await self.forget_refused(fh)
            raise

    async def forget_refused(self, ino: int) -> None:
        """The volume refused data the kernel holds in its cache (writeback cache): make the kernel forget it.
        Returns once the kernel has dropped the inode's names (or after FORGET_WAIT); its cached pages and
        attributes are dropped next, in a thread, since that waits for the writes in flight, this one's too."""
        pending = self.start_forgetting(ino)
        with trio.move_on_after(FORGET_WAIT):
            await pending.entries.wait()

    def start_forgetting(self, ino: int, released: bool = False) -> Forgetting:
        """Start (unless under way) dropping the kernel's names, pages and attributes of ``ino``."""
        pending = self.forgetting.get(ino)
        if pending is None or pending.done.is_set():
            pending = self.forgetting[ino] = Forgetting()
            pending.released = released
            token = trio.lowlevel.current_trio_token()
            names = list(self.names.get(ino, ()))
            threading.Thread(target=self._forget_in_kernel, args=(ino, names, pending, token), daemon=True,
                             name=f"forget-{ino}").start()
        return pending

    def _forget_in_kernel(self, ino: int, names: list[tuple[int, bytes]], pending: Forgetting,
                          token: trio.lowlevel.TrioToken) -> None:
        def step(fn, *args) -> None:
            try:
                fn(*args)
            except OSError as e:  # not cached by the kernel (any more): nothing to forget
                log.debug("%s%r: %s", fn.__name__, args, e)

        def then(fn) -> None:
            try:
                trio.from_thread.run_sync(fn, trio_token=token)
            except trio.RunFinishedError:  # unmounted meanwhile
                pass

        for parent, name in names:
            step(pyfuse3.invalidate_entry, parent, name)
        then(pending.entries.set)
        step(pyfuse3.invalidate_inode, ino)

        def pages_done() -> None:
            pending.pages = True
            inode = self.vol.inodes.get(ino)
            pending.released = pending.released or inode is None or inode.opens <= 0
            pending.check()
        then(pages_done)

    async def flush(self, fh):
        return None  # data reaches the image by commits; fsync and umount report their errors

    @_translate
    async def release(self, fh):
        self.vol.release(fh)
        inode = self.vol.inodes.get(fh)
        if inode is None or inode.opens <= 0:  # the reply to this release lets the kernel's inode go
            pending = self.forgetting.get(fh)
            if pending is not None:
                pending.released = True
                pending.check()
            elif fh in self.stale:  # a lookup gave up waiting for this close: forget the kernel's inode now
                self.stale.discard(fh)
                self.start_forgetting(fh, released=True)

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
        for name, ino, nxt in self.vol.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self.entry(self.seen(fh, name, self.vol.getattr(ino))), nxt):
                break
            self.vol.ref(ino)

    async def releasedir(self, fh):
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
