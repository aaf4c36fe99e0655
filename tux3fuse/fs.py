"""Filesystem operations on a mounted volume, independent of FUSE: the embedded API.

Guarantees:
- Every change runs inside one delta (``Deltas.change``) and touches only in-core state: inode attributes and
  pages of file and directory data, tagged with the delta. Btrees, the bitmap and the log are the backend's.
- Errors are ``OSError`` with the errno a POSIX filesystem would return; nothing else escapes an operation except
  ``VolumeError`` for a volume that has failed (then the volume is read-only and every change gets EROFS).
- A write never over-commits space: blocks are reserved before a page is dirtied, and a commit is tried first to
  release space freed by earlier deltas; ENOSPC is returned only when that still does not help.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import format as fmt
from . import recovery
from .alloc import NoSpace
from .backend import extents
from .backend.btree import BTree
from .backend.commit import CommitJob, commit_delta
from .backend.log import load_bitmap, newest_logged, read_chain, replay, replay_error, replay_trees
from .cache import AddressSpace, Page, PageCache
from .cache.fork import FORK, MODES, WAIT, Action, ForkRegistry, clone_page, need_fork
from .cache.mmap import SharedMapping
from .delta import Deltas
from .device import FILL_CHUNK, WRITE_PIECE, Device, OutOfRange, image_size
from .dir import CorruptDir, DirIndex
from .format import ROOT_INO, CorruptBlock, FormatError, InodeRecord, Super
from .inode import Inode
from .recovery import Recovery

log = logging.getLogger("tux3fuse")

DT_OF_MODE = {stat.S_IFREG: fmt.DT_REG, stat.S_IFDIR: fmt.DT_DIR, stat.S_IFCHR: fmt.DT_CHR,
              stat.S_IFBLK: fmt.DT_BLK, stat.S_IFIFO: fmt.DT_FIFO, stat.S_IFSOCK: fmt.DT_SOCK,
              stat.S_IFLNK: fmt.DT_LNK}
MAX_FILE_SIZE = 1 << 50  # logical blocks must fit the 48-bit range of the format at any block size
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class VolumeError(Exception):
    """The volume cannot be used (bad image, or it failed while mounted)."""


class Throttled(Exception):
    """Dirty data is over ``Options.dirty_limit``: the writer waits for a commit to clean some (the
    balance_dirty_pages analogue); nothing was changed. ``Volume.call`` does the waiting."""


class WaitFor(Exception):
    """The operation must wait for a commit in flight: until its blocks are written (``written``: stable=wait,
    a page the commit is writing), or until it completes (space held by that commit); nothing was changed. Await
    ``Volume.wait_job(job, written)`` and try again (``Volume.call`` does both)."""

    def __init__(self, job: CommitJob, written: bool = False) -> None:
        what = "the blocks of" if written else "the commit of"
        super().__init__(f"waiting for {what} delta {job.delta}")
        self.job = job
        self.written = written


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


def _nothing_pending() -> bool:
    return False


def guarded(fn):
    """The failure policy of the embedded API, for every caller (the FUSE adapter, tests, scripts): an OSError is
    the caller's answer and goes through, as do the control-flow exceptions ``WaitFor`` and ``Throttled`` and a
    ``VolumeError``; a corrupt block, or any other exception (a bug), is logged with its stack, turns the volume
    read-only (``Volume.fail``: the image keeps its last commit) and reaches the caller as EIO."""
    def fail(self, e: Exception) -> OSError:
        if isinstance(e, (CorruptBlock, CorruptDir)):
            reason = str(e)
        else:
            reason = f"unexpected {type(e).__name__} in {fn.__name__}: {e}"
        if self.failed is None:
            self.fail(reason)  # logs the stack
        else:
            log.error("%s (volume already read-only)", reason, exc_info=True)
        return OSError(errno.EIO, f"{os.strerror(errno.EIO)}: {reason}")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(self, *args, **kwargs):
            try:
                yield from fn(self, *args, **kwargs)
            except (OSError, WaitFor, Throttled, VolumeError):
                raise
            except Exception as e:
                raise fail(self, e) from e
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (OSError, WaitFor, Throttled, VolumeError):
            raise
        except Exception as e:
            raise fail(self, e) from e
    return wrapper


def _checked(steps: Iterator[None]) -> Iterator[None]:
    """A stage's steps with a boundary before the first one as well: the caller checks its slice at each."""
    yield
    yield from steps


class RunnableTasks:
    """A trio instrument that knows which tasks are runnable: scheduled and not yet stepped. Unlike the run
    queue's length it also counts the tasks of the batch being run, so a commit between two slices sees a
    request task that the scheduler happened to put behind it."""

    def __init__(self) -> None:
        self.tasks: set = set()

    def task_scheduled(self, task) -> None:
        self.tasks.add(task)

    def before_task_step(self, task) -> None:
        self.tasks.discard(task)


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


@dataclass
class Options:
    readonly: bool = False
    stable: str = FORK  # what a write to a page under writeback does: fork, wait or none
    cache_bytes: int = 256 << 20
    commit_interval: float = 5.0  # seconds: the flusher commits a delta this old (commit=; <= 0: only on demand)
    max_tasks: int = 256  # requests the daemon serves at once: every fsync waiting for a commit holds one
    gc_thresholds: tuple[int, int, int] = (20_000, 50, 100)  # the collector's thresholds while the daemon serves
    # the commit runner (Volume._sliced): how long a commit stage holds the event loop at once, in seconds
    prepare_slice: float = 0.00002  # a commit nobody waits for
    urgent_slice: float = 0.0002  # a commit an fsync waits for
    commit_yield: float = 0.001  # a commit passes through the scheduler at least this often, even with no request
    commit_share: float = 0.2  # between two slices requests go first, while the commit has had this share of the loop
    touch_after: float = 1.0  # seconds: a re-dirtied inode moves to its dirty list's tail at most this often
    write_piece: int = WRITE_PIECE  # bytes: the most one write system call of a commit carries (device.py)
    fill_chunk: int = FILL_CHUNK  # bytes: the image's holes are filled this much at a time, around the blocks written
    unify_deltas: int = 16  # unify every this many deltas (not in a commit an fsync waits for): PERFORMANCE.md
    unify_log_blocks: int = 64  # ... or when the log would pass this many 4 KiB (it bounds the replay at mount)
    background_bytes: int = 32 << 20  # dirty data that starts a commit without waiting for the timer
    dirty_limit: int = 128 << 20  # above this much dirty data writers are throttled (0: no limit)
    one_flush: bool = True  # commit with one flush, the superblock proving the delta's blocks (docs/FORMAT.md)
    inline_commit_blocks: int = 8  # commits this small do their I/O on the event loop, not in a worker thread
    fsync_ahead_bytes: int = 1 << 20  # fsync commits only the file when the rest of its delta is dirtier than this
    writelog: str | None = None  # record every write and flush to this file (crash testing)
    lock: bool = True  # take the image lock (tests reading a committed state beside a live volume pass False)
    # after every commit, replay the image as a mount would and compare (replaycheck.py): mount option verify_log,
    # or TUX3FUSE_VERIFY_LOG=1 in the environment (the test suite sets it, so every daemon it starts checks too)
    verify_log: bool = field(default_factory=lambda: os.environ.get("TUX3FUSE_VERIFY_LOG") == "1")


class Volume:
    """A mounted tux3fuse volume."""

    # ---------------------------------------------------------------------------------------------------------------
    # mount, commit, unmount

    def __init__(self, path: str, options: Options | None = None) -> None:
        self.options = opts = options or Options()
        if opts.stable not in MODES:
            raise VolumeError(f"stable= takes one of {', '.join(MODES)}, not {opts.stable!r}")
        self.path = path
        self.readonly = opts.readonly
        self.stable = opts.stable
        self.forks = ForkRegistry()
        self.job: CommitJob | None = None  # the commit in flight
        self.on_background = None  # called when dirty data passes Options.background_bytes (the flusher)
        self.on_dirty = None  # called when a delta gets its first dirty inode (the flusher)
        self.flusher = None  # the attached Flusher, which then starts every commit (flusher.py)
        self.clock = time.monotonic  # dirtied times; the flusher sets trio's clock while it runs
        # True when a request waits that no task has picked up yet (the FUSE daemon polls /dev/fuse); a commit's
        # slices then let the frontend go first
        self.frontend_pending: Callable[[], bool] = _nothing_pending
        # when the task that runs commits last got the event loop back (perf_counter): whoever makes it wait sets
        # this when it resumes, and a commit's first slice counts from it
        self.turn_started = 0.0
        self.io_thread = None  # backend.iothread.IOThread for the writes of commits nobody waits for, once needed
        self.failed: str | None = None
        try:
            fd = os.open(path, os.O_RDONLY if self.readonly else os.O_RDWR)
        except OSError as e:
            raise VolumeError(f"cannot open {path}: {e.strerror}") from None
        try:
            if opts.lock or not opts.readonly:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise VolumeError(f"{path} is in use (mounted, or being checked)") from None
        self.lock_fd = fd
        try:
            self._load(fd)
        except BaseException:
            self.close_files()
            raise

    def _load(self, fd: int) -> None:
        sb, self.recovery = find_super(fd, self.path)  # what was left out of the load, and why: reported
        if self.recovery.refuse and not self.readonly:
            raise VolumeError(self.recovery.refuse)
        for line in self.recovery.warnings():
            log.warning("%s", line)
        self.sb = sb
        self.blocksize = bs = sb.blocksize
        self.leaf_capacity = fmt.leaf_capacity(bs)  # bytes of entries one btree leaf holds
        self.dev = Device(self.path, bs, sb.volblocks, self.readonly, self.options.writelog,
                          write_piece=self.options.write_piece, fill_chunk=self.options.fill_chunk)
        self.counters: Counter[str] = Counter()
        for key in ("forks", "data_forks", "dir_forks", "attr_forks", "waits", "commits", "blocks_written",
                    "flushes", "unifies", "bytes_copied", "pinned_copies", "commits_ahead", "in_place_writes",
                    "after_io_writes"):
            self.counters[key] = 0
        self.writes: list[tuple[int, bytes | bytearray]] = []
        # a read-only mount allocates nothing: a bad bitmap block reads as all used, and is reported
        self.bitmap_damage: list[tuple[int, int, str]] = []
        try:
            self.alloc = load_bitmap(self.dev.read_block, sb, self.bitmap_damage if self.readonly else None)
        except CorruptBlock as e:
            raise VolumeError(f"{self.path}: {e}; run fsck.tux3 {self.path} to rebuild the bitmap from the trees "
                              "(mount -o ro serves the files)") from None
        except OutOfRange as e:
            raise VolumeError(f"{self.path}: {e}") from None
        for index, block, reason in self.bitmap_damage:
            log.warning("%s: bitmap block %d (number %d of its region) is corrupt (%s): read-only, it is not "
                        "needed; run fsck.tux3 %s to rebuild it", self.path, block, index, reason, self.path)
        broken: Exception | None = None  # a log that does not replay: diagnosed below, once the trees are set up
        try:
            chain = read_chain(self.dev.read_block, sb.log_head, sb.log_count)
            replay(self.alloc, chain)
        except (CorruptBlock, OutOfRange) as e:
            if sb.itree_root == 0:
                raise VolumeError(f"{self.path}: {e}") from None
            chain, broken = [], e
        self.log_blocks = [block for block, _ in chain]
        first = fmt.reserved_blocks(bs) + 2 * sb.bitmap_blocks
        self.alloc.meta_goal = first  # metadata from the front, data from a sixteenth of the way in
        self.alloc.goal = first + (sb.volblocks - first) // 16
        self.deltas_since_unify = sb.seq - sb.unify_seq
        self.itable = BTree(self, fmt.KIND_ILEAF, sb.itree_root)
        self.otree = BTree(self, fmt.KIND_OLEAF, sb.otree_root)
        committed = sb.seq
        if self.recovery.dropped and not self.readonly:  # never reuse the number of a delta left out, nor of
            committed = newest_logged(self, max(sb.seq, self.recovery.dropped))  # any log block it left behind
        self.deltas = Deltas(committed)  # the first commit is numbered above every delta seen
        self.inodes: dict[int, Inode] = {}
        self.registry: dict[int, AddressSpace] = {}
        self.cache = PageCache(self.options.cache_bytes, bs)
        self.dirty_inodes: dict[int, dict[int, Inode]] = {}
        self.unflushed: dict[int, Inode] = {}  # inodes whose extent tree has changes only the log holds
        self.unify_frees: list[int] = []  # tree nodes dropped since the last unify; the trees on disk use them
        self.unify_nodes = 0  # extent tree nodes the next unify writes (at most)
        self.split_uncounted = 0  # new inodes a split moved past the delta being committed
        self.used_inodes = sb.used_inodes
        self.next_inum = sb.next_inum
        if sb.itree_root == 0:  # a volume being made: mkfs creates the root next
            return
        try:
            if broken is not None:
                raise broken
            replay_trees(self, chain)
            self.iget(ROOT_INO)
        except (CorruptBlock, OutOfRange, OSError) as e:
            raise replay_error(self, e) from None  # names the last delta that replays, and fsck.tux3

    def mount(self) -> None:
        """Reclaim orphans left by a crash and record the volume as mounted (a commit)."""
        if self.readonly:
            return
        for ino, _ in list(self.otree.items()):
            inode = self.iget(ino)
            if inode.rec.nlink == 0:
                self._dirty_inode(inode, self.deltas.current)
        self.commit(state=fmt.STATE_MOUNTED)

    def close_files(self) -> None:
        if getattr(self, "io_thread", None) is not None:
            self.io_thread.close()
            self.io_thread = None
        if getattr(self, "dev", None) is not None:
            self.dev.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def unmount(self) -> None:
        """Forget every kernel reference, commit everything with a unify, and close the image."""
        try:
            if not self.readonly and self.failed is None:
                for inode in list(self.inodes.values()):
                    inode.lookups = 0
                    inode.opens = 0
                    if inode.rec.nlink == 0:
                        self._dirty_inode(inode, self.deltas.current)
                self.commit(unify=True, state=fmt.STATE_CLEAN)
        finally:
            self.close_files()

    def commit(self, *, unify: bool = False, state: int | None = None, only: set[int] | None = None) -> bool:
        """Transition and commit the current delta synchronously (with ``only``: just those inodes' changes, as
        in ``start_commit``). Returns True if anything was written."""
        if self.readonly:
            return False
        self.check_writable()
        if self.job is not None:
            raise AssertionError("synchronous commit while a commit is in flight")
        delta = self.deltas.transition()
        if only is not None:
            self._split_delta(delta, only)
        try:
            written = commit_delta(self, delta, unify=unify, state=state)
        except Exception as e:
            self.fail(f"commit of delta {delta} failed: {e}")
            raise VolumeError(self.failed) from e
        self.counters["flushes"] = self.dev.stats.flushes
        if written:
            self._verify_log(delta)
        return written

    def _verify_log(self, delta: int) -> None:
        """With ``Options.verify_log``: the image just committed must replay to what memory holds; if not, the
        volume turns read-only at this delta, before anything is built on it."""
        if not self.options.verify_log:
            return
        from .backend.replaycheck import check_replay

        problems = check_replay(self)
        self.counters["replay_checks"] += 1
        if problems:
            self.fail(f"delta {delta} does not replay to the state in memory: {'; '.join(problems)}")
            raise VolumeError(self.failed)

    def start_commit(self, *, unify: bool = False, state: int | None = None, prepare: bool = True,
                     urgent: bool = False, only: set[int] | None = None) -> CommitJob:
        """Transition and prepare a commit of the current delta (stage 1); the caller writes and completes it.
        With ``prepare=False`` the caller runs ``job.prepare_steps()`` itself, interleaving frontend work. With
        ``only`` (inodes for which ``can_commit_ahead`` holds) the delta is split first: the changes of every other
        inode move to the next delta, and this commit holds only those of ``only``."""
        self.check_writable()
        if self.job is not None:
            raise AssertionError("a commit is already in flight")
        delta = self.deltas.transition()
        if only is not None:
            self._split_delta(delta, only)
        job = self.job = CommitJob(self, delta, unify=unify, state=state, urgent=urgent)
        job.begin()
        if prepare:
            try:
                job.prepare()
            except Exception as e:
                self.fail(f"commit of delta {delta} failed: {e}")
                raise VolumeError(self.failed) from e
        return job

    async def commit_async(self, *, unify: bool = False, state: int | None = None, inline_small: bool = False,
                           only: set[int] | None = None, urgent: bool | None = None) -> int:
        """Commit the current delta with its I/O in a worker thread; the frontend keeps running meanwhile.
        Returns the delta committed. Waits for a commit already in flight first. ``only``: as in start_commit,
        re-checked once the commit in flight has ended (a whole-delta commit if it no longer holds)."""
        import trio

        while self.job is not None:
            await self.wait_job(self.job)
            self.turn_started = time.perf_counter()
        if only is not None and not self.commit_ahead_pays(only):
            only = None
        urgent = inline_small if urgent is None else urgent
        job = self.start_commit(unify=unify, state=state, prepare=False, urgent=urgent, only=only)
        clock = time.perf_counter
        with trio.CancelScope(shield=True):  # a commit once started always ends
            try:
                started = clock()
                hold = await self._sliced(job.prepare_steps(), urgent)
                prepared = clock()
                if inline_small and len(job.writes) <= self.options.inline_commit_blocks:
                    job.write()  # someone waits for this small commit: a thread hop costs more than it saves
                else:
                    token = trio.lowlevel.current_trio_token()
                    write = functools.partial(job.write, lambda: token.run_sync_soon(job.mark_written))
                    if urgent or self.stable == WAIT:  # someone waits (with stable pages, any writer may: as
                        # Linux's writeback, the I/O then runs at the process's priority), in a worker thread
                        await trio.to_thread.run_sync(write)
                    else:  # nobody waits: the low-priority I/O thread, which never takes the CPU from requests
                        if self.io_thread is None:
                            from .backend.iothread import IOThread

                            self.io_thread = IOThread()
                        await self.io_thread.run(write)
                    self.turn_started = clock()
                self.counters["commit_prepare_seconds"] += prepared - started
                self.counters["commit_write_seconds"] += clock() - prepared
            except Exception as e:
                self.fail(f"commit of delta {job.delta} failed: {e}")
                self.job = None
                job.wake_waiters()
                raise VolumeError(self.failed) from e
            done = clock()
            hold = max(hold, await self._sliced(job.complete_steps(), urgent))
            c = self.counters
            c["commit_complete_seconds"] += clock() - done
            c["loop_hold_max_seconds"] = max(c["loop_hold_max_seconds"], hold)
            c["flushes"] = self.dev.stats.flushes
            if not job.empty:
                self._verify_log(job.delta)
        return job.delta

    async def _sliced(self, steps: Iterator[None], urgent: bool = False) -> float:
        """Run a commit stage's steps on the event loop in slices of about ``Options.prepare_slice`` (``urgent_slice``
        when someone waits for the commit), letting the frontend go first between two slices when it has work;
        return the longest the loop was held at once. The first slice counts from the task's last turn
        (``turn_started``), so the work between two stages, and between two commits, is part of a slice too.
        Requests that reach the kernel while the frontend has its turn go first as well, as long as the stage has
        held the loop for ``commit_share`` of its time; not when someone waits for the commit (an fsync, or with
        stable pages any writer may)."""
        import trio

        clock = time.perf_counter
        opts = self.options
        length = opts.urgent_slice if urgent else opts.prepare_slice
        pending = self.frontend_pending
        # the instrument is added at the first slice boundary, so a stage shorter than a slice costs the frontend
        # nothing; tasks runnable before it was added are unknown to it, so that boundary always yields
        runnable: RunnableTasks | None = None
        last = yielded = max(self.turn_started, clock() - length)  # a turn of unknown start: one whole slice
        began = last
        requests_first = not urgent and self.stable != WAIT
        hold = held = 0.0  # the longest hold, and all of them
        counters = self.counters
        try:
            for _ in _checked(steps):
                if (now := clock()) - last >= length:
                    if runnable is None:
                        runnable = RunnableTasks()
                        trio.lowlevel.add_instrument(runnable)
                        go = True
                    else:
                        go = bool(runnable.tasks) or pending() or now - yielded >= opts.commit_yield
                    if go:
                        hold = max(hold, now - yielded)
                        held += now - yielded
                        counters["commit_loop_seconds"] += now - yielded
                        await self._frontend_first()
                        # a request that came while the frontend ran (a small write behind a large one) would
                        # otherwise wait for one more slice
                        while requests_first and pending() and held >= opts.commit_share * (self.turn_started - began):
                            await self._frontend_first()
                        last = yielded = self.turn_started
                    else:  # nobody waits for the loop: go on without a trip through the scheduler
                        last = now
            now = clock()
            counters["commit_loop_seconds"] += now - yielded
            return max(hold, now - yielded)
        finally:
            if runnable is not None:
                trio.lowlevel.remove_instrument(runnable)

    async def _frontend_first(self) -> None:
        """Between two slices of a commit: one turn for every task that is runnable, requests first. The first
        checkpoint lets the loop poll for requests and wake their tasks; the second lets those tasks run even when
        the scheduler puts this task first in their batch. Tasks that stay runnable get no second turn before the
        next slice, so a steady stream of requests slows a commit down but never stops it."""
        import trio

        await trio.sleep(0)
        await trio.sleep(0)
        self.turn_started = time.perf_counter()

    async def wait_job(self, job: CommitJob, written: bool = False) -> None:
        """Wait until ``job`` completes, or with ``written`` only until its blocks are written (the end of its
        pages' I/O)."""
        import trio

        if self.job is job and not (written and job.written):
            event = trio.Event()
            (job.written_waiters if written else job.waiters).append(event)
            await event.wait()

    # -- fsync ahead of the delta ----------------------------------------------------------------------------------

    def can_commit_ahead(self, ino: int) -> bool:
        """May this inode's changes in the current delta be committed before the rest of the delta? Yes for a
        regular file whose names are all committed already: the inode table holds it with the same link count, so
        a state with only its data and attributes newer is a state the namespace allows (ext4's fast-commit
        eligibility, by the same reasoning)."""
        inode = self.inodes.get(ino)
        if inode is None or not inode.is_reg or not inode.on_disk or inode.rec.nlink == 0:
            return False
        raw = self.itable.lookup(ino)
        return raw is not None and fmt.InodeRecord.unpack(raw).nlink == inode.rec.nlink

    def commit_ahead_pays(self, only: set[int]) -> bool:
        """Commit ``only`` ahead of its delta when every one may be, and the rest of the delta holds more than
        ``Options.fsync_ahead_bytes`` of dirty data (below that, one commit of the whole delta costs about the
        same and also makes the other files durable, which group commit of many fsyncing files relies on)."""
        delta = self.deltas.current
        dirty = self.dirty_inodes.get(delta, {})
        if self.options.fsync_ahead_bytes < 0 or len(dirty) <= len(only):  # nothing else (the usual fsync)
            return False
        rest = sum(len(inode.mapping.dirty.get(delta, ())) for ino, inode in dirty.items() if ino not in only)
        return rest * self.blocksize > self.options.fsync_ahead_bytes and all(map(self.can_commit_ahead, only))

    def _split_delta(self, delta: int, only: set[int]) -> None:
        """Right after the transition of ``delta``: move the changes of every inode not in ``only`` to the delta
        now current (which has none yet), so that ``delta`` holds only those of ``only``. Costs one pass over the
        moved inodes' dirty pages."""
        later = self.deltas.current
        dirty = self.dirty_inodes.pop(delta, {})
        kept = {ino: inode for ino, inode in dirty.items() if ino in only}
        moved = {ino: inode for ino, inode in dirty.items() if ino not in only}
        if later in self.dirty_inodes or any(later in inode.dirty_deltas for inode in moved.values()):
            raise AssertionError(f"delta {later} changed before the split of delta {delta}")
        if kept:
            self.dirty_inodes[delta] = kept
        if moved:
            self.dirty_inodes[later] = moved
        for inode in moved.values():
            inode.dirty_deltas.discard(delta)
            inode.dirty_deltas.add(later)
            if inode.attr_delta == delta:
                inode.attr_delta = later
            if delta in inode.hole_from:
                inode.hole_from[later] = inode.hole_from.pop(delta)
            inode.mapping.retag(delta, later)
        self.split_uncounted = sum(not inode.on_disk for inode in moved.values())  # created, not yet committed
        self.counters["commits_ahead"] += 1
        self.counters["inodes_moved_by_split"] += len(moved)

    async def fsync(self, ino: int) -> None:
        """fsync of one file: return once its changes are durable. When the rest of its delta is large, only its
        own blocks are committed (``commit_ahead_pays``); otherwise the whole delta (``sync``)."""
        if self.flusher is not None:
            await self.flusher.sync(ino)
            return
        inode = self.inodes.get(ino)
        if inode is None:
            return
        while self.job is not None and inode.dirty_deltas:
            await self.wait_job(self.job)
        if not inode.dirty_deltas:
            return
        if self.deltas.current in inode.dirty_deltas and self.commit_ahead_pays({ino}):
            await self.commit_async(inline_small=True, only={ino})
            return
        await self.sync()

    async def sync(self) -> None:
        """Return once everything changed before the call is durable (fsync, syncfs). Callers that arrive while a
        commit is in flight share the next one. With a flusher attached the request goes through its queue."""
        if self.flusher is not None:
            await self.flusher.sync()
            return
        target = self.deltas.current
        while self.deltas.committed < target:
            self.check_writable()
            if self.job is not None:
                await self.wait_job(self.job)
                continue
            if not (self.dirty_inodes.get(self.deltas.current) or self.alloc.records):
                if self.deltas.committed >= target - 1:
                    return  # nothing was changed in the delta we would commit
            await self.commit_async(inline_small=True)

    async def call(self, fn, *args, **kwargs):
        """Run an embedded-API operation, waiting and retrying while it must wait for a commit (WaitFor)."""
        import time as _time

        while True:
            try:
                return fn(*args, **kwargs)
            except WaitFor as w:
                started = _time.perf_counter()
                await self.wait_job(w.job, w.written)
                self.counters["waits"] += 1
                self.counters["wait_seconds"] += _time.perf_counter() - started
            except Throttled:
                started = _time.perf_counter()
                if self.job is not None:
                    await self.wait_job(self.job)
                elif self.flusher is not None:  # the flusher commits; the writer waits for it
                    await self.flusher.throttle()
                else:  # nobody is committing: the throttled writer commits, as balance_dirty_pages writes back
                    await self.commit_async()
                self.counters["throttled"] += 1
                self.counters["throttle_seconds"] += _time.perf_counter() - started

    def fail(self, reason: str) -> None:
        """Turn the volume read-only after an error it cannot recover from; the image keeps its last commit."""
        if self.failed is None:
            self.failed = reason
            log.error("volume %s is now read-only: %s", self.path, reason, exc_info=True)

    def check_writable(self) -> None:
        if self.failed is not None or self.readonly:
            raise _err(errno.EROFS)

    # ---------------------------------------------------------------------------------------------------------------
    # btree store (the backend's block access)

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

    # ---------------------------------------------------------------------------------------------------------------
    # inodes

    def iget(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is not None:
            return inode
        raw = self.itable.lookup(ino)
        if raw is None:
            raise _err(errno.ENOENT, f"inode {ino}")
        try:
            rec = InodeRecord.unpack(raw)
        except (ValueError, IndexError) as e:
            raise CorruptBlock(self.sb.itree_root, "ileaf", f"inode {ino}: {e}") from None
        return self._new_inode(ino, rec, on_disk=True)

    def _new_inode(self, ino: int, rec: InodeRecord, on_disk: bool) -> Inode:
        mapping = AddressSpace(ino, self.cache, self.registry)
        self.registry[ino] = mapping
        inode = Inode(ino, rec, mapping, on_disk)
        self.inodes[ino] = inode
        return inode

    def forget_inode(self, inode: Inode) -> None:
        inode.mapping.drop_all()
        self.inodes.pop(inode.ino, None)

    def dtree(self, inode: Inode) -> BTree:
        if inode.dtree is None:
            inode.dtree = BTree(self, fmt.KIND_DLEAF, inode.rec.dtree_root)
        return inode.dtree

    def dirty_inode_for(self, inode: Inode, delta: int) -> InodeRecord:
        return self._dirty_inode(inode, delta)

    def _dirty_inode(self, inode: Inode, delta: int) -> InodeRecord:
        """Prepare to change an inode in ``delta``: fork its attributes if needed and put it on the delta's dirty
        list (flusher.py states the list's order and its touch rule)."""
        if inode.attr_dirty(delta):
            self.counters["attr_forks"] += 1
        rec = inode.rec
        inode.dirty_deltas.add(delta)
        dirty = self.dirty_inodes.get(delta)
        if dirty is None:
            dirty = self.dirty_inodes[delta] = {}
            if self.on_dirty is not None:
                self.on_dirty()
        if inode.ino not in dirty:
            inode.dirtied = self.clock()
            dirty[inode.ino] = inode
        elif (now := self.clock()) - inode.dirtied >= self.options.touch_after:  # touch: move to the tail
            del dirty[inode.ino]
            self._inherit_head(dirty, inode.dirtied)
            inode.dirtied = now
            dirty[inode.ino] = inode
        return rec

    @staticmethod
    def _inherit_head(dirty: dict[int, Inode], dirtied: float) -> None:
        """An inode left the head of a dirty list: the new head takes over its age, so that the head's
        ``dirtied`` stays the time of the oldest change still pending in the delta."""
        for head in dirty.values():
            if head.dirtied > dirtied:
                head.dirtied = dirtied
            return

    def _inode_done(self, inode: Inode, delta: int) -> None:
        """Done: take an inode off ``delta``'s dirty list, nothing of it being left to write for that delta."""
        dirty = self.dirty_inodes.get(delta)
        if dirty is None or dirty.pop(inode.ino, None) is None:
            return
        inode.dirty_deltas.discard(delta)
        if dirty:
            self._inherit_head(dirty, inode.dirtied)
        else:
            del self.dirty_inodes[delta]

    def attr(self, inode: Inode) -> Attr:
        r = inode.rec
        pending = inode.mapping.dirty_count()
        return Attr(inode.ino, r.mode, r.nlink, r.uid, r.gid, r.rdev, r.size,
                    (r.blocks + pending) * (self.blocksize // 512), self.blocksize, r.atime_ns, r.mtime_ns,
                    r.ctime_ns)

    @guarded
    def getattr(self, ino: int) -> Attr:
        return self.attr(self.iget(ino))

    @guarded
    def ref(self, ino: int, n: int = 1) -> None:
        """The kernel holds n more references (lookup count)."""
        self.iget(ino).lookups += n

    @guarded
    def forget(self, ino: int, n: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.lookups -= n
        self._maybe_dead(inode)

    def _maybe_dead(self, inode: Inode) -> None:
        if inode.dead and inode.ino != ROOT_INO and self.failed is None and not self.readonly:
            with self.deltas.change() as delta:
                if not inode.on_disk and inode.dirty_deltas <= {delta}:
                    # created and gone within the current delta: nothing of it is written, not even a table entry
                    self._inode_done(inode, delta)
                    self.used_inodes -= 1
                    self.forget_inode(inode)
                    self.counters["inodes_discarded"] += 1
                else:
                    self._dirty_inode(inode, delta)

    @guarded
    def open(self, ino: int, truncate: bool = False) -> Attr:
        inode = self.iget(ino)
        if truncate:
            self.setattr(ino, size=0)
        inode.opens += 1
        return self.attr(inode)

    @guarded
    def release(self, ino: int) -> None:
        inode = self.inodes.get(ino)
        if inode is not None:
            inode.opens -= 1
            self._maybe_dead(inode)

    # ---------------------------------------------------------------------------------------------------------------
    # space

    def _meta_estimate(self, dirty_pages: int, dirty_inodes: int) -> int:
        """Blocks a commit may need for metadata beyond the data blocks (a generous upper bound)."""
        leaf = self.leaf_capacity
        return 16 + 12 * dirty_inodes + (dirty_pages * 64) // leaf + (dirty_inodes * 160) // leaf

    def _dirty_reservation(self, dead: int = 0) -> int:
        """Blocks the dirty pages and the commits of them may take; ``dead``: dirty inodes whose commit only drops
        them (they write no record)."""
        pages = self.cache.dirty_pages
        inodes = max(0, sum(len(d) for d in self.dirty_inodes.values()) - dead)
        return pages + self._meta_estimate(pages, inodes) + self._unify_estimate()

    def _unify_estimate(self) -> int:
        """Blocks the next unify may need for the tree nodes changed since the last one (a generous bound)."""
        return self.unify_nodes + self.itable.dirty_nodes + self.otree.dirty_nodes

    def _slack(self) -> int:
        """Blocks kept back for deletes and truncates, which must work on a full volume."""
        return max(8, self.sb.volblocks // 512)

    def reserve(self, new_pages: int) -> None:
        """Make sure ``new_pages`` more dirty pages can be committed; commit first if that frees space.

        Only blocks free in the bitmap count (``alloc.free``): blocks that unlinks and truncates free are
        reusable once the commit that frees them is durable, so when they are needed this commits (or raises
        WaitFor for the commit in flight, after which the caller retries) and counts them only then. A write
        that returns has its blocks, so its commit never fails for lack of space."""
        for attempt in range(2):
            need = self._dirty_reservation() + new_pages + self._meta_estimate(new_pages, 1)
            if need + self._slack() <= self.alloc.free:
                return
            if attempt == 0 and (self.alloc.pending or self.cache.dirty_pages or self.unify_frees
                                 or self.unify_nodes or any(self.dirty_inodes.values())):
                if self.job is not None:  # the commit in flight holds the space: wait for it
                    raise WaitFor(self.job)
                self.commit(unify=bool(self.unify_frees or self.unflushed))
        raise _err(errno.ENOSPC)

    def _mapped_from(self, inode: Inode, index: int) -> int:
        """Blocks the extent tree of ``inode`` maps at logical ``index`` and beyond."""
        tree = self.dtree(inode)
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
        of the dirty inodes are such unlinked ones (their commit only drops them). Reusable once those commits
        are durable (``reserve`` commits for them when it needs them)."""
        total, dead = self.alloc.pending_count(), 0
        seen: dict[int, Inode] = {}
        for dirty in self.dirty_inodes.values():
            seen.update(dirty)
        if self.job is not None:
            seen.update((inode.ino, inode) for inode in self.job.inodes)
        for ino, inode in seen.items():
            if self.inodes.get(ino) is not inode:  # destroyed by the commit in flight: its blocks are pending
                continue
            if inode.rec.nlink == 0 and inode.opens <= 0:
                total += inode.rec.blocks + inode.mapping.dirty_count()
                dead += 1
            elif inode.hole_from:
                total += self._mapped_from(inode, min(inode.hole_from.values()))
        return total, dead

    @guarded
    def statfs(self) -> dict[str, int]:
        """Space as a user should see it: free blocks, plus what unlinks and truncates free once their commit is
        durable (``freeing``; a write that needs them waits for that commit), minus what dirty data and the
        commits of it will take, minus the slack kept for deletes."""
        freeing, dead = self.freeing()
        free = max(0, self.alloc.free + freeing - self._dirty_reservation(dead) - self._slack())
        per_block = max(1, self.blocksize // 128)
        return {
            "bsize": self.blocksize, "frsize": self.blocksize, "blocks": self.sb.volblocks,
            "bfree": free, "bavail": free, "files": self.used_inodes + free * per_block,
            "ffree": free * per_block, "namemax": fmt.NAME_MAX,
        }

    # ---------------------------------------------------------------------------------------------------------------
    # pages

    def _read_pages(self, inode: Inode, index: int, limit: int) -> list[Page]:
        """Bring up to ``limit`` pages from ``index`` into the cache (at least one)."""
        mapping = inode.mapping
        page = mapping.get(index)
        if page is not None:
            self.cache.touch(mapping, page)
            return [page]
        bs = self.blocksize
        hole = min((h for d, h in inode.hole_from.items()), default=None)
        tree = self.dtree(inode)
        limit = min(limit, max(1, -(-inode.rec.size // bs) - index))
        for i in range(1, limit):  # stop at the next cached page
            if mapping.get(index + i) is not None:
                limit = i
                break
        if hole is not None and index >= hole:
            physical, csums, n = 0, [], 1
        else:
            physical, csums, n = extents.lookup_run(tree, index, limit)
            if hole is not None:
                n = max(1, min(n, hole - index))
        pages = []
        if physical:
            data = memoryview(self.dev.read_blocks(physical, n))
            for i in range(n):
                block = data[i * bs: (i + 1) * bs]
                if fmt.checksum(block) != csums[i]:
                    self.counters["checksum_errors"] += 1
                    raise CorruptBlock(physical + i, "data", f"checksum mismatch (inode {inode.ino}, "
                                                            f"block {index + i})")
                pages.append(Page(index + i, block))
        else:
            zero = memoryview(bytes(bs))  # holes share one read-only zero block until written
            pages = [Page(index + i, zero) for i in range(n)]
        for page in pages:
            mapping.insert(page)
        return pages

    def _page(self, inode: Inode, index: int) -> Page:
        return self._read_pages(inode, index, 1)[0]

    def _write_page(self, inode: Inode, index: int, delta: int, fill: bool = True) -> Page:
        """The page at ``index`` made ready to change in ``delta`` (read first when ``fill``), by the decision
        table of cache/fork.py: dirtied, forked, or (stable=none) left under writeback to change in place."""
        mapping = inode.mapping
        page = mapping.get(index)
        if page is None:
            page = self._page(inode, index) if fill else Page(index, bytearray(self.blocksize))
            if not fill:
                mapping.insert(page)
        job = self.job
        action = need_fork(page, delta, self.stable, job is not None and job.written)
        if action is Action.CAN_DIRTY:
            mapping.mark_dirty(page, delta)
        elif action is Action.NEED_FORK:
            page = self._fork(inode, page, delta)
        elif action is Action.IN_PLACE:
            page.redirty = delta
            self.counters["in_place_writes"] += 1
        elif action is Action.AFTER_IO:  # the block is written: neither the disk nor the delta can see this change
            page.redirty = delta
            self.counters["after_io_writes"] += 1
        elif action is Action.WAIT:  # callers check first (_must_wait); a miss here is a bug
            raise AssertionError(f"{page} of inode {inode.ino} needs a wait that was not checked for")
        elif action is Action.FORKED:
            raise AssertionError(f"forked {page} is still in the index of inode {inode.ino}")
        page.mutable()
        return page

    def _fork(self, inode: Inode, page: Page, delta: int) -> Page:
        """Copy a page the backend owns; the copy takes its place in the index and in every mapping."""
        new = clone_page(page)
        mapping = inode.mapping
        mapping.replace(page, new)
        self.forks.add(page)
        mapping.rmap_cow(page, new)
        mapping.mark_dirty(new, delta)
        c = self.counters
        c["forks"] += 1
        c["dir_forks" if inode.is_dir else "data_forks"] += 1
        c["bytes_copied"] += self.blocksize
        return new

    def _must_wait(self, inode: Inode, first: int = 0, last: int | None = None) -> None:
        """stable=wait: raise WaitFor before changing anything if a page in [first, last] is the backend's and not
        written yet (once the commit's blocks are written its pages change in place, as after Linux's
        end_page_writeback: the wait is for the page's I/O, never for the flush)."""
        if self.stable != WAIT or self.job is None or self.job.written:
            return
        pages = inode.mapping.pages
        current = self.deltas.current

        def owned(p: Page) -> bool:  # under writeback, or dirty for the delta being prepared
            return p.writeback or (p.delta != -1 and p.delta != current)

        if last is None or last - first > len(pages):
            busy = any(owned(p) for i, p in pages.items() if i >= first and (last is None or i <= last))
        else:
            busy = any((p := pages.get(i)) is not None and owned(p) for i in range(first, last + 1))
        if busy:
            raise WaitFor(self.job, written=True)

    @guarded
    def page_for_mapping(self, inode: Inode, index: int) -> Page:
        """Read fault of a shared mapping: the page the index holds."""
        return self._page(inode, index)

    @guarded
    def page_mkwrite(self, smap: SharedMapping, index: int) -> list:
        """Write fault of a shared mapping: make the page writable for the current delta (forking it if the
        backend owns it) and map it writable in ``smap``; returns the page-table entry."""
        self.check_writable()
        inode = smap.inode
        self._must_wait(inode, index, index)
        page = inode.mapping.get(index)
        if page is None or page.delta != self.deltas.current:
            self.reserve(1)
        with self.deltas.change() as delta:
            page = self._write_page(inode, index, delta)
            rec = self._dirty_inode(inode, delta)
            rec.mtime_ns = rec.ctime_ns = time.time_ns()
        pte = smap.ptes[index] = [page, True]
        return pte

    @guarded
    def mmap(self, ino: int) -> SharedMapping:
        """Map a regular file shared and writable (the embedded API's mmap)."""
        inode = self.iget(ino)
        if not inode.is_reg:
            raise _err(errno.ENODEV)
        return SharedMapping(self, inode)

    # ---------------------------------------------------------------------------------------------------------------
    # data

    @guarded
    def read(self, ino: int, offset: int, size: int) -> bytes:
        inode = self.iget(ino)
        end = min(offset + size, inode.rec.size)
        if offset >= end:
            return b""
        bs = self.blocksize
        first, last = offset // bs, (end - 1) // bs
        parts = []
        index = first
        while index <= last:
            for page in self._read_pages(inode, index, last - index + 1):
                parts.append(page.data)
                index += 1
        if len(parts) == 1:
            lo = offset - first * bs
            return bytes(parts[0][lo: lo + end - offset])
        data = b"".join(parts)
        lo = offset - first * bs
        return data[lo: lo + end - offset]

    @guarded
    def write(self, ino: int, offset: int, data: bytes) -> int:
        self.check_writable()
        if offset + len(data) > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        if not data:
            return 0
        inode = self.iget(ino)
        bs = self.blocksize
        first, last = offset // bs, (offset + len(data) - 1) // bs
        mapping = inode.mapping
        self._must_wait(inode, first, last)
        mine = mapping.dirty.get(self.deltas.current)
        npages = last - first + 1
        new = npages if not mine else npages - sum(1 for i in range(first, last + 1) if i in mine)
        limit = self.options.dirty_limit
        if limit and new and self.cache.dirty_pages and (self.cache.dirty_pages + new) * bs > limit:
            if self.job is not None or self.on_background is not None:
                raise Throttled()  # the caller awaits the commit (Volume.call); the event loop keeps serving
            self.commit()  # a plain embedded caller with no flusher: write back now, synchronously
        self.reserve(new)
        with self.deltas.change() as delta:
            size = inode.rec.size
            mv = memoryview(data)
            end = offset + len(data)
            index, pos = first, 0
            lo = offset - first * bs
            if lo or end - first * bs < bs:  # a partial first page
                n = min(bs - lo, len(data))
                page = self._write_page(inode, first, delta, fill=not (lo == 0 and end >= size))
                page.data[lo: lo + n] = mv[:n]
                index, pos = first + 1, n
            whole_end = (end // bs) if end % bs else last + 1  # pages fully covered by the write
            if index < whole_end:
                mapping.write_pages(index, mv[pos: pos + (whole_end - index) * bs], delta,
                                    lambda i: self._write_page(inode, i, delta, fill=False))
                pos += (whole_end - index) * bs
                index = whole_end
            if index <= last:  # a partial last page
                n = end - index * bs
                page = self._write_page(inode, index, delta, fill=index * bs < size)
                page.data[:n] = mv[pos:]
            rec = self._dirty_inode(inode, delta)
            now = time.time_ns()
            if end > rec.size:
                rec.size = end
            if self.on_background is not None and self.cache.dirty_pages * bs >= self.options.background_bytes:
                self.on_background()
            rec.mtime_ns = rec.ctime_ns = now
            if rec.mode & (stat.S_ISUID | stat.S_ISGID):
                rec.mode &= ~stat.S_ISUID & ~(stat.S_ISGID if rec.mode & stat.S_IXGRP else 0)
        return len(data)

    def _truncate(self, inode: Inode, size: int, delta: int) -> None:
        rec = inode.rec
        bs = self.blocksize
        if size < rec.size:
            keep = -(-size // bs)
            for page in inode.mapping.truncate(keep, delta):  # the backend's: deleted for writeout, no copy
                self.forks.add(page)
            old = inode.hole_from.get(delta)
            inode.hole_from[delta] = keep if old is None else min(old, keep)
            if size % bs:
                page = self._write_page(inode, size // bs, delta)
                page.data[size % bs:] = bytes(bs - size % bs)
        rec.size = size

    @guarded
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                ctime_ns: int | None = None) -> Attr:
        self.check_writable()
        inode = self.iget(ino)
        if size is not None:
            if inode.is_dir:
                raise _err(errno.EISDIR)
            if size > MAX_FILE_SIZE:
                raise _err(errno.EFBIG)
            if size > inode.rec.size and size % self.blocksize:
                self.reserve(1)
            if size < inode.rec.size:
                self._must_wait(inode, size // self.blocksize)
        with self.deltas.change() as delta:
            rec = self._dirty_inode(inode, delta)
            now = time.time_ns()
            if size is not None and size != rec.size:
                self._truncate(inode, size, delta)
                rec.mtime_ns = now
            if mode is not None:
                rec.mode = stat.S_IFMT(rec.mode) | (mode & 0o7777)
            if uid is not None:
                rec.uid = uid
            if gid is not None:
                rec.gid = gid
            if atime_ns is not None:
                rec.atime_ns = atime_ns
            if mtime_ns is not None:
                rec.mtime_ns = mtime_ns
            rec.ctime_ns = ctime_ns if ctime_ns is not None else now
        return self.attr(inode)

    # ---------------------------------------------------------------------------------------------------------------
    # directories

    def _dir(self, inode: Inode) -> DirIndex:
        if not inode.is_dir:
            raise _err(errno.ENOTDIR)
        if inode.dir is None:
            inode.dir = DirIndex(inode.ino, self.blocksize, inode.rec.size // self.blocksize,
                                 lambda block: self._page(inode, block).data)
        return inode.dir

    def _dir_writer(self, inode: Inode, delta: int):
        def write(block: int) -> bytearray:
            fill = block * self.blocksize < inode.rec.size
            return self._write_page(inode, block, delta, fill=fill).data
        return write

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > fmt.NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name:
            raise _err(errno.EINVAL)
        if name in (b".", b".."):
            raise _err(errno.EEXIST)

    @guarded
    def lookup(self, parent: int, name: bytes) -> Attr:
        """Find a name; the kernel now holds one more reference to the inode."""
        if len(name) > fmt.NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        dirnode = self.iget(parent)
        if name == b".":
            ino = parent
        elif name == b"..":
            ino = dirnode.rec.parent or ROOT_INO
        else:
            entry = self._dir(dirnode).get(name)
            if entry is None:
                raise _err(errno.ENOENT)
            ino = entry[0]
        inode = self.iget(ino)
        inode.lookups += 1
        return self.attr(inode)

    def _make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0) -> Inode:
        self.check_writable()
        self._check_name(name)
        dirnode = self.iget(parent)
        index = self._dir(dirnode)
        if dirnode.rec.nlink == 0:
            raise _err(errno.ENOENT)
        if index.get(name) is not None:
            raise _err(errno.EEXIST)
        self._must_wait(dirnode)
        self.reserve(2)
        with self.deltas.change() as delta:
            now = time.time_ns()
            ino = self.next_inum
            self.next_inum += 1
            self.used_inodes += 1
            is_dir = stat.S_ISDIR(mode)
            rec = InodeRecord(mode=mode, uid=uid, gid=gid, nlink=2 if is_dir else 1, rdev=rdev, atime_ns=now,
                              mtime_ns=now, ctime_ns=now, parent=parent if is_dir else 0)
            if dirnode.rec.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
                rec.gid = dirnode.rec.gid
                if is_dir:
                    rec.mode |= stat.S_ISGID
            inode = self._new_inode(ino, rec, on_disk=False)
            self._dirty_inode(inode, delta)
            self._add_entry(dirnode, name, inode, delta)
            if is_dir:
                prec = self._dirty_inode(dirnode, delta)
                prec.nlink += 1
        inode.lookups += 1
        return inode

    def _add_entry(self, dirnode: Inode, name: bytes, inode: Inode, delta: int) -> None:
        index = self._dir(dirnode)
        rec = self._dirty_inode(dirnode, delta)
        if index.add(name, inode.ino, DT_OF_MODE.get(stat.S_IFMT(inode.rec.mode), 0),
                     self._dir_writer(dirnode, delta)):
            rec.size = index.nblocks * self.blocksize
        rec.mtime_ns = rec.ctime_ns = time.time_ns()

    @guarded
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, uid: int = 0, gid: int = 0) -> Attr:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_IFMT(mode) not in DT_OF_MODE or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise _err(errno.EINVAL)
        return self.attr(self._make(parent, name, mode, uid, gid, rdev))

    @guarded
    def create(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        """Create and open a regular file."""
        inode = self._make(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        inode.opens += 1
        return self.attr(inode)

    @guarded
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0) -> Attr:
        return self.attr(self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid))

    @guarded
    def symlink(self, parent: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Attr:
        if len(target) >= 4096:
            raise _err(errno.ENAMETOOLONG)
        inode = self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid)
        self.reserve(-(-len(target) // self.blocksize))
        with self.deltas.change() as delta:
            bs = self.blocksize
            for at in range(0, len(target), bs):
                page = self._write_page(inode, at // bs, delta, fill=False)
                chunk = target[at: at + bs]
                page.data[: len(chunk)] = chunk
            self._dirty_inode(inode, delta).size = len(target)
        return self.attr(inode)

    @guarded
    def readlink(self, ino: int) -> bytes:
        inode = self.iget(ino)
        if not stat.S_ISLNK(inode.rec.mode):
            raise _err(errno.EINVAL)
        return self.read(ino, 0, inode.rec.size)

    @guarded
    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        self.check_writable()
        self._check_name(name)
        inode = self.iget(ino)
        if inode.is_dir:
            raise _err(errno.EPERM)
        dirnode = self.iget(parent)
        if self._dir(dirnode).get(name) is not None:
            raise _err(errno.EEXIST)
        if inode.rec.nlink >= 65000:
            raise _err(errno.EMLINK)
        self._must_wait(dirnode)
        self.reserve(1)
        with self.deltas.change() as delta:
            self._add_entry(dirnode, name, inode, delta)
            rec = self._dirty_inode(inode, delta)
            rec.nlink += 1
            rec.ctime_ns = time.time_ns()
        inode.lookups += 1
        return self.attr(inode)

    def _drop_link(self, inode: Inode, delta: int, now: int) -> None:
        rec = self._dirty_inode(inode, delta)
        rec.nlink = 0 if inode.is_dir else rec.nlink - 1
        rec.ctime_ns = now

    @guarded
    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, is_dir=False)

    @guarded
    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, is_dir=True)

    def _remove(self, parent: int, name: bytes, is_dir: bool) -> None:
        self.check_writable()
        if len(name) > fmt.NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if name in (b".", b".."):
            raise _err(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
        dirnode = self.iget(parent)
        index = self._dir(dirnode)
        entry = index.get(name)
        if entry is None:
            raise _err(errno.ENOENT)
        inode = self.iget(entry[0])
        if is_dir and not inode.is_dir:
            raise _err(errno.ENOTDIR)
        if not is_dir and inode.is_dir:
            raise _err(errno.EISDIR)
        if is_dir and len(self._dir(inode)):
            raise _err(errno.ENOTEMPTY)
        self._must_wait(dirnode)
        with self.deltas.change() as delta:
            now = time.time_ns()
            index.remove(name, self._dir_writer(dirnode, delta))
            prec = self._dirty_inode(dirnode, delta)
            prec.mtime_ns = prec.ctime_ns = now
            if is_dir:
                prec.nlink -= 1
            self._drop_link(inode, delta, now)
        self._maybe_dead(inode)

    def _is_ancestor(self, ino: int, of: int) -> bool:
        """Is directory ``ino`` the directory ``of`` or one of its ancestors?"""
        cur = of
        for _ in range(1 << 16):
            if cur == ino:
                return True
            if cur == ROOT_INO or cur == 0:
                return False
            cur = self.iget(cur).rec.parent
        return False

    @guarded
    def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int = 0) -> None:
        self.check_writable()
        self._check_name(new)
        if len(old) > fmt.NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise _err(errno.EINVAL)
        sdir, ddir = self.iget(old_parent), self.iget(new_parent)
        sidx, didx = self._dir(sdir), self._dir(ddir)
        sentry = sidx.get(old)
        if sentry is None:
            raise _err(errno.ENOENT)
        src = self.iget(sentry[0])
        dentry = didx.get(new)
        dst = self.iget(dentry[0]) if dentry is not None else None
        if flags & RENAME_NOREPLACE and dst is not None:
            raise _err(errno.EEXIST)
        self._must_wait(sdir)
        self._must_wait(ddir)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _err(errno.ENOENT)
            if src.is_dir and self._is_ancestor(src.ino, ddir.ino) and src is not dst:
                raise _err(errno.EINVAL)
            if dst.is_dir and self._is_ancestor(dst.ino, sdir.ino) and src is not dst:
                raise _err(errno.EINVAL)
            self._exchange(sdir, old, src, ddir, new, dst)
            return
        if dst is src:
            return  # both names are links to the same inode: nothing to do
        if src.is_dir and self._is_ancestor(src.ino, ddir.ino):
            raise _err(errno.EINVAL)
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise _err(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise _err(errno.EISDIR)
            if dst.is_dir and len(self._dir(dst)):
                raise _err(errno.ENOTEMPTY)
        else:
            self.reserve(1)
        with self.deltas.change() as delta:
            now = time.time_ns()
            dtype = DT_OF_MODE.get(stat.S_IFMT(src.rec.mode), 0)
            if dst is not None:
                didx.retarget(new, src.ino, dtype, self._dir_writer(ddir, delta))
                drec = self._dirty_inode(ddir, delta)
                drec.mtime_ns = drec.ctime_ns = now
                self._drop_link(dst, delta, now)
                if dst.is_dir:
                    drec.nlink -= 1
            else:
                self._add_entry(ddir, new, src, delta)
            sidx.remove(old, self._dir_writer(sdir, delta))
            srec = self._dirty_inode(sdir, delta)
            srec.mtime_ns = srec.ctime_ns = now
            rec = self._dirty_inode(src, delta)
            rec.ctime_ns = now
            if src.is_dir and sdir is not ddir:
                srec.nlink -= 1
                self._dirty_inode(ddir, delta).nlink += 1
                rec.parent = ddir.ino
        if dst is not None:
            self._maybe_dead(dst)

    def _exchange(self, sdir: Inode, old: bytes, src: Inode, ddir: Inode, new: bytes, dst: Inode) -> None:
        with self.deltas.change() as delta:
            now = time.time_ns()
            sidx, didx = self._dir(sdir), self._dir(ddir)
            sidx.retarget(old, dst.ino, DT_OF_MODE.get(stat.S_IFMT(dst.rec.mode), 0), self._dir_writer(sdir, delta))
            didx.retarget(new, src.ino, DT_OF_MODE.get(stat.S_IFMT(src.rec.mode), 0), self._dir_writer(ddir, delta))
            for d in (sdir, ddir):
                r = self._dirty_inode(d, delta)
                r.mtime_ns = r.ctime_ns = now
            for node, new_parent in ((src, ddir), (dst, sdir)):
                r = self._dirty_inode(node, delta)
                r.ctime_ns = now
                if node.is_dir and sdir is not ddir:
                    r.parent = new_parent.ino
            if sdir is not ddir and src.is_dir != dst.is_dir:
                moved = 1 if src.is_dir else -1  # a directory moved from sdir to ddir
                self._dirty_inode(sdir, delta).nlink -= moved
                self._dirty_inode(ddir, delta).nlink += moved

    @guarded
    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode number, next position) from position ``start`` (0: the beginning)."""
        inode = self.iget(ino)
        index = self._dir(inode)
        for name, child, _, nxt in index.entries(start, lambda block: self._page(inode, block).data):
            yield name, child, nxt

    # ---------------------------------------------------------------------------------------------------------------
    # extended attributes

    @guarded
    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.iget(ino).rec.xattrs.get(name)
        if value is None:
            raise _err(errno.ENODATA)
        return value

    @guarded
    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self.iget(ino).rec.xattrs)

    @guarded
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self.check_writable()
        if not (name.startswith(b"user.") or name.startswith(b"trusted.") or name.startswith(b"security.")):
            raise _err(errno.EOPNOTSUPP)
        if len(name) > 255:
            raise _err(errno.ERANGE)
        inode = self.iget(ino)
        xattrs = inode.rec.xattrs
        if flags & os.XATTR_CREATE and name in xattrs:
            raise _err(errno.EEXIST)
        if flags & os.XATTR_REPLACE and name not in xattrs:
            raise _err(errno.ENODATA)
        size = len(inode.rec.pack()) - (fmt.xattr_cost(name, xattrs[name]) if name in xattrs else 0)
        if size + fmt.xattr_cost(name, value) > fmt.max_inode_record(self.blocksize):
            raise _err(errno.ENOSPC, "extended attributes do not fit in the inode")
        self.reserve(1)
        with self.deltas.change() as delta:
            rec = self._dirty_inode(inode, delta)
            rec.xattrs[name] = bytes(value)
            rec.ctime_ns = time.time_ns()

    @guarded
    def removexattr(self, ino: int, name: bytes) -> None:
        self.check_writable()
        inode = self.iget(ino)
        if name not in inode.rec.xattrs:
            raise _err(errno.ENODATA)
        with self.deltas.change() as delta:
            rec = self._dirty_inode(inode, delta)
            del rec.xattrs[name]
            rec.ctime_ns = time.time_ns()

    # ---------------------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.counters)
        out.update(dirty_pages=self.cache.dirty_pages, cached_pages=len(self.cache.clean) + self.cache.dirty_pages,
                   delta=self.deltas.current, committed=self.deltas.committed, free_blocks=self.alloc.free,
                   flushes=self.dev.stats.flushes, hole_fill_bytes=self.dev.stats.fill_bytes,
                   forked_pages_live=self.forks.live,
                   forked_pages_peak=self.forks.peak, wait_seconds=float(self.counters["wait_seconds"]),
                   stable=self.stable, read_only=int(self.failed is not None or self.readonly),
                   dropped_delta=self.recovery.dropped, dropped_cause=self.recovery.cause)
        return out


def delta_landed(fd: int, sb: Super) -> bool:
    """Did every block of the delta this superblock commits reach the disk? (Only for one-flush commits.)"""
    bs = sb.blocksize

    def read(block: int) -> bytes:
        if not 0 < block < sb.volblocks:
            raise fmt.CorruptBlock(block, "log", "outside the volume")
        return os.pread(fd, bs, block * bs)

    records: list = []
    logs: list[int] = []
    block, left = sb.log_head, sb.log_count
    try:
        while block and left:
            buf = read(block)
            _, _, count, delta = fmt.unseal(buf, block, (fmt.KIND_LOG,))
            if delta != sb.seq:
                break
            prev, recs = fmt.unpack_log(buf, count)
            records[:0] = recs
            logs.append(block)
            block, left = prev, left - 1
    except (fmt.CorruptBlock, ValueError):
        return False
    if not logs:
        return False
    named = fmt.delta_blocks(records) | set(logs)
    try:
        return fmt.delta_digest({b: read(b) for b in named}) == sb.delta_csum
    except fmt.CorruptBlock:
        return False


def read_super(fd: int, path: str = "image") -> Super:
    """The superblock a mount loads (``find_super``, without the report)."""
    return find_super(fd, path)[0]


def find_super(fd: int, path: str = "image") -> tuple[Super, Recovery]:
    """The superblock copy to load, and the report of what was left out and why (recovery.py). Every copy whose
    checksum fails is reported; when the newest delta's proof fails, the delta before is loaded and the report says
    whether the newest was a commit that did not finish or was damaged after it was written (docs/FORMAT.md §11);
    ``Recovery.refuse`` is set when a read-write mount must not go on. VolumeError when no delta can be loaded."""
    size = image_size(fd)
    if size < fmt.SUPER_OFFSETS[1] + fmt.SUPER_SIZE:
        raise VolumeError(f"{path}: image is too short ({size} bytes) to hold a tux3fuse volume")
    found, problems, bad = [], [], []
    for copy, offset in enumerate(fmt.SUPER_OFFSETS):
        raw = os.pread(fd, fmt.SUPER_SIZE, offset)
        try:
            found.append(Super.unpack(raw, copy))
        except FormatError as e:
            problems.append(str(e))
            bad.append((copy, raw, str(e)))
    if not found:
        if all("wrong magic" in p for p in problems):
            raise VolumeError(f"{path}: not a tux3fuse volume (no signature found)")
        raise VolumeError(f"{path}: no usable superblock ({'; '.join(problems)})")
    found.sort(key=lambda s: s.seq, reverse=True)
    sb = found[0]
    report = Recovery(path)
    for copy, raw, reason in bad:
        note, refuse = recovery.judge_bad_copy(raw, copy, sb, reason.removeprefix(f"superblock copy {copy}: "), path)
        if note:
            report.notes.append(note)
        report.refuse = report.refuse or refuse
        fix = recovery.super_fix(raw, copy) if refuse else None
        if fix is not None:  # a newer copy whose content is known exactly: fsck.tux3 restores it
            report.fixes.append(fix)
        if refuse:
            report.exact = fix is not None
    if sb.delta_csum and not delta_landed(fd, sb):
        if len(found) < 2:
            raise VolumeError(f"{path}: the last delta ({sb.seq}) did not reach the disk whole and the other "
                              f"superblock copy is unusable ({'; '.join(problems)}); run fsck.tux3")
        copies = report  # what the bad copies cost: kept beside the report on the newest delta
        report = recovery.judge_delta(fd, sb, found[1], path)
        report.notes[:0] = copies.notes + ([copies.refuse] if copies.refuse and report.refuse else [])
        report.refuse = report.refuse or copies.refuse
        report.fixes[:0] = copies.fixes
        report.exact = report.exact and (copies.exact or not copies.refuse)
        sb = found[1]
        if sb.delta_csum and not delta_landed(fd, sb):  # durable before the newest was written: damage
            report.cause = recovery.DAMAGED
            report.refuse = (f"{path}: delta {sb.seq}, durable before delta {report.dropped}, fails its proof "
                             "too; run fsck.tux3")
    report.seq = sb.seq
    if size < sb.volblocks * sb.blocksize:
        raise VolumeError(f"{path}: image is {size} bytes but the filesystem needs {sb.volblocks * sb.blocksize}"
                          " (truncated image?)")
    return sb, report


__all__ = ["Attr", "CorruptBlock", "CorruptDir", "NoSpace", "Options", "Volume", "VolumeError", "read_super"]
