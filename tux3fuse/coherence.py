"""The kernel's caches kept coherent with the volume, under the FUSE writeback cache.

Guarantee: what readers see is what the volume keeps. With the writeback cache the kernel takes a ``write()`` into
its page cache and its own idea of the file size, and sends the data later (at close, fsync or writeback); when the
volume refuses some of it (ENOSPC), the kernel still holds the refused data and the larger size. The handler of the
refused write makes the kernel forget both before it answers (``KernelCache.refused``): it drops the kernel's names
of the inode (so the kernel's inode, with its size and pages, goes once no file has it open, and the next lookup
brings the size the volume keeps) and its cached pages and attributes. A lookup that comes while the kernel still
holds the old inode waits (a bounded time, ``FORGET_WAIT``) until it is gone (``KernelCache.wait_forgotten``); if
the inode is still open elsewhere, it is forgotten again at its last close.

``KernelCache`` owns what this needs and nothing else: the kernel's names of each regular file (``names``, the
newest ``NAMES_KEPT`` per inode, fed by ``seen`` after every answer that gives the kernel a dentry), the inodes being
forgotten (``forgetting``, one ``Forgetting`` each), the inodes whose kernel inode may keep refused data until their
last close (``stale``), and the invalidation (``pyfuse3.invalidate_entry``/``invalidate_inode``, in a thread of its
own, since invalidating pages waits for the writes in flight, the refused one's too). Without the writeback cache
the kernel holds no data the volume has not taken, and nothing is remembered.
"""

from __future__ import annotations

import logging
import stat
import threading

import pyfuse3
import trio

from .fs import Attr, Volume

log = logging.getLogger("tux3fuse")
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


class KernelCache:
    """What the kernel caches of the volume, as far as coherence needs it (see the module's guarantee). The adapter
    calls it at the points a request changes that: ``seen`` after an answer that gives the kernel a dentry,
    ``renamed`` after a rename, ``forgotten`` after a forget, ``released`` after a release, ``refused`` when the
    volume refuses a write, ``wait_forgotten`` in a lookup."""

    def __init__(self, vol: Volume, writeback: bool) -> None:
        self.vol = vol
        self.writeback = writeback  # the kernel's writeback cache is on: the only case that needs any of this
        self.names: dict[int, list[tuple[int, bytes]]] = {}  # ino -> (parent, name) the kernel may have cached
        self.forgetting: dict[int, Forgetting] = {}
        self.stale: set[int] = set()  # inodes whose kernel inode may keep refused data until their last close

    def seen(self, parent: int, name: bytes, a: Attr) -> Attr:
        """The kernel now has a dentry ``name`` in ``parent`` for the inode (kept only with the writeback cache,
        for regular files). Returns ``a``."""
        if self.writeback and stat.S_ISREG(a.mode):
            names = self.names.setdefault(a.ino, [])
            if (parent, name) not in names:
                names.append((parent, name))
                del names[:-NAMES_KEPT]
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

    async def wait_forgotten(self, ino: int) -> bool:
        """In a lookup that found ``ino``: if the kernel is being made to forget it, wait (at most FORGET_WAIT) until
        the kernel's old inode is gone, so the kernel makes a new one of the answer; if it is still open elsewhere,
        mark it stale, to be forgotten again at its last close. Returns True when the caller must read the
        attributes again (the volume's, not those before the refusal)."""
        pending = self.forgetting.get(ino)
        if pending is None or pending.done.is_set():
            return False
        # the kernel may still hold its inode with the size it believed (an open file, or the release that
        # holds it on its way): answered once that inode is gone, so the kernel makes a new one of this answer
        with trio.move_on_after(FORGET_WAIT):
            await pending.done.wait()
        if not pending.done.is_set():  # still open elsewhere: the kernel keeps its inode until the last close
            self.stale.add(ino)
        self.forgetting.pop(ino, None)
        return True

    def forgotten(self, ino: int) -> None:
        """After the volume took the kernel's forget of ``ino``: once the kernel has no inode of it left, nothing
        of it is remembered, and a forgetting under way counts it released."""
        inode = self.vol.icache.inodes.get(ino)
        if inode is None or inode.lookups <= 0:  # the kernel has no inode of it left
            self.names.pop(ino, None)
            self.stale.discard(ino)
            pending = self.forgetting.pop(ino, None)
            if pending is not None:
                pending.released = True
                pending.check()

    def released(self, ino: int) -> None:
        """After the volume took a release of ``ino``: on its last close, a forgetting under way counts it
        released, and a stale inode (a lookup gave up waiting for this close) is forgotten now."""
        inode = self.vol.icache.inodes.get(ino)
        if inode is None or inode.opens <= 0:  # the reply to this release lets the kernel's inode go
            pending = self.forgetting.get(ino)
            if pending is not None:
                pending.released = True
                pending.check()
            elif ino in self.stale:  # a lookup gave up waiting for this close: forget the kernel's inode now
                self.stale.discard(ino)
                self.start_forgetting(ino, released=True)

    async def refused(self, ino: int) -> None:
        """The volume refused data of ``ino`` the kernel holds in its cache: make the kernel forget it (with the
        writeback cache; nothing to do without). Returns once the kernel has dropped the inode's names (or after
        FORGET_WAIT); its cached pages and attributes are dropped next, in a thread, since that waits for the
        writes in flight, this one's too."""
        if not self.writeback:
            return
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
            inode = self.vol.icache.inodes.get(ino)
            pending.released = pending.released or inode is None or inode.opens <= 0
            pending.check()
        then(pages_done)
