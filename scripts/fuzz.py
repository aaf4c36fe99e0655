#!/usr/bin/env python3
"""fuzz.py - coverage-guided fuzzing of everything that reads a tux3fuse image, with atheris (libFuzzer).

Usage:
  python scripts/fuzz.py run [--seconds N | --runs N] [--seed N] [--dir DIR] [--jobs N] [LIBFUZZER_FLAG ...]
  python scripts/fuzz.py seeds [--dir DIR]          write the seed images (made once, then reused)
  python scripts/fuzz.py image INPUT OUT.img        the crafted image an input stands for (a regression image)
  python scripts/fuzz.py check IMAGE...             run every target on images as they are (no mutation)
  python scripts/fuzz.py replay INPUT|DIR...        run inputs (a corpus) through the targets, without libFuzzer
                                                    (to measure line coverage: coverage run scripts/fuzz.py replay ...)

An input is a recipe, not an image: a base image (one of the seeds below), then patches of it, then ``reseal``
(scripts/reseal.py) recomputes every checksum, so that what the patches crafted reaches the parsers instead of
stopping at a checksum. The bytes of an input read as:

  byte 0          the seed image (its index modulo the number of seeds)
  byte 1          flags: 1 data checksums resealed too, 2 the superblock's proof recomputed, 4 fsck also repairs
                  (on a copy), 8 a read-write mount also runs a few operations (on a copy), 16 after the reseal
                  one bit of the first byte of the last patch is flipped (bit ``flags >> 5``): damage that the
                  checksums see, beside the values they do not
  then patches, each an op byte (modulo 4) and its arguments, until the bytes run out:
    0 field    u16 place, u8 value: a field of a structure the seed holds (``places``: superblock fields, block
               headers, tree entries, extent and inode records, log records, directory entries) set to one of
               ``interesting`` values of the image (0, 1, block numbers, volblocks±1, 2^32−1, ...) or, for a value
               byte past their number, to the next 8 bytes
    1 raw      u32 offset, u8 length (1-16), the bytes
    2 clone    u16 src, u16 dst: block src copied over block dst, its own-number field set to dst (a block reached
               from two places, a tree that reaches itself)
    3 pointer  u16 place, u16 block: a pointer field (child, previous log block, root, extent) set to the number of
               one of the seed's metadata blocks

The seeds are small volumes made by mkfs and a workload through the embedded API (files with several extents,
directories, symlinks, hard links, an extended attribute, orphans: unlinked while open, enough inodes and extents
for trees of two levels), with 512-byte and 4 KiB blocks, after a clean unmount and after a "crash" that leaves a
log of several deltas. They are made deterministically (fixed times, uuid and contents) into DIR/seeds.

Each input runs these targets, with libFuzzer's -timeout and -rss_limit_mb and an address-space limit in the
process (``--memory``): superblock choice (``replay.find_super``); the volume load, read-only (log replay); every
inode of the table (getattr), every directory from the root (readdir, then lookup of each name), every file read
(its head by the daemon's read beside the event loop and by the embedded read, which must agree; its tail) and every
symlink; ``fsck`` without repair; with the flags, ``fsck`` with repair and then without, and a read-write mount that
creates, writes, truncates, makes and removes a directory, renames and unlinks, commits and unmounts, then fsck.

What counts as a bug: any exception but the documented ones (``VolumeError`` in one line; ``OSError`` with the
errno of the operation, EIO only when the volume turned read-only over a ``CorruptBlock`` or ``CorruptDir``, or
EROFS after; ``CorruptBlock``/``CorruptDir`` from the raw tree walk), an fsck status outside 0, 1, 4, 8, a report
line over two lines, a repair that says it corrected everything and leaves errors, a hang (-timeout), or the memory
limit (-rss_limit_mb, or MemoryError in process). libFuzzer keeps such inputs as DIR/crash-*, timeout-*, oom-*;
``image`` turns one into the image it crafts, which goes under tests/images/fuzz-*.img once the bug is fixed
(tests/scripts/test_fuzz.py replays them all).

Exit status: 0 nothing found, 1 libFuzzer found a crash, hang or memory blow-up (its own status otherwise), 2 usage.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import random
import resource
import shutil
import signal
import stat
import struct
import sys
import tempfile
import traceback
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_DIR = ROOT / ".fuzz"
TIMEOUT = 20  # seconds an input may take (libFuzzer -timeout)
RSS_MB = 2048  # libFuzzer -rss_limit_mb
MEMORY = 3 << 30  # bytes of address space the process may map (the in-process guard)
READ_AT_MOST = 64 << 10  # bytes read of a file's head and of its tail
WALK_AT_MOST = 4096  # directory entries and inodes a walk visits at most
ALLOWED_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENOSPC, errno.EROFS,
                  errno.ENOTEMPTY, errno.EEXIST, errno.ENAMETOOLONG, errno.EMLINK, errno.ENODATA, errno.EPERM}


def _imports() -> None:
    """Import what the targets use; under ``atheris.instrument_imports`` when fuzzing, for coverage."""
    global fmt, logrec, Volume, Options, VolumeError, CorruptBlock, CorruptDir, find_super, fsck, reseal, mkfs, trio
    import trio
    from reseal import reseal

    from mkfs import mkfs
    from tux3fuse import format as fmt
    from tux3fuse import logrecord as logrec
    from tux3fuse.dir import CorruptDir
    from tux3fuse.format import CorruptBlock
    from tux3fuse.fs import Options, Volume, VolumeError
    from tux3fuse.fsck import fsck
    from tux3fuse.replay import find_super


# ---------------------------------------------------------------------------------------------------------------
# seeds


SEEDS = (("s512-clean", 512, 128 << 10, False), ("s512-crash", 512, 128 << 10, True),
         ("s4k-clean", 4096, 512 << 10, False), ("s4k-crash", 4096, 512 << 10, True))


def _workload(vol, bs: int, crash: bool) -> None:
    """Many inodes (an inode table of two levels), then after a unify deltas of small changes, each committed when
    ``crash`` (so that the log holds several): files of many extents (an extent tree of two levels with 512-byte
    blocks), a hard link, symlinks of one block and of two, an xattr, a rename, an rmdir, orphans."""
    rnd = random.Random(bs)
    d = vol.mkdir(1, b"d", 0o755).ino
    sub = vol.mkdir(d, b"sub", 0o700).ino
    for i in range(24 if bs == 512 else 50):
        f = vol.create(sub if i % 2 else 1, b"e%d" % i, 0o600).ino
        if i % 10 == 0:
            vol.write(f, 0, rnd.randbytes(100 + i))
        vol.release(f)
    vol.commit(unify=True)
    a = vol.create(d, b"a", 0o644).ino
    b = vol.create(d, b"b", 0o644).ino
    for i in range(20 if bs == 512 else 3):  # interleaved writes: many extents each
        vol.write(a, i * bs * 2, rnd.randbytes(bs))
        vol.write(b, i * bs * 2, rnd.randbytes(bs))
        if crash and i % 7 == 6:
            vol.commit()
    vol.commit()
    vol.link(a, sub, b"hard")
    vol.symlink(d, b"short", b"a")
    vol.symlink(1, b"long", b"d/" + b"x" * (bs + 100 if bs == 512 else 200))
    vol.setxattr(a, b"user.k", b"v" * 40)
    if crash:
        vol.commit()
    vol.rename(d, b"b", 1, b"moved")
    vol.mkdir(sub, b"gone", 0o755)  # still looked up once removed: an orphan directory
    vol.rmdir(sub, b"gone")
    if crash:
        vol.commit()
    o = vol.create(1, b"orphan", 0o644).ino  # unlinked while open: an orphan
    vol.write(o, 0, rnd.randbytes(3 * bs))
    vol.unlink(1, b"orphan")
    vol.release(a)
    vol.commit()


def make_seeds(directory: Path) -> list[Path]:
    """The seed images in ``directory`` (made when missing), deterministic: fixed times, uuid and contents."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, bs, size, crash in SEEDS:
        path = directory / f"{name}.img"
        out.append(path)
        if path.exists():
            continue
        clock = iter(range(1_800_000_000_000_000_000, 1 << 62, 1_000_000_007))
        with mock.patch("time.time_ns", lambda clock=clock: next(clock)), \
                mock.patch("uuid.uuid4", lambda: mock.Mock(bytes=bytes(range(16)))):
            tmp = path.with_suffix(".tmp")
            mkfs(str(tmp), bs, size)
            vol = Volume(str(tmp), Options(unify_deltas=1 << 30, unify_log_blocks=1 << 30, verify_log=False))
            vol.mount()
            _workload(vol, bs, crash)
            if crash:
                vol.close_files()  # a crash: the log stays, the orphan is not reclaimed
            else:
                vol.unmount()
        tmp.rename(path)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the structure of a seed: where its fields are, what values are worth trying


class Seed:
    """A base image, its block size, the places of its fields (offset, width, is a pointer) and the values worth
    writing there."""

    def __init__(self, path: Path) -> None:
        self.image = path.read_bytes()
        raw = self.image[fmt.SUPER_OFFSETS[0]: fmt.SUPER_OFFSETS[0] + fmt.SUPER_SIZE]
        sb = fmt.Super.unpack(raw, 0)
        self.bs = bs = sb.blocksize
        self.nblocks = len(self.image) // bs
        self.places: list[tuple[int, int, bool]] = []
        self.meta: list[int] = []
        for at in fmt.SUPER_OFFSETS:
            for off, width, ptr in ((12, 2, False), (14, 2, False), (16, 8, False), (24, 8, False), (32, 8, True),
                                    (40, 8, True), (48, 8, True), (56, 4, False), (60, 4, False), (64, 8, False),
                                    (72, 8, True), (80, 8, True), (88, 4, False), (96, 8, False), (104, 8, False),
                                    (112, 8, False), (176, 8, False)):
                self.places.append((at + off, width, ptr))
        for block in range(self.nblocks):
            base = block * bs
            kind, level, count = struct.unpack_from("<4sHH", self.image, base)
            if kind not in fmt.KIND_NAMES:
                continue
            self.meta.append(block)
            self.places += [(base + 4, 2, False), (base + 6, 2, False), (base + 8, 8, True), (base + 24, 8, False)]
            if kind == fmt.KIND_BNODE:
                for i in range(count):
                    self.places += [(base + 32 + 16 * i, 8, False), (base + 40 + 16 * i, 8, True)]
            elif kind in (fmt.KIND_ILEAF, fmt.KIND_DLEAF, fmt.KIND_OLEAF):
                self._leaf(base, kind, count)
            elif kind == fmt.KIND_LOG:
                self._log(base, count)
        self._dirs(path)
        first = sb.alloc_start
        self.values = sorted({0, 1, 2, 3, 7, 8, 15, 16, 255, 256, 0x7FFF, 0xFFFF, 0x10000, (1 << 31) - 1, 1 << 31,
                              (1 << 32) - 1, 1 << 32, fmt.MAX_INUM, fmt.MAX_INUM + 1, (1 << 63) - 1, 1 << 63,
                              (1 << 64) - 1, sb.volblocks - 1, sb.volblocks, sb.volblocks + 1, first - 1, first,
                              bs - 1, bs, bs + 1, sb.next_inum - 1, sb.next_inum, sb.seq, sb.seq + 1, 1 << 62,
                              fmt.MAX_FILE_SIZE, 4095, 4096})

    def _leaf(self, base: int, kind: bytes, count: int) -> None:
        for i in range(count):
            at = base + 32 + 12 * i
            self.places += [(at, 8, False), (at + 8, 2, False), (at + 10, 2, False)]
            _, off, length = struct.unpack_from("<QHH", self.image, at)
            value = base + off
            if kind == fmt.KIND_DLEAF and length >= 12:
                self.places += [(value, 8, True), (value + 8, 4, False), (value + 12, 8, False)]
            elif kind == fmt.KIND_ILEAF and length >= fmt.INODE_FIXED:
                self._inode(value)

    def _inode(self, at: int) -> None:
        for off, width, ptr in ((0, 4, False), (12, 4, False), (16, 8, False), (56, 8, True), (64, 8, False),
                                (72, 8, False), (84, 2, False), (86, 1, False), (87, 2, False)):
            self.places.append((at + off, width, ptr))

    def _log(self, base: int, count: int) -> None:
        self.places += [(base + 32, 8, True), (base + 40, 4, False)]
        at, end = base + 44, base + self.bs
        for _ in range(count):
            if at >= end:
                return
            code = self.image[at]
            self.places.append((at, 1, False))
            if code in (logrec.LOG_ALLOC, logrec.LOG_FREE):
                self.places += [(at + 1, 8, True), (at + 9, 4, False)]
                at += 13
            elif code == logrec.LOG_INODE:
                self.places += [(at + 1, 8, False), (at + 9, 2, False)]
                self._inode(at + 11)
                at += 11 + struct.unpack_from("<H", self.image, at + 9)[0]
            elif code == logrec.LOG_MAP:
                self.places += [(at + 1, 8, False), (at + 9, 8, False), (at + 17, 8, True), (at + 25, 2, False)]
                at += 27 + 8 * struct.unpack_from("<H", self.image, at + 25)[0]
            else:
                self.places.append((at + 1, 8, False))
                at += 17 if code == logrec.LOG_UNMAP else 9

    def _dirs(self, path: Path) -> None:
        """The entries of every directory block: inode number, record length, name length, type."""
        vol = Volume(str(path), Options(readonly=True))
        try:
            for ino, raw in vol.backend.itable.items():
                if not stat.S_ISDIR(fmt.InodeRecord.unpack(raw).mode):
                    continue
                tree = vol.backend.dtree(vol.iget(ino))
                for _, value in tree.items():
                    physical, csums = fmt.unpack_extent(value)
                    for block in range(physical, physical + len(csums)):
                        off = 0
                        while off + 12 <= self.bs:
                            at = block * self.bs + off
                            self.places += [(at, 8, False), (at + 8, 2, False), (at + 10, 1, False),
                                            (at + 11, 1, False)]
                            rl = fmt.decode_rec_len(struct.unpack_from("<H", self.image, at + 8)[0])
                            if rl < 12:
                                break
                            off += rl
        finally:
            vol.close_files()


# ---------------------------------------------------------------------------------------------------------------
# an input: the image it crafts


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, n: int) -> bytes:
        out = self.data[self.at: self.at + n]
        self.at += n
        return out.ljust(n, b"\0")

    def u(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")


def craft(data: bytes, seeds: list[Seed]) -> tuple[bytearray, int]:
    """The image the input ``data`` crafts (patched and resealed), and its flags."""
    r = Reader(data)
    seed = seeds[r.u(1) % len(seeds)]
    flags = r.u(1)
    img = bytearray(seed.image)
    bs, size = seed.bs, len(img)
    last = None  # the byte the last patch changed first
    while r.left() > 0:
        op = r.u(1) % 4
        if op == 0 or op == 3:
            places = seed.places if op == 0 else [p for p in seed.places if p[2]]
            at, width, _ = places[r.u(2) % len(places)]
            if op == 0:
                pick = r.u(1)
                value = seed.values[pick] if pick < len(seed.values) else r.u(8)
            else:
                value = seed.meta[r.u(2) % len(seed.meta)]
            img[at: at + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
        elif op == 1:
            at, n = r.u(4) % size, 1 + r.u(1) % 16
            img[at: at + n] = r.take(n)[: size - at]
        else:
            src, dst = r.u(2) % seed.nblocks, r.u(2) % seed.nblocks
            at = dst * bs + 32
            img[dst * bs: (dst + 1) * bs] = seed.image[src * bs: (src + 1) * bs]
            if bytes(img[dst * bs: dst * bs + 4]) in fmt.KIND_NAMES:
                struct.pack_into("<Q", img, dst * bs + 8, dst)
        last = at
    reseal(img, bs, data=bool(flags & 1), proof=bool(flags & 2))
    if flags & 16 and last is not None:  # one flipped bit after the reseal: damage, beside the crafted values
        img[last] ^= 1 << (flags >> 5)
    return img, flags


# ---------------------------------------------------------------------------------------------------------------
# the targets


class Hang(BaseException):
    """An input that took more than ``TIMEOUT`` seconds (``replay``; a BaseException, so that no handler in the code
    under test can swallow it)."""


class Bug(Exception):
    """What a target must never do; its message ends with the stack of the exception behind it."""

    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        stack = "".join(traceback.format_exception(cause)) if cause is not None else ""
        super().__init__(what + ("\n" + stack if stack else ""))


def _damage(e: BaseException | None) -> bool:
    return isinstance(e, (CorruptBlock, CorruptDir))


def _answer(e: BaseException, vol=None) -> None:
    """Return if ``e`` is an answer the embedded API may give; raise the bug otherwise."""
    if isinstance(e, VolumeError):
        cause = e.__cause__
        if "\n" in str(e) or (cause is not None and not isinstance(cause, (OSError, fmt.FormatError, CorruptBlock,
                                                                           CorruptDir, VolumeError))):
            raise Bug(f"VolumeError over {type(cause).__name__}: {e}", cause or e)
        return
    if isinstance(e, OSError) and e.errno in ALLOWED_ERRNOS:
        return
    if isinstance(e, OSError) and e.errno == errno.EIO:
        cause = e.__cause__
        if _damage(cause) or (cause is None and vol is not None and vol.failed):
            return
        raise Bug(f"EIO over {type(cause).__name__}: {cause}", cause or e)
    raise Bug(f"{type(e).__name__}: {e}", e)


def _call(vol, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        _answer(e, vol)
        return None


def walk(vol) -> None:
    """Every inode of the table, every directory from the root, every file and symlink, through the API."""
    try:
        inos = [ino for ino, _ in itertools.islice(vol.backend.itable.items(), WALK_AT_MOST)]
    except (CorruptBlock, CorruptDir):
        inos = []
    for ino in inos:
        _call(vol, vol.getattr, ino)
    seen, queue, visited = {1}, [1], 0
    while queue and visited < WALK_AT_MOST:
        parent = queue.pop()
        entries = _call(vol, lambda p=parent: list(itertools.islice(vol.readdir(p, 0), WALK_AT_MOST))) or []
        for name, child, _ in entries:
            visited += 1
            attr = _call(vol, vol.lookup, parent, name)
            if attr is None:
                continue
            kind = stat.S_IFMT(attr.mode)
            if kind == stat.S_IFDIR and child not in seen:
                seen.add(child)
                queue.append(child)
            elif kind == stat.S_IFREG:  # the daemon's read (worker threads), then the embedded one: the same bytes
                head = _call(vol, trio.run, vol.read_async, child, 0, READ_AT_MOST)
                again = _call(vol, vol.read, child, 0, READ_AT_MOST)
                if head is not None and again is not None and head != again:
                    raise Bug(f"inode {child}: read_async and read return different bytes")
                _call(vol, vol.read, child, max(0, attr.size - READ_AT_MOST), READ_AT_MOST)
            elif kind == stat.S_IFLNK:
                _call(vol, vol.readlink, child)
            _call(vol, vol.listxattr, child)
    if vol.failed and vol.failed.startswith("unexpected"):
        raise Bug(vol.failed)


def check_fsck(path: str, repair: bool = False) -> int:
    report = fsck(path, repair=repair)
    if report.status not in (0, 1, 4, 8) or not report.lines:
        raise Bug(f"fsck status {report.status}: {report.lines}")
    if any("\n" in line for line in report.lines):
        raise Bug(f"fsck line over two lines: {report.lines}")
    return report.status


def repair_then_check(path: str) -> None:
    """fsck with repair, then without: a repair that says it corrected everything leaves a volume that checks
    clean (e2fsck's promise)."""
    if check_fsck(path, repair=True) == 1 and check_fsck(path) != 0:
        raise Bug(f"fsck repaired and said so, yet the check after it is not clean: {fsck(path).lines}")
    check_fsck(path)


def read_write(path: str) -> None:
    """A read-write mount: create and write; for the first names of the root, a rewrite and a truncate of a file, a
    directory made and removed in a directory, a rename and an unlink (rmdir); a commit between, a unify at the
    unmount; then a check."""
    try:
        vol = Volume(path, Options(verify_log=False))
    except Exception as e:
        _answer(e)
        return
    try:
        _call(vol, vol.mount)
        a = _call(vol, vol.create, 1, b"fuzz-new", 0o644)
        if a is not None:
            _call(vol, vol.write, a.ino, 0, b"z" * 5000)
            _call(vol, vol.write, a.ino, 1, b"y" * 100)
            _call(vol, vol.release, a.ino)
        for name, child, _ in (_call(vol, lambda: list(itertools.islice(vol.readdir(1, 0), 4))) or []):
            attr = _call(vol, vol.lookup, 1, name)
            if attr is not None and stat.S_ISREG(attr.mode):
                _call(vol, vol.write, child, 1, b"w" * 700)
                _call(vol, vol.setattr, child, size=attr.size // 2)
            elif attr is not None and stat.S_ISDIR(attr.mode):
                _call(vol, vol.mkdir, child, b"fuzz-dir", 0o755)
                _call(vol, vol.rmdir, child, b"fuzz-dir")
            _call(vol, vol.commit)
            _call(vol, vol.rename, 1, name, 1, name + b".r")
            _call(vol, vol.unlink if attr is None or not stat.S_ISDIR(attr.mode) else vol.rmdir, 1, name + b".r")
        _call(vol, vol.commit)
    finally:
        try:
            vol.unmount()
        except Exception as e:
            _answer(e, vol)
    if vol.failed and vol.failed.startswith("unexpected"):
        raise Bug(vol.failed)
    check_fsck(path)


def run_targets(path: str, flags: int) -> None:
    """Every target on the image at ``path`` (its copies in the same directory for the writing ones)."""
    with open(path, "rb") as f:
        try:
            find_super(f.fileno(), path)
        except Exception as e:
            _answer(e)
    try:
        vol = Volume(path, Options(readonly=True))
    except Exception as e:
        _answer(e)
    else:
        try:
            walk(vol)
        finally:
            vol.close_files()
    check_fsck(path)
    for flag, target in ((4, repair_then_check), (8, read_write)):
        if flags & flag:
            copy = path + ".copy"
            shutil.copyfile(path, copy)
            try:
                target(copy)
            finally:
                os.unlink(copy)


# ---------------------------------------------------------------------------------------------------------------
# commands


def _quiet() -> None:
    log = logging.getLogger("tux3fuse")
    log.addHandler(logging.NullHandler())
    log.propagate = False


def _scratch() -> str:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="tux3fuse-fuzz-", dir=base)


def cmd_run(a: argparse.Namespace, extra: list[str]) -> int:
    import atheris

    with atheris.instrument_imports(include=["tux3fuse", "reseal"]):
        _imports()
    _quiet()
    work = Path(a.dir)
    seeds = [Seed(p) for p in make_seeds(work / "seeds")]
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):  # one input per seed and flag set, no patch: the seeds as they are
        for i in range(len(seeds)):
            for flags in (0, 3, 15):
                (corpus / f"seed-{i}-{flags}").write_bytes(bytes([i, flags]))
    scratch = _scratch()
    image = os.path.join(scratch, "input.img")
    resource.setrlimit(resource.RLIMIT_AS, (a.memory, a.memory))

    def one(data: bytes) -> None:
        img, flags = craft(data, seeds)
        with open(image, "wb") as f:
            f.write(img)
        run_targets(image, flags)

    argv = [sys.argv[0], str(corpus), f"-timeout={a.timeout}", f"-rss_limit_mb={a.rss_mb}",
            f"-artifact_prefix={work}/", "-print_final_stats=1", f"-seed={a.seed}", "-max_len=512", "-len_control=20",
            *extra]
    argv.append(f"-runs={a.runs}" if a.runs is not None else f"-max_total_time={a.seconds}")
    try:
        atheris.Setup(argv, one)
        atheris.Fuzz()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def cmd_seeds(a: argparse.Namespace) -> int:
    _imports()
    for p in make_seeds(Path(a.dir) / "seeds"):
        print(f"{p}: {p.stat().st_size} bytes")
    return 0


def cmd_image(a: argparse.Namespace) -> int:
    _imports()
    seeds = [Seed(p) for p in make_seeds(Path(a.dir) / "seeds")]
    img, flags = craft(Path(a.input).read_bytes(), seeds)
    Path(a.out).write_bytes(img)
    print(f"{a.out}: {len(img)} bytes, flags {flags}")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    """Run every target on each image as it is; one line per image, exit 1 if a target did what it must not."""
    _imports()
    _quiet()
    if a.memory:
        resource.setrlimit(resource.RLIMIT_AS, (a.memory, a.memory))
    scratch = _scratch()
    bad = 0
    try:
        for name in a.images:
            path = os.path.join(scratch, "check.img")
            shutil.copyfile(name, path)
            try:
                run_targets(path, 4 | 8)
                print(f"{name}: ok")
            except Exception as e:  # anything a target lets out is what it must not do
                bad += 1
                print(f"{name}: BUG {type(e).__name__}: {e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if bad else 0


def cmd_replay(a: argparse.Namespace) -> int:
    """Run inputs through the targets as the fuzzer does; one line per input that breaks a target, exit 1 if any."""
    _imports()
    _quiet()
    seeds = [Seed(p) for p in make_seeds(Path(a.dir) / "seeds")]
    if a.memory:
        resource.setrlimit(resource.RLIMIT_AS, (a.memory, a.memory))
    inputs = [f for name in a.inputs for f in (sorted(Path(name).iterdir()) if Path(name).is_dir() else [Path(name)])]
    scratch = _scratch()
    image = os.path.join(scratch, "input.img")
    bad = 0

    def hang(signum, frame) -> None:
        raise Hang(f"no answer within {TIMEOUT} s")
    signal.signal(signal.SIGALRM, hang)
    try:
        for f in inputs:
            try:
                data = f.read_bytes()
            except FileNotFoundError:  # a corpus that libFuzzer is reducing meanwhile
                continue
            img, flags = craft(data, seeds)
            Path(image).write_bytes(img)
            signal.alarm(TIMEOUT)
            try:
                run_targets(image, flags)
            except (Exception, Hang) as e:  # anything a target lets out is what it must not do
                bad += 1
                print(f"{f}: BUG {type(e).__name__}: {e}", flush=True)
            finally:
                signal.alarm(0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(inputs)} inputs, {bad} broke a target")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="seeds, corpus and what libFuzzer keeps (default .fuzz)")
    p.add_argument("--memory", type=int, default=MEMORY, help="address-space limit of the process in bytes")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fuzz")
    r.add_argument("--seconds", type=int, default=60)
    r.add_argument("--runs", type=int, default=None, help="stop after this many inputs (in place of --seconds)")
    r.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: from the clock)")
    r.add_argument("--timeout", type=int, default=TIMEOUT, help="seconds an input may take")
    r.add_argument("--rss-mb", type=int, default=RSS_MB, help="megabytes of resident memory an input may take")
    sub.add_parser("seeds", help="make the seed images")
    i = sub.add_parser("image", help="the crafted image of an input")
    i.add_argument("input")
    i.add_argument("out")
    c = sub.add_parser("check", help="run the targets on images as they are")
    c.add_argument("images", nargs="+")
    r = sub.add_parser("replay", help="run inputs (files, or corpus directories) through the targets")
    r.add_argument("inputs", nargs="+")
    a, extra = p.parse_known_args(argv)
    if extra and a.cmd != "run":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.cmd == "run":
        return cmd_run(a, extra)
    return {"seeds": cmd_seeds, "image": cmd_image, "check": cmd_check, "replay": cmd_replay}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
