#!/usr/bin/env python3
"""Unify benchmark: what the two unify triggers cost and bound, to choose their defaults from measurements.

Between unifies a delta writes only its data blocks and its log blocks; the changed btree nodes stay dirty in
memory until a unify writes them (and the changed bitmap blocks, under two flushes). A unify happens every K =
``Options.unify_deltas`` deltas (never in a commit an fsync waits for) or when the log would pass L =
``Options.unify_log_blocks`` blocks, and at unmount; a mount after a crash replays the whole log. Small K and L
make changes cost more blocks and flushes (tree nodes are rewritten more often); large ones keep more dirty nodes
in memory and leave a longer log to replay after a crash. Everything runs through the embedded API (no FUSE), one
fresh 1 GiB sparse image per run in a temporary directory on local disk (default /var/tmp, never tmpfs):

  fsync    random 4 KiB overwrites of a 64 MiB file, each followed by ``await vol.sync()``; per L (K does not
           enter: an fsync's commit never unifies because of K; the runs use K = 1 to show it). Measured over
           whole unify cycles, from right after a unify to right after the unify that ends the cycle in which
           --fsyncs fsyncs (and at least two unifies) have passed: blocks written and device flushes per fsync,
           and fsyncs/s.
  mixed    periodic commits (``vol.commit()``, not urgent) of a mixed workload, every --ops operations: half of
           them create a file of 1 to 16 KiB in one of 16 directories, half overwrite a random 4 KiB page of one
           of four 16 MiB files; per (K, L), over whole unify cycles from right after a unify until --commits
           commits have passed: blocks written per changed data page, flushes per commit, unifies, the longest
           log, and the most tree nodes held dirty in memory until a unify wrote them (the blocks a unify
           wrote beyond its data pages: inode table, orphan tree and extent tree nodes, and bitmap blocks).
           Then the workload goes on until the log is at its longest (the next commit would unify), and the
           volume crashes there (closed without unmount) and is mounted again: the periodic crash.
  crash    the longest log a crash can leave, per L: fsync commits never unify because of K, so for every K the
           log can grow to L blocks; here each fsync'd delta overwrites as many random pages of a 64 MiB file as
           fill one log block (about 60, each a map, an allocate and a free record: the densest work for
           replay), L times, then the volume crashes (K = 1, so the mount's commit also does the unify that is
           due).

Mount after a crash: the image's pages are dropped from the page cache (fsync + POSIX_FADV_DONTNEED) before each
timing. *replay* is ``Volume(image)`` read-only (bitmap, log and tree replay), the fastest of seven runs after
the crash run and of three after a periodic crash (the replay is the same work every time: slower runs measure
other processes on the machine; the median is reported beside it); *mount* is ``Volume(image)`` + ``mount()``
once (the commit that marks the volume mounted, with the unify if one is due).

Decision rule (printed with the numbers it used; the recommendation is computed, not written in):
  1. replay bound: the replay after the crash run of L, and after the periodic crash of (K, L), takes at most
     --budget-ms (100 ms);
  2. memory bound: the most dirty tree nodes held between unifies in the mixed workload is at most
     --memory-nodes (4,096 nodes, 16 MiB of 4 KiB blocks);
  3. L: among the L within the replay bound, the one with the fewest blocks per fsync (then flushes);
  4. K: at that L, among the K within both bounds, the smallest whose blocks per changed page and flushes per
     commit are within --tolerance (5 %) of the best of them (a smaller K holds fewer dirty nodes and leaves a
     shorter log after a periodic crash).
  When the chosen L replays within 15 % of the bound, the script also says what the rule gives without it (on a
  slower or busier machine).

Output: a table on stdout, OUTDIR/bench_unify.png (needs matplotlib) and a section "## Unify" in
OUTDIR/PERFORMANCE.md (replaced if present, the rest of the file is kept). OUTDIR is docs/, or bench-out/ with
--quick. Exit status: 0 when every run finished, 1 if one failed (a tux3fuse error), 130 if interrupted.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import Harness, log, machine_info, md_table

SECTION = "## Unify"
BLOCK = 4096
IMAGE_BYTES = 1 << 30
KS = (1, 2, 4, 8, 16, 32, 64)
LS = (16, 32, 64, 128, 256)
QUICK_KS = (1, 8, 64)
QUICK_LS = (16, 64)
BUDGET_MS = 100.0
MEMORY_NODES = 4096
TOLERANCE = 0.05
CLOSE = 0.15  # a replay this close to the bound is reported as a close call
FSYNC_FILE_MIB = 64
MIXED_DIRS = 16
MIXED_BIG_FILES = 4
MIXED_BIG_MIB = 16
PAYLOADS = 16


# ---------------------------------------------------------------------------------------------------------------
# measurements


@dataclass
class FsyncStep:
    """One overwrite + fsync: blocks the commit wrote, the log after it, and whether it unified."""
    blocks: int
    log_blocks: int
    unified: bool


@dataclass
class FsyncResult:
    k: int
    l: int
    fsyncs: int = 0
    seconds: float = 0.0
    blocks: int = 0
    flushes: int = 0
    unifies: int = 0
    log_max: int = 0
    steps: list[FsyncStep] = field(default_factory=list)

    @property
    def blocks_per_fsync(self) -> float:
        return self.blocks / self.fsyncs if self.fsyncs else float("nan")

    @property
    def flushes_per_fsync(self) -> float:
        return self.flushes / self.fsyncs if self.fsyncs else float("nan")

    @property
    def rate(self) -> float:
        return self.fsyncs / self.seconds if self.seconds else float("nan")


@dataclass
class CrashResult:
    log_blocks: int = 0
    records: int = 0
    replay: float = 0.0  # seconds, the fastest run
    replay_median: float = 0.0
    mount: float = 0.0  # seconds: Volume() + mount(), once
    mount_unified: bool = False
    replays: list[float] = field(default_factory=list)


@dataclass
class MixedResult:
    k: int
    l: int
    commits: int = 0
    ops: int = 0
    pages: int = 0
    blocks: int = 0
    flushes: int = 0
    unifies: int = 0
    log_max: int = 0
    peak_nodes: int = 0  # the most tree nodes and bitmap blocks one unify wrote: what it found dirty in memory
    seconds: float = 0.0
    unify_after: list[bool] = field(default_factory=list)  # per commit: did it unify
    log_after: list[int] = field(default_factory=list)  # per commit: log blocks after it
    crash: CrashResult | None = None

    @property
    def blocks_per_page(self) -> float:
        return self.blocks / self.pages if self.pages else float("nan")

    @property
    def flushes_per_commit(self) -> float:
        return self.flushes / self.commits if self.commits else float("nan")


def _options(k: int, l: int, **kw):
    from tux3fuse.fs import Options

    return Options(unify_deltas=k, unify_log_blocks=l, **kw)


def _payloads(rnd: random.Random) -> list[bytes]:
    return [rnd.randbytes(BLOCK) for _ in range(PAYLOADS)]


def _fill(vol, ino: int, mib: int, rnd: random.Random) -> None:
    chunk = rnd.randbytes(1 << 20)
    for i in range(mib):
        vol.write(ino, i << 20, chunk)


class OnDisk:
    """What the image's newest superblock says, read with the format module alone (docs/FORMAT.md), after a
    commit has returned: the log length, the deltas since the last unify, and the records of the log chain."""

    def __init__(self, image: Path) -> None:
        self.fd = os.open(image, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def super(self):
        from tux3fuse import format as fmt

        copies = []
        for copy, offset in enumerate(fmt.SUPER_OFFSETS):
            try:
                copies.append(fmt.Super.unpack(os.pread(self.fd, fmt.SUPER_SIZE, offset), copy))
            except fmt.FormatError:
                continue
        if not copies:
            raise AssertionError("no superblock copy of the image can be read")
        return max(copies, key=lambda sb: sb.seq)

    @property
    def log_blocks(self) -> int:
        return self.super().log_count

    @property
    def since_unify(self) -> int:
        sb = self.super()
        return sb.seq - sb.unify_seq

    def records(self) -> int:
        from tux3fuse import format as fmt
        from tux3fuse import logrecord as logrec

        sb = self.super()
        block, count = sb.log_head, 0
        for _ in range(sb.log_count):
            buf = os.pread(self.fd, sb.blocksize, block * sb.blocksize)
            _, _, n, _ = fmt.unseal(buf, block, (fmt.KIND_LOG,))
            block, records = logrec.unpack_log(buf, n)
            count += len(records)
        return count


def counters(vol) -> dict[str, int]:
    """The public counters of ``Volume.stats()`` this benchmark reads (a counter never incremented reads 0)."""
    st = vol.stats()
    return {k: int(st.get(k, 0)) for k in ("blocks_written", "data_blocks_written", "unifies", "flushes")}


def run_fsync(image: Path, k: int, l: int, *, file_mib: int = FSYNC_FILE_MIB, min_fsyncs: int = 512,
              min_unifies: int = 2, seed: int = 1) -> FsyncResult:
    """Random 4 KiB overwrites of one file, each followed by ``await vol.sync()``, over whole unify cycles."""
    import trio

    from mkfs import mkfs
    from tux3fuse.format import ROOT_INO
    from tux3fuse.fs import Volume

    mkfs(str(image), BLOCK, IMAGE_BYTES, force=True)
    rnd = random.Random(seed)
    vol = Volume(str(image), _options(k, l))
    result = FsyncResult(k, l)
    try:
        vol.mount()
        ino = vol.create(ROOT_INO, b"big", 0o644, os.getuid(), os.getgid()).ino
        _fill(vol, ino, file_mib, rnd)
        vol.commit(unify=True)
        payloads = _payloads(rnd)
        pages = (file_mib << 20) // BLOCK

        async def loop() -> None:
            first = c = counters(vol)
            started = time.perf_counter()
            n = 0
            while True:
                before = c
                vol.write(ino, rnd.randrange(pages) * BLOCK, payloads[n % PAYLOADS])
                await vol.sync()
                n += 1
                c = counters(vol)
                unified = c["unifies"] > before["unifies"]
                log_blocks = disk.log_blocks
                result.steps.append(FsyncStep(c["blocks_written"] - before["blocks_written"], log_blocks, unified))
                result.log_max = max(result.log_max, log_blocks)
                if unified and n >= min_fsyncs and c["unifies"] - first["unifies"] >= min_unifies:
                    break
            result.seconds = time.perf_counter() - started
            result.fsyncs = n
            result.blocks = c["blocks_written"] - first["blocks_written"]
            result.flushes = c["flushes"] - first["flushes"]
            result.unifies = c["unifies"] - first["unifies"]

        disk = OnDisk(image)
        try:
            trio.run(loop)
        finally:
            disk.close()
        vol.unmount()
    finally:
        vol.close_files()
    return result


class Mixed:
    """The mixed workload: creates of small files in a few directories and random overwrites of a few big files."""

    def __init__(self, vol, seed: int) -> None:
        from tux3fuse.format import ROOT_INO

        self.vol = vol
        self.rnd = rnd = random.Random(seed)
        uid, gid = os.getuid(), os.getgid()
        self.owner = (uid, gid)
        self.dirs = [vol.mkdir(ROOT_INO, f"d{i}".encode(), 0o755, uid, gid).ino for i in range(MIXED_DIRS)]
        self.big = []
        for i in range(MIXED_BIG_FILES):
            ino = vol.create(ROOT_INO, f"big{i}".encode(), 0o644, uid, gid).ino
            _fill(vol, ino, MIXED_BIG_MIB, rnd)
            vol.release(ino)
            self.big.append(ino)
        self.big_pages = (MIXED_BIG_MIB << 20) // BLOCK
        self.payloads = _payloads(rnd)
        self.created = 0

    def op(self) -> None:
        vol, rnd = self.vol, self.rnd
        data = self.payloads[rnd.randrange(PAYLOADS)]
        if rnd.random() < 0.5:
            d = self.dirs[self.created % MIXED_DIRS]
            ino = vol.create(d, f"f{self.created}".encode(), 0o644, *self.owner).ino
            size = rnd.randint(1, 16) << 10
            for at in range(0, size, BLOCK):
                vol.write(ino, at, data[: min(BLOCK, size - at)])
            vol.release(ino)
            self.created += 1
        else:
            vol.write(rnd.choice(self.big), rnd.randrange(self.big_pages) * BLOCK, data)

    def delta(self, ops: int) -> None:
        for _ in range(ops):
            self.op()


def run_mixed(image: Path, k: int, l: int, *, commits: int = 192, ops: int = 100, seed: int = 1,
              crash: bool = True) -> MixedResult:
    """Periodic commits of the mixed workload over whole unify cycles; then, with ``crash``, go on until the log
    is at its longest, crash there and time the mount."""
    from mkfs import mkfs
    from tux3fuse.fs import Volume

    mkfs(str(image), BLOCK, IMAGE_BYTES, force=True)
    vol = Volume(str(image), _options(k, l))
    result = MixedResult(k, l)
    closed = False
    try:
        vol.mount()
        work = Mixed(vol, seed)
        vol.commit(unify=True)
        disk = OnDisk(image)
        first = c = counters(vol)
        started = time.perf_counter()
        n = 0
        while True:
            before = c
            work.delta(ops)
            vol.commit()
            n += 1
            c = counters(vol)
            unified = c["unifies"] > before["unifies"]
            log_blocks = disk.log_blocks
            result.unify_after.append(unified)
            result.log_after.append(log_blocks)
            result.log_max = max(result.log_max, log_blocks)
            if unified:  # a unify writes, beside the delta's data, every tree node and bitmap block held dirty
                meta = (c["blocks_written"] - before["blocks_written"]) - (c["data_blocks_written"]
                                                                          - before["data_blocks_written"])
                result.peak_nodes = max(result.peak_nodes, meta)
            if unified and n >= commits:
                break
        result.seconds = time.perf_counter() - started
        result.commits = n
        result.ops = n * ops
        result.pages = c["data_blocks_written"] - first["data_blocks_written"]
        result.blocks = c["blocks_written"] - first["blocks_written"]
        result.flushes = c["flushes"] - first["flushes"]
        result.unifies = c["unifies"] - first["unifies"]
        if not crash:
            disk.close()
            vol.unmount()
            return result
        last = 1
        for _ in range(2 * k + 64):  # the log is longest just before the commit that unifies
            before_log = disk.log_blocks
            if disk.since_unify + 1 >= k or before_log + last > l:
                break
            before = counters(vol)["unifies"]
            work.delta(ops)
            vol.commit()
            if counters(vol)["unifies"] == before:
                last = max(1, disk.log_blocks - before_log)
        disk.close()
        vol.close_files()  # the crash: nothing more reaches the image
        closed = True
        result.crash = mount_after_crash(image, k, l)
    finally:
        if not closed:
            vol.close_files()
    return result


def log_batch(blocksize: int = BLOCK) -> int:
    """Random single-page overwrites whose records fill one log block (a map, an allocate and a free record each,
    beside the file's inode record)."""
    from tux3fuse import logrecord as logrec

    size = logrec.log_record_size
    per_page = size((logrec.LOG_MAP, 1, 0, 1, [0])) + 2 * size((logrec.LOG_ALLOC, 1, 1))
    inode = 11 + 256  # the inode record (§9, code 3) with room to spare
    return (logrec.log_room(blocksize) - inode) // per_page


def run_crash(image: Path, l: int, *, file_mib: int = FSYNC_FILE_MIB, seed: int = 1, repeats: int = 7
              ) -> CrashResult:
    """Fill the log to L blocks of dense records with fsync'd deltas, crash, and time the mount."""
    import trio

    from mkfs import mkfs
    from tux3fuse.format import ROOT_INO
    from tux3fuse.fs import Volume

    mkfs(str(image), BLOCK, IMAGE_BYTES, force=True)
    rnd = random.Random(seed)
    vol = Volume(str(image), _options(1, l))
    try:
        vol.mount()
        ino = vol.create(ROOT_INO, b"big", 0o644, os.getuid(), os.getgid()).ino
        _fill(vol, ino, file_mib, rnd)
        vol.commit(unify=True)
        payloads = _payloads(rnd)
        pages = (file_mib << 20) // BLOCK
        batch = log_batch()

        async def fill() -> None:
            most = 1
            while (before := disk.log_blocks) + most <= l:
                for i in range(batch):
                    vol.write(ino, rnd.randrange(pages) * BLOCK, payloads[i % PAYLOADS])
                await vol.sync()
                if disk.log_blocks <= before:
                    raise AssertionError(f"an fsync commit unified with the log at {before} of {l} blocks")
                most = max(most, disk.log_blocks - before)

        disk = OnDisk(image)
        try:
            trio.run(fill)
        finally:
            disk.close()
    finally:
        vol.close_files()  # the crash
    return mount_after_crash(image, 1, l, repeats=repeats)


def _drop_cache(image: Path) -> None:
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mount_after_crash(image: Path, k: int, l: int, repeats: int = 3) -> CrashResult:
    """Time the replay (read-only ``Volume``, the fastest of ``repeats``) and one ``Volume`` + ``mount()`` of a
    crashed image, each from a cold page cache; then unmount cleanly and check the log is empty."""
    from tux3fuse.fs import Volume

    result = CrashResult()
    disk = OnDisk(image)
    try:
        result.log_blocks, result.records = disk.log_blocks, disk.records()
    finally:
        disk.close()
    for _ in range(repeats):
        _drop_cache(image)
        started = time.perf_counter()
        vol = Volume(str(image), _options(k, l, readonly=True))
        result.replays.append(time.perf_counter() - started)
        vol.close_files()
    result.replay = min(result.replays)
    result.replay_median = statistics.median(result.replays)
    _drop_cache(image)
    started = time.perf_counter()
    vol = Volume(str(image), _options(k, l))
    try:
        vol.mount()
        result.mount = time.perf_counter() - started
        result.mount_unified = counters(vol)["unifies"] > 0
        vol.unmount()
    finally:
        vol.close_files()
    disk = OnDisk(image)
    try:
        if disk.log_blocks:
            raise AssertionError(f"log of {disk.log_blocks} blocks after a clean unmount")
    finally:
        disk.close()
    return result


# ---------------------------------------------------------------------------------------------------------------
# the decision


@dataclass
class Decision:
    k: int | None
    l: int | None
    lines: list[str]


def worst_replay(crash: dict[int, CrashResult], mixed: dict[tuple[int, int], MixedResult], k: int, l: int
                 ) -> float:
    """The longest replay measured for (K, L): the crash run of L, and the periodic crash of (K, L)."""
    times = [crash[l].replay] if l in crash else []
    m = mixed.get((k, l))
    if m is not None and m.crash is not None:
        times.append(m.crash.replay)
    return max(times, default=float("inf"))


def recommend(fsync: dict[int, FsyncResult], mixed: dict[tuple[int, int], MixedResult],
              crash: dict[int, CrashResult], budget_ms: float = BUDGET_MS, memory_nodes: int = MEMORY_NODES,
              tolerance: float = TOLERANCE) -> Decision:
    """Apply the decision rule of the module docstring to the measurements."""
    lines = []
    budget = budget_ms / 1e3
    ls = sorted(set(fsync) & set(crash))
    fits = [l for l in ls if crash[l].replay <= budget]
    over = [l for l in ls if l not in fits]
    if over:
        lines.append("replay bound: L = " + ", ".join(f"{l} ({crash[l].replay * 1e3:.0f} ms)" for l in over)
                     + f" replay for longer than {budget_ms:g} ms after the crash run")
    if not fits:
        lines.append(f"no L replays the crash run within {budget_ms:g} ms: no recommendation")
        return Decision(None, None, lines)
    pick_l = min(fits, key=lambda l: (fsync[l].blocks_per_fsync, fsync[l].flushes_per_fsync, l))
    f, c = fsync[pick_l], crash[pick_l]
    lines.append(f"L = {pick_l}: the fewest blocks per fsync within the replay bound, {f.blocks_per_fsync:.2f} "
                 f"(and {f.flushes_per_fsync:.3f} flushes per fsync; best of the sweep "
                 f"{min(r.blocks_per_fsync for r in fsync.values()):.2f}); replay after the crash run "
                 f"{c.replay * 1e3:.0f} ms for {c.log_blocks} log blocks of {c.records:,} records")
    ks = sorted(k for k, l in mixed if l == pick_l)
    ok = []
    for k in ks:
        m = mixed[(k, pick_l)]
        worst = worst_replay(crash, mixed, k, pick_l)
        if m.peak_nodes > memory_nodes:
            lines.append(f"memory bound: K = {k} holds {m.peak_nodes:,} dirty tree nodes (> {memory_nodes:,})")
        elif worst > budget:
            lines.append(f"replay bound: K = {k} replays for {worst * 1e3:.0f} ms after a crash")
        else:
            ok.append(k)
    if not ok:
        lines.append(f"no K keeps both bounds at L = {pick_l}: no recommendation for K")
        return Decision(None, pick_l, lines)
    best_blocks = min(mixed[(k, pick_l)].blocks_per_page for k in ok)
    best_flushes = min(mixed[(k, pick_l)].flushes_per_commit for k in ok)
    near = [k for k in ok if mixed[(k, pick_l)].blocks_per_page <= best_blocks * (1 + tolerance)
            and mixed[(k, pick_l)].flushes_per_commit <= best_flushes * (1 + tolerance)]
    pick_k = min(near)
    m = mixed[(pick_k, pick_l)]
    lines.append(f"K = {pick_k}: the smallest K within {tolerance:.0%} of the best blocks per changed page "
                 f"({best_blocks:.3f}) and flushes per commit ({best_flushes:.3f}) at L = {pick_l}: "
                 f"{m.blocks_per_page:.3f} and {m.flushes_per_commit:.3f}; at most {m.peak_nodes:,} dirty tree "
                 f"nodes in memory and a log of at most {m.log_max} blocks in the mixed workload")
    if crash[pick_l].replay > budget * (1 - CLOSE) and len(fits) > 1:  # say what a slower machine would get
        rest = {l: c for l, c in crash.items() if l != pick_l}
        alt = recommend(fsync, mixed, rest, budget_ms, memory_nodes, tolerance)
        lines.append(f"close call: the replay after the crash run of L = {pick_l} is within {CLOSE:.0%} of the "
                     f"bound ({crash[pick_l].replay * 1e3:.0f} of {budget_ms:g} ms); where it does not fit (a "
                     f"slower or busier machine) the rule gives K = {alt.k}, L = {alt.l}")
    return Decision(pick_k, pick_l, lines)


def defaults() -> tuple[int, int]:
    from tux3fuse.fs import Options

    o = Options()
    return o.unify_deltas, o.unify_log_blocks


def verdict(decision: Decision) -> str:
    k0, l0 = defaults()
    if decision.k is None or decision.l is None:
        return f"No recommendation from these measurements; the defaults stay K = {k0}, L = {l0}."
    if (decision.k, decision.l) == (k0, l0):
        return f"Recommended: K = {decision.k}, L = {decision.l}, the current defaults (`Options`)."
    return (f"Recommended: K = {decision.k}, L = {decision.l}; the current defaults (`Options`) are K = {k0}, "
            f"L = {l0}.")


# ---------------------------------------------------------------------------------------------------------------
# report


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


FSYNC_HEADER = ["L", "fsyncs", "unifies", "blocks/fsync", "flushes/fsync", "fsyncs/s", "crash log blocks",
                "records", "replay ms", "median ms", "mount ms"]
MIXED_HEADER = ["K", "L", "commits", "unifies", "blocks/page", "flushes/commit", "log max", "dirty nodes",
                "crash log blocks", "replay ms", "mount ms"]


def fsync_rows(fsync: dict[int, FsyncResult], crash: dict[int, CrashResult]) -> list[list[str]]:
    rows = []
    for l in sorted(set(fsync) | set(crash)):
        f, c = fsync.get(l), crash.get(l)
        rows.append([str(l),
                     f"{f.fsyncs:,}" if f else "-", f"{f.unifies:,}" if f else "-",
                     f"{f.blocks_per_fsync:.3f}" if f else "-", f"{f.flushes_per_fsync:.4f}" if f else "-",
                     f"{f.rate:,.0f}" if f else "-",
                     str(c.log_blocks) if c else "-", f"{c.records:,}" if c else "-",
                     ms(c.replay) if c else "-", ms(c.replay_median) if c else "-", ms(c.mount) if c else "-"])
    return rows


def mixed_rows(mixed: dict[tuple[int, int], MixedResult]) -> list[list[str]]:
    rows = []
    for (k, l) in sorted(mixed, key=lambda kl: (kl[1], kl[0])):
        m = mixed[(k, l)]
        c = m.crash
        rows.append([str(k), str(l), f"{m.commits:,}", f"{m.unifies:,}", f"{m.blocks_per_page:.3f}",
                     f"{m.flushes_per_commit:.3f}", str(m.log_max), f"{m.peak_nodes:,}",
                     str(c.log_blocks) if c else "-", ms(c.replay) if c else "-", ms(c.mount) if c else "-"])
    return rows


def draw_chart(plt, fsync: dict[int, FsyncResult], mixed: dict[tuple[int, int], MixedResult],
               crash: dict[int, CrashResult], decision: Decision, budget_ms: float, memory_nodes: int):
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a, b), (c, d) = axes
    ls = sorted(fsync)
    if ls:
        a.plot(ls, [fsync[l].blocks_per_fsync for l in ls], marker="o", color="#1f77b4")
        for l in ls:
            a.annotate(f"{fsync[l].flushes_per_fsync:.3f} flushes", (l, fsync[l].blocks_per_fsync),
                       textcoords="offset points", xytext=(4, 6), fontsize=8)
        a.set_xscale("log", base=2)
        a.set_xticks(ls, [str(l) for l in ls])
        a.margins(x=0.08, y=0.12)
    a.set_xlabel("L (unify_log_blocks)")
    a.set_ylabel("blocks written per fsync")
    a.set_title("(a) 4 KiB overwrite + fsync, 64 MiB file", fontsize=10)
    a.grid(True, alpha=0.3)
    mixed_ls = sorted({l for _, l in mixed})
    for l in mixed_ls:
        ks = sorted(k for k, ll in mixed if ll == l)
        b.plot(ks, [mixed[(k, l)].blocks_per_page for k in ks], marker="o", label=f"L = {l}")
        d.plot(ks, [mixed[(k, l)].peak_nodes for k in ks], marker="o", label=f"L = {l}")
    for ax in (b, d):
        ax.set_xscale("log", base=2)
        ks = sorted({k for k, _ in mixed})
        if ks:
            ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (unify_deltas)")
        ax.grid(True, alpha=0.3)
        if mixed:
            ax.legend(fontsize=8)
    b.set_ylabel("blocks written per changed data page")
    b.set_title("(b) periodic commits of a mixed workload", fontsize=10)
    d.set_ylabel("tree nodes dirty in memory (peak)")
    d.axhline(memory_nodes, color="black", linestyle=":", linewidth=0.8)
    d.set_title(f"(b) memory between unifies (dotted: bound {memory_nodes:,})", fontsize=10)
    if crash:
        pts = sorted(crash.items())
        c.plot([x.log_blocks for _, x in pts], [x.replay * 1e3 for _, x in pts], marker="o", color="#1f77b4",
               label="crash run (dense log, per L)")
    periodic = [m.crash for m in mixed.values() if m.crash is not None]
    if periodic:
        c.scatter([x.log_blocks for x in periodic], [x.replay * 1e3 for x in periodic], color="#ff7f0e", s=14,
                  label="periodic crash (per K, L)")
    c.axhline(budget_ms, color="black", linestyle=":", linewidth=0.8)
    c.set_xlabel("log blocks replayed")
    c.set_ylabel("replay at mount (ms, fastest run, cold cache)")
    c.set_title(f"(c) replay after a crash (dotted: bound {budget_ms:g} ms)", fontsize=10)
    c.grid(True, alpha=0.3)
    if crash or periodic:
        c.legend(fontsize=8)
    pick = f"recommended K = {decision.k}, L = {decision.l}" if decision.l is not None else "no recommendation"
    fig.suptitle(f"Unify every K deltas or when the log would pass L blocks: {pick}")
    return fig



@dataclass
class Settings:
    ks: Sequence[int]
    ls: Sequence[int]
    fsyncs: int
    commits: int
    ops: int
    budget_ms: float
    memory_nodes: int
    tolerance: float
    seed: int
    quick: bool = False


BUSY = ("The machine was busy during the run (1-minute load average above {cpus}): times, and a decision that "
        "rests on the replay bound, may be off; blocks, flushes and nodes are not affected.")


def section_text(s: Settings, fsync: dict[int, FsyncResult], mixed: dict[tuple[int, int], MixedResult],
                 crash: dict[int, CrashResult], decision: Decision, errors: list[str], h: Harness,
                 chart: str | None, elapsed: float) -> str:
    info = machine_info()
    loads, workdir = h.loads, h.parent
    k0, l0 = defaults()
    out = [SECTION, ""]
    out.append(f"Generated by `{h.command()}` on {h.now()} in {elapsed:.0f} s; machine: "
               + ", ".join(f"{k} {v}" for k, v in info.items())
               + f"; load average (1/5/15 min) {loads[0]} at the start, {loads[1]} at the end.")
    if h.busy():
        out.append("")
        out.append(f"*{BUSY.format(cpus=os.cpu_count() or 1)}*")
    out.append("")
    out.append("A unify writes every tree node changed since the last one and the changed bitmap blocks (two "
               "flushes); between unifies a delta writes its data and log blocks only. It happens every K = "
               f"`unify_deltas` deltas (defaults now: K = {k0}; never in a commit an fsync waits for) or when the "
               f"log would pass L = `unify_log_blocks` blocks (L = {l0}), and at unmount; a mount after a crash "
               "replays the whole log. Everything runs through the embedded API on a fresh 1 GiB sparse image "
               f"per run in {workdir} (local disk), 4 KiB blocks:")
    out.append("")
    out.append("- **(a) fsync**: random 4 KiB overwrites of a 64 MiB file, each followed by `await vol.sync()`, "
               f"per L, over whole unify cycles (at least {s.fsyncs} fsyncs and two unifies). K does not enter: "
               "the commit an fsync waits for never unifies because of K (the runs use K = 1).")
    out.append(f"- **(b) mixed**: a `vol.commit()` every {s.ops} operations, half of them creating a file of 1 to "
               "16 KiB in one of 16 directories, half overwriting a random 4 KiB page of one of four 16 MiB files; "
               f"per (K, L), over whole unify cycles (at least {s.commits} commits). *blocks/page*: blocks written "
               "per changed data page; *dirty nodes*: the most tree nodes held dirty in memory until a unify "
               "wrote them (what a unify wrote beyond the delta's data pages, from `Volume.stats()`: the inode "
               "table, orphan tree and extent tree nodes changed since the last unify, and the bitmap blocks). "
               "Then the workload goes on until the log is at its longest (the next commit would "
               "unify) and the volume crashes there: *periodic crash*.")
    out.append("- **(c) crash run**: the longest log a crash can leave, per L. fsync commits never unify because "
               "of K, so for every K the log can grow to L blocks; here each fsync'd delta overwrites as many "
               "random pages of a 64 MiB file as fill one log block (map, allocate and free records, the densest "
               "work for replay), until the log holds L blocks, then the volume is closed without unmount.")
    out.append("- After a crash the image's pages are dropped from the page cache before each timing. *replay*: "
               "`Volume(image)` read-only (bitmap, log and tree replay), the fastest of seven runs (crash run, the "
               "median beside it) or three (periodic crash): the replay is the same work every time, slower runs "
               "measure other processes on the machine; *mount*: "
               "`Volume(image)` + `mount()` once, with the mount's commit (and its unify when one is due).")
    out.append("")
    out += md_table(FSYNC_HEADER, fsync_rows(fsync, crash))
    out.append("")
    out += md_table(MIXED_HEADER, mixed_rows(mixed), left=2)
    out.append("")
    out.append("Decision rule, applied by the script to the numbers above:")
    out.append("")
    out.append(f"1. replay bound: the crash run replays in at most {s.budget_ms:g} ms, and so does the periodic "
               "crash of (K, L);")
    out.append(f"2. memory bound: at most {s.memory_nodes:,} tree nodes dirty in memory in the mixed workload "
               f"({s.memory_nodes * BLOCK >> 20} MiB of 4 KiB blocks);")
    out.append("3. L: the fewest blocks per fsync (then flushes) among the L within the replay bound;")
    out.append(f"4. K: at that L, among the K within both bounds, the smallest whose blocks per changed page and "
               f"flushes per commit are within {s.tolerance:.0%} of the best of them (a smaller K holds fewer "
               "dirty nodes and leaves a shorter log after a periodic crash);")
    out.append(f"5. when the chosen L replays within {CLOSE:.0%} of the bound, what the rule gives without that L "
               "(a slower or busier machine) is shown too.")
    out.append("")
    for line in decision.lines:
        out.append(f"- {line}")
    for e in errors:
        out.append(f"- failed: `{e.splitlines()[-1]}`")
    out.append("")
    out.append("L counts log blocks of 4 KiB here; a log block of a larger block size holds proportionally more "
               "records (64 KiB: about 16 times as many), and its replay takes proportionally longer.")
    out.append("")
    out.append(f"**{verdict(decision)}**")
    out.append("")
    if chart:
        out.append(f"![unify sweep]({chart})")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench_unify", __doc__, "bench_unify.png", "a small sweep, output in bench-out/ (smoke run)",
                SECTION)
    ap = h.parser
    ap.add_argument("--k", type=int_list, help=f"K values (default {','.join(map(str, KS))}; quick "
                    f"{','.join(map(str, QUICK_KS))})")
    ap.add_argument("--l", type=int_list, help=f"L values (default {','.join(map(str, LS))}; quick "
                    f"{','.join(map(str, QUICK_LS))})")
    ap.add_argument("--fsyncs", type=int, help="fsyncs per L, at least (default 512, quick 128)")
    ap.add_argument("--commits", type=int, help="mixed-workload commits per (K, L), at least (default 96, "
                    "quick 32)")
    ap.add_argument("--ops", type=int, default=100, help="operations per mixed-workload commit (default 100)")
    ap.add_argument("--budget-ms", type=float, default=BUDGET_MS, help=f"replay bound (default {BUDGET_MS:g})")
    ap.add_argument("--memory-nodes", type=int, default=MEMORY_NODES,
                    help=f"dirty tree node bound (default {MEMORY_NODES})")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help=f"how far from the best counts as close (default {TOLERANCE:g})")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = h.parse(argv)
    s = Settings(ks=args.k or (QUICK_KS if args.quick else KS), ls=args.l or (QUICK_LS if args.quick else LS),
                 fsyncs=args.fsyncs or (128 if args.quick else 512),
                 commits=args.commits or (32 if args.quick else 96), ops=args.ops, budget_ms=args.budget_ms,
                 memory_nodes=args.memory_nodes, tolerance=args.tolerance, seed=args.seed, quick=args.quick)
    fsync: dict[int, FsyncResult] = {}
    crash: dict[int, CrashResult] = {}
    mixed: dict[tuple[int, int], MixedResult] = {}
    errors: list[str] = []
    started = time.monotonic()

    with h.workdir("tux3unify-") as workdir:
        log(f"bench_unify: work directory {workdir}; K {list(s.ks)}, L {list(s.ls)}; load average {h.loads[0]}")
        image = workdir / "unify.img"

        def attempt(what: str, fn):
            t = time.monotonic()
            try:
                value = fn()
            except Exception:  # a tux3fuse bug: keep the traceback for the report
                errors.append(f"{what}: {traceback.format_exc()}")
                log(f"  {what} FAILED:\n{traceback.format_exc()}")
                return None
            finally:
                image.unlink(missing_ok=True)
            log(f"  {what} ({time.monotonic() - t:.1f} s)")
            return value

        for l in s.ls:
            f = attempt(f"fsync L={l}", lambda l=l: run_fsync(image, 1, l, min_fsyncs=s.fsyncs, seed=s.seed))
            if f is not None:
                fsync[l] = f
            c = attempt(f"crash L={l}", lambda l=l: run_crash(image, l, seed=s.seed))
            if c is not None:
                crash[l] = c
        for l in s.ls:
            for k in s.ks:
                m = attempt(f"mixed K={k} L={l}", lambda k=k, l=l: run_mixed(image, k, l, commits=s.commits,
                                                                             ops=s.ops, seed=s.seed))
                if m is not None:
                    mixed[(k, l)] = m
    if h.interrupted:
        return 130
    elapsed = time.monotonic() - started

    decision = recommend(fsync, mixed, crash, s.budget_ms, s.memory_nodes, s.tolerance)
    h.table(FSYNC_HEADER, fsync_rows(fsync, crash))
    h.table(MIXED_HEADER, mixed_rows(mixed), left=2)
    print()
    for line in decision.lines:
        print(line)
    print(verdict(decision))
    if s.quick:
        print("(quick run: a small sweep with short runs; numbers are indicative only)")
    print(f"{elapsed:.0f} s; {h.load_line()}")
    if h.busy():
        print(BUSY.format(cpus=os.cpu_count() or 1))
    chart = h.chart(lambda plt: draw_chart(plt, fsync, mixed, crash, decision, s.budget_ms, s.memory_nodes))
    h.write(section_text(s, fsync, mixed, crash, decision, errors, h, chart, elapsed), chart)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
