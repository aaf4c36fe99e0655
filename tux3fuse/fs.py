"""The embedded API: a volume opened from an image, its parts wired together, and every filesystem operation.

``Volume`` owns no mechanism. It opens and locks the image, loads it (``replay.py``), wires the parts, and is the
façade through which every caller (the FUSE adapter, tests, scripts, the repairs) reaches them:

| part                     | owner of                                                      | module            |
|--------------------------|---------------------------------------------------------------|-------------------|
| ``backend``              | superblock, allocator, trees, log chain, unify bookkeeping     | backend/store.py  |
| ``icache``               | in-core inodes, address spaces, the page cache                | inodes.py         |
| ``dirty``                | the per-delta dirty-inode lists                               | dirty.py          |
| ``deltas``, ``transition`` | delta numbers; the transition and the split of a delta      | delta.py, transition.py |
| ``forks``                | forked pages kept for the backend                             | cache/fork.py     |
| ``runner``               | the commit in flight and its stages                           | runner.py         |
| ``flusher``              | when to commit; the one place a commit starts                 | flusher.py        |
| ``space``                | reservation and statfs                                        | space.py          |
| ``files``, ``names``     | file I/O and mapping faults; namespace operations             | fileio.py, namespace.py |

``describe`` reads what a volume's superblock says without opening the volume (``tux3 stat IMAGE``).

Guarantees:
- Every change runs inside one delta (``Deltas.change``) and touches only in-core state; trees, bitmap and log are
  the backend's, changed only by a commit.
- Errors are ``OSError`` with the errno a POSIX filesystem would return; nothing else escapes an operation except
  ``VolumeError`` for a volume that has failed and the control-flow exceptions of ``failure.py`` (``call`` handles
  them); anything unexpected fails the volume read-only with a logged stack and is EIO (``failure.guarded``).
- Used without an event loop, an operation that must wait for a commit (space freed by earlier deltas, the dirty
  limit) has its flusher commit synchronously and tries once more (``commit_for``); with the flusher's worker
  running (the daemon) nothing commits inside a request: the request waits for the flusher (``call``).
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Iterator

from . import format as fmt
from .alloc import NoSpace
from .backing import Backing, InUse, is_uri, open_backing
from .cache.fork import MODES, ForkRegistry
from .cache.mmap import SharedMapping
from .delta import Deltas
from .dir import CorruptDir
from .dirty import DirtyLists
from .failure import Health, NeedSpace, Throttled, VolumeError, WaitFor, err, guarded
from .fileio import Files
from .flusher import Flusher
from .format import CorruptBlock
from .inode import Inode
from .inodes import Attr
from .namespace import Namespace
from .options import Options
from .reads import ReadPlan, Reads
from .replay import delta_landed, find_super, load, read_super, reclaim_orphans
from .replaycheck import check_replay
from .runner import Runner
from .space import Space
from .transition import Transition

log = logging.getLogger("tux3fuse")

COUNTERS = ("forks", "data_forks", "dir_forks", "attr_forks", "waits", "commits", "blocks_written", "flushes",
            "unifies", "bytes_copied", "pinned_copies", "commits_ahead", "in_place_writes", "after_io_writes")


class Volume:
    """A mounted tux3fuse volume."""

    def __init__(self, path: str, options: Options | None = None) -> None:
        self.options = opts = options or Options()
        if opts.stable not in MODES:
            raise VolumeError(f"stable= takes one of {', '.join(MODES)}, not {opts.stable!r}")
        self.path = path
        self.readonly = opts.readonly
        self.stable = opts.stable
        self.health = Health(path, self.readonly)
        self.backing: Backing | None = None
        self.runner: Runner | None = None
        try:
            backing = open_backing(path, self.readonly)
        except OSError as e:  # an NBD export's error names the export already
            raise VolumeError(e.strerror if is_uri(path) else f"cannot open {path}: {e.strerror}") from None
        try:
            if opts.lock or not opts.readonly:
                backing.lock(exclusive=not self.readonly)
        except InUse:
            backing.close()
            raise VolumeError(f"{path} is in use (mounted, or being checked)") from None
        self.backing = backing  # the device reads and writes through it; closed last
        try:
            self.backend, self.icache, self.recovery, committed = load(path, opts, backing)
        except BaseException:
            self.close_files()
            raise
        for line in self.recovery.warnings():
            log.warning("%s", line)
        for index, block, reason in self.backend.bitmap_damage:
            log.warning("%s: bitmap block %d (number %d of its region) is corrupt (%s): read-only, it is not "
                        "needed; run fsck.tux3 %s to rebuild it", path, block, index, reason, path)
        self._wire(committed)

    def _wire(self, committed: int) -> None:
        opts, be = self.options, self.backend
        self.blocksize = be.blocksize
        self.counters: Counter[str] = Counter({key: 0 for key in COUNTERS})
        c = self.counters
        self.deltas = Deltas(committed)  # the first commit is numbered above every delta seen
        self.deltas.on_abort = self.health.abort  # a change left half made: read-only before any commit takes it
        self.dirty = DirtyLists(opts.touch_after, c)
        self.forks = ForkRegistry()
        self.runner = Runner(self.deltas, self.forks, be.dev, self.health, opts, c, self._verify_log)
        self.transition = Transition(self.deltas, self.dirty, be, self.icache, opts, c)
        self.space = Space(be, self.icache, self.dirty, self.runner)
        self.files = Files(be, self.icache, self.deltas, self.dirty, self.space, self.runner, self.forks,
                           self.health, opts, c)
        self.reads = Reads(be, self.icache, self.runner, opts, c)  # the daemon's reads, beside the event loop
        self.files.on_truncate = self.reads.readahead.stop
        self.names = Namespace(be, self.icache, self.files, self.deltas, self.dirty, self.space, self.health, c)
        self.flusher = Flusher(self)
        self.iget = self.icache.iget

    # -- mount, commit, unmount ------------------------------------------------------------------------------------

    def mount(self) -> None:
        """Reclaim orphans left by a crash and record the volume as mounted (a commit)."""
        if self.readonly:
            return
        try:
            reclaim_orphans(self.backend, self.icache, self.dirty, self.deltas.current)
        except (CorruptBlock, CorruptDir, OSError) as e:  # nothing is written: the volume stays as it was
            self.health.fail(f"cannot reclaim the orphans: {e}", stack=False)
            raise VolumeError(f"{self.path}: cannot reclaim the orphans: {e}; run fsck.tux3 {self.path}") from None
        self.commit(state=fmt.STATE_MOUNTED)

    def close_files(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if getattr(self, "backend", None) is not None:
            self.backend.dev.close()
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    @property
    def lock_fd(self) -> int:
        """0 or more while the volume holds its image open and locked (a file's descriptor; 0 for an NBD export);
        -1 once it is closed."""
        if self.backing is None:
            return -1
        return max(self.backing.fd, 0)

    def unmount(self) -> None:
        """Forget every kernel reference, commit everything with a unify, and close the image."""
        try:
            if self.health.writable:
                for inode in list(self.icache.inodes.values()):
                    inode.lookups = 0
                    inode.opens = 0
                    if inode.rec.nlink == 0:
                        self.dirty.mark(inode, self.deltas.current)
                self.commit(unify=True, state=fmt.STATE_CLEAN)
        finally:
            self.close_files()

    def commit(self, *, unify: bool = False, state: int | None = None, only: set[int] | None = None) -> bool:
        """Commit the current delta now, synchronously, through the flusher (``Flusher.commit_now``)."""
        if self.readonly:
            return False
        self.check_writable()
        return self.flusher.commit_now(unify=unify, state=state, only=only)

    def commit_for(self, wait: Throttled) -> bool:
        """An operation must wait for a commit (``Throttled``): without the flusher's worker and with no commit in
        flight, commit now (the embedded mode) and say so; otherwise False (the caller waits, ``call``)."""
        if self.flusher.running or self.runner.job is not None or self.readonly:
            return False
        self.check_writable()
        if not isinstance(wait, NeedSpace) and not self.dirty.count():
            return False
        self.commit(unify=wait.unify)
        return True

    def _verify_log(self, delta: int) -> None:
        """With ``Options.verify_log``: the image just committed must replay to what memory holds; if not, the
        volume turns read-only at this delta, before anything is built on it."""
        if not self.options.verify_log:
            return
        problems = check_replay(self)
        self.counters["replay_checks"] += 1
        if problems:
            self.fail(f"delta {delta} does not replay to the state in memory: {'; '.join(problems)}")
            raise VolumeError(self.failed)

    async def fsync(self, ino: int) -> None:
        """fsync of one file: return once its changes are durable (``Flusher.sync``)."""
        await self.flusher.sync(ino)

    async def sync(self) -> None:
        """Return once everything changed before the call is durable (fsyncdir, syncfs)."""
        await self.flusher.sync()

    async def call(self, fn, *args, **kwargs):
        """Run an embedded-API operation, waiting and retrying while it must wait: for a commit's I/O or its end
        (``WaitFor``), or for a commit the flusher makes (``Throttled``; for space, ``NeedSpace``, once: the try
        after that commit is the last, and ENOSPC then is final)."""
        final = False
        while True:
            try:
                if final:
                    with self.space.last_try():
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            except WaitFor as w:
                started = time.perf_counter()
                await self.runner.wait_job(w.job, w.written)
                self.counters["waits"] += 1
                self.counters["wait_seconds"] += time.perf_counter() - started
            except Throttled as t:
                started = time.perf_counter()
                await self.flusher.throttle(t.unify)
                final = final or isinstance(t, NeedSpace)
                self.counters["throttled"] += 1
                self.counters["throttle_seconds"] += time.perf_counter() - started

    @property
    def failed(self) -> str | None:
        return self.health.failed

    def fail(self, reason: str) -> None:
        """Turn the volume read-only after an error it cannot recover from; the image keeps its last commit."""
        self.health.fail(reason)

    def check_writable(self) -> None:
        self.health.check_writable()

    # -- inodes ----------------------------------------------------------------------------------------------------

    def attr(self, inode: Inode) -> Attr:
        return self.icache.attr(inode)

    @guarded
    def getattr(self, ino: int) -> Attr:
        return self.icache.attr(self.iget(ino))

    @guarded
    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel holds n more references (lookup count)."""
        self.names.ref(ino, n)

    @guarded
    def forget(self, ino: int, n: int) -> None:
        self.names.forget(ino, n)

    @guarded
    def open(self, ino: int, truncate: bool = False) -> Attr:
        inode = self.iget(ino)
        if truncate:
            self.setattr(ino, size=0)
        inode.opens += 1
        return self.icache.attr(inode)

    @guarded
    def release(self, ino: int) -> None:
        self.names.release(ino)
        self.reads.readahead.closed(ino)

    @guarded
    def statfs(self) -> dict[str, int]:
        """Space as a user should see it (``Space.statfs``)."""
        return self.space.statfs()

    # -- data ------------------------------------------------------------------------------------------------------

    @guarded
    def read(self, ino: int, offset: int, size: int) -> bytes:
        return self.files.read(self.iget(ino), offset, size)

    async def read_async(self, ino: int, offset: int, size: int) -> bytes:
        """``read`` that never holds the event loop while the device reads (the daemon's); a read of cached pages
        only is not a checkpoint (``Reads.read``)."""
        return await self.reads.read(ino, offset, size, self.read, self.read_plan)

    @guarded
    def read_plan(self, ino: int, offset: int, size: int, fetched: list | None = None) -> ReadPlan:
        """One round of ``read_async`` (``Reads.plan``)."""
        return self.reads.plan(self.iget(ino), offset, size, fetched)

    @guarded
    def write(self, ino: int, offset: int, data: bytes) -> int:
        return self.files.write(self.iget(ino), offset, data)

    @guarded
    def setattr(self, ino: int, **changes: int | None) -> Attr:
        inode = self.iget(ino)
        self.files.setattr(inode, **changes)
        return self.icache.attr(inode)

    @guarded
    def mmap(self, ino: int) -> SharedMapping:
        """Map a regular file shared and writable (the embedded API's mmap)."""
        inode = self.iget(ino)
        if not inode.is_reg:
            raise err(errno.ENODEV)
        return SharedMapping(self, inode)

    @guarded
    def page_for_mapping(self, inode: Inode, index: int):
        """Read fault of a shared mapping."""
        return self.files.page_for_mapping(inode, index)

    @guarded
    def page_mkwrite(self, smap: SharedMapping, index: int) -> list:
        """Write fault of a shared mapping (``Files.page_mkwrite``)."""
        return self.files.page_mkwrite(smap, index)

    # -- names -----------------------------------------------------------------------------------------------------

    @guarded
    def lookup(self, parent: int, name: bytes) -> Attr:
        """Find a name; the kernel now holds one more reference to the inode."""
        return self.names.lookup(parent, name)

    @guarded
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, uid: int = 0, gid: int = 0) -> Attr:
        return self.names.mknod(parent, name, mode, rdev, uid, gid)

    @guarded
    def create(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        """Create and open a regular file."""
        return self.names.create(parent, name, mode, uid, gid)

    @guarded
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        return self.names.mkdir(parent, name, mode, uid, gid)

    @guarded
    def symlink(self, parent: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Attr:
        return self.names.symlink(parent, name, target, uid, gid)

    @guarded
    def readlink(self, ino: int) -> bytes:
        return self.names.readlink(ino)

    @guarded
    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        return self.names.link(ino, parent, name)

    @guarded
    def unlink(self, parent: int, name: bytes) -> None:
        self.names.unlink(parent, name)

    @guarded
    def rmdir(self, parent: int, name: bytes) -> None:
        self.names.rmdir(parent, name)

    @guarded
    def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int = 0) -> None:
        self.names.rename(old_parent, old, new_parent, new, flags)

    @guarded
    def readdir(self, ino: int, start: int, dots: bool = False) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode number, next position) from position ``start`` (0: the beginning); with ``dots``, "." and
        ".." first, as POSIX readdir returns them (``Namespace.readdir``)."""
        yield from self.names.readdir(ino, start, dots)

    @guarded
    def getxattr(self, ino: int, name: bytes) -> bytes:
        return self.names.getxattr(ino, name)

    @guarded
    def listxattr(self, ino: int) -> list[bytes]:
        return self.names.listxattr(ino)

    @guarded
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self.names.setxattr(ino, name, value, flags)

    @guarded
    def removexattr(self, ino: int, name: bytes) -> None:
        self.names.removexattr(ino, name)

    # --------------------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.counters)
        cache = self.icache.cache
        out.update(dirty_pages=cache.dirty_pages, cached_pages=len(cache.clean) + cache.dirty_pages,
                   delta=self.deltas.current, committed=self.deltas.committed, free_blocks=self.backend.free,
                   flushes=self.backend.dev.stats.flushes, blocks_read=self.backend.dev.stats.blocks_read,
                   read_errors=self.backend.dev.stats.read_errors,
                   readahead_errors=self.backend.dev.stats.readahead_errors,
                   hole_fill_bytes=self.backend.dev.stats.fill_bytes,
                   fua_writes=self.backend.dev.stats.fua_writes, device=self.path,
                   forked_pages_live=self.forks.live,
                   forked_pages_peak=self.forks.peak, wait_seconds=float(self.counters["wait_seconds"]),
                   stable=self.stable, read_only=int(not self.health.writable),
                   label=self.backend.sb.label_text, uuid=self.backend.sb.uuid_text,
                   dropped_delta=self.recovery.dropped, dropped_cause=self.recovery.cause)
        return out


def describe(path: str) -> dict[str, object]:
    """What the superblock of the volume at ``path`` (an image file, block device or NBD URI; mounted or not)
    says, as ``tux3 stat IMAGE`` shows it: identity (label, UUID), size, counts and state as of the delta a mount
    would load. Reads only, without the lock; VolumeError with one line when the volume cannot be read."""
    try:
        backing = open_backing(path, readonly=True)
    except OSError as e:
        raise VolumeError(e.strerror if is_uri(path) else f"cannot open {path}: {e.strerror}") from None
    try:
        sb = read_super(backing, path)
    finally:
        backing.close()
    state = "clean" if sb.state == fmt.STATE_CLEAN else "mounted or not cleanly unmounted"
    return {"device": path, "label": sb.label_text, "uuid": sb.uuid_text, "blocksize": sb.blocksize,
            "blocks": sb.volblocks, "free_blocks": sb.free_blocks, "used_inodes": sb.used_inodes,
            "committed": sb.seq, "state": state,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sb.created_ns // 10**9))}


__all__ = ["Attr", "CorruptBlock", "CorruptDir", "NoSpace", "Options", "Throttled", "Volume", "VolumeError",
           "WaitFor", "delta_landed", "describe", "find_super", "read_super"]
