#!/usr/bin/env python3
"""Crash consistency, the dm-log-writes way: every crash point must recover to a committed delta.

A seeded workload runs through the embedded API with the device's write log on: creates, writes, overwrites,
renames over existing files, unlinks of open files, truncates, stores through shared mappings, links, symlinks,
directory operations, and a commit (fsync) now and then. The state of the namespace and of every file is recorded
at every delta that reaches the disk. Then, for each crash point, the image is rebuilt as a disk could have left
it, and checked:

- crash points: after every flush, and inside each interval between two flushes a sample of subsets of the
  unflushed writes (a disk may reorder them), some with one write torn at 512-byte sectors;
- the rebuilt image is opened as a mount would (newest valid superblock, log replay), checked with fsck (no
  errors; orphans waiting for reclaim are fine), and its namespace and data must equal the state recorded at the
  delta it recovers to, which must be no earlier than the last delta durable before the crash;
- every few points the real recovery also runs (a writable mount: replay, orphan reclaim, a commit, a clean
  unmount) and fsck must then be clean.

The last line reads ``N crash points, M inconsistent``; the exit status is 1 when M > 0.
"""

from __future__ import annotations

import argparse
import errno
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

from tux3fuse import format as fmt  # noqa: E402
from tux3fuse.fs import Options, Volume, VolumeError  # noqa: E402
from tux3fuse.fsck import Checker  # noqa: E402
from tux3fuse.mkfs import mkfs  # noqa: E402
from tux3fuse.writelog import read_log  # noqa: E402

SECTOR = 512


def snapshot(vol: Volume, inos: dict[bytes, int] | None = None) -> dict[bytes, tuple]:
    """Path -> (kind, content) of everything reachable from the root, without taking kernel references (and
    path -> inode number into ``inos``)."""
    out: dict[bytes, tuple] = {}
    stack = [(b"", fmt.ROOT_INO)]
    while stack:
        path, ino = stack.pop()
        inode = vol.iget(ino)
        for name, (child, _, _, _) in sorted(vol._dir(inode).names.items()):
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
                out[p] = ("f", stat.S_IMODE(mode), node.rec.nlink, vol.read(child, 0, node.rec.size))
    return out


class Workload:
    """Seeded operations on a live volume, with the state recorded at every delta written to disk."""

    def __init__(self, vol: Volume, rng: random.Random) -> None:
        self.vol = vol
        self.rng = rng
        self.inos: dict[int, dict[bytes, int]] = {vol.sb.seq: {}}
        self.states: dict[int, dict] = {vol.sb.seq: snapshot(vol, self.inos[vol.sb.seq])}
        self.dirs = [fmt.ROOT_INO]
        self.files: list[tuple[int, bytes]] = []  # (parent, name)
        self.open_orphans: list[int] = []
        plain_commit = self.plain_commit = vol.commit

        def commit(**kwargs) -> bool:  # every commit, also those a full volume makes inside an operation
            written = plain_commit(**kwargs)
            if written:
                inos = self.inos[vol.sb.seq] = {}
                self.states[vol.sb.seq] = snapshot(vol, inos)
            return written

        vol.commit = commit

    def commit(self) -> None:
        self.vol.commit()

    def fsync_ahead(self, ino: int) -> None:
        """fsync of one file committed ahead of its delta: the state on disk is the last committed one with only
        this file's content and attributes newer."""
        vol = self.vol
        base = vol.sb.seq
        rec = vol.iget(ino).rec
        state = dict(self.states[base])
        for path, owner in self.inos[base].items():
            if owner == ino:
                state[path] = ("f", stat.S_IMODE(rec.mode), rec.nlink, vol.read(ino, 0, rec.size))
        if self.plain_commit(only={ino}):
            self.states[vol.sb.seq] = state
            self.inos[vol.sb.seq] = self.inos[base]

    def step(self) -> None:
        try:
            self._step()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise

    def _step(self) -> None:
        vol, rng = self.vol, self.rng
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
            entry = vol._dir(vol.iget(parent)).get(name)
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
                m.write(off, rng.randbytes(min(size - off, rng.randrange(1, bs))))
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
            names = vol._dir(vol.iget(parent_ino)).names
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
            if ino in vol.dirty_inodes.get(vol.deltas.current, {}) and vol.commit_ahead_pays({ino}):
                self.fsync_ahead(ino)
            else:
                self.commit()


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


def check_point(image: Path, base: bytes, records: list, writes: list[tuple[int, bytes]], end: int,
                states: dict[int, dict], full: bool) -> str | None:
    """Build the image for one crash point and check it; return what is wrong, or None."""
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
        seq = vol.sb.seq
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
    p.add_argument("--full-every", type=int, default=10, help="run the writable recovery every N points")
    p.add_argument("--keep", help="directory to keep the failing images in")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="show the volume's log (fallbacks at mount)")
    a = p.parse_args(argv)
    logging.getLogger("tux3fuse").setLevel(logging.INFO if a.verbose else logging.ERROR)
    rng = random.Random(a.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/var/tmp" if os.path.isdir("/var/tmp") else None) as tmp:
        work = Path(tmp)
        image = work / "live.img"
        mkfs(str(image), a.blocksize, a.size << 20)
        base = image.read_bytes()
        before = snapshot_after(image)
        base_seq = Volume(str(image), Options(readonly=True, lock=False)).sb.seq
        logpath = work / "writes.log"
        vol = Volume(str(image), Options(writelog=str(logpath), unify_deltas=5, fsync_ahead_bytes=0))
        vol.mount()
        load = Workload(vol, rng)
        load.states[vol.sb.seq] = snapshot(vol)
        load.states[base_seq] = before
        for _ in range(a.ops):
            load.step()
        while load.open_orphans:
            vol.release(load.open_orphans.pop())
        load.commit()
        states = load.states
        vol.unmount()
        states[vol.sb.seq] = states.get(vol.sb.seq) or snapshot_after(image)
        records = list(read_log(str(logpath)))
        flushes = [i for i, r in enumerate(records) if r[0] == "F"]
        if not a.quiet:
            print(f"workload: {a.ops} ops, {len(states)} deltas on disk, {len(records) - len(flushes)} writes, "
                  f"{len(flushes)} flushes (seed {a.seed})")
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
        points = points[: a.points]
        bad = 0
        for n, (end, kept, torn) in enumerate(points):
            durable_end = max([i for i in flushes if i < end], default=-1)
            writes = [(r[1], r[2]) for r in records[: durable_end + 1] if r[0] == "W"]
            extra_writes = []
            for i in kept:
                offset, data = records[i][1], records[i][2]
                if i == torn:  # keep some sectors of this write, the rest keeps what was there before
                    img = bytearray(base)
                    for o, d in writes:
                        img[o: o + len(d)] = d
                    mixed = bytearray(img[offset: offset + len(data)])
                    for s in range(0, len(data), SECTOR):
                        if rng.random() < 0.5:
                            mixed[s: s + SECTOR] = data[s: s + SECTOR]
                    data = bytes(mixed)
                extra_writes.append((offset, data))
            end_for_durable = durable_end + 1
            problem = check_point(work / "crash.img", base, records, writes + extra_writes, end_for_durable,
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
    return 1 if bad else 0


def snapshot_after(image: Path) -> dict:
    vol = Volume(str(image), Options(readonly=True, lock=False))
    try:
        return snapshot(vol)
    finally:
        vol.close_files()


if __name__ == "__main__":
    sys.exit(main())
