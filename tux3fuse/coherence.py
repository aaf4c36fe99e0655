"""The kernel's caches kept coherent with the volume, under the FUSE writeback cache.

With the writeback cache the kernel takes a ``write()`` into its page cache and its own idea of the file size, and
sends the data later, as WRITEs of its writeback (when its dirty limit for the mount is reached, at fsync or close,
or when the data has aged). The volume may refuse one (ENOSPC). Guarantees:

- ENOSPC reaches the writer at its next ``write()``. A refused WRITE starts a *refusal* of its inode
  (``KernelCache.refuse``), which stands until the kernel has no inode of the file that may hold refused data: the
  last close, once the kernel's names and pages of it are dropped (``Forgetting.done``), or its FORGET. While it
  stands:
  - a GETATTR of the inode is answered ENOSPC (``check_attributes``). A refusal first invalidates the inode's
    attributes in the kernel, so the writer's next ``write()`` asks for them and fails with that error, as does
    every later one (even after space is freed: its kernel inode still holds what was refused). A ``stat``
    (``ls -l``) of the file fails with it too, for as long: the kernel would answer it with its own size, which
    holds the refused data, and pyfuse3 gives getattr no file handle that would tell the writer's GETATTR from a
    stat's. (A ``statx`` asking for the size alone is answered from the kernel's cache while its attributes have
    not expired: it may show the kernel's size, as it does for data not yet written back.)
  - every WRITE of the inode is refused, even one that would fit: the file keeps what the volume took before the
    refusal, and no later WRITE stores data beyond a range it refused (a hole of zeros under a larger size).
    WRITEs of one inode are taken one at a time, in the order the kernel sent them (``write``), so none overtakes
    an earlier one that waits for space and is then refused.
  - attributes of the inode in any answer are valid for no time (``attr_timeout``); an answer that gives the kernel
    a dentry of the inode (lookup, readdirplus) is preceded by another round of invalidation (``seen``,
    ``settled``): the kernel ignores attributes older than an invalidation, so they stay invalid, and the dentry is
    dropped once the answer is in.
- What readers see after the refusal is what the volume keeps. Each round (``start_forgetting``, in a thread: it
  may wait for requests in flight) invalidates the inode's attributes, drops the kernel's names of it (so the
  kernel's inode, with its size and pages, goes at its last close) and its cached pages. A lookup while a refusal
  stands waits (at most ``FORGET_WAIT``) for it to end, as it does once the last close's RELEASE is in
  (``looked_up``): the kernel then makes a new inode of the answer, with the size the volume keeps.
- The kernel holds little more dirty data of the mount than the volume can take (``DirtyBound``). The kernel bounds
  the dirty data of a FUSE mount by the limit of its writeback device (``/sys/class/bdi/MAJOR:MINOR/max_bytes``:
  by default 1 % of the machine's dirty threshold, tens of MiB; FUSE mounts have strictlimit, so a writer above it
  waits for the writeback). When the volume's room falls below that, the daemon lowers it to the room rounded down
  to a power of two, not below ``Options.kernel_dirty`` (1 MiB), and gives the kernel its own back when the room
  returns. Only root may change it; otherwise the kernel's own stands.

So a writer that fills the volume gets ENOSPC from its next ``write()`` after the first refused WRITE (from fsync
or close if it writes no more): its ``write()`` calls took at most the kernel's dirty limit for the mount, plus the
``write()`` in progress, beyond what the volume stores (README, *A full volume*: measured). ``nowriteback``: every
``write()`` is a WRITE, the kernel holds no data the volume has not taken, and nothing here is needed.

What this relies on in the kernel (fs/fuse, Linux 6.18; read in its source, seen on a mount, and the outcome checked
by tests/mounted/test_enospc.py): before a buffered write with the writeback cache, ``fuse_cache_write_iter`` calls
``fuse_update_attributes(STATX_SIZE | STATX_MODE)`` and returns its error; that sends a GETATTR when the attributes
have expired, or when an invalid one is not among those the writeback cache keeps itself (``fuse_get_cache_mask``:
size, mtime, ctime; so an invalid mode always asks); ``FUSE_NOTIFY_INVAL_INODE`` with offset -1 invalidates the
attributes only, and bumps the inode's ``attr_version``, so that a reply to a request sent before it leaves them
invalid; a failed GETATTR leaves them invalid (every ``write()`` and ``stat`` asks again); the kernel keeps its own
size over the daemon's under the writeback cache (``fuse_change_attributes``), so only a new kernel inode shows
the size the volume keeps; a FUSE inode with no dentry left is evicted at its last close, and the kernel sends a
FORGET; a refused writeback WRITE leaves its error for fsync and close; the bdi's ``max_bytes`` bounds what a
writer gets ahead of the daemon (measured: the overshoot follows it).

``KernelCache`` owns what this needs and nothing else: the kernel's names of each regular file (``names``, the
newest ``NAMES_KEPT`` per inode, fed by ``seen`` after every answer that gives the kernel a dentry), the newest round
of forgetting of each refused inode (``forgetting``, a ``Forgetting`` each) and the rounds not yet past their
attributes (``unsettled``), the WRITEs under way per inode (``writing``), the kernel's dirty limit for the mount
(``dirty``), and the invalidation (``pyfuse3.invalidate_inode``/``invalidate_entry``, in a thread per round, since
invalidating names waits for the requests in flight in their directory and pages for the WRITEs of their
writeback, the refused ones too).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

import pyfuse3
import trio

from .fs import Attr, Volume

log = logging.getLogger("tux3fuse")
NAMES_KEPT = 4  # names per inode remembered for invalidation (the kernel's dentries of it; the newest kept)
FORGET_WAIT = 1.0  # seconds a refused write or a lookup waits at most for the kernel to drop what was refused
BDI = "/sys/class/bdi"  # the kernel's writeback devices: a FUSE mount's is named MAJOR:MINOR of its st_dev


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def dirty_target(room: int, floor: int, default: int) -> int | None:
    """The kernel's dirty limit for the mount, in bytes, when the volume has ``room`` bytes for new data: None (the
    kernel's own, ``default``) while the room is at least that; else the room rounded down to a power of two (so
    the limit changes only when the room halves or doubles), not below ``floor``, and never above the kernel's
    own."""
    target = max(floor, 1 << (room.bit_length() - 1) if room > 0 else 0)
    return None if room >= default or target >= default else target


class DirtyBound:
    """The kernel's limit of dirty data for the mount (its bdi's ``max_bytes``), kept within the room the volume has
    (``dirty_target``) once ``attach`` has found it writable. ``follow`` writes the kernel's file only when the
    target changes."""

    def __init__(self, floor: int) -> None:
        self.floor = floor  # the least the limit is lowered to (0: the kernel's limit is left alone)
        self.bdi: str | None = None  # /sys/class/bdi/MAJOR:MINOR, once attached
        self.default_fine = ""  # the kernel's own limit, as a fraction of its dirty threshold (max_ratio_fine)
        self.default = 0  # the same in bytes when attached
        self.limit: int | None = None  # what the daemon set; None: the kernel's own

    def attach(self, device: str) -> bool:
        """Take the limit of the mount whose st_dev is ``device`` (``MAJOR:MINOR``); False when it cannot be
        changed here (not root, no such file, or ``floor`` 0), and the kernel's limit then stands."""
        if self.floor <= 0:
            return False
        bdi = os.path.join(BDI, device)
        try:
            with open(os.path.join(bdi, "max_ratio_fine")) as f:
                self.default_fine = f.read().strip()
            with open(os.path.join(bdi, "max_bytes")) as f:
                self.default = int(f.read())
        except (OSError, ValueError) as e:
            log.info("the kernel's dirty limit for the mount is left as it is: %s", e)
            return False
        if not os.access(os.path.join(bdi, "max_bytes"), os.W_OK):
            log.info("the kernel's dirty limit for the mount (%s/max_bytes) cannot be changed by this user: the "
                     "kernel's own, %d bytes, bounds what a writer may write past a full volume", bdi, self.default)
            return False
        self.bdi = bdi
        return True

    def follow(self, room: int) -> None:
        """The volume has ``room`` bytes for new data: set the kernel's limit to match, if it changes."""
        if self.bdi is None:
            return
        target = dirty_target(room, self.floor, self.default)
        if target == self.limit:
            return
        name, value = ("max_bytes", str(target)) if target is not None else ("max_ratio_fine", self.default_fine)
        try:
            with open(os.path.join(self.bdi, name), "w") as f:
                f.write(value)
        except OSError as e:  # the mount went away meanwhile, or the kernel refused the value
            log.warning("cannot set the kernel's dirty limit for the mount (%s/%s=%s): %s", self.bdi, name, value, e)
            self.bdi = None
            return
        self.limit = target


class Forgetting:
    """One round of making the kernel forget what it holds of an inode whose data the volume refused: ``attrs`` is
    set once the kernel's attributes of it are invalid, ``entries`` once its names are dropped, ``done`` once its
    cached pages are dropped too and no file has the inode open (the kernel's inode, with the size it believed,
    is then gone, or goes with the last close)."""

    def __init__(self, released: bool, superseded: Forgetting | None = None) -> None:
        self.attrs = trio.Event()
        self.entries = trio.Event()
        self.pages = False
        self.released = released
        self.done = trio.Event()
        self.superseded = superseded  # the round before, not done when this one started: done with this one

    def check(self) -> None:
        if self.pages and self.released:
            self.done.set()
            if self.superseded is not None:
                self.superseded.pages = self.superseded.released = True
                self.superseded.check()


class KernelCache:
    """What the kernel caches of the volume, as far as coherence needs it (see the module's guarantees). The
    adapter calls it at the points a request changes that: ``write`` for a WRITE, ``check_attributes`` in a
    getattr, ``attr_timeout`` for the attributes of every answer, ``looked_up`` in a lookup, ``seen`` after an
    answer that gives the kernel a dentry and ``settled`` at the end of a readdir, ``renamed`` after a rename,
    ``forgotten`` after a forget, ``released`` after a release; the daemon calls ``attach`` once mounted."""

    def __init__(self, vol: Volume, writeback: bool) -> None:
        self.vol = vol
        self.writeback = writeback  # the kernel's writeback cache is on: the only case that needs any of this
        self.names: dict[int, list[tuple[int, bytes]]] = {}  # ino -> (parent, name) the kernel may have cached
        self.forgetting: dict[int, Forgetting] = {}  # the newest round for each inode whose data was refused
        self.unsettled: set[Forgetting] = set()  # rounds whose attribute invalidation is not done yet
        self.writing: dict[int, trio.Lock] = {}  # inodes with a WRITE under way: one at a time, in order
        self.dirty = DirtyBound(vol.options.kernel_dirty)
        for key in ("enospc_writes", "enospc_getattrs", "kernel_dirty_limit"):
            vol.counters[key] += 0

    def attach(self, device: str) -> None:
        """The mount is up, its st_dev ``device`` (``MAJOR:MINOR``): bound the kernel's dirty data by the volume's
        room from now on (with the writeback cache, and where this user may)."""
        if self.writeback and self.dirty.attach(device):
            self.follow_room()

    def follow_room(self) -> None:
        """Set the kernel's dirty limit for the room the volume has now (``DirtyBound.follow``)."""
        dirty = self.dirty
        if dirty.bdi is not None:
            dirty.follow(self.vol.space.room() * self.vol.blocksize)
            self.vol.counters["kernel_dirty_limit"] = dirty.default if dirty.limit is None else dirty.limit

    # -- refusals ----------------------------------------------------------------------------------------------

    def refusing(self, ino: int) -> bool:
        """Whether a refusal of ``ino`` stands: the kernel may hold an inode of it with data the volume refused."""
        pending = self.forgetting.get(ino)
        return pending is not None and not pending.done.is_set()

    def check_attributes(self, ino: int) -> None:
        """In a GETATTR: raises ENOSPC while a refusal of ``ino`` stands (the writer's next write() fails with it)."""
        if self.refusing(ino):
            self.vol.counters["enospc_getattrs"] += 1
            raise enospc()

    def attr_timeout(self, ino: int, timeout: float) -> float:
        """How long the kernel may trust attributes of ``ino`` given now: ``timeout``, or 0 while a refusal stands
        (it asks again, and gets ENOSPC)."""
        return 0.0 if self.refusing(ino) else timeout

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        """A WRITE of ``data`` at ``offset``: what the volume took (``len(data)``), or ENOSPC. With the writeback
        cache, WRITEs of one inode are taken one at a time in the order they came (one that waits for space holds
        back the later ones), and refused while a refusal of it stands; the first refused starts one (``refuse``).
        A refused WRITE returns once the kernel has dropped the inode's names, or after FORGET_WAIT."""
        vol = self.vol
        if not self.writeback:
            return await vol.call(vol.write, ino, offset, data)
        lock = self.writing.get(ino)
        if lock is None:
            lock = self.writing[ino] = trio.Lock()
        try:
            lock.acquire_nowait()  # no checkpoint when no other WRITE of the inode is under way
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if not self.refusing(ino):
                try:
                    return await vol.call(vol.write, ino, offset, data)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    self.refuse(ino)
        finally:
            lock.release()
            if not lock.locked():  # no other WRITE of the inode waits (release hands the lock to the next one)
                del self.writing[ino]
            self.follow_room()
        vol.counters["enospc_writes"] += 1
        pending = self.forgetting[ino]
        with trio.move_on_after(FORGET_WAIT):
            await pending.entries.wait()
        raise enospc()

    def refuse(self, ino: int) -> None:
        """The volume refused data of ``ino`` that the kernel holds: the refusal stands from now (``refusing``) until
        the kernel's inode of it is gone, and the kernel is made to forget its attributes, names and pages."""
        if not self.refusing(ino):
            self.start_forgetting(ino)

    # -- the kernel's names and inodes -------------------------------------------------------------------------

    def seen(self, parent: int, name: bytes, a: Attr) -> Attr:
        """The kernel now has a dentry ``name`` in ``parent`` for the inode (kept only with the writeback cache,
        for regular files). While a refusal of it stands that dentry may be one of the kernel's old inode: another
        round of forgetting drops it once the answer is in (``settled`` waits for its attributes). Returns ``a``."""
        if self.writeback and stat.S_ISREG(a.mode):
            names = self.names.setdefault(a.ino, [])
            if (parent, name) not in names:
                names.append((parent, name))
                del names[:-NAMES_KEPT]
            if self.refusing(a.ino):
                self.start_forgetting(a.ino)
        return a

    async def settled(self) -> None:
        """Before an answer that gives the kernel attributes or dentries of inodes whose refusal stands: wait (at
        most FORGET_WAIT) until their attributes are invalid in the kernel. The kernel then ignores the attributes
        of the answer (they are older than the invalidation: ``attr_version``), so they stay invalid and its next
        GETATTR gets ENOSPC. No checkpoint when no round is starting."""
        if not self.unsettled:
            return
        with trio.move_on_after(FORGET_WAIT):
            while self.unsettled:
                await next(iter(self.unsettled)).attrs.wait()

    async def looked_up(self, parent: int, name: bytes, a: Attr) -> Attr:
        """In a lookup that found ``a``: while a refusal of it stands, wait (at most FORGET_WAIT) until the kernel's
        old inode is gone (the release or forget that ends the refusal is often still on its way), so the kernel
        makes a new one of the answer, with the size the volume keeps; if the file is still open, the answer
        gives the old inode a dentry, which another round drops (``seen``). Returns the attributes to answer."""
        if self.refusing(a.ino):
            with trio.move_on_after(FORGET_WAIT):
                while self.refusing(a.ino):
                    await self.forgetting[a.ino].done.wait()
            a = self.vol.getattr(a.ino)  # the volume's attributes as they are after the wait
        self.seen(parent, name, a)
        await self.settled()
        return a

    def renamed(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes) -> None:
        """The volume renamed (or exchanged) the names: the kernel moves its dentries likewise, so the names
        remembered follow. An OSError of a name no longer there is no error; others propagate."""
        if not self.writeback:
            return
        for parent, name in ((parent_new, name_new), (parent_old, name_old)):
            try:
                a = self.vol.lookup(parent, name)
            except OSError:
                continue
            self.vol.forget(a.ino, 1)  # a look, not a reference the kernel holds
            self.seen(parent, name, a)

    def forgotten(self, ino: int) -> None:
        """After the volume took the kernel's forget of ``ino``: once the kernel has no inode of it left, nothing
        of it is remembered, and a refusal of it ends."""
        inode = self.vol.icache.inodes.get(ino)
        if inode is None or inode.lookups <= 0:  # the kernel has no inode of it left
            self.names.pop(ino, None)
            pending = self.forgetting.pop(ino, None)
            if pending is not None:
                pending.released = pending.pages = True
                pending.check()

    def released(self, ino: int) -> None:
        """After the volume took a release of ``ino``: on its last close, the round of forgetting under way counts
        it released (the kernel's inode goes with this close once its names and pages are dropped)."""
        inode = self.vol.icache.inodes.get(ino)
        pending = self.forgetting.get(ino)
        if pending is not None and (inode is None or inode.opens <= 0):
            pending.released = True
            pending.check()

    def start_forgetting(self, ino: int) -> Forgetting:
        """Start a round dropping the kernel's attributes, names and pages of ``ino``, in that order, in a thread of
        its own: the attributes never wait (invalidating them makes the writer's next write() ask for them); the
        names wait for a request in flight in their directory (so a dentry that request's answer gives is dropped
        too), the pages for the WRITEs of their writeback, the refused ones too."""
        inode = self.vol.icache.inodes.get(ino)
        before = self.forgetting.get(ino)
        pending = self.forgetting[ino] = Forgetting(inode is None or inode.opens <= 0,
                                                    before if before is not None and not before.done.is_set() else None)
        self.unsettled.add(pending)
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

        def attrs_done() -> None:
            pending.attrs.set()
            self.unsettled.discard(pending)

        def pages_done() -> None:
            pending.pages = True
            inode = self.vol.icache.inodes.get(ino)
            pending.released = pending.released or inode is None or inode.opens <= 0
            pending.check()

        step(pyfuse3.invalidate_inode, ino, True)  # the attributes only
        then(attrs_done)
        for parent, name in names:
            step(pyfuse3.invalidate_entry, parent, name)
        then(pending.entries.set)
        step(pyfuse3.invalidate_inode, ino)
        then(pages_done)
