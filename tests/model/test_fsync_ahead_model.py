"""Model-based test of fsync ahead of the delta: random namespace and data changes to a few files in two
directories, fsyncs of one file, whole commits and crashes, against a model of the files (names, content) and of
what the image holds.

fsync of a file commits either the whole delta or, when ``Volume.commit_ahead_pays``, only that file's changes
ahead of the rest (the rest moves to the next delta). After every fsync the image is read as a mount after a crash
would read it (a second, read-only Volume beside the live one) and must hold:
- the fsync'd file with exactly the content it had at the fsync;
- after a commit ahead, every other file and every name exactly as of the last commit (its own earlier fsync
  included); after a whole commit, everything as in memory;
- a commit ahead only for a file the rule allows: a regular file on the image whose link count there equals its
  count in memory (its names are committed);
- a namespace fsck finds no error in, and a used-inode count equal to the inodes the committed namespace holds.

The machine runs twice: with the embedded fsync (no flusher) and with the fsync handed to a running flusher.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from volumes import unmount_clean

from mkfs import mkfs
from tux3fuse.checker import Checker
from tux3fuse.flusher import Flusher
from tux3fuse.fs import Options, Volume

BS = 4096
NAMES = [b"a", b"b", b"c"]
MAX_BLOCKS = 6  # files stay below this many blocks
EXAMPLES = int(os.environ.get("TUX3_MODEL_EXAMPLES", "25"))  # raise both for a longer run
STEPS = int(os.environ.get("TUX3_MODEL_STEPS", "40"))

Place = tuple[int, bytes]  # (directory inode, name)


class FsyncAheadMachine(RuleBasedStateMachine):
    """The model: ``ns`` maps each name to its inode and ``data`` each inode to its content, in memory;
    ``c_ns`` and ``c_data`` are the same as the image holds them (the last commit)."""

    via_flusher = False
    totals: Counter = Counter()  # how the fsyncs went, over all runs: checked by the tests below

    @initialize()
    def setup(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tux3ahead-")
        self.path = os.path.join(self.tmp, "vol.img")
        mkfs(self.path, BS, 32 << 20)
        # the rest of a delta is "large" from two dirty blocks on: commits ahead happen with small files
        self.options = dict(fsync_ahead_bytes=BS)
        self.vol = Volume(self.path, Options(**self.options))
        self.vol.mount()
        self.sub = self.vol.mkdir(1, b"sub", 0o755).ino
        self.vol.commit()
        self.dirs = [1, self.sub]
        self.places: list[Place] = [(1, n) for n in NAMES] + [(self.sub, n) for n in NAMES[:2]]
        self.base_used = self.vol.backend.used_inodes  # the root, lost+found if any, sub
        self.ns: dict[Place, int] = {}
        self.data: dict[int, bytearray] = {}
        self.lookups: dict[int, int] = {}  # the references the kernel would hold
        self.c_ns: dict[Place, int] = {}
        self.c_data: dict[int, bytes] = {}
        self.stamp = 0
        for i in range(3):  # three files on the image to start with
            self.create(i)
            self.write(i, 0, 0, 1)
        self.vol.commit()
        self.commit_all()

    def teardown(self) -> None:
        vol = getattr(self, "vol", None)
        try:
            if vol is not None and vol.lock_fd >= 0:
                unmount_clean(vol)
        finally:
            if vol is not None:
                vol.close_files()
            if getattr(self, "tmp", None):
                shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def nlink(self, ino: int, ns: dict[Place, int] | None = None) -> int:
        return sum(1 for i in (self.ns if ns is None else ns).values() if i == ino)

    def place(self, i: int) -> Place:
        return self.places[i % len(self.places)]

    def dropped(self, ino: int) -> None:
        """A name of ``ino`` is gone: once it has none, the kernel forgets it."""
        if self.nlink(ino) == 0:
            if self.lookups.get(ino):
                self.vol.forget(ino, self.lookups.pop(ino))
            del self.data[ino]

    def next_byte(self) -> int:
        self.stamp += 1
        return self.stamp % 251 + 1

    def commit_all(self) -> None:
        self.c_ns = dict(self.ns)
        self.c_data = {ino: bytes(d) for ino, d in self.data.items()}

    def fsync(self, ino: int) -> None:
        vol = self.vol
        if not self.via_flusher:
            trio.run(vol.fsync, ino)
            return

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(Flusher(vol, interval=0).run)
                await vol.fsync(ino)
                nursery.cancel_scope.cancel()

        trio.run(main)

    def check_image(self, fsynced: int | None = None) -> None:
        """The image, read as a mount after a crash would, holds ``c_ns`` and ``c_data``."""
        snap = Volume(self.path, Options(readonly=True, lock=False))
        try:
            if fsynced is not None:
                assert snap.read(fsynced, 0, MAX_BLOCKS * BS + BS) == bytes(self.data[fsynced]), \
                    f"the fsync'd inode {fsynced} does not hold what it held at the fsync"
            for d in self.dirs:
                names = {name: ino for name, ino, _ in snap.readdir(d, 0) if name not in (b".", b"..")}
                want = {name: ino for (parent, name), ino in self.c_ns.items() if parent == d}
                if d == 1:
                    names = {n: i for n, i in names.items() if n in NAMES}
                assert names == want, f"directory {d} on the image: {names}, committed {want}"
            for ino in set(self.c_ns.values()):
                attr = snap.getattr(ino)
                content = snap.read(ino, 0, MAX_BLOCKS * BS + BS)
                assert content == self.c_data[ino], f"inode {ino} on the image is not its committed content"
                assert attr.size == len(self.c_data[ino])
                assert attr.nlink == self.nlink(ino, self.c_ns), f"inode {ino}: nlink {attr.nlink} on the image"
            errors = Checker(snap).run().errors
            assert errors == [], errors
            assert snap.backend.sb.used_inodes == self.base_used + len(set(self.c_ns.values())), \
                f"the image counts {snap.backend.sb.used_inodes} inodes, its namespace holds " \
                f"{self.base_used + len(set(self.c_ns.values()))}"
        finally:
            snap.close_files()

    # -- rules -----------------------------------------------------------------------------------------------------

    @rule(i=st.integers(0, 100))
    def create(self, i: int) -> None:
        place = self.place(i)
        if place in self.ns:
            return
        ino = self.vol.create(*place, 0o644).ino
        self.vol.release(ino)
        self.ns[place] = ino
        self.data[ino] = bytearray()
        self.lookups[ino] = 1

    @rule(i=st.integers(0, 100), block=st.integers(0, MAX_BLOCKS - 1), at=st.integers(0, BS - 1),
          blocks=st.integers(0, 3))
    def write(self, i: int, block: int, at: int, blocks: int) -> None:
        if not self.ns:
            return
        place = sorted(self.ns)[i % len(self.ns)]
        ino = self.ns[place]
        off = block * BS + at
        n = min(max(1, blocks * BS - at + 1), MAX_BLOCKS * BS - off)
        data = bytes([self.next_byte()]) * n
        self.vol.write(ino, off, data)
        d = self.data[ino]
        if len(d) < off:
            d.extend(bytes(off - len(d)))
        d[off: off + n] = data

    @rule(i=st.integers(0, 100), size=st.integers(0, MAX_BLOCKS * BS))
    def truncate(self, i: int, size: int) -> None:
        if not self.ns:
            return
        ino = self.ns[sorted(self.ns)[i % len(self.ns)]]
        self.vol.setattr(ino, size=size)
        d = self.data[ino]
        if size < len(d):
            del d[size:]
        else:
            d.extend(bytes(size - len(d)))

    @rule(i=st.integers(0, 100), mode=st.sampled_from([0o600, 0o640, 0o644]))
    def chmod(self, i: int, mode: int) -> None:
        if not self.ns:
            return
        ino = self.ns[sorted(self.ns)[i % len(self.ns)]]
        self.vol.setattr(ino, mode=mode)
        assert self.vol.getattr(ino).mode & 0o777 == mode

    @rule(i=st.integers(0, 100))
    def unlink(self, i: int) -> None:
        if not self.ns:
            return
        place = sorted(self.ns)[i % len(self.ns)]
        ino = self.ns.pop(place)
        self.vol.unlink(*place)
        self.dropped(ino)

    @rule(i=st.integers(0, 100), j=st.integers(0, 100))
    def link(self, i: int, j: int) -> None:
        if not self.ns:
            return
        src, dst = sorted(self.ns)[i % len(self.ns)], self.place(j)
        if dst in self.ns:
            return
        ino = self.ns[src]
        self.vol.link(ino, *dst)
        self.ns[dst] = ino
        self.lookups[ino] = self.lookups.get(ino, 0) + 1

    @rule(i=st.integers(0, 100), j=st.integers(0, 100))
    def rename(self, i: int, j: int) -> None:
        if not self.ns:
            return
        src, dst = sorted(self.ns)[i % len(self.ns)], self.place(j)
        if src == dst or self.ns.get(dst) == self.ns[src]:
            return
        self.vol.rename(*src, *dst)
        over = self.ns.get(dst)
        self.ns[dst] = self.ns.pop(src)
        if over is not None:
            self.dropped(over)

    @rule(i=st.integers(0, 100))
    def fsync_one_file(self, i: int) -> None:
        if not self.ns:
            return
        vol = self.vol
        ino = self.ns[sorted(self.ns)[i % len(self.ns)]]
        commits, ahead = vol.counters["commits"], vol.counters["commits_ahead"]
        eligible = ino in self.c_data and self.nlink(ino, self.c_ns) == self.nlink(ino)
        self.fsync(ino)
        assert vol.failed is None, vol.failed
        if vol.counters["commits_ahead"] > ahead:
            assert vol.counters["commits"] == commits + 1
            assert eligible, f"inode {ino} went ahead of its delta, but its names are not all committed"
            self.c_data[ino] = bytes(self.data[ino])
            self.totals["ahead"] += 1
        elif vol.counters["commits"] > commits:
            self.commit_all()
            self.totals["whole"] += 1
        else:  # nothing of the file was dirty: it is durable already
            assert self.c_data.get(ino) == bytes(self.data[ino]), f"inode {ino}: fsync committed nothing"
            self.totals["clean"] += 1
        self.check_image(fsynced=ino)

    @rule(i=st.integers(0, 100), blocks=st.integers(2, 4))
    def write_blocks(self, i: int, blocks: int) -> None:
        """Dirty a few whole blocks: the rest of the delta a later fsync of another file may go ahead of."""
        self.write(i, 0, 0, blocks)

    @rule(now=st.integers(0, 2))
    def sync(self, now: int) -> None:
        if now:  # one draw in three: fsyncs see more of a delta
            return
        trio.run(self.vol.sync)
        self.commit_all()
        self.check_image()

    @rule(now=st.integers(0, 3))
    def crash(self, now: int) -> None:
        """Drop the volume without a commit; the mount after it finds the committed state."""
        if now:
            return
        self.vol.close_files()
        self.vol = Volume(self.path, Options(**self.options))
        self.vol.mount()
        self.ns, self.lookups = dict(self.c_ns), {}
        self.data = {ino: bytearray(d) for ino, d in self.c_data.items()}
        self.check_image()

    @invariant()
    def reads_agree_with_the_model(self) -> None:
        if getattr(self, "vol", None) is None:
            return
        for place, ino in self.ns.items():
            assert self.vol.lookup(*place).ino == ino
            self.vol.forget(ino, 1)
            assert self.vol.read(ino, 0, MAX_BLOCKS * BS + BS) == bytes(self.data[ino])


class FsyncAheadThroughFlusherMachine(FsyncAheadMachine):
    via_flusher = True


# random programs on every run, CI included (hypothesis's CI profile would fix them, and the fixed ones happen to
# take the whole-commit way only): the checks below ask that both ways were taken
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=False,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def run_machine(machine: type[FsyncAheadMachine], rounds: int = 4) -> Counter:
    """Run the machine until its fsyncs have gone both ways (ahead and whole), at most ``rounds`` times: a round of
    random programs may happen to take one way only, and every program checks the image either way."""
    machine.totals = Counter()
    for _ in range(rounds):  # (settings go to the run: each access to .TestCase makes a new class)
        run_state_machine_as_test(machine, settings=SETTINGS)
        if machine.totals["ahead"] and machine.totals["whole"]:
            break
    return machine.totals


def test_fsync_commits_the_file_ahead_or_the_whole_delta_and_the_image_holds_the_model() -> None:
    totals = run_machine(FsyncAheadMachine)
    assert totals["ahead"] > 0 and totals["whole"] > 0, totals  # both ways were taken


def test_fsync_through_the_flusher_commits_the_file_ahead_or_the_whole_delta_likewise() -> None:
    totals = run_machine(FsyncAheadThroughFlusherMachine)
    assert totals["ahead"] > 0 and totals["whole"] > 0, totals
