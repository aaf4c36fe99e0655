"""Model-based test of the flusher's queue (flusher.py) on a real volume: random changes, concurrent syncs and
fsyncs, throttled writers, cancelled waiters and time passing, against a model of every version of each file.

How an async system is driven by a state machine: one ``trio.run`` (on a MockClock that moves only when a rule
jumps it) hosts a Flusher for the whole of each example; the hypothesis engine runs in a worker thread of that
run, and each rule hands one coroutine to the event loop (``trio.from_thread.run``) and returns once every task
is blocked again and no commit is in flight. Between rules the loop is idle, so an example replays the same way.
Inside a ``batch`` rule, requests are started as concurrent tasks while every commit's I/O is held at its first
write (a gate in the worker threads), so later requests meet a commit in flight at a point the rule chooses; the
gate is opened once all of them wait.

Checked, from the flusher's guarantees:
- the queue never holds more than one item (at every task step, by a trio instrument);
- every waiter is woken, and never before its changes are durable: when a sync or fsync returns, the image, read
  as a mount would read it by a second read-only Volume, holds each file (for fsync: that file) at the version it
  had at the call or a later one; no file ever goes back to an older version, and every file on the image is
  some version the model made;
- group commit: a request waits for at most two commits; syncs from a settled state with changes share one
  commit; a sync with nothing new causes no commit and queues no item;
- a cancelled waiter only stops waiting: the commit it asked for still happens;
- dirty expiry: once ``interval`` has passed after a change, it is durable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from volumes import unmount_clean

from mkfs import mkfs
from tux3fuse.flusher import Flusher
from tux3fuse.fs import Options, Volume

BS = 4096
NAMES = [b"a", b"b", b"c", b"d"]
MAX_BLOCKS = 8
INTERVAL = 5.0
EXAMPLES = int(os.environ.get("TUX3_MODEL_EXAMPLES", "40"))  # raise both for a longer run
STEPS = int(os.environ.get("TUX3_MODEL_STEPS", "30"))

State = tuple[int, bytes] | None  # a name's file: (inode, content), or no such name


@dataclass
class Version:
    state: State
    at: float  # trio time of the change


class Gate:
    """Holds device writes made outside the event loop's thread (a commit's I/O) while closed; every device
    write holds ``lock``, which a reader of the image takes to see it between two writes, never inside one."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.opened.set()
        self.lock = threading.Lock()
        self.loop_thread = threading.get_ident()

    def wrap(self, fn: Callable) -> Callable:
        def gated(*args, **kwargs):
            if threading.get_ident() != self.loop_thread:
                self.opened.wait()
            with self.lock:
                return fn(*args, **kwargs)

        return gated

    def install(self, vol: Volume) -> None:
        dev = vol.backend.dev
        for name in ("write_plan", "write_blocks", "write_at", "flush"):
            setattr(dev, name, self.wrap(getattr(dev, name)))


class QueueWatch(trio.abc.Instrument):
    """The longest the flusher's queue was, over every task step."""

    def __init__(self) -> None:
        self.flusher: Flusher | None = None
        self.longest = 0

    def after_task_step(self, task) -> None:
        if self.flusher is not None:
            self.longest = max(self.longest, len(self.flusher.queue))


class Loop:
    """The event loop side: a nursery that hosts each example's flusher."""

    def __init__(self, nursery: trio.Nursery, clock: trio.testing.MockClock, watch: QueueWatch) -> None:
        self.nursery, self.clock, self.watch = nursery, clock, watch

    async def start_flusher(self, flusher: Flusher) -> trio.CancelScope:
        async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    await inner.start(flusher.run)
                    task_status.started(scope)

        return await self.nursery.start(serve)


class FlusherMachine(RuleBasedStateMachine):
    loop: Loop  # set by run_machine
    totals: Counter = Counter()  # what the runs exercised, checked by the test

    def run(self, fn: Callable, *args):
        return trio.from_thread.run(fn, *args)

    @initialize()
    def setup(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tux3flusher-")
        self.path = os.path.join(self.tmp, "vol.img")
        mkfs(self.path, BS, 32 << 20)
        self.vol = Volume(self.path, Options(background_bytes=12 * BS, dirty_limit=20 * BS,
                                             fsync_ahead_bytes=2 * BS))
        self.vol.mount()
        self.gate = Gate()
        self.run(self._install_gate)
        self.hist: dict[bytes, list[Version]] = {n: [Version(None, 0.0)] for n in NAMES}
        self.floor = dict.fromkeys(NAMES, 0)  # the oldest version of each name the image may still hold
        self.stamp = 0
        self.changes = 0  # changes made so far (the directory's times change with every create and unlink too)
        self.synced = 0  # changes a sync has made durable: with none since, a sync has nothing new to commit
        self.flusher = Flusher(self.vol, INTERVAL)
        self.loop.watch.flusher, self.loop.watch.longest = self.flusher, 0
        self.scope = self.run(self.loop.start_flusher, self.flusher)

    async def _install_gate(self) -> None:
        self.gate.loop_thread = threading.get_ident()
        self.gate.install(self.vol)

    def teardown(self) -> None:
        vol = getattr(self, "vol", None)
        try:
            if getattr(self, "scope", None) is not None:
                self.gate.opened.set()
                self.run(self._stop)
            if vol is not None and vol.lock_fd >= 0:
                unmount_clean(vol)
        finally:
            self.loop.watch.flusher = None
            if vol is not None:
                vol.close_files()
            if getattr(self, "tmp", None):
                shutil.rmtree(self.tmp, ignore_errors=True)

    async def _stop(self) -> None:
        await self.settle()
        self.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not self.vol.flusher.running

    # -- the model -------------------------------------------------------------------------------------------------

    def state(self, name: bytes) -> State:
        return self.hist[name][-1].state

    def changed(self, name: bytes, state: State) -> None:
        self.hist[name].append(Version(state, trio.current_time()))
        self.changes += 1

    def now_versions(self) -> dict[bytes, int]:
        return {n: len(h) - 1 for n, h in self.hist.items()}

    def durable(self, need: dict[bytes, int], why: str) -> None:
        """The image holds every name at a version at least ``need`` (and never older than it held before)."""
        vol = self.vol
        with self.gate.lock:
            snap = Volume(self.path, Options(readonly=True, lock=False))
            try:
                names = {name: ino for name, ino, _ in snap.readdir(1, 0)}
                found: dict[bytes, State] = {}
                for n in NAMES:
                    ino = names.get(n)
                    found[n] = None if ino is None else (ino, snap.read(ino, 0, MAX_BLOCKS * BS + BS))
            finally:
                snap.close_files()
        for n in NAMES:
            least = max(self.floor[n], need.get(n, 0))
            match = [j for j, v in enumerate(self.hist[n]) if j >= least and v.state == found[n]]
            if not match:
                older = [j for j, v in enumerate(self.hist[n]) if v.state == found[n]]
                raise AssertionError(
                    f"{why}: {n!r} on the image is version {older or 'none the model made'} of "
                    f"{len(self.hist[n]) - 1}, at least {least} expected (committed delta "
                    f"{vol.deltas.committed}, current {vol.deltas.current})")
            self.floor[n] = match[0]

    def differs(self) -> bool:
        """Does the image hold some name at another version than memory (so the current delta has changes)?"""
        return any(self.hist[n][self.floor[n]].state != self.state(n) for n in NAMES)

    # -- operations (on the event loop) ----------------------------------------------------------------------------

    async def settle(self) -> None:
        """Let every task run until all wait, with no commit in flight."""
        vol = self.vol
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if vol.runner.job is None:
                return
            await vol.runner.wait_job(vol.runner.job)

    async def change(self, op: str, name: bytes, offset: int = 0, size: int = 0) -> None:
        """One change through the embedded API as a request would make it (throttled writers wait)."""
        vol = self.vol
        state = self.state(name)
        if state is None:
            attr = await vol.call(vol.create, 1, name, 0o644)
            vol.release(attr.ino)
            self.changed(name, (attr.ino, b""))
            return
        ino, content = state
        if op == "unlink":
            await vol.call(vol.unlink, 1, name)
            vol.forget(ino, 1)
            self.changed(name, None)
        elif op == "truncate":
            await vol.call(vol.setattr, ino, size=offset)
            self.changed(name, (ino, content[:offset].ljust(offset, b"\0")))
        else:
            self.stamp += 1
            data = bytes([self.stamp % 251 + 1]) * size
            await vol.call(vol.write, ino, offset, data)
            new = bytearray(content.ljust(offset, b"\0"))
            new[offset: offset + size] = data
            self.changed(name, (ino, bytes(new)))

    async def request(self, name: bytes | None, scopes: list, cancelled: list, status: dict) -> None:
        """sync() (name None) or fsync of ``name``'s file, checked when it returns."""
        vol = self.vol
        if name is None:
            need, what = self.now_versions(), "sync"
        else:
            state = self.state(name)
            if state is None:
                return
            need, what = {name: len(self.hist[name]) - 1}, f"fsync of {name!r}"
        commits, changes = vol.counters["commits"], self.changes
        with trio.CancelScope() as scope:
            scopes.append(scope)
            status[id(scope)] = "waiting"
            if name is None:
                await vol.sync()
            else:
                await vol.fsync(state[0])
        if scope.cancelled_caught:
            status[id(scope)] = "cancelled"
            cancelled.append((need, what))
            self.totals["cancelled"] += 1
            return
        waited = vol.counters["commits"] - commits
        assert waited <= 2, f"{what} waited for {waited} commits"
        self.durable(need, f"when {what} returned")
        status[id(scope)] = "woken"
        if name is None:
            self.synced = max(self.synced, changes)
        self.totals["requests"] += 1

    async def checked(self, body: Callable, *args) -> None:
        """Run one rule's body in the loop, then settle and check what holds between rules."""
        vol, flusher = self.vol, self.flusher
        await body(*args)
        await self.settle()
        assert vol.failed is None, vol.failed
        assert vol.flusher is flusher and not flusher.queue and flusher.inflight is None
        assert self.loop.watch.longest <= 1, f"the queue held {self.loop.watch.longest} items"
        self.durable({}, "after the rule")

    # -- rules -----------------------------------------------------------------------------------------------------

    @rule(op=st.sampled_from(["write", "write", "write", "truncate", "unlink"]), name=st.sampled_from(NAMES),
          block=st.integers(0, MAX_BLOCKS - 1), blocks=st.integers(1, 4))
    def change_one_file(self, op: str, name: bytes, block: int, blocks: int) -> None:
        size = min(blocks, MAX_BLOCKS - block) * BS
        self.run(self.checked, self.change, op, name, block * BS if op != "truncate" else block * BS // 2, size)

    @rule(actions=st.lists(st.one_of(
        st.just(("sync",)),
        st.tuples(st.just("fsync"), st.sampled_from(NAMES)),
        st.tuples(st.just("write"), st.sampled_from(NAMES), st.integers(0, MAX_BLOCKS - 1), st.integers(1, 3)),
        st.just(("cancel",)),
        st.just(("blocked",))), min_size=1, max_size=8))
    def batch(self, actions: list[tuple]) -> None:
        """Requests and writes started one after the other as concurrent tasks, every commit's I/O held until all
        of them wait."""
        self.run(self.checked, self._batch, actions)

    async def _batch(self, actions: list[tuple]) -> None:
        vol = self.vol
        only_requests = all(a[0] in ("sync", "fsync", "blocked") for a in actions)
        nothing_new, differs = self.synced == self.changes, self.differs()
        items, commits, committed = vol.counters["flusher_items"], vol.counters["commits"], vol.deltas.committed
        scopes: list[trio.CancelScope] = []
        cancelled: list = []
        status: dict[int, str] = {}
        started = 0
        self.gate.opened.clear()
        try:
            async with trio.open_nursery() as nursery:
                for action in actions:
                    if action[0] == "sync":
                        nursery.start_soon(self.request, None, scopes, cancelled, status)
                        started += 1
                    elif action[0] == "fsync":
                        nursery.start_soon(self.request, action[1], scopes, cancelled, status)
                        started += 1
                    elif action[0] == "write":
                        _, name, block, blocks = action
                        size = min(blocks, MAX_BLOCKS - block) * BS
                        nursery.start_soon(self.change, "write", name, block * BS, size)
                    elif action[0] == "cancel":
                        if scopes:
                            scopes[-1].cancel()
                    else:
                        await trio.testing.wait_all_tasks_blocked()
                    await trio.sleep(0)
                await trio.testing.wait_all_tasks_blocked()
                assert self.loop.watch.longest <= 1, f"the queue held {self.loop.watch.longest} items"
                self.gate.opened.set()
                await self.settle()
                stuck = sum(1 for st_ in status.values() if st_ == "waiting")
                if stuck:
                    nursery.cancel_scope.cancel()
                    raise AssertionError(f"{stuck} request(s) never woken, with nothing left in flight")
        finally:
            self.gate.opened.set()
        for need, what in cancelled:  # the commit a cancelled waiter asked for happened all the same
            self.durable(need, f"after {what} was cancelled")
        made = vol.counters["commits"] - commits
        if only_requests:
            if nothing_new:
                queued, deltas = vol.counters["flusher_items"] - items, vol.deltas.committed - committed
                assert made == 0 and queued == 0 and deltas == 0, \
                    f"requests with nothing new since the last sync queued {queued} items, made {made} commits"
                self.totals["clean batches"] += 1
            elif differs and all(a[0] in ("sync", "blocked") for a in actions) and started:
                assert made == 1, f"{len(actions)} syncs from a settled state made {made} commits, not one"
                self.totals["group commits"] += 1
        self.totals["batch commits"] += made
        self.totals["batch requests"] += started

    @rule(first=st.sampled_from(NAMES), second=st.sampled_from(NAMES), blocks=st.integers(1, 3),
          fsync=st.booleans())
    def cancel_a_queued_waiter(self, first: bytes, second: bytes, blocks: int, fsync: bool) -> None:
        """A request queued behind a commit in flight, then cancelled: its commit still happens."""
        request = ("fsync", second) if fsync else ("sync",)
        self.run(self.checked, self._batch, [("write", first, 0, blocks), ("sync",), ("sync",), ("blocked",),
                                             ("write", second, 1, blocks), request, ("cancel",)])

    @rule(k=st.integers(1, 6))
    def concurrent_syncs(self, k: int) -> None:
        """k syncs at once from a settled state: one commit if anything changed, none otherwise."""
        self.run(self.checked, self._batch, [("sync",)] * k)

    @rule(dt=st.sampled_from([0.5, INTERVAL - 0.01, INTERVAL + 0.01, 3 * INTERVAL]))
    def time_passes(self, dt: float) -> None:
        self.run(self.checked, self._time_passes, dt)

    async def _time_passes(self, dt: float) -> None:
        await self.settle()
        self.loop.clock.jump(dt)
        await self.settle()
        deadline = trio.current_time() - INTERVAL
        need = {}
        for n, versions in self.hist.items():
            old = [j for j, v in enumerate(versions) if v.at <= deadline]
            if old:
                need[n] = old[-1]
        self.durable(need, f"{INTERVAL} s after the changes")
        self.totals["expiry checks"] += bool(need)


SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                    suppress_health_check=list(HealthCheck))


def run_machine() -> Counter:
    """Run the machine inside one trio run on a MockClock; returns what it exercised."""
    clock = trio.testing.MockClock()
    watch = QueueWatch()
    FlusherMachine.totals = Counter()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            FlusherMachine.loop = Loop(nursery, clock, watch)
            try:
                await trio.to_thread.run_sync(lambda: run_state_machine_as_test(FlusherMachine, settings=SETTINGS))
            finally:
                nursery.cancel_scope.cancel()

    trio.run(main, clock=clock, instruments=[watch])
    return FlusherMachine.totals


@pytest.mark.timeout(600)
def test_flusher_queue_wakes_every_waiter_once_durable_and_shares_commits() -> None:
    totals = run_machine()
    assert totals["requests"] > 0 and totals["group commits"] > 0 and totals["cancelled"] > 0, totals
    assert totals["batch commits"] < totals["batch requests"], totals  # requests shared commits
