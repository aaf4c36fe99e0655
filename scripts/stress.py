"""Multi-process stress of a tux3fuse mount, and a verifier of what fsync promised.

``python scripts/stress.py [--procs N] [--ops N] [--seed S] [--mix full|cuf|renameover|renameover-fsync]
[--options OPTS] [--kill | --kill-after SECONDS] [--read-errors RATE]`` makes a fresh image, mounts it, runs N
worker processes, each doing a seeded random mix of create, unlink (often of the file it has just created),
rename (also over an existing name), link, mkdir/rmdir, truncate, pwrite, fsync, fdatasync, fsync of a directory,
``os.sync()`` and write-temp-then-rename-over, in a directory of its own and in one directory all workers share.
It then unmounts (or SIGKILLs the daemon in the middle), requires ``fsck.tux3 -n`` to exit 0, mounts again,
verifies, unmounts and runs fsck again. The last line says PASS or FAIL with the reason; the exit status is 0 only
for PASS. ``stress.py run MNT --journal DIR`` runs the workers against an existing mount; ``stress.py verify MNT
--journal DIR [--clean]`` checks a mount against the journals.

What is verified, and why it is sound. Every worker keeps a model of its own names: for each name the set of
states it may have on disk after a crash (absent, a directory, or bound to one of its inodes with one exact
content, or with content unknown). The set only grows before an operation is issued (the operation may reach
the disk even if the worker never sees it return), and it shrinks only after a durability point has returned:

- fsync or fdatasync of a file returned: that inode's content is durable, so every name that may be bound to it
  is expected to hold exactly its current bytes. The name itself is not made durable by this: POSIX does not
  promise it, ``fsync_ahead`` commits only the file's blocks when its link count is committed, and an fsync of a
  file with no uncommitted change commits nothing (even with ``-o fsync_ahead=off``).
- fsync of a directory returned: this filesystem commits everything changed before it, so the names in that
  directory are expected in their current state (content exact where the inode is durable too).
- ``os.sync()`` is exercised but promises nothing here: FUSE does not pass syncfs to the daemon.

Each change of a name's set is appended to the worker's journal, outside the mount, before the operation when
the set grows and after the durability point when it shrinks. After a SIGKILL the verifier requires every name
to be in one of its journaled states; after a clean run (no kill) it requires the exact final state: every
name, directory, inode number and byte, and no other entry in the workers' directories. It then requires the
used-inode count of ``statfs`` to equal the number of inodes reachable from the root, and the daemon logs to
hold no ERROR and no "read-only".

With ``--read-errors RATE`` (``2%``) the image is served by nbdkit with its ``error`` filter, which fails that share
of the device's reads with EIO during the run (not during mkfs, the checks and the verification), and the mount
runs with ``nowriteback`` (so that every write's error reaches the ``write()`` that made it). An operation that
gets EIO must have changed nothing: the worker's model stays as it was, and the exact final state after a clean
unmount proves it. A read error that a commit meets fails the volume (read-only): the workers stop there, and the
verification is the one after a kill (every name in one of its journaled states).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent

MIXES: dict[str, dict[str, int]] = {
    "full": {"create": 12, "unlink": 10, "rename": 8, "link": 4, "mkdir": 2, "rmdir": 2, "truncate": 5,
             "write": 20, "fsync": 8, "fdatasync": 4, "fsyncdir": 2, "sync": 1, "replace": 6, "read": 6,
             "close": 4},
    "cuf": {"create": 4, "unlink": 4, "fsync": 2},
    "renameover": {"replace": 1},
    "renameover-fsync": {"replace_fsync": 1},
}
FILES_OWN = 40  # file names per worker in its own directory
FILES_SHARED = 12  # file names per worker in the shared directory
SUBDIRS = 3  # subdirectory names per worker, in each of the two directories
MAX_SIZE = 64 << 10
MAX_SET = 12  # a name whose set of possible states grows beyond this is no longer checked after a crash
OPEN_FDS = 4

ABSENT = ("-",)
DIR = ("d",)
ANY_FILE = ("f",)  # a file, inode not known yet: the state a name may have while it is being created


class StressError(Exception):
    """A failure of the run, reported as one line."""


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def digest(data: bytes | bytearray) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# the worker


@dataclass
class Inode:
    mid: int  # model id: inode numbers may be reused, model ids are not
    ino: int
    data: bytearray = field(default_factory=bytearray)
    synced: bool = True  # is the content on disk (in any delta that holds the inode) the current content?
    names: set[str] = field(default_factory=set)


class Worker:
    """One process of the stress: a model of its names, the operations, and the journal."""

    def __init__(self, mnt: str, wid: int, ops: int, seed: int, mix: str, journal: str, stop_flag: str,
                 progress=None, tolerate_eio: bool = False) -> None:
        self.mnt, self.wid, self.ops, self.mix = mnt, wid, ops, mix
        self.tolerate_eio = tolerate_eio  # the device fails reads: an operation may fail with EIO, changing nothing
        self.eio = 0
        self.rng = random.Random(f"{seed}/{wid}")
        self.stop_flag = stop_flag
        self.progress = progress
        self.jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        own, shared = f"w{wid}", "shared"
        self.own_files = [f"{own}/f{k}" for k in range(FILES_OWN)]
        self.shared_files = [f"{shared}/w{wid}.f{k}" for k in range(FILES_SHARED)]
        self.tmp_names = [f"{own}/t.tmp", f"{shared}/w{wid}.t.tmp"]
        self.files = self.own_files + self.shared_files + self.tmp_names
        self.subdirs = [f"{own}/d{k}" for k in range(SUBDIRS)] + [f"{shared}/w{wid}.d{k}" for k in range(SUBDIRS)]
        self.bind: dict[str, Inode] = {}
        self.dirs: set[str] = set()
        self.allowed: dict[str, set | None] = {n: {ABSENT} for n in self.files + self.subdirs}
        self.fds: list[tuple[int, Inode]] = []
        self.next_mid = 0
        self.recent: list[str] = []
        self.weights = MIXES[mix]
        self.kinds = list(self.weights)
        self.counts = {k: 0 for k in self.kinds}
        self.verified_points = 0
        self.inos: dict[int, int] = {}

    # -- journal -----------------------------------------------------------------------------------------------

    def state_str(self, s: tuple) -> str:
        if s[0] == "x":
            return f"x{self.inos[s[1]]}"
        if s[0] == "h":
            return f"{self.inos[s[1]]}:{s[2]}:{s[3]}"
        return s[0]

    def write_journal(self, record: dict) -> None:
        os.write(self.jfd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def journal(self, names) -> None:
        lines = []
        for n in names:
            a = self.allowed[n]
            lines.append(json.dumps({"n": n, "a": None if a is None else sorted(map(self.state_str, a))},
                                    separators=(",", ":")))
        if lines:
            os.write(self.jfd, ("\n".join(lines) + "\n").encode())

    # -- the model -----------------------------------------------------------------------------------------------

    def state_of(self, inode: Inode) -> tuple:
        return ("h", inode.mid, len(inode.data), digest(inode.data)) if inode.synced else ("x", inode.mid)

    def current(self, name: str) -> tuple:
        if name in self.dirs:
            return DIR
        inode = self.bind.get(name)
        return ABSENT if inode is None else self.state_of(inode)

    def widen(self, name: str, state: tuple) -> None:
        """Before an operation that may leave ``name`` in ``state`` on disk."""
        a = self.allowed[name]
        if a is not None and state not in a:
            a.add(state)
            if len(a) > MAX_SET:
                self.allowed[name] = None
            self.journal([name])

    def content_changes(self, inode: Inode) -> None:
        """Before a write or truncate of ``inode``: any name that may be bound to it may hold any content."""
        if not inode.synced:
            return
        inode.synced = False
        changed = []
        for n, a in self.allowed.items():
            if a and any(s[0] == "h" and s[1] == inode.mid for s in a):
                self.allowed[n] = {("x", inode.mid) if s[0] == "h" and s[1] == inode.mid else s for s in a}
                changed.append(n)
        self.journal(changed)

    def synced(self, inode: Inode) -> None:
        """After fsync or fdatasync of ``inode`` returned."""
        inode.synced = True
        exact = self.state_of(inode)
        changed = []
        for n, a in self.allowed.items():
            if a and any(s[0] in "xh" and s[1] == inode.mid and s != exact for s in a):
                self.allowed[n] = {exact if s[0] in "xh" and s[1] == inode.mid else s for s in a}
                changed.append(n)
        self.write_journal({"o": "fsync", "i": inode.ino})
        self.journal(changed)
        self.verified_points += 1

    def settle(self, names) -> list[str]:
        """After a commit of the whole delta: each of ``names`` is on disk in its current state."""
        changed = []
        for n in names:
            now = {self.current(n)}
            if self.allowed[n] != now:
                self.allowed[n] = now
                changed.append(n)
        return changed

    def new_inode(self, ino: int) -> Inode:
        inode = Inode(self.next_mid, ino)
        self.inos[self.next_mid] = ino
        self.next_mid += 1
        return inode

    # -- helpers -----------------------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.mnt, name)

    def existing(self) -> list[str]:
        return [n for n in self.files if n in self.bind]

    def absent(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.bind and n not in self.dirs]

    def pick_file(self) -> str | None:
        names = self.existing()
        if not names:
            return None
        fresh = [n for n in self.recent[-4:] if n in self.bind]
        if fresh and self.rng.random() < 0.6:
            return fresh[-1]
        return self.rng.choice(names)

    def pick_place(self) -> list[str]:
        return self.own_files if self.rng.random() < 0.7 else self.shared_files

    def payload(self, limit: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, limit))

    def unbind(self, name: str) -> Inode | None:
        inode = self.bind.pop(name, None)
        if inode is not None:
            inode.names.discard(name)
        return inode

    def do_bind(self, name: str, inode: Inode) -> None:
        self.bind[name] = inode
        inode.names.add(name)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """``os.pwrite``; returns the bytes written. A short write is a failure, but where reads fail on purpose:
        the kernel sends the part of a write that begins inside a page it has not cached in a request of its own,
        and when a later request fails, the write returns what the first ones wrote (POSIX allows a short write)."""
        done = os.pwrite(fd, data, offset)
        if done < len(data):
            if not self.tolerate_eio:
                raise StressError(f"short write: {done} of {len(data)} bytes at {offset}")
            self.eio += 1
        return done

    def open_inode(self, inode: Inode, flags: int = os.O_RDWR) -> tuple[int, bool]:
        """An fd on ``inode``: one held open, or a new one through one of its names (close it when the flag)."""
        held = [fd for fd, i in self.fds if i is inode]
        if held:
            return held[0], False
        return os.open(self.path(next(iter(sorted(inode.names)))), flags), True

    # -- operations ----------------------------------------------------------------------------------------------

    def op_create(self) -> None:
        choices = self.absent(self.pick_place())
        if not choices:
            return self.op_unlink()
        name = self.rng.choice(choices)
        fd, inode = self.create(name)
        self.recent.append(name)
        del self.recent[:-8]
        if self.mix != "cuf" or self.rng.random() < 0.5:
            data = self.payload(8192)
            self.content_changes(inode)
            inode.data[:] = data[: self.pwrite(fd, data, 0)]
        self.hold_or_close(fd, inode)

    def create(self, name: str) -> tuple[int, Inode]:
        """Create ``name``: before, it may be any file; once the inode number is known, exactly that empty inode."""
        self.widen(name, ANY_FILE)
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        inode = self.new_inode(os.fstat(fd).st_ino)
        a = self.allowed[name]
        if a is not None:
            a.discard(ANY_FILE)
            a.add(self.state_of(inode))
            self.journal([name])
        self.do_bind(name, inode)
        return fd, inode

    def hold_or_close(self, fd: int, inode: Inode) -> None:
        if self.mix == "full" and len(self.fds) < OPEN_FDS and self.rng.random() < 0.3:
            self.fds.append((fd, inode))
        else:
            os.close(fd)

    def op_unlink(self) -> None:
        name = self.pick_file()
        if name is None:
            return
        self.widen(name, ABSENT)
        os.unlink(self.path(name))
        self.unbind(name)

    def op_rename(self) -> None:
        src = self.pick_file()
        if src is None:
            return
        inode = self.bind[src]
        dst = self.rng.choice(self.pick_place())
        if dst in self.dirs or dst == src or self.bind.get(dst) is inode:
            return
        self.rename(src, dst)

    def rename(self, src: str, dst: str) -> None:
        inode = self.bind[src]
        self.widen(dst, self.state_of(inode))
        self.widen(src, ABSENT)
        os.rename(self.path(src), self.path(dst))
        self.unbind(dst)
        self.unbind(src)
        self.do_bind(dst, inode)

    def op_link(self) -> None:
        src = self.pick_file()
        choices = self.absent(self.pick_place())
        if src is None or not choices:
            return
        dst = self.rng.choice(choices)
        inode = self.bind[src]
        self.widen(dst, self.state_of(inode))
        os.link(self.path(src), self.path(dst))
        self.do_bind(dst, inode)

    def op_mkdir(self) -> None:
        choices = self.absent(self.subdirs)
        if not choices:
            return self.op_rmdir()
        name = self.rng.choice(choices)
        self.widen(name, DIR)
        os.mkdir(self.path(name))
        self.dirs.add(name)

    def op_rmdir(self) -> None:
        if not self.dirs:
            return
        name = self.rng.choice(sorted(self.dirs))
        self.widen(name, ABSENT)
        os.rmdir(self.path(name))
        self.dirs.discard(name)

    def write_fd(self) -> tuple[int, Inode, bool] | None:
        """An fd to write through: a held one (perhaps of an unlinked file) or one opened by name."""
        if self.fds and self.rng.random() < 0.4:
            fd, inode = self.rng.choice(self.fds)
            return fd, inode, False
        name = self.pick_file()
        if name is None:
            return None
        inode = self.bind[name]
        fd, close = self.open_inode(inode)
        return fd, inode, close

    def op_write(self) -> None:
        got = self.write_fd()
        if got is None:
            return
        fd, inode, close = got
        data = self.payload(16384)
        offset = self.rng.randint(0, MAX_SIZE - len(data))
        self.content_changes(inode)
        data = data[: self.pwrite(fd, data, offset)]
        if offset > len(inode.data):
            inode.data.extend(bytes(offset - len(inode.data)))
        inode.data[offset:offset + len(data)] = data
        if close:
            os.close(fd)

    def op_truncate(self) -> None:
        got = self.write_fd()
        if got is None:
            return
        fd, inode, close = got
        size = self.rng.choice([0, self.rng.randint(0, MAX_SIZE), len(inode.data) // 2,
                                min(MAX_SIZE, len(inode.data) + 100)])
        self.content_changes(inode)
        os.ftruncate(fd, size)
        if size < len(inode.data):
            del inode.data[size:]
        else:
            inode.data.extend(bytes(size - len(inode.data)))
        if close:
            os.close(fd)

    def op_fsync(self, data_only: bool = False) -> None:
        if self.fds and self.rng.random() < 0.3:
            fd, inode = self.rng.choice(self.fds)
            close = False
        else:
            name = self.pick_file()
            if name is None:
                return
            inode = self.bind[name]
            fd, close = self.open_inode(inode, os.O_RDONLY)
        (os.fdatasync if data_only else os.fsync)(fd)
        self.synced(inode)
        if close:
            os.close(fd)

    def op_fdatasync(self) -> None:
        self.op_fsync(data_only=True)

    def op_fsyncdir(self) -> None:
        d = self.rng.choice([f"w{self.wid}", "shared"])
        fd = os.open(self.path(d), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.write_journal({"o": "fsyncdir", "d": d})
        self.journal(self.settle([n for n in self.allowed if n.startswith(d + "/")]))
        self.verified_points += 1

    def op_sync(self) -> None:
        os.sync()

    def op_close(self) -> None:
        if self.fds:
            fd, _ = self.fds.pop(self.rng.randrange(len(self.fds)))
            os.close(fd)

    def op_read(self) -> None:
        name = self.pick_file()
        if name is None:
            return
        inode = self.bind[name]
        fd, close = self.open_inode(inode, os.O_RDONLY)
        data = os.pread(fd, MAX_SIZE + 65536, 0)
        if close:
            os.close(fd)
        if self.tolerate_eio and len(data) < len(inode.data) and data == inode.data[:len(data)]:
            self.eio += 1  # a read error after some pages were copied: the kernel returns those (a short read)
            return
        if data != inode.data:
            raise StressError(f"{name}: read {len(data)} bytes (digest {digest(data)}), "
                              f"expected {len(inode.data)} ({digest(inode.data)})")

    def op_replace(self, fsync: bool | None = None) -> None:
        """The atomic save: write the temporary file, perhaps fsync it, rename it over the target."""
        if fsync is None:
            fsync = self.rng.random() < 0.5
        own = self.rng.random() < 0.7 or self.mix != "full"
        tmp = self.tmp_names[0 if own else 1]
        if self.mix == "full":
            targets = [n for n in (self.own_files if own else self.shared_files) if n not in self.dirs]
            target = self.rng.choice(targets)
        else:
            target = self.own_files[0]
        if tmp in self.bind:  # left by an earlier interrupted save: start over
            self.widen(tmp, ABSENT)
            os.unlink(self.path(tmp))
            self.unbind(tmp)
        fd, inode = self.create(tmp)
        data = self.payload(8192)
        self.content_changes(inode)
        try:
            inode.data[:] = data[: self.pwrite(fd, data, 0)]
            if fsync:
                os.fsync(fd)
                self.synced(inode)
        finally:
            os.close(fd)
        self.rename(tmp, target)

    def op_replace_fsync(self) -> None:
        self.op_replace(fsync=True)

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.write_journal({"worker": self.wid, "mix": self.mix})
        kinds, weights = self.kinds, [self.weights[k] for k in self.kinds]
        done, kind = 0, ""
        try:
            for done in range(self.ops):
                kind = self.rng.choices(kinds, weights)[0]
                self.counts[kind] += 1
                try:
                    getattr(self, "op_" + kind)()
                except OSError as e:
                    if not (self.tolerate_eio and e.errno == errno.EIO):
                        raise
                    self.eio += 1  # nothing changed: the model stays as it was
                if self.progress is not None and done % 16 == 0:
                    with self.progress.get_lock():
                        self.progress.value += 16
            while self.fds:
                os.close(self.fds.pop()[0])
        except (OSError, StressError) as e:
            if os.path.exists(self.stop_flag):
                self.write_journal({"stopped": done})
                return 0
            msg = f"{type(e).__name__}: {e}" if isinstance(e, OSError) and not e.errno else str(e)
            if isinstance(e, OSError) and e.errno:
                msg = f"op {done} ({kind}): {errno.errorcode.get(e.errno, e.errno)} {e.strerror}" + (
                    f": {e.filename}" if e.filename else "")
            self.write_journal({"error": f"worker {self.wid}: {msg}"})
            return 1
        final = {n: self.state_str(("h", i.mid, len(i.data), digest(i.data))) for n, i in self.bind.items()}
        final.update({d: "d" for d in self.dirs})
        self.write_journal({"final": final, "counts": self.counts, "points": self.verified_points, "eio": self.eio})
        return 0


def _worker_main(mnt: str, wid: int, ops: int, seed: int, mix: str, journal: str, stop_flag: str,
                 progress, tolerate_eio: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    w = Worker(mnt, wid, ops, seed, mix, journal, stop_flag, progress, tolerate_eio)
    os._exit(w.run())


def run_workers(mnt: str, journal_dir: str, procs: int, ops: int, seed: int, mix: str,
                kill_when: Callable[[float], bool] | None = None, on_kill: Callable[[], None] | None = None,
                tolerate_eio: bool = False, on_start: Callable[[], None] | None = None) -> list[str]:
    """Run ``procs`` workers on the mount at ``mnt``; return the errors they reported. ``kill_when(done)`` is
    asked with the fraction of all operations done; once it says yes, ``on_kill()`` is called (once), and the
    errors the workers meet after that are expected. ``tolerate_eio``: the device fails reads on purpose, so an
    operation may fail with EIO (having changed nothing). ``on_start()`` is called once the directories are made
    and committed, as the workers start."""
    if mix not in MIXES:
        raise StressError(f"unknown mix {mix!r} (known: {', '.join(MIXES)})")
    os.makedirs(journal_dir, exist_ok=True)
    for d in ["shared"] + [f"w{i}" for i in range(procs)]:
        os.makedirs(os.path.join(mnt, d), exist_ok=True)
    if subprocess.run([tool("tux3"), "sync", mnt], capture_output=True).returncode:  # the directories are durable
        raise StressError("tux3 sync failed before the run")
    stop_flag = os.path.join(journal_dir, "stopped")
    if os.path.exists(stop_flag):
        os.unlink(stop_flag)
    if on_start is not None:
        on_start()
    ctx = multiprocessing.get_context("fork")
    progress = ctx.Value("q", 0)
    workers = [ctx.Process(target=_worker_main, args=(mnt, i, ops, seed, mix, os.path.join(journal_dir,
                                                                                          f"w{i}.jsonl"),
                                                    stop_flag, progress, tolerate_eio)) for i in range(procs)]
    for w in workers:
        w.start()
    try:
        killed = False
        while any(w.is_alive() for w in workers):
            if kill_when is not None and on_kill is not None and not killed and kill_when(
                    progress.value / (procs * ops)):
                Path(stop_flag).touch()
                on_kill()
                killed = True
            time.sleep(0.01)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
            w.join()
    errors = []
    for i in range(procs):
        for rec in read_journal(os.path.join(journal_dir, f"w{i}.jsonl")):
            if "error" in rec:
                errors.append(rec["error"])
    errors += [f"worker {i} exited with {w.exitcode}" for i, w in enumerate(workers) if w.exitcode and not errors]
    return errors


# ---------------------------------------------------------------------------------------------------------------
# verification


def read_journal(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out


def actual_state(mnt: str, name: str) -> str:
    path = os.path.join(mnt, name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "-"
    if os.path.isdir(path):
        return "d"
    with open(path, "rb") as f:
        data = f.read()
    return f"{st.st_ino}:{len(data)}:{digest(data)}"


def matches(actual: str, allowed: list[str]) -> bool:
    if actual in allowed:
        return True
    return actual not in ("-", "d") and ("f" in allowed or f"x{actual.split(':')[0]}" in allowed)


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    names: int = 0  # names checked
    exact_files: int = 0  # names whose content was checked byte for byte (after an fsync, or at the clean end)
    # after a kill, a name counts there when every file state it may have is an exact content


def verify(mnt: str, journal_dir: str, clean: bool) -> Verdict:
    """Check the mount against the journals. ``clean``: the run ended with a clean unmount, so every worker's
    final state must be there exactly; otherwise every name must be in one of its journaled states."""
    v = Verdict()
    journals = sorted(p for p in os.listdir(journal_dir) if p.endswith(".jsonl"))
    for j in journals:
        allowed: dict[str, list[str] | None] = {}
        final = None
        wid = None
        for rec in read_journal(os.path.join(journal_dir, j)):
            if "n" in rec:
                allowed[rec["n"]] = rec["a"]
            elif "final" in rec:
                final = rec["final"]
            elif "worker" in rec:
                wid = rec["worker"]
        if clean:
            if final is None:
                v.problems.append(f"{j}: the worker did not finish")
                continue
            seen = set(os.listdir(os.path.join(mnt, f"w{wid}")))
            present = {f"w{wid}/{n}" for n in seen}
            present |= {f"shared/{n}" for n in os.listdir(os.path.join(mnt, "shared"))
                        if n.startswith(f"w{wid}.")}
            for name in sorted(present - set(final)):
                v.problems.append(f"{name}: present, but not in the worker's final state")
            for name, want in sorted(final.items()):
                got = actual_state(mnt, name)
                v.names += 1
                if got != want:
                    v.problems.append(f"{name}: {describe(got)}, expected {describe(want)}")
                elif want != "d":
                    v.exact_files += 1
        for name, a in sorted(allowed.items()):
            if a is None:
                continue
            got = actual_state(mnt, name)
            v.names += not clean
            if not matches(got, a):
                v.problems.append(f"{name}: {describe(got)}, expected {' or '.join(map(describe, a))}")
            elif not clean and any(":" in s for s in a) and not any(s == "f" or s[0] == "x" for s in a):
                v.exact_files += 1  # if it is a file, its bytes are exactly those of an fsync
    return v


def describe(state: str) -> str:
    if state == "-":
        return "absent"
    if state == "d":
        return "a directory"
    if state == "f":
        return "a file"
    if state.startswith("x"):
        return f"inode {state[1:]} (any content)"
    ino, size, h = state.split(":")
    return f"inode {ino}, {size} bytes, digest {h}"


def count_inodes(mnt: str) -> tuple[int, int]:
    """(used inodes by statfs, inodes reachable from the root)."""
    seen = {os.lstat(mnt).st_ino}
    for root, dirs, files in os.walk(mnt):
        for n in dirs + files:
            seen.add(os.lstat(os.path.join(root, n)).st_ino)
    st = os.statvfs(mnt)
    return st.f_files - st.f_ffree, len(seen)


# ---------------------------------------------------------------------------------------------------------------
# the driver


class Daemon:
    """tux3fuse in the foreground, its output in a log file."""

    def __init__(self, image: Path | str, mnt: Path, options: str, log: Path) -> None:
        self.image, self.mnt, self.options, self.log = image, mnt, options, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        args = [tool("tux3fuse"), "-f", str(self.image), str(self.mnt)]
        if self.options:
            args[1:1] = ["-o", self.options]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not mounted(self.mnt):
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise StressError(f"the daemon exited with {rc}: {self.tail(1).strip()}")
            if time.monotonic() > deadline:
                raise StressError("the mount did not appear within 30 s")
            time.sleep(0.02)

    def umount(self) -> None:
        assert self.proc is not None
        r = subprocess.run([tool("tux3"), "umount", str(self.mnt)], capture_output=True, text=True, timeout=300)
        self.proc.wait(timeout=120)
        rc, self.proc = self.proc.returncode, None
        if r.returncode or rc:
            raise StressError(f"tux3 umount exited {r.returncode}, daemon {rc}: {r.stderr.strip()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc = None
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    def cleanup(self) -> None:
        if self.proc is not None:
            self.kill()
        elif mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_errors(self, allowed: Callable[[str], bool] = lambda line: False) -> list[str]:
        """The log's ERROR, CRITICAL, read-only and Traceback lines, but those ``allowed``."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines()
                if (" ERROR:" in line or " CRITICAL:" in line or "read-only" in line or "Traceback" in line)
                and not allowed(line)]


class FailingReads:
    """nbdkit serving ``image`` on a Unix socket with its error filter: while ``flag`` exists, ``rate`` of the
    reads fail with EIO. Stopped by its PID."""

    def __init__(self, image: Path, work: Path, rate: str) -> None:
        self.flag, self.socket, self.log = work / "read-errors", work / "nbd.sock", work / "nbdkit.log"
        self.uri = f"nbd+unix:///?socket={self.socket}"
        args = ["nbdkit", "--unix", str(self.socket), "--foreground", "--exit-with-parent", "--filter=error", "file",
                f"file={image}", "error-pread=EIO", f"error-pread-rate={rate}", f"error-pread-file={self.flag}"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise StressError(f"nbdkit did not start: {self.log.read_text(errors='replace').strip()}")
            time.sleep(0.02)
        time.sleep(0.1)  # the socket exists a moment before the server listens on it

    def injected(self) -> int:
        return self.log.read_text(errors="replace").count("injecting EIO error into pread")

    def stop(self) -> None:
        self.flag.unlink(missing_ok=True)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


from tux3fuse.mounts import is_mounted as mounted  # noqa: E402


def fsck(image: Path | str) -> None:
    r = subprocess.run([tool("fsck.tux3"), "-n", str(image)], capture_output=True, text=True, timeout=600)
    if r.returncode:
        out = (r.stdout + r.stderr).strip().splitlines()
        raise StressError(f"fsck.tux3 -n exited {r.returncode}: {'; '.join(out[-4:])}")


@dataclass
class Config:
    procs: int = 4
    ops: int = 2000
    seed: int = 1
    mix: str = "full"
    options: str = ""
    size: str = "256M"
    kill: bool = False
    kill_after: float | None = None
    workdir: str | None = None
    keep: bool = False
    read_errors: str | None = None  # a share of the device's reads that fail (nbdkit's error filter), "2%"


def drive(cfg: Config) -> tuple[bool, str]:
    """Everything: mkfs, mount, workers (SIGKILL of the daemon in the middle if asked), unmount, fsck, remount,
    verify, unmount, fsck. Returns (passed, summary line)."""
    work = Path(tempfile.mkdtemp(prefix="stress-", dir=cfg.workdir))
    image, mnt, journal = work / "fs.img", work / "mnt", work / "journal"
    options = cfg.options
    if cfg.read_errors:
        options = ",".join(o for o in (options, "nowriteback") if o)
    daemon = Daemon(image, mnt, options, work / "daemon.log")
    what = (f"stress: {cfg.procs} procs x {cfg.ops} ops, mix {cfg.mix}, seed {cfg.seed}, "
            f"options {cfg.options or 'default'}{', kill' if cfg.kill or cfg.kill_after is not None else ''}"
            + (f", {cfg.read_errors} read errors" if cfg.read_errors else ""))
    passed = False
    server: FailingReads | None = None
    try:
        r = subprocess.run([tool("mkfs.tux3"), "-q", "-f", "-s", cfg.size, str(image)], capture_output=True,
                           text=True)
        if r.returncode:
            raise StressError(f"mkfs.tux3: {r.stderr.strip()}")
        if cfg.read_errors:
            server = FailingReads(image, work, cfg.read_errors)
            daemon.image = server.uri
        daemon.start()
        started = time.monotonic()
        kill_when: Callable[[float], bool] | None = None
        if cfg.kill_after is not None:
            after = cfg.kill_after
            kill_when = lambda done: time.monotonic() - started >= after  # noqa: E731
        elif cfg.kill:
            at = random.Random(cfg.seed).uniform(0.3, 0.7)
            kill_when = lambda done: done >= at  # noqa: E731
        killed: list[float] = []

        def on_kill() -> None:
            daemon.kill()
            killed.append(time.monotonic() - started)

        failed = False  # with read errors: a commit met one, and the volume turned read-only

        def allowed(line: str) -> bool:  # what the injected read errors may log
            return server is not None and ("read of " in line or "read error" in line or failed)

        errors = run_workers(str(mnt), str(journal), cfg.procs, cfg.ops, cfg.seed, cfg.mix, kill_when,
                             on_kill, tolerate_eio=server is not None,
                             on_start=None if server is None else server.flag.touch)
        if server is not None:
            server.flag.unlink()
            if daemon.proc is not None:
                r = subprocess.run([tool("tux3"), "stat", "--json", str(mnt)], capture_output=True, text=True)
                failed = bool(r.stdout) and json.loads(r.stdout).get("read_only") == 1
            if failed:
                errors = [e for e in errors if "EROFS" not in e]
        if errors:
            raise StressError(errors[0])
        if daemon.proc is not None:
            if kill_when is not None:  # the workers finished before the kill point
                daemon.kill()
                killed.append(time.monotonic() - started)
            elif failed:  # as after a kill: the delta that met the error is not on disk
                daemon.kill()
            else:
                daemon.umount()
        bad = daemon.log_errors(allowed)
        if bad:
            raise StressError(f"daemon log: {bad[0]}")
        fsck(daemon.image)
        daemon.start()
        v = verify(str(mnt), str(journal), clean=not killed and not failed)
        if v.problems:
            raise StressError(f"{len(v.problems)} names wrong after the remount: {v.problems[0]}")
        used, real = count_inodes(str(mnt))
        if used != real:
            raise StressError(f"statfs counts {used} used inodes, but {real} inodes are reachable")
        daemon.umount()
        bad = daemon.log_errors(allowed)
        if bad:
            raise StressError(f"daemon log: {bad[0]}")
        fsck(daemon.image)
        elapsed = time.monotonic() - started
        kill_note = f"killed at {killed[0]:.1f} s, " if killed else ""
        if server is not None:
            eio = sum(rec.get("eio", 0) for p in journal.glob("*.jsonl") for rec in read_journal(str(p)))
            kill_note += (f"{server.injected()} read errors injected, {eio} operations failed with EIO"
                          f"{', the volume turned read-only' if failed else ''}, ")
        passed = True
        return True, (f"{what}: PASS ({kill_note}fsck clean, {v.names} names verified, {v.exact_files} exact "
                      f"file contents, inodes {used} = {real}, {elapsed:.1f} s)")
    except StressError as e:
        tail = daemon.tail()
        return False, ((f"--- daemon log tail ({daemon.log}):\n{tail}\n---\n" if tail else "")
                       + f"stress: work directory kept: {work}\n{what}: FAIL: {e}")
    finally:
        daemon.cleanup()
        if server is not None:
            server.stop()
        if passed and not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="stress.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--ops", type=int, default=2000, help="operations per process")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mix", choices=list(MIXES), default="full")
    if argv[:1] == ["run"]:
        p.add_argument("mountpoint")
        p.add_argument("--journal", required=True, help="directory for the journals (outside the mount)")
        a = p.parse_args(argv[1:])
        try:
            errors = run_workers(a.mountpoint, a.journal, a.procs, a.ops, a.seed, a.mix)
        except (StressError, OSError) as e:
            print(f"stress: {e}", file=sys.stderr)
            return 1
        for e in errors:
            print(f"stress: {e}", file=sys.stderr)
        return 1 if errors else 0
    if argv[:1] == ["verify"]:
        q = argparse.ArgumentParser(prog="stress.py verify")
        q.add_argument("mountpoint")
        q.add_argument("--journal", required=True)
        q.add_argument("--clean", action="store_true", help="the run ended with a clean unmount: exact state")
        a = q.parse_args(argv[1:])
        v = verify(a.mountpoint, a.journal, a.clean)
        for problem in v.problems:
            print(f"stress: {problem}")
        print(f"stress: {v.names} names verified, {v.exact_files} exact file contents, "
              f"{len(v.problems)} wrong: {'FAIL' if v.problems else 'PASS'}")
        return 1 if v.problems else 0
    p.add_argument("--options", default="", help="mount options, as for tux3fuse -o")
    p.add_argument("--size", default="256M", help="image size (default 256M)")
    p.add_argument("--kill", action="store_true", help="SIGKILL the daemon at a seeded point of the run")
    p.add_argument("--kill-after", type=float, metavar="SECONDS", help="SIGKILL the daemon after SECONDS")
    p.add_argument("--workdir", help="where the temporary work directory is made")
    p.add_argument("--keep", action="store_true", help="keep the work directory after a pass")
    p.add_argument("--read-errors", metavar="RATE", help="serve the image with nbdkit's error filter failing RATE "
                   "(2%%) of the reads during the run; operations may fail with EIO and must change nothing")
    a = p.parse_args(argv)
    if a.procs < 1 or a.ops < 1:
        p.error("--procs and --ops must be at least 1")
    cfg = Config(a.procs, a.ops, a.seed, a.mix, a.options, a.size, a.kill, a.kill_after, a.workdir, a.keep,
                 a.read_errors)
    try:
        ok, line = drive(cfg)
    except KeyboardInterrupt:
        print("stress: interrupted", file=sys.stderr)
        return 130
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
