#!/usr/bin/env python3
"""Crash consistency, the dm-log-writes way: every crash point must recover to a committed delta.

A seeded workload runs through the embedded API with the device's write log on. One caller does creates,
writes, overwrites, renames over existing files, unlinks of open files, truncates, stores through shared mappings,
links, symlinks, directory operations, and a commit (fsync) now and then. Beside it, several callers
(``--callers``, the processes of a mount) each work in a directory of their own and hold kernel references
(lookups and opens) the way the kernel does: they create and write files, unlink fresh files they still hold,
rename new versions over files they hold, fsync (a whole delta, or one file committed ahead of its delta), and
drop the references to unlinked files some operations later. Commits run in the stages the daemon runs them in:
transitioned, prepared step by step, written, completed step by step, with the other callers' operations landing
in the next delta between any two steps (a forget or release of an unlinked file can arrive between two prepare
steps of the delta that unlinked it). The state of the namespace and of every file is recorded at every delta
that reaches the disk: the state at its transition.

After every commit the superblock's used-inode count must equal the number of inodes in the inode table. Then,
for each crash point, the image is rebuilt as a disk could have left it, and checked:

- crash points: after every flush, and inside each interval between two flushes a sample of subsets of the
  unflushed writes (a disk may reorder them), some with one write torn at 512-byte sectors;
- the rebuilt image is opened as a mount would (newest valid superblock, log replay), checked with fsck (no
  errors, exact used-inode and free-block counts; orphans waiting for reclaim are fine), and its namespace and
  data must equal the state recorded at the delta it recovers to, which must be no earlier than the last delta
  durable before the crash;
- every few points the real recovery also runs (a writable mount: replay, orphan reclaim, a commit, a clean
  unmount) and fsck must then be clean.

The last line reads ``N crash points, M inconsistent``; a commit that left a wrong used-inode count, or a volume
that failed during the workload, counts as one more inconsistency. The exit status is 1 when M > 0.
"""

from __future__ import annotations

import argparse
import bisect
import errno
import functools
import logging
import os
import random
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mkfs import mkfs  # noqa: E402
from tux3fuse import format as fmt  # noqa: E402
from tux3fuse.backend.commit import CommitJob  # noqa: E402
from tux3fuse.checker import Checker  # noqa: E402
from tux3fuse.fs import Options, Throttled, Volume, VolumeError, WaitFor  # noqa: E402
from tux3fuse.replaycheck import check_replay  # noqa: E402
from tux3fuse.writelog import read_log  # noqa: E402

SECTOR = 512
CALLER_WRITE = 16384  # bytes a caller writes at most at once: small files, as a mail spool or a build tree has
CONTENTS: dict[bytes, bytes] = {}  # one copy of every file content the recorded states hold


def snapshot(vol: Volume, inos: dict[bytes, int] | None = None) -> dict[bytes, tuple]:
    """Path -> (kind, content) of everything reachable from the root, without taking kernel references (and
    path -> inode number into ``inos``). A content already recorded in an earlier state is shared with it."""
    out: dict[bytes, tuple] = {}
    stack = [(b"", fmt.ROOT_INO)]
    while stack:
        path, ino = stack.pop()
        inode = vol.iget(ino)
        for name, (child, _, _, _) in sorted(vol.names.dir(inode).names.items()):
            node = vol.iget(child)
            p = path + b"/" + name
            if inos is not None:
                inos[p] = child
            mode = node.rec.mode
            if stat.S_ISDIR(mode):
                out[p] = ("d", stat.S_IMODE(mode))
                stack.append((p, child))
            elif stat.S_ISLNK(mode):
                out[p] = ("l", vol.read(child, 0, node.rec.size))
            else:
                data = vol.read(child, 0, node.rec.size)
                out[p] = ("f", stat.S_IMODE(mode), node.rec.nlink, CONTENTS.setdefault(data, data))
    return out


class Caller:
    """One process of the workload: a directory of its own, the files it made there, and the kernel references it
    holds, on files that still have a name (``held``) and on files that lost theirs (``late``: the forget or
    release comes some operations later, maybe in a later delta, maybe between two prepare steps of a commit)."""

    def __init__(self, home: int) -> None:
        self.home = home
        self.names: list[bytes] = []
        self.held: list[tuple[int, str]] = []  # (inode, "open" or "lookup")
        self.late: list[tuple[int, str]] = []
        self.waits_for: CommitJob | None = None  # the commit its fsync waits for: it does nothing else meanwhile


class Workload:
    """Seeded operations on a live volume, with the state recorded at every delta written to disk."""

    def __init__(self, vol: Volume, rng: random.Random, callers: int = 0) -> None:
        self.vol = vol
        self.rng = rng
        self.inos: dict[int, dict[bytes, int]] = {vol.backend.sb.seq: {}}
        self.states: dict[int, dict] = {vol.backend.sb.seq: snapshot(vol, self.inos[vol.backend.sb.seq])}
        self.dirs = [fmt.ROOT_INO]
        self.files: list[tuple[int, bytes]] = []  # (parent, name)
        self.open_orphans: list[int] = []
        self.job: CommitJob | None = None  # the commit in flight, prepared step by step
        self.steps = None  # its prepare stage, while it lasts
        self.stage = ""  # then: "write", "written", "super", "complete"
        self.completing = None  # its complete stage, once begun
        self.job_state: tuple[dict, dict[bytes, int]] = ({}, {})  # the state it commits, and its inode numbers
        self.count_errors: list[str] = []  # commits after which the used-inode count was wrong
        self.stats = {"commits": 0, "stepped": 0, "ahead": 0, "ops_in_prepare": 0, "late_drops_in_prepare": 0,
                      "ops_in_write_or_complete": 0}
        plain_commit = self.plain_commit = vol.commit

        def commit(**kwargs) -> bool:  # every commit, also those a full volume makes inside an operation
            written = plain_commit(**kwargs)
            if written:
                inos = self.inos[vol.backend.sb.seq] = {}
                self.states[vol.backend.sb.seq] = snapshot(vol, inos)
            self.check_count()
            return written

        vol.commit = commit
        self.callers: list[Caller] = []
        for i in range(callers):
            home = vol.mkdir(fmt.ROOT_INO, b"p%d" % i, 0o755)
            vol.forget(home.ino, 1)
            self.callers.append(Caller(home.ino))

    # -- commits ---------------------------------------------------------------------------------------------------

    def check_count(self) -> None:
        """After a commit: the superblock's used-inode count is the number of inodes in the inode table."""
        vol = self.vol
        self.stats["commits"] += 1
        n = len(list(vol.backend.itable.items()))
        if vol.backend.sb.used_inodes != n:
            self.count_errors.append(f"after the commit of delta {vol.backend.sb.seq}: used inode count "
                                     f"{vol.backend.sb.used_inodes}, but {n} inodes in the inode table")
        if vol.runner.job is None:  # the replay invariant: the image just committed replays to what memory holds
            self.count_errors += [f"after the commit of delta {vol.backend.sb.seq}: {p}" for p in check_replay(vol)]

    def commit(self) -> None:
        self.finish_job()
        self.vol.commit()

    def ahead_state(self, ino: int) -> tuple[dict, dict[bytes, int]]:
        """The state a commit of ``ino`` ahead of its delta leaves on disk: the last committed one with only this
        file's content and attributes newer."""
        vol = self.vol
        base = vol.backend.sb.seq
        rec = vol.iget(ino).rec
        state = dict(self.states[base])
        for path, owner in self.inos[base].items():
            if owner == ino:
                state[path] = ("f", stat.S_IMODE(rec.mode), rec.nlink, vol.read(ino, 0, rec.size))
        return state, self.inos[base]

    def fsync_ahead(self, ino: int) -> None:
        """fsync of one file committed ahead of its delta, synchronously."""
        self.finish_job()
        state, inos = self.ahead_state(ino)
        self.stats["ahead"] += 1
        if self.plain_commit(only={ino}):
            self.states[self.vol.backend.sb.seq] = state
            self.inos[self.vol.backend.sb.seq] = inos
        self.check_count()

    def start_job(self, only: set[int] | None = None) -> CommitJob:
        """Transition and start a commit whose prepare stage runs in steps between other operations, as
        ``Flusher.commit_async`` runs it; ``only``: an fsync ahead of the delta. The state it commits is the one at
        the transition."""
        vol = self.vol
        assert self.job is None
        if only is None:
            inos: dict[bytes, int] = {}
            self.job_state = (snapshot(vol, inos), inos)
        else:
            self.job_state = self.ahead_state(next(iter(only)))
            self.stats["ahead"] += 1
        job = self.job = vol.flusher.start_commit(prepare=False, only=only)
        self.steps = job.prepare_steps()
        self.stats["stepped"] += 1
        return job

    def advance(self, n: int | None) -> None:
        """Take ``n`` steps of the commit in flight (None: all the rest): one step of its prepare stage; or the
        writes of its blocks, the end of their I/O (``mark_written``), the superblock and its flush, each one step;
        or one step of its complete stage. The last step records the state it committed."""
        while self.job is not None and (n is None or n > 0):
            if n is not None:
                n -= 1
            job = self.job
            try:
                if self.steps is not None:
                    try:
                        next(self.steps)
                    except StopIteration:
                        self.steps = None
                        self.stage = "complete" if job.empty else "write"  # an empty commit writes nothing
                elif self.stage == "write":
                    job.write_data()
                    self.stage = "written"
                elif self.stage == "written":
                    job.mark_written()
                    self.stage = "super"
                elif self.stage == "super":
                    job.write_super()
                    self.stage = "complete"
                else:
                    if self.completing is None:
                        self.completing = job.complete_steps()
                    try:
                        next(self.completing)
                    except StopIteration:
                        self._completed()
            except Exception as e:
                self._failed(e)

    def finish_job(self) -> None:
        """Run the commit in flight to its end."""
        self.advance(None)

    def _completed(self) -> None:
        """The commit in flight completed: record the state it committed, check the count."""
        job = self.job
        assert job is not None and self.vol.runner.job is None
        self.job = self.completing = None
        self.vol.counters["flushes"] = self.vol.backend.dev.stats.flushes
        if not job.empty:
            self.states[job.delta], self.inos[job.delta] = self.job_state
        for c in self.callers:
            if c.waits_for is job:
                c.waits_for = None
        self.check_count()

    def _failed(self, e: Exception) -> None:
        job, vol = self.job, self.vol
        assert job is not None
        vol.fail(f"commit of delta {job.delta} failed: {e}")
        vol.runner.job = self.job = self.steps = self.completing = None
        raise VolumeError(vol.failed) from e

    def call(self, fn, *args, **kwargs):
        """An operation that may have to wait for the commit in flight (``Volume.call``): the commit ends, and the
        operation is tried again."""
        while True:
            try:
                return fn(*args, **kwargs)
            except (WaitFor, Throttled):
                if self.job is None:
                    raise
                self.finish_job()

    def fsync(self, ino: int, caller: Caller | None = None) -> None:
        """fsync as ``Volume.fsync`` decides it: wait for the commit in flight, then commit the file ahead of its
        delta when that pays, else the whole delta; synchronously, or as a commit in flight that ``caller`` waits
        for while the others go on."""
        vol = self.vol
        self.finish_job()
        inode = vol.icache.inodes.get(ino)
        if inode is None or not inode.dirty_deltas:
            return
        ahead = vol.deltas.current in inode.dirty_deltas and vol.transition.commit_ahead_pays({ino})
        if caller is None or self.rng.random() < 0.3:
            self.fsync_ahead(ino) if ahead else self.commit()
        else:
            caller.waits_for = self.start_job({ino} if ahead else None)

    def finish(self) -> None:
        """Every caller drops its references, the commit in flight ends, and the rest is committed."""
        for c in self.callers:
            for ino, kind in c.held + c.late:
                self.drop(ino, kind)
            c.held, c.late = [], []
        while self.open_orphans:
            self.vol.release(self.open_orphans.pop())
        self.commit()

    # -- operations ------------------------------------------------------------------------------------------------

    def step(self) -> None:
        rng = self.rng
        if self.job is not None and rng.random() < 0.35:
            self.advance(rng.randrange(1, 4))
            return
        if self.steps is not None:
            self.stats["ops_in_prepare"] += 1
        elif self.job is not None:
            self.stats["ops_in_write_or_complete"] += 1
        try:
            r = rng.random()
            if self.callers and r < 0.6:
                ready = [c for c in self.callers if c.waits_for is None]
                if ready:
                    self._caller_step(rng.choice(ready))
                else:
                    self.finish_job()
            elif self.callers and r < 0.65:
                if self.job is None:  # the flusher: a background commit nobody waits for
                    self.start_job()
            else:
                self._step()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise

    def drop(self, ino: int, kind: str) -> None:
        """The kernel drops one reference: a release (close) or a forget."""
        if kind == "open":
            self.vol.release(ino)
        else:
            self.vol.forget(ino, 1)
        inode = self.vol.icache.inodes.get(ino)
        if self.steps is not None and inode is not None and inode.dead and self.job.delta in inode.dirty_deltas:
            self.stats["late_drops_in_prepare"] += 1  # it died after its delta's transition, during the prepare

    def _own(self, c: Caller, name: bytes) -> int | None:
        """The inode a caller's name stands for (None, and the name is forgotten, if it is gone)."""
        entry = self.vol.names.dir(self.vol.iget(c.home)).get(name)
        if entry is None or not stat.S_ISREG(self.vol.iget(entry[0]).rec.mode):
            c.names.remove(name)
            return None
        return entry[0]

    def _hold(self, c: Caller, name: bytes, ino: int) -> None:
        """The caller looks a name up and opens it, unless it holds the file already."""
        if any(i == ino for i, _ in c.held):
            return
        self.vol.lookup(c.home, name)
        c.held.append((ino, "lookup"))
        self.vol.open(ino)
        c.held.append((ino, "open"))

    def _unnamed(self, c: Caller, ino: int) -> None:
        """The caller's file lost its last name: its references become late ones."""
        inode = self.vol.icache.inodes.get(ino)
        if inode is not None and inode.rec.nlink:
            return
        c.late += [r for r in c.held if r[0] == ino]
        c.held = [r for r in c.held if r[0] != ino]

    def _create(self, c: Caller, name: bytes) -> int | None:
        vol, rng = self.vol, self.rng
        try:
            a = self.call(vol.create, c.home, name, 0o644)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            return None
        c.names.append(name)
        c.held += [(a.ino, "lookup"), (a.ino, "open")]
        self.call(vol.write, a.ino, 0, rng.randbytes(rng.randrange(1, CALLER_WRITE)))
        return a.ino

    def _caller_step(self, c: Caller) -> None:
        vol, rng = self.vol, self.rng
        op = rng.choices(["create", "unlink", "fsync", "write", "rename_over", "drop_late", "close", "churn"],
                         [4, 4, 2, 3, 2, 4, 1, 2])[0]
        if c.late and (op == "drop_late" or self.steps is not None and rng.random() < 0.5):
            ino = rng.choice(c.late)[0]  # close, and the kernel forgets: the file's last references go
            for r in [r for r in c.late if r[0] == ino]:
                c.late.remove(r)
                self.drop(*r)
            return
        if op in ("drop_late", "close"):
            if c.held:
                self.drop(*c.held.pop(rng.randrange(len(c.held))))
            return
        if op in ("create", "churn") or not c.names:
            ino = self._create(c, b"q%d" % rng.randrange(1000))
            if ino is None:
                return
            if op == "create":
                if rng.random() < 0.5:  # closed at once, else held open for a while
                    c.held = [r for r in c.held if r[0] != ino]
                    vol.release(ino)
                    vol.forget(ino, 1)
                return
            # churn: a fresh file unlinked while still open, then an fsync of another file in the same delta
            vol.unlink(c.home, c.names.pop())
            self._unnamed(c, ino)
            if c.names and (other := self._own(c, rng.choice(c.names))) is not None:
                self.call(vol.write, other, 0, rng.randbytes(rng.randrange(1, CALLER_WRITE)))
                self.fsync(other, c)
            return
        name = rng.choice(c.names[-3:]) if rng.random() < 0.6 else rng.choice(c.names)  # mostly fresh files
        ino = self._own(c, name)
        if ino is None:
            return
        if op == "unlink":
            if rng.random() < 0.6:
                self._hold(c, name, ino)
            vol.unlink(c.home, name)
            c.names.remove(name)
            self._unnamed(c, ino)
        elif op == "write":
            size = vol.iget(ino).rec.size
            self.call(vol.write, ino, rng.randrange(0, size + 1), rng.randbytes(rng.randrange(1, CALLER_WRITE)))
        elif op == "fsync":
            self.fsync(ino, c)
        elif op == "rename_over":  # an editor's save: a new version renamed over a file the kernel still knows
            self._hold(c, name, ino)
            tmp = self._create(c, name + b".t%d" % rng.randrange(100))
            if tmp is None:
                return
            if rng.random() < 0.3:
                self.fsync(tmp)
            for r in [r for r in c.held if r[0] == tmp]:
                c.held.remove(r)
                self.drop(*r)
            vol.rename(c.home, c.names.pop(), c.home, name)
            self._unnamed(c, ino)

    def _step(self) -> None:
        rng = self.rng
        vol = Retrying(self)
        op = rng.choices(["create", "write", "overwrite", "rename", "unlink_open", "truncate", "mmap", "mkdir",
                          "link", "symlink", "rmdir", "close_orphan", "commit", "fsync"],
                         [8, 10, 8, 5, 2, 4, 3, 2, 2, 1, 1, 2, 5, 3])[0]
        bs = vol.blocksize
        if op == "create" or not self.files:
            parent = rng.choice(self.dirs)
            name = b"f%d" % rng.randrange(10_000)
            try:
                a = vol.create(parent, name, 0o644)
            except OSError:
                return
            vol.release(a.ino)
            vol.forget(a.ino, 1)
            self.files.append((parent, name))
            return
        parent, name = rng.choice(self.files)
        try:
            entry = vol.names.dir(vol.iget(parent)).get(name)
        except OSError:
            entry = None
        if entry is None or not stat.S_ISREG(vol.iget(entry[0]).rec.mode):
            self.files.remove((parent, name))
            return
        ino = entry[0]
        if op in ("write", "overwrite"):
            size = vol.iget(ino).rec.size
            off = rng.randrange(0, max(1, size)) if op == "overwrite" and size else rng.randrange(0, 24 * bs)
            data = rng.randbytes(rng.randrange(1, 3 * bs))
            vol.write(ino, off, data)
        elif op == "rename":  # write a new version and rename it over the old name: must be atomic
            tmp = name + b".tmp"
            try:
                a = vol.create(parent, tmp, 0o644)
            except OSError:
                return
            vol.write(a.ino, 0, rng.randbytes(rng.randrange(1, 5 * bs)))
            vol.release(a.ino)
            vol.forget(a.ino, 1)
            vol.rename(parent, tmp, parent, name)
        elif op == "unlink_open":
            vol.open(ino)
            vol.unlink(parent, name)
            self.files.remove((parent, name))
            self.open_orphans.append(ino)
        elif op == "close_orphan" and self.open_orphans:
            vol.release(self.open_orphans.pop(0))
        elif op == "truncate":
            vol.setattr(ino, size=rng.randrange(0, 20 * bs))
        elif op == "mmap":
            size = vol.iget(ino).rec.size
            if size:
                m = vol.mmap(ino)
                off = rng.randrange(size)
                try:
                    self.call(m.write, off, rng.randbytes(min(size - off, rng.randrange(1, bs))))
                finally:
                    m.unmap()
        elif op == "mkdir":
            try:
                d = vol.mkdir(rng.choice(self.dirs), b"d%d" % rng.randrange(1000), 0o755)
                vol.forget(d.ino, 1)
                self.dirs.append(d.ino)
            except OSError:
                pass
        elif op == "link":
            try:
                vol.link(ino, rng.choice(self.dirs), name + b".l%d" % rng.randrange(100))
                vol.forget(ino, 1)
            except OSError:
                pass
        elif op == "symlink":
            try:
                s = vol.symlink(rng.choice(self.dirs), b"s%d" % rng.randrange(1000), name)
                vol.forget(s.ino, 1)
            except OSError:
                pass
        elif op == "rmdir" and len(self.dirs) > 1:
            d = self.dirs[-1]
            parent_ino = vol.iget(d).rec.parent
            names = vol.names.dir(vol.iget(parent_ino)).names
            for n, (child, _, _, _) in list(names.items()):
                if child == d:
                    try:
                        vol.rmdir(parent_ino, n)
                        self.dirs.remove(d)
                        self.files = [(p, f) for p, f in self.files if p != d]
                    except OSError:
                        pass
                    break
        elif op == "commit":
            self.commit()
        elif op == "fsync":
            self.fsync(ino)


class Retrying:
    """The volume's API as the single caller uses it: an operation that must wait for the commit in flight
    (``WaitFor``, ``Throttled``) waits for it to end and is tried again."""

    def __init__(self, load: Workload) -> None:
        self._load = load

    def __getattr__(self, name: str):
        attr = getattr(self._load.vol, name)
        return functools.partial(self._load.call, attr) if callable(attr) else attr


def durable_and_issued(records: list, end: int) -> tuple[int, int]:
    """Highest delta whose superblock is durable, and highest whose superblock write was issued, in records[:end]."""
    durable = issued = -1
    pending = -1
    for kind, offset, data in records[:end]:
        if kind == "W" and offset in fmt.SUPER_OFFSETS:
            try:
                seq = fmt.Super.unpack(data, 0).seq
            except fmt.FormatError:
                continue
            issued = max(issued, seq)
            pending = max(pending, seq)
        elif kind == "F" and pending >= 0:
            durable = max(durable, pending)
    return durable, issued


def check_point(image: Path, base: bytes | bytearray, records: list, writes: list[tuple[int, bytes]], end: int,
                states: dict[int, dict], full: bool) -> str | None:
    """Build the image for one crash point (``base`` with ``writes`` on top) and check it; return what is wrong,
    or None."""
    with open(image, "wb") as f:
        f.write(base)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    durable, issued = durable_and_issued(records, end)
    try:
        vol = Volume(str(image), Options(readonly=True, lock=False))
    except VolumeError as e:
        return f"does not mount: {e}"
    try:
        seq = vol.backend.sb.seq
        if seq < durable:
            return f"recovered delta {seq}, but delta {durable} was durable"
        if seq not in states:
            return f"recovered delta {seq}, which the workload never committed"
        report = Checker(vol).run()
        if report.errors:
            return f"fsck at delta {seq}: {report.errors[:3]}"
        got = snapshot(vol)
        if got != states[seq]:
            diff = sorted(set(got.items()) ^ set(states[seq].items()))[:2]
            return f"namespace or data differ from delta {seq}: {diff}"
    finally:
        vol.close_files()
    if full:  # the real recovery: replay, orphan reclaim, a commit, a clean unmount; then fsck
        try:
            vol = Volume(str(image), Options(lock=False))
            vol.mount()
            vol.unmount()
            vol = Volume(str(image), Options(readonly=True, lock=False))
            report = Checker(vol).run()
            got = snapshot(vol)
            vol.close_files()
        except VolumeError as e:
            return f"recovery mount failed: {e}"
        if report.errors or report.orphans:
            return f"fsck after recovery: {report.errors[:3]} orphans {report.orphans[:3]}"
        if got != states[seq]:
            return f"recovery changed the namespace or data of delta {seq}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--points", type=int, default=300, help="crash points to check")
    p.add_argument("--ops", type=int, default=400, help="workload operations")
    p.add_argument("--blocksize", type=int, default=4096)
    p.add_argument("--size", type=int, default=16, help="image size in MiB")
    p.add_argument("--full-every", type=int, default=4, help="run the writable recovery every N points")
    p.add_argument("--callers", type=int, default=3,
                   help="callers beside the single one, with kernel references and commits in flight")
    p.add_argument("--keep", help="directory to keep the failing images in")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show the volume's log (fallbacks at mount)")
    a = p.parse_args(argv)
    logging.getLogger("tux3fuse").setLevel(logging.INFO if a.verbose else logging.ERROR)
    rng = random.Random(a.seed)
    started = time.monotonic()
    CONTENTS.clear()
    with tempfile.TemporaryDirectory(dir="/var/tmp" if os.path.isdir("/var/tmp") else None) as tmp:
        work = Path(tmp)
        image = work / "live.img"
        mkfs(str(image), a.blocksize, a.size << 20)
        base = image.read_bytes()
        before = snapshot_after(image)
        base_seq = Volume(str(image), Options(readonly=True, lock=False)).backend.sb.seq
        logpath = work / "writes.log"
        vol = Volume(str(image), Options(writelog=str(logpath), unify_deltas=5, fsync_ahead_bytes=0))
        vol.mount()
        load = Workload(vol, rng, a.callers)
        load.states[base_seq] = before
        failed = None
        try:
            for _ in range(a.ops):
                load.step()
            load.finish()
        except VolumeError as e:
            failed = str(e)
        states = load.states
        if failed is None:
            vol.unmount()
            states[vol.backend.sb.seq] = states.get(vol.backend.sb.seq) or snapshot_after(image)
        else:
            vol.close_files()
        records = list(read_log(str(logpath)))
        flushes = [i for i, r in enumerate(records) if r[0] == "F"]
        if not a.quiet:
            st = load.stats
            print(f"workload: {a.ops} ops, {len(states)} deltas on disk, {len(records) - len(flushes)} writes, "
                  f"{len(flushes)} flushes (seed {a.seed}); {len(load.callers)} callers beside the single one, "
                  f"{st['commits']} commits, {st['stepped']} prepared in steps with {st['ops_in_prepare']} "
                  f"operations between them ({st['late_drops_in_prepare']} unlinked files of the delta in flight "
                  f"dropped between its prepare steps) and {st['ops_in_write_or_complete']} more before it completed, "
                  f"{st['ahead']} fsyncs ahead of their delta")
        bad = 0
        if failed is not None:
            bad += 1
            print(f"workload: the volume failed: {failed}")
        if load.count_errors:
            bad += 1
            print(f"workload: {len(load.count_errors)} commits left a wrong used-inode count, the first: "
                  f"{load.count_errors[0]}")
        # crash points: after each flush, plus samples inside the intervals
        points: list[tuple[int, list[int], int | None]] = []  # (end, indices of unflushed writes kept, torn)
        intervals = list(zip([-1, *flushes], flushes + [len(records)], strict=True))
        for _lo, hi in intervals:
            if hi < len(records):
                points.append((hi + 1, [], None))
        extra = max(0, a.points - len(points))
        for _ in range(extra):
            lo, hi = rng.choice(intervals)
            pending = list(range(lo + 1, hi))
            if not pending:
                continue
            kept = sorted(rng.sample(pending, rng.randrange(0, len(pending) + 1)))
            torn = rng.choice(kept) if kept and rng.random() < 0.3 else None
            points.append((hi, kept, torn))
        rng.shuffle(points)
        points = sorted(points[: a.points], key=lambda point: point[0])  # in log order: one pass builds the
        durable = bytearray(base)  # image of the writes durable at each point
        applied = 0  # records applied to it
        for n, (end, kept, torn) in enumerate(points):
            durable_end = flushes[bisect.bisect_left(flushes, end) - 1] if flushes and flushes[0] < end else -1
            for kind, offset, data in records[applied: durable_end + 1]:
                if kind == "W":
                    durable[offset: offset + len(data)] = data
            applied = max(applied, durable_end + 1)
            extra_writes = []
            for i in kept:
                offset, data = records[i][1], records[i][2]
                if i == torn:  # keep some sectors of this write, the rest keeps what was there before
                    mixed = bytearray(durable[offset: offset + len(data)])
                    for s in range(0, len(data), SECTOR):
                        if rng.random() < 0.5:
                            mixed[s: s + SECTOR] = data[s: s + SECTOR]
                    data = bytes(mixed)
                extra_writes.append((offset, data))
            end_for_durable = durable_end + 1
            problem = check_point(work / "crash.img", durable, records, extra_writes, end_for_durable,
                                  states, full=(n % a.full_every == 0))
            if problem is not None:
                bad += 1
                print(f"point {n}: crash after record {end} with {len(kept)} unflushed writes"
                      f"{' (one torn)' if torn is not None else ''}: {problem}")
                if a.keep:
                    os.makedirs(a.keep, exist_ok=True)
                    shutil.copy(work / "crash.img", Path(a.keep) / f"seed{a.seed}-point{n}.img")
    if not a.quiet:
        print(f"checked in {time.monotonic() - started:.1f} s")
    print(f"{len(points)} crash points, {bad} inconsistent")
    CONTENTS.clear()
    return 1 if bad else 0


def snapshot_after(image: Path) -> dict:
    vol = Volume(str(image), Options(readonly=True, lock=False))
    try:
        return snapshot(vol)
    finally:
        vol.close_files()


if __name__ == "__main__":
    sys.exit(main())
