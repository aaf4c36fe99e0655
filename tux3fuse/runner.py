"""The commit runner: drives one commit's stages (``CommitJob``) beside the frontend, and owns the job in flight.

Guarantees:
- At most one commit is in flight (``job``); a commit once started always ends: its stages run shielded from
  cancellation, and it ends either completed (the delta is durable, ``Deltas.committed_to``) or failed (the volume
  is read-only, ``VolumeError`` to whoever waits).
- The prepare and complete stages run on the event loop in slices of about ``Options.prepare_slice``
  (``urgent_slice`` when someone waits for the commit), and between two slices the frontend goes first when it
  has work (``sliced``); so a large delta slows requests down but never stops them, and a steady stream of
  requests slows a commit down but never stops it.
- The write stage runs where it costs the frontend least: inline when one caller waits for a small commit and no
  request waits for the loop (never on a modelled slow device, whose waits must not hold the loop: ``Device.slow``),
  in a trio worker thread when someone waits (an fsync, or with stable pages any writer may), otherwise in the
  nice-19 I/O thread (``backend/iothread.py``), which never takes the CPU from requests. So under many concurrent
  fsyncs the loop keeps taking their writes while a commit's I/O is in flight (``commits_inline`` counts the
  others).
- ``wait_job`` wakes when the job completes, or with ``written`` once its blocks are written (the end of its
  pages' I/O, as Linux's ``end_page_writeback``: what a stable-page writer waits for).

The runner never decides when to commit, nor starts a commit: the flusher does both (``flusher.py``).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator

from .backend.commit import CommitJob
from .cache.fork import WAIT, ForkRegistry
from .delta import Deltas
from .device import Device
from .failure import Health, VolumeError
from .options import Options


def _nothing_pending() -> bool:
    return False


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


class Runner:
    def __init__(self, deltas: Deltas, forks: ForkRegistry, dev: Device, health: Health, options: Options,
                 counters: Counter[str], verify: Callable[[int], None]) -> None:
        self.deltas = deltas
        self.forks = forks
        self.dev = dev
        self.health = health
        self.options = options
        self.counters = counters
        self.verify = verify  # after every commit that wrote something (the replay invariant, when asked for)
        self.job: CommitJob | None = None  # the commit in flight
        self.io_thread = None  # backend.iothread.IOThread for the writes of commits nobody waits for, once needed
        # True when a request waits that no task has picked up yet (the FUSE daemon polls /dev/fuse); a commit's
        # slices then let the frontend go first
        self.frontend_pending: Callable[[], bool] = _nothing_pending
        # when the task that runs commits last got the event loop back (perf_counter): whoever makes it wait sets
        # this when it resumes, and a commit's first slice counts from it
        self.turn_started = 0.0

    def _failed(self, job: CommitJob, e: BaseException) -> VolumeError:
        self.health.fail(f"commit of delta {job.delta} failed: {e}")
        self.job = None
        job.wake_waiters()
        return VolumeError(self.health.failed)

    def end(self, job: CommitJob) -> None:
        """The last step of a commit (``CommitJob.ended``): its delta is durable."""
        self.deltas.committed_to(job.delta)
        self.forks.poll()
        self.job = None
        job.wake_waiters()
        self.counters["flushes"] = self.dev.stats.flushes
        if not job.empty:
            self.verify(job.delta)

    # -- synchronous (embedded use without an event loop, mount, unmount, repairs) ---------------------------------

    def prepare(self, job: CommitJob) -> None:
        try:
            job.prepare()
        except Exception as e:
            raise self._failed(job, e) from e

    def run_sync(self, job: CommitJob) -> bool:
        """Write and complete a prepared job, blocking. True when anything was written."""
        try:
            job.write()
            job.complete()
        except Exception as e:
            raise self._failed(job, e) from e
        return not job.empty

    # -- beside the frontend ---------------------------------------------------------------------------------------

    async def run(self, job: CommitJob, *, inline_small: bool = False, urgent: bool = False) -> int:
        """Run a started job's three stages beside the frontend; returns the delta committed."""
        import trio

        clock = time.perf_counter
        with trio.CancelScope(shield=True):  # a commit once started always ends
            try:
                started = clock()
                hold = await self.sliced(job.prepare_steps(), urgent)
                prepared = clock()
                if (inline_small and len(job.writes) <= self.options.inline_commit_blocks and not self.dev.slow
                        and not self.frontend_pending()):
                    # one caller waits for this small commit and no request waits for the loop: a thread hop
                    # costs more than it saves
                    job.write()
                    self.counters["commits_inline"] += 1
                else:
                    token = trio.lowlevel.current_trio_token()
                    write = functools.partial(job.write, lambda: token.run_sync_soon(job.mark_written))
                    if urgent or self.options.stable == WAIT:  # someone waits (with stable pages, any writer
                        # may: as Linux's writeback, the I/O then runs at the process's priority)
                        await trio.to_thread.run_sync(write)
                    else:  # nobody waits: the low-priority I/O thread, which never takes the CPU from requests
                        if self.io_thread is None:
                            from .backend.iothread import IOThread

                            self.io_thread = IOThread()
                        await self.io_thread.run(write)
                    self.turn_started = clock()
                self.counters["commit_prepare_seconds"] += prepared - started
                self.counters["commit_write_seconds"] += clock() - prepared
                done = clock()
                hold = max(hold, await self.sliced(job.complete_steps(), urgent))
            except Exception as e:
                raise self._failed(job, e) from e
            c = self.counters
            c["commit_complete_seconds"] += clock() - done
            c["loop_hold_max_seconds"] = max(c["loop_hold_max_seconds"], hold)
        return job.delta

    async def sliced(self, steps: Iterator[None], urgent: bool = False) -> float:
        """Run a commit stage's steps on the event loop in slices of about ``Options.prepare_slice``
        (``urgent_slice`` when someone waits for the commit), letting the frontend go first between two slices
        when it has work; return the longest the loop was held at once. The first slice counts from the task's
        last turn (``turn_started``), so the work between two stages, and between two commits, is part of a slice
        too. Requests that reach the kernel while the frontend has its turn go first as well, as long as the stage
        has held the loop for ``commit_share`` of its time; not when someone waits for the commit (an fsync, or
        with stable pages any writer may)."""
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
        requests_first = not urgent and opts.stable != WAIT
        hold = held = 0.0  # the longest hold, and all of them
        counters = self.counters
        try:
            for _ in _checked(steps):
                if (now := clock()) - last >= length:
                    if urgent:  # short stages someone waits for: the run queue's length, cheaper than an instrument
                        go = (pending() or now - yielded >= opts.commit_yield
                              or trio.lowlevel.current_statistics().tasks_runnable > 0)
                    elif runnable is None:
                        runnable = RunnableTasks()
                        trio.lowlevel.add_instrument(runnable)
                        go = True
                    else:
                        go = bool(runnable.tasks) or pending() or now - yielded >= opts.commit_yield
                    if go:
                        hold = max(hold, now - yielded)
                        held += now - yielded
                        counters["commit_loop_seconds"] += now - yielded
                        await self.frontend_first()
                        # a request that came while the frontend ran (a small write behind a large one) would
                        # otherwise wait for one more slice
                        while requests_first and pending() and held >= opts.commit_share * (self.turn_started - began):
                            await self.frontend_first()
                        last = yielded = self.turn_started
                    else:  # nobody waits for the loop: go on without a trip through the scheduler
                        last = now
            now = clock()
            counters["commit_loop_seconds"] += now - yielded
            return max(hold, now - yielded)
        finally:
            if runnable is not None:
                trio.lowlevel.remove_instrument(runnable)

    async def frontend_first(self) -> None:
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

    async def idle(self) -> None:
        """Wait until no commit is in flight."""
        while self.job is not None:
            await self.wait_job(self.job)
            self.turn_started = time.perf_counter()

    def close(self) -> None:
        if self.io_thread is not None:
            self.io_thread.close()
            self.io_thread = None
