#!/usr/bin/env python3
"""Page forking benchmark: write latency while commits run, for stable=fork, wait and none, swept over the
device's latency.

Whenever a commit is writing a page, the stable-page mode decides what the next write to that page does: with
fork the page is copied and the write goes on at once, with wait the write waits until the commit in flight has
written its blocks (not for its flush, as Linux's stable pages), and with none the page is changed while it is
being written (no stable pages at all, the baseline). How long a wait lasts is the device's service time, so the
device's latency is the sweep's axis: the device model (``-o device_latency=``, tux3fuse/device.py) makes every
write and flush of the image complete as on a device of that latency.

The sweep (path "mounted", the acceptance): for each device latency of --latencies (ms; default 0 = the local
image, 0.2, 1, 5, 20; --quick 0 and 5), each workload of --workloads and each mode, ``tux3fuse -f -o
nowriteback,stable=MODE,commit=0.01,device_latency=D IMAGE MNT`` in a subprocess on a fresh 1 GiB sparse image in
a temporary directory (default /var/tmp, not tmpfs). With the kernel's writeback cache off every pwrite() is a
request to the daemon; the script times each write for --seconds (default 3, --quick 1). Workloads:

  hot64, hot4096  (a) random 4 KiB rewrites of a hot set of 64 or 4,096 pages, beside the background stream
  append          (b) appends of 256 B - 1 KiB records with an fdatasync every 64 records (the log-file pattern:
                  the tail page is rewritten while a commit writes it); the fdatasyncs are not timed
  seq             (c) the control: sequential 4 KiB writes of new data (a new file every 256 MiB), which no commit
                  is writing: the three modes must tie

Background stream (--stream MB/s, default 32; 0 turns it off; workload a only): a thread appends 128 KiB chunks
to a second file at that rate, so that every commit carries some data besides the hot pages and takes real time.
The stream wraps at 512 MiB; its writes are not timed.

Each point (workload, device, mode) runs --repeat times (default 3, --quick 1), the modes alternating (fork, wait,
none, fork, ...); the report gives the median with its spread (min-max). Per run: writes/s, p50, p99, p99.9, max,
the share of writes that waited (counter ``waits`` over writes), forks, forked_pages_peak, and the bytes written to
the device (``blocks_written`` x 4 KiB + ``hole_fill_bytes``, from ``tux3 stat --json``). FUSE requests per
operation are in scripts/bench.py's table (every mode runs the same writer). After each run the image is
unmounted and opened read-only to check that it holds the data last written (hot pages, the log's bytes, the
control's size); a difference after a stable=none run is reported as a note, for fork and wait it fails the run.

Torn blocks: on devices of 1 ms or more the daemon is stopped (SIGSTOP) the moment the timed phase ends and its
image copied in this process, as a crash at that moment would leave it; after the unmount ``fsck.tux3 -n`` counts
the copy's data blocks whose checksum fails (the "torn" column). stable=none shows them; fork and wait must not. A
clean unmount leaves none in any mode, since its last commit writes the changed pages again.

The floor (--no-floor skips it): each workload once on ``scripts/nullfs.py --nowriteback``, an in-memory pyfuse3
filesystem that does nothing ("pyfuse3-null"): the latency any pyfuse3 filesystem has under this load.

The embedded path (``--only embedded``; both paths by default): the embedded API in one trio run on the local
image, ``Volume(image, Options(stable=MODE))``, a committer calling ``await vol.flusher.commit_async()`` back to
back (its I/O in a worker thread) and a writer timing ``await vol.call(vol.write, ...)`` of random pages of a hot
set of --hot-pages (default 256), the garbage collector set as the daemon sets it. It records the dirty pages of
each delta as its commit starts and checks, for every commit during which forked_pages_peak rose, that the new
peak is at most that delta's dirty pages.

Goal lines, PASS/FAIL per point (they do not change the exit status), every point reported, misses included:
- on devices of 1 ms or more (workloads a and b): fork p99 <= 0.1 x wait p99 and fork p99.9 <= 0.1 x wait p99.9,
  at equal or higher throughput (fork's median writes/s at least 0.95 x wait's);
- on every device: fork p99 <= 1.25 x none p99;
- on the local image, and for the control on every device: the three modes within the noise (medians within
  1.25x of each other, or spreads that overlap), for writes/s and p99;
- forked_pages_peak at most one copy per dirty page: the hot set (a), the tail page under two commits (b), one
  page (c); on the embedded path checked at every commit;
- torn data blocks: 0 for fork and wait (none's are reported as expected).

Output: the tables on stdout, latency CDFs (a panel per workload and device) in OUTDIR/bench_fork.png, p99 and
p99.9 against the device latency in OUTDIR/bench_fork_tails.png (matplotlib, log axes), and the section "## When
stable pages hurt" in OUTDIR/PERFORMANCE.md (replaced if present, or in place of the older "## Page forking"; the
rest of the file is kept). OUTDIR is docs/, or bench-out/ with --quick. Exit status: 0 if every run finished, 1 if
one failed (a tux3fuse error), 130 if interrupted.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchfs import NullFs, Tux3Fs, dispose
from benchkit import (
    VENV_BIN,
    BenchError,
    Harness,
    comma_choices,
    generated_line,
    log,
    md_table,
    run,
)

PATHS = ("embedded", "mounted")
MODES = ("fork", "wait", "none")
FLOOR = "null"  # the mounted path's floor: a do-nothing pyfuse3 filesystem under the same load
BLOCK = 4096
IMAGE_SIZE = 1 << 30
STREAM_CHUNK = 128 << 10
STREAM_WRAP = 512 << 20
PAYLOADS = 16  # distinct 4 KiB payloads; each write also stamps the page with a sequence number
COUNTERS = ("forks", "waits", "wait_seconds", "commits", "blocks_written", "commit_seconds", "in_place_writes",
            "hole_fill_bytes", "flushes")
GOAL_RATIO = 0.1  # fork's p99 and p99.9 against wait's, on devices of GOAL_DEVICE or slower
GOAL_DEVICE = 0.001  # seconds
NONE_RATIO = 1.25  # fork's p99 against none's, everywhere
TIE = 1.25  # "within the noise": medians within this factor of each other, or overlapping spreads
RATE_SLACK = 0.95  # "equal or higher throughput": fork's median writes/s at least this share of wait's
LATENCIES = (0.0, 0.0002, 0.001, 0.005, 0.02)  # seconds: the device latencies of the sweep (0: the local image)
QUICK_LATENCIES = (0.0, 0.005)
APPEND_SYNC = 64  # records between two fdatasyncs of the append workload
SEQ_WRAP = 256 << 20  # the control starts a new file after this many bytes (and removes the one before)
SECTION = "## When stable pages hurt"
OLD_SECTION = "## Page forking"  # the heading this section had before the sweep; replaced by it


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # hot: random 4 KiB rewrites of a hot set; append: small appends, fdatasync every APPEND_SYNC; seq
    pages: int  # hot set size (hot only)
    stream: bool  # the background stream runs beside the writer
    text: str


WORKLOADS = {w.name: w for w in (
    Workload("hot64", "hot", 64, True, "(a) 4 KiB rewrites of a 64-page hot set beside the stream"),
    Workload("hot4096", "hot", 4096, True, "(a) 4 KiB rewrites of a 4,096-page hot set beside the stream"),
    Workload("append", "append", 0, False, f"(b) appends of 256 B - 1 KiB, fdatasync every {APPEND_SYNC} records"),
    Workload("seq", "seq", 0, False, "(c) control: sequential 4 KiB writes of new data (must tie)"),
)}


@dataclass
class Config:
    seconds: float
    hot_pages: int
    stream_mbps: float
    commit_interval: float
    seed: int
    workdir: Path


@dataclass
class Result:
    path: str
    mode: str
    latencies: list[float] = field(default_factory=list)  # seconds, in order
    elapsed: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)  # counters over the timed phase, and forked_pages_peak
    stream_bytes: int = 0
    max_gap: float | None = None  # embedded: longest time between two writes of the writer (event loop stalls)
    max_delta_dirty: int | None = None  # embedded: most dirty pages of a delta as its commit started
    peak_violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # oddities worth a look that do not fail a goal
    error: str | None = None
    workload: str = "hot64"
    latency: float = 0.0  # seconds: the modelled device's latency (0: the local image)
    torn: int | None = None  # data blocks failing their checksums in the image copied at the end of the run
    syncs: int = 0  # fdatasyncs of the append workload

    @property
    def device_bytes(self) -> float:
        """Bytes the run's commits wrote to the device: blocks, and the zeros filling holes of the sparse image."""
        return self.stats.get("blocks_written", 0.0) * BLOCK + self.stats.get("hole_fill_bytes", 0.0)

    @property
    def writes(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.writes / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile in seconds (p in 0..100)."""
        data = sorted(self.latencies)
        if not data:
            return math.nan
        return data[max(0, math.ceil(p / 100 * len(data)) - 1)]


def page_data(payloads: list[bytes], seq: int) -> bytes:
    """A 4 KiB payload stamped with its sequence number (so the final contents can be checked)."""
    base = payloads[seq % len(payloads)]
    return seq.to_bytes(8, "little") + base[8:]


def make_payloads(rnd: random.Random) -> list[bytes]:
    return [rnd.randbytes(BLOCK) for _ in range(PAYLOADS)]


def stat_delta(before: dict, after: dict) -> dict[str, float]:
    out = {k: float(after.get(k, 0)) - float(before.get(k, 0)) for k in COUNTERS}
    out["forked_pages_peak"] = float(after.get("forked_pages_peak", 0))
    return out


def verify_image(image: Path, expected: list[bytes]) -> None:
    """Open the unmounted image read-only and compare the hot file with what was written last."""
    from tux3fuse.format import ROOT_INO
    from tux3fuse.fs import Options, Volume

    vol = Volume(str(image), Options(readonly=True))
    try:
        ino = vol.lookup(ROOT_INO, b"hot").ino
        data = vol.read(ino, 0, len(expected) * BLOCK)
    finally:
        vol.unmount()
    if len(data) != len(expected) * BLOCK:
        raise BenchError(f"hot file is {len(data)} bytes after unmount, expected {len(expected) * BLOCK}")
    bad = [i for i, want in enumerate(expected) if data[i * BLOCK: (i + 1) * BLOCK] != want]
    if bad:
        got = int.from_bytes(data[bad[0] * BLOCK: bad[0] * BLOCK + 8], "little")
        want = int.from_bytes(expected[bad[0]][:8], "little")
        raise BenchError(f"wrong data after unmount: {len(bad)} of {len(expected)} hot pages differ from the last "
                         f"write (page {bad[0]}: holds write #{got}, expected write #{want})")


def verify_file(image: Path, name: str, want: bytes | int) -> None:
    """Open the unmounted image read-only and check file NAME: its contents (bytes), or its size (int)."""
    from tux3fuse.format import ROOT_INO
    from tux3fuse.fs import Options, Volume

    vol = Volume(str(image), Options(readonly=True))
    try:
        ino = vol.lookup(ROOT_INO, name.encode()).ino
        size = vol.getattr(ino).size
        data = vol.read(ino, 0, len(want)) if isinstance(want, bytes) else b""
    finally:
        vol.unmount()
    expected_size = len(want) if isinstance(want, bytes) else want
    if size != expected_size:
        raise BenchError(f"{name} is {size} bytes after unmount, expected {expected_size}")
    if isinstance(want, bytes) and data != want:
        at = next(i for i in range(len(want)) if data[i: i + 1] != want[i: i + 1])
        raise BenchError(f"wrong data after unmount: {name} differs from what was written from byte {at}")


# ---------------------------------------------------------------------------------------------------------------
# embedded


def run_embedded(mode: str, cfg: Config, image: Path, latency: float = 0.0) -> Result:
    import trio

    from mkfs import mkfs

    mkfs(str(image), BLOCK, IMAGE_SIZE, force=True)
    result = Result("embedded", mode, workload=f"hot{cfg.hot_pages}", latency=latency)
    expected = trio.run(_embedded, mode, cfg, image, result)
    verify_image(image, expected)
    return result


async def _embedded(mode: str, cfg: Config, image: Path, result: Result) -> list[bytes]:
    import trio

    from tux3fuse.format import ROOT_INO
    from tux3fuse.fs import Options, Volume

    rnd = random.Random(cfg.seed)
    payloads = make_payloads(rnd)
    vol = Volume(str(image), Options(stable=mode, device_latency=result.latency))
    thresholds = gc.get_threshold()
    try:
        vol.mount()
        uid, gid = os.getuid(), os.getgid()
        hot = vol.create(ROOT_INO, b"hot", 0o644, uid, gid).ino
        stream = vol.create(ROOT_INO, b"stream", 0o644, uid, gid).ino
        seq = 0
        last: list[bytes] = []
        for index in range(cfg.hot_pages):
            last.append(page_data(payloads, seq))
            vol.write(hot, index * BLOCK, last[-1])
            seq += 1
        await vol.flusher.commit_async()  # the hot set starts clean, on disk
        gc.collect()  # garbage of earlier runs is not collected during this one
        # the collector as the daemon sets it, so that both paths run the filesystem under the same runtime: with
        # Python's defaults, full collections of the cache's objects hold the loop for 30-60 ms
        gc.freeze()
        gc.set_threshold(*Options().gc_thresholds)
        before = vol.stats()
        chunk = rnd.randbytes(STREAM_CHUNK)
        stop = False
        max_dirty = 0
        violations: list[str] = []

        touched: set[int] = set()  # hot pages written since the last commit started: the delta's dirty hot pages

        async def committer() -> None:
            nonlocal max_dirty, touched
            while not stop:
                st = vol.stats()
                dirty, peak = int(st["dirty_pages"]), int(st["forked_pages_peak"])
                hot_dirty, touched = len(touched), set()
                max_dirty = max(max_dirty, dirty)
                delta = await vol.flusher.commit_async()
                new_peak = int(vol.stats()["forked_pages_peak"])
                if new_peak > peak and new_peak > dirty:
                    violations.append(f"delta {delta}: forked_pages_peak rose to {new_peak} during its commit, "
                                      f"which had {dirty} dirty pages")
                elif new_peak > peak and new_peak > hot_dirty:
                    result.notes.append(f"delta {delta}: forked_pages_peak rose to {new_peak} during its commit, "
                                        f"which had only {hot_dirty} dirty hot pages")
                await trio.sleep(0)  # writers woken by this commit's end run before the next commit starts

        async def streamer() -> None:
            if cfg.stream_mbps <= 0:
                return
            period = STREAM_CHUNK / (cfg.stream_mbps * 1e6)
            offset = 0
            due = time.perf_counter()
            while not stop:
                await vol.call(vol.write, stream, offset, chunk)
                result.stream_bytes += STREAM_CHUNK
                offset = (offset + STREAM_CHUNK) % STREAM_WRAP
                due += period
                await trio.sleep(max(0.0, due - time.perf_counter()))

        async def writer() -> None:
            nonlocal stop, seq
            lat = result.latencies
            gap = 0.0
            clock = time.perf_counter
            try:
                start = prev = clock()
                end = start + cfg.seconds
                while prev < end:
                    index = rnd.randrange(cfg.hot_pages)
                    data = page_data(payloads, seq)
                    seq += 1
                    t0 = clock()
                    gap = max(gap, t0 - prev)
                    await vol.call(vol.write, hot, index * BLOCK, data)
                    prev = clock()
                    lat.append(prev - t0)
                    last[index] = data
                    touched.add(index)
                    await trio.sleep(0)
                result.elapsed = prev - start
                result.max_gap = gap
            finally:
                stop = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer)
            nursery.start_soon(streamer)
            nursery.start_soon(writer)
        result.stats = stat_delta(before, vol.stats())
        result.max_delta_dirty = max_dirty
        result.peak_violations = violations
        if vol.stats()["read_only"]:
            raise BenchError("the volume went read-only during the run (see the log)")
        return last
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        vol.unmount()


# ---------------------------------------------------------------------------------------------------------------
# mounted


def mount_options(mode: str, cfg: Config, latency: float) -> str:
    """The -o of a sweep point: no writeback cache, the mode, the commit interval, the modelled device."""
    return (f"nowriteback,stable={mode},commit={cfg.commit_interval:g}"
            + (f",device_latency={latency * 1e3:g}ms" if latency > 0 else ""))


def torn_blocks(image: Path) -> tuple[int, list[str]]:
    """``fsck.tux3 -n IMAGE``: the data blocks failing their checksums, and the other errors it reports."""
    proc = run([VENV_BIN / "fsck.tux3", "-n", image], timeout=600, check=False)
    if proc.returncode not in (0, 4):
        raise BenchError(f"fsck.tux3 -n {image}: exit status {proc.returncode}: "
                         f"{(proc.stdout + proc.stderr).strip()[-500:]}")
    lines = proc.stdout.splitlines()
    torn = [ln for ln in lines if "fails its checksum" in ln and "data block" in ln]
    other = [ln for ln in lines if ln not in torn and ("error" in ln or "fails" in ln) and "left uncorrected" not in ln]
    return len(torn), other


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy the data extents of the sparse file SRC to DST (the holes stay holes)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        at = 0
        while at < size:
            try:
                data = os.lseek(fi.fileno(), at, os.SEEK_DATA)
            except OSError:  # no data after AT (ENXIO)
                break
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            while data < hole:
                chunk = os.pread(fi.fileno(), min(8 << 20, hole - data), data)
                os.pwrite(fo.fileno(), chunk, data)
                data += len(chunk)
            at = hole
        fo.truncate(size)


def run_mounted(mode: str, cfg: Config, image: Path, workload: Workload | None = None, latency: float = 0.0,
                torn: bool = False) -> Result:
    """``tux3fuse -f`` on IMAGE (a child of the script); the timed phase reads ``tux3 stat --json``. With TORN, the
    daemon is stopped (SIGSTOP) the moment the timed phase ends and the image copied, as a crash would leave it;
    after the unmount ``fsck.tux3 -n`` counts the copy's data blocks that fail their checksums."""
    from mkfs import mkfs

    workload = workload or Workload(f"hot{cfg.hot_pages}", "hot", cfg.hot_pages, True, "")
    fs = Tux3Fs(image.parent, options=mount_options(mode, cfg, latency), foreground=True, label=image.stem)
    mkfs(str(fs.image), BLOCK, IMAGE_SIZE, force=True)
    result = Result("mounted", mode, workload=workload.name, latency=latency)
    crash = image.with_suffix(".crash")

    def snapshot() -> None:
        proc = fs.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        try:  # in this process: a child would close its copies of the files open on the mount, and wait
            copy_sparse(fs.image, crash)
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    try:
        fs.mount()
        expected = timed_writes(fs.mnt, cfg, result, fs.stats, workload, snapshot if torn else None)
        if result.stats.get("read_only"):
            raise BenchError(f"the volume went read-only during the run\n{fs.log_tail(30)}")
    except BaseException:
        dispose(fs)  # unmount and reap what the failure left; the failure is what is reported
        crash.unlink(missing_ok=True)
        raise
    fs.umount()  # tux3 umount, then the daemon's exit status
    try:
        try:
            if isinstance(expected, list):
                verify_image(fs.image, expected)
            else:
                verify_file(fs.image, *expected)
        except BenchError as e:
            if mode != "none":
                raise
            # without stable pages a write may land in a page as its commit marks it clean: reported, not fatal
            result.notes.append(f"after a clean unmount: {e}")
        if torn:
            result.torn, other = torn_blocks(crash)
            if other:
                result.notes.append(f"fsck -n of the crash image: {len(other)} other error(s), e.g. {other[0]}")
    finally:
        crash.unlink(missing_ok=True)
    return result


def run_floor(cfg: Config, workload: Workload | None = None) -> Result:
    """The same writer and stream on scripts/nullfs.py --nowriteback: what any pyfuse3 filesystem costs."""
    fs = NullFs(cfg.workdir, nowriteback=True)
    workload = workload or Workload(f"hot{cfg.hot_pages}", "hot", cfg.hot_pages, True, "")
    result = Result("mounted", FLOOR, workload=workload.name)
    try:
        fs.setup()
        expected = timed_writes(fs.mnt, cfg, result, None, workload)
        if isinstance(expected, list):  # the floor keeps its data in memory: check it there
            with open(fs.mnt / "hot", "rb") as f:
                ok = f.read() == b"".join(expected)
        else:
            name, want = expected
            ok = (os.path.getsize(fs.mnt / name) == want if isinstance(want, int)
                  else (fs.mnt / name).read_bytes() == want)
        if not ok:
            raise BenchError("nullfs returned other data than was written")
    finally:
        error = dispose(fs)
    if error is not None:
        raise error
    return result


def timed_writes(mnt: Path, cfg: Config, result: Result, counters, workload: Workload | None = None,
                 snapshot=None) -> list[bytes] | tuple[str, bytes | int]:
    """The timed phase on a mount: the workload's writes (timed one by one), beside the stream thread when the
    workload has one. ``counters`` (or None) returns the filesystem's counters; their change over the phase goes
    to ``result.stats``. ``snapshot`` (or None) runs the moment the timed phase ends, with the writer's last write
    just returned and the stream still running. Returns what to check after the unmount: the hot pages' data
    (hot), or a file's name with its data (append) or its size (seq)."""
    workload = workload or Workload(f"hot{cfg.hot_pages}", "hot", cfg.hot_pages, True, "")
    rnd = random.Random(cfg.seed)
    payloads = make_payloads(rnd)
    expected: list[bytes] = []
    name = {"hot": "hot", "append": "log", "seq": "seq0"}[workload.kind]
    fd = os.open(mnt / name, os.O_CREAT | os.O_RDWR, 0o644)
    sfd = os.open(mnt / "stream", os.O_CREAT | os.O_WRONLY, 0o644)
    log_data = bytearray()
    seq_file, seq_offset = 0, 0
    try:
        seq = 0
        for index in range(workload.pages):
            expected.append(page_data(payloads, seq))
            os.pwrite(fd, expected[-1], index * BLOCK)
            seq += 1
        os.fsync(fd)  # the hot set starts clean, on disk
        before = counters() if counters else {}
        gc.collect()
        stop = threading.Event()
        stream_error: list[BaseException] = []
        chunk = rnd.randbytes(STREAM_CHUNK)
        records = rnd.randbytes(1 << 20)

        def streamer() -> None:
            period = STREAM_CHUNK / (cfg.stream_mbps * 1e6)
            offset = 0
            due = time.perf_counter()
            try:
                while not stop.is_set():
                    os.pwrite(sfd, chunk, offset)
                    result.stream_bytes += STREAM_CHUNK
                    offset = (offset + STREAM_CHUNK) % STREAM_WRAP
                    due += period
                    stop.wait(max(0.0, due - time.perf_counter()))
            except BaseException as e:
                stream_error.append(e)

        thread = threading.Thread(target=streamer, name="stream", daemon=True)
        if cfg.stream_mbps > 0 and workload.stream:
            thread.start()
        lat = result.latencies
        clock = time.perf_counter
        pwrite = os.pwrite
        try:
            start = now = clock()
            end = start + cfg.seconds
            if workload.kind == "hot":
                while now < end:
                    index = rnd.randrange(workload.pages)
                    data = page_data(payloads, seq)
                    seq += 1
                    t0 = clock()
                    pwrite(fd, data, index * BLOCK)
                    now = clock()
                    lat.append(now - t0)
                    expected[index] = data
            elif workload.kind == "append":
                while now < end:
                    size = rnd.randint(256, 1024)
                    at = rnd.randrange(len(records) - size)
                    data = records[at: at + size]
                    t0 = clock()
                    pwrite(fd, data, len(log_data))
                    now = clock()
                    lat.append(now - t0)
                    log_data += data
                    if len(lat) % APPEND_SYNC == 0:
                        os.fdatasync(fd)
                        result.syncs += 1
                        now = clock()
            else:
                page = payloads[0]
                while now < end:
                    if seq_offset >= SEQ_WRAP:  # a new file, so that every write stays a write of new data
                        os.close(fd)
                        fd = os.open(mnt / f"seq{seq_file + 1}", os.O_CREAT | os.O_RDWR, 0o644)
                        if seq_file:
                            os.unlink(mnt / f"seq{seq_file - 1}")
                        seq_file, seq_offset = seq_file + 1, 0
                    t0 = clock()
                    pwrite(fd, page, seq_offset)
                    now = clock()
                    lat.append(now - t0)
                    seq_offset += BLOCK
            result.elapsed = now - start
            if snapshot is not None:
                snapshot()
        finally:
            stop.set()
            if thread.is_alive():
                thread.join(timeout=120)
        if stream_error:
            raise BenchError(f"background stream: {stream_error[0]!r}")
        if counters:
            after = counters()
            result.stats = stat_delta(before, after)
            result.stats["read_only"] = after.get("read_only", 0)
    finally:
        os.close(fd)
        os.close(sfd)
    if workload.kind == "hot":
        return expected
    if workload.kind == "append":
        return name, bytes(log_data)
    return f"seq{seq_file}", seq_offset


# ---------------------------------------------------------------------------------------------------------------
# reporting


def us(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    v = seconds * 1e6
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def num(v: float) -> str:
    return f"{v:,.0f}"


def device_name(latency: float) -> str:
    return "local" if latency <= 0 else f"{latency * 1e3:g} ms"


Key = tuple[str, str, float, str]  # path, workload, device latency, mode


@dataclass
class Point:
    """The runs of one (path, workload, device, mode): medians with their spread (min, max)."""

    path: str
    workload: str
    latency: float
    mode: str
    runs: list[Result]

    def spread(self, metric) -> tuple[float, float, float]:
        values = sorted(metric(r) for r in self.runs)
        if not values:
            return math.nan, math.nan, math.nan
        n = len(values)
        mid = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
        return mid, values[0], values[-1]

    def med(self, metric) -> float:
        return self.spread(metric)[0]

    def p(self, q: float) -> float:
        return self.med(lambda r: r.percentile(q))

    @property
    def rate(self) -> float:
        return self.med(lambda r: r.rate)

    @property
    def waited(self) -> float:
        """Share of the writes that waited (counter waits over writes), median of the runs."""
        return self.med(lambda r: r.stats.get("waits", 0.0) / max(1, r.writes))

    @property
    def torn(self) -> int | None:
        counts = [r.torn for r in self.runs if r.torn is not None]
        return max(counts) if counts else None

    def latencies(self) -> list[float]:
        return [x for r in self.runs for x in r.latencies]


def points(results: list[Result]) -> list[Point]:
    """The runs grouped by (path, workload, device, mode), failed runs left out, in the order first seen."""
    groups: dict[Key, Point] = {}
    for r in results:
        if r.error:
            continue
        key = (r.path, r.workload, r.latency, r.mode)
        groups.setdefault(key, Point(*key, [])).runs.append(r)
    return list(groups.values())


def with_spread(p: Point, metric, fmt) -> str:
    mid, lo, hi = p.spread(metric)
    if len(p.runs) < 2:
        return fmt(mid)
    return f"{fmt(mid)} ({fmt(lo)}–{fmt(hi)})"


TABLE_HEADER = ["path", "workload", "device", "mode", "runs", "writes/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs",
                "waited %", "forks", "forked peak", "MB to device", "torn"]
LOAD_HEADER = ["path", "workload", "device", "mode", "commits/s", "MiB/commit", "ms/commit", "flushes/s",
               "stream MB/s", "wait s", "max gap µs"]


def table_rows(results: list[Result]) -> list[list[str]]:
    """One row per point: medians, with the spread (min–max) of writes/s, p99 and p99.9 when there are runs."""
    rows = []
    for p in points(results):
        head = [p.path, p.workload, device_name(p.latency) if p.mode != FLOOR else "-",
                "pyfuse3-null" if p.mode == FLOOR else p.mode, str(len(p.runs))]
        latency = [with_spread(p, lambda r: r.rate, num), us(p.p(50)),
                   with_spread(p, lambda r: r.percentile(99), us), with_spread(p, lambda r: r.percentile(99.9), us),
                   us(p.p(100))]
        if p.mode == FLOOR:  # no commits, no counters
            rows.append([*head, *latency, *["-"] * (len(TABLE_HEADER) - 10)])
            continue
        torn = p.torn
        rows.append([*head, *latency, f"{100 * p.waited:.2f}", num(p.med(lambda r: r.stats["forks"])),
                     num(p.med(lambda r: r.stats["forked_pages_peak"])),
                     f"{p.med(lambda r: r.device_bytes) / 1e6:,.1f}", "-" if torn is None else str(torn)])
    for r in results:
        if r.error:
            rows.append([r.path, r.workload, device_name(r.latency), r.mode, "error",
                         *["-"] * (len(TABLE_HEADER) - 5)])
    return rows


def load_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for p in points(results):
        if p.mode == FLOOR:
            continue

        def per_commit(r: Result, value: float) -> float:
            return value / r.stats["commits"] if r.stats.get("commits") else math.nan

        def per_second(r: Result, value: float) -> float:
            return value / r.elapsed if r.elapsed else math.nan

        gaps = [r.max_gap for r in p.runs if r.max_gap is not None]
        rows.append([p.path, p.workload, device_name(p.latency), p.mode,
                     f"{p.med(lambda r: per_second(r, r.stats['commits'])):,.0f}",
                     f"{p.med(lambda r: per_commit(r, r.device_bytes / 2**20)):.2f}",
                     f"{p.med(lambda r: per_commit(r, r.stats['commit_seconds'] * 1e3)):.2f}",
                     f"{p.med(lambda r: per_second(r, r.stats.get('flushes', 0.0))):,.0f}",
                     f"{p.med(lambda r: per_second(r, r.stream_bytes / 1e6)):.1f}",
                     f"{p.med(lambda r: r.stats['wait_seconds']):.2f}", us(max(gaps)) if gaps else "-"])
    return rows


def tie(points_: list[Point], metric) -> bool:
    """Within the noise: the medians within TIE of each other, or every two spreads overlapping."""
    spreads = [p.spread(metric) for p in points_]
    mids = [s[0] for s in spreads]
    if min(mids) > 0 and max(mids) / min(mids) <= TIE:
        return True
    return max(s[1] for s in spreads) <= min(s[2] for s in spreads)


def peak_bound(p: Point) -> tuple[int, str]:
    """The most forked pages one copy per dirty page allows, and what bounds it: the hot set (only hot pages are
    rewritten), or for appends the one tail page each commit can be writing while it is appended to, and none for
    the control (its pages are written once)."""
    w = WORKLOADS.get(p.workload)
    if w is None or w.kind == "hot":
        pages = w.pages if w else int(p.workload.removeprefix("hot") or 0)
        return pages, f"hot set {pages} pages"
    if w.kind == "append":
        return 2, "the tail page, under the commit writing it and the one after"
    return 1, "the last page, whose next write may land while it is written"


def goal_lines(results: list[Result], hot_pages: int | None = None) -> list[str]:
    """PASS/FAIL per point for the goals of the sweep, INFO beside them; every point is reported."""
    lines: list[str] = []
    by = {(p.path, p.workload, p.latency, p.mode): p for p in points(results)}
    seen: list[tuple[str, str, float]] = []
    for path, workload, latency, _ in by:
        if (path, workload, latency) not in seen and _ != FLOOR:
            seen.append((path, workload, latency))
    for path, workload, latency in seen:
        where = f"{path} {workload} {device_name(latency)}"
        fork, wait, none = (by.get((path, workload, latency, m)) for m in MODES)
        control = WORKLOADS.get(workload) is not None and WORKLOADS[workload].kind == "seq"
        if fork is not None and wait is not None and latency >= GOAL_DEVICE and not control:
            fp99, wp99, fp999, wp999 = fork.p(99), wait.p(99), fork.p(99.9), wait.p(99.9)
            ok = fp99 <= GOAL_RATIO * wp99 and fp999 <= GOAL_RATIO * wp999 and fork.rate >= RATE_SLACK * wait.rate
            lines.append(f"{'PASS' if ok else 'FAIL'}: {where}: fork p99 {us(fp99)} vs wait {us(wp99)} µs "
                         f"(ratio {fp99 / wp99:.3f}), p99.9 {us(fp999)} vs {us(wp999)} µs (ratio {fp999 / wp999:.3f}); "
                         f"goal <= {GOAL_RATIO}; writes/s fork {num(fork.rate)} vs wait {num(wait.rate)} (goal: fork "
                         f">= {RATE_SLACK:g} x wait); {100 * wait.waited:.2f} % of wait's writes waited")
        if fork is not None and none is not None:
            ok = fork.p(99) <= NONE_RATIO * none.p(99)
            lines.append(f"{'PASS' if ok else 'FAIL'}: {where}: fork p99 {us(fork.p(99))} vs none {us(none.p(99))} µs "
                         f"(ratio {fork.p(99) / none.p(99):.2f}, goal <= {NONE_RATIO:g})")
        if (latency <= 0 or control) and fork is not None and wait is not None and none is not None:
            trio_ = [fork, wait, none]
            ok_rate, ok_p99 = tie(trio_, lambda r: r.rate), tie(trio_, lambda r: r.percentile(99))
            lines.append(f"{'PASS' if ok_rate and ok_p99 else 'FAIL'}: {where}: the three modes tie "
                         f"({'control' if control else 'local image'}): writes/s "
                         + " / ".join(num(p.rate) for p in trio_) + ", p99 "
                         + " / ".join(us(p.p(99)) for p in trio_) + " µs (fork / wait / none; within the noise: "
                         f"medians within {TIE:g}x or overlapping spreads)")
        floor = by.get((path, workload, 0.0, FLOOR))
        if floor is not None and latency <= 0:
            lines.append(f"INFO: {where}: a pyfuse3 filesystem that does nothing, under the same writer: p99 "
                         f"{us(floor.p(99))} µs, {num(floor.rate)} writes/s")
        for p in (fork,) if fork is not None else ():
            bound, what = peak_bound(p)
            peak = int(max(r.stats["forked_pages_peak"] for r in p.runs))
            violations = [v for r in p.runs for v in r.peak_violations]
            ok = peak <= bound and not violations
            extra = ""
            dirty = [r.max_delta_dirty for r in p.runs if r.max_delta_dirty is not None]
            if dirty:
                extra = (f"; most dirty pages in a committing delta {max(dirty)}; checked at every commit: "
                         + (f"{len(violations)} violations ({violations[0]})" if violations
                            else "the peak never passed the committing delta's dirty pages"))
            lines.append(f"{'PASS' if ok else 'FAIL'}: {where}: forked_pages_peak {peak} <= {bound} ({what}; at "
                         f"most one copy per dirty page{extra})")
        for p in (none, fork, wait):
            if p is not None and p.torn is not None:
                expect_torn = p.mode == "none"
                ok = p.torn == 0 or expect_torn
                lines.append(f"{'PASS' if ok else 'FAIL'}: {where}: {p.mode}: {p.torn} torn data block(s) in the "
                             "image as a crash at the end of the run leaves it"
                             + (" (stable pages off: expected)" if expect_torn else " (goal: 0)"))
    for r in results:
        if r.notes:
            lines.append(f"NOTE: {r.path} {r.workload} {device_name(r.latency)} {r.mode}: {r.notes[0]}"
                         + (f" (and {len(r.notes) - 1} more)" if len(r.notes) > 1 else ""))
        if not r.error and r.mode not in ("fork", FLOOR) and r.stats.get("forked_pages_peak"):
            lines.append(f"NOTE: {r.path} {r.workload} {device_name(r.latency)} {r.mode}: forked_pages_peak "
                         f"{int(r.stats['forked_pages_peak'])} (expected 0 without forking)")
    return lines


COLORS = {"fork": "#1f77b4", "wait": "#d62728", "none": "#7f7f7f", FLOOR: "#2ca02c"}


def cdf(ax, data_s: list[float], **kw) -> None:
    data = sorted(x * 1e6 for x in data_s)
    n = len(data)
    step = max(1, n // 3000)  # enough points for a smooth curve, always with the tail
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    ax.step([data[i] for i in idx], [(i + 1) / n for i in idx], where="post", **kw)


def draw_chart(plt, results: list[Result], commit_interval: float):
    """Latency CDFs: a row per workload, a column per device; the runs of a point pooled."""
    pts = [p for p in points(results) if p.mode != FLOOR and p.path == "mounted"]
    if not pts:
        pts = [p for p in points(results) if p.mode != FLOOR]
    if not pts:
        return None
    workloads = list(dict.fromkeys(p.workload for p in pts))
    devices = sorted({p.latency for p in pts})
    fig, axes = plt.subplots(len(workloads), len(devices), figsize=(3.3 * len(devices) + 1, 2.7 * len(workloads)),
                             sharey=True, squeeze=False)
    for i, w in enumerate(workloads):
        for j, lat in enumerate(devices):
            ax = axes[i][j]
            for p in pts:
                if p.workload == w and p.latency == lat and p.latencies():
                    cdf(ax, p.latencies(), color=COLORS[p.mode], label=f"{p.mode} (p99 {us(p.p(99))})")
            ax.axhline(0.99, color="black", linewidth=0.6, linestyle=":")
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{w}, device {device_name(lat)}", fontsize=9)
            if ax.lines:
                ax.legend(loc="lower right", fontsize=7)
            if i == len(workloads) - 1:
                ax.set_xlabel("write latency (µs)")
        axes[i][0].set_ylabel("fraction of writes")
    axes[0][0].set_ylim(0, 1.01)
    fig.suptitle(f"Write latency CDFs by stable-page mode and device latency (FUSE mount, nowriteback, commit every "
                 f"{commit_interval * 1e3:g} ms; dotted: p99)", fontsize=11)
    return fig


def draw_tails(plt, results: list[Result]):
    """p99 (solid) and p99.9 (dashed) against the device latency, a panel per workload (log axes; the local image
    is drawn at LOCAL_X)."""
    pts = [p for p in points(results) if p.mode in MODES and p.path == "mounted"]
    if not pts:
        return None
    local_x = 0.05  # ms: where the local image sits on the log axis
    workloads = list(dict.fromkeys(p.workload for p in pts))
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.6 * len(workloads) + 1, 3.6), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for mode in MODES:
            mine = sorted((p for p in pts if p.workload == w and p.mode == mode), key=lambda p: p.latency)
            if not mine:
                continue
            xs = [p.latency * 1e3 if p.latency > 0 else local_x for p in mine]
            ax.plot(xs, [p.p(99) * 1e6 for p in mine], marker="o", color=COLORS[mode], label=f"{mode} p99")
            ax.plot(xs, [p.p(99.9) * 1e6 for p in mine], marker="x", linestyle="--", color=COLORS[mode],
                    label=f"{mode} p99.9")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(w, fontsize=10)
        ax.set_xlabel(f"device latency (ms; local image at {local_x:g})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("write latency (µs)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Tail write latency against device latency, by stable-page mode", fontsize=11)
    return fig


def section_text(results: list[Result], cfg: Config, cmd: str, now: str, goals: list[str], charts: list[str],
                 loads: list[str], latencies: Sequence[float] = LATENCIES, repeat: int = 1) -> str:
    out = [SECTION, ""]
    out.append(generated_line(cmd, now, loads))
    out.append("")
    out.append("Stable pages make a write to a page that a commit is writing wait until the page is written. On a "
               "fast local image that wait is short and rare; on a slow or distant device it is as long as the "
               "device's service time. This sweep gives the device's speed as its axis: the device model "
               "(`-o device_latency=`) makes every write and flush of the image complete as on a device of that "
               "latency (a queue served in order). Devices: "
               + ", ".join(device_name(x) for x in latencies) + ".")
    out.append("")
    out.append(f"Each run mounts a fresh 1 GiB sparse image with `tux3fuse -f -o nowriteback,stable=MODE,"
               f"commit={cfg.commit_interval:g},device_latency=D` (every pwrite() is a request to the daemon) and "
               f"times each write for {cfg.seconds:g} s. Workloads: "
               + "; ".join(f"*{w.name}* {w.text}" for w in WORKLOADS.values())
               + f". The stream appends 128 KiB chunks at {cfg.stream_mbps:g} MB/s to a second file, so that "
               "commits carry data besides the hot pages. *pyfuse3-null*: the same writer on "
               "`scripts/nullfs.py --nowriteback`, a pyfuse3 filesystem that does nothing (the floor of every row). "
               f"The modes alternate run by run (fork, wait, none, fork, ...), {repeat} run(s) per point; the table "
               "gives medians, with the spread (min–max) in brackets. After each run the image is unmounted and "
               "checked to hold the data last written.")
    out.append("")
    out.append("Columns: *waited %*: writes that waited for a commit (counter `waits` over writes: a p99 shows the "
               "waits only when more than 1 % of the writes wait); *forks*, *forked peak*: pages copied, and the "
               "most copies alive at once; *MB to device*: `blocks_written` x 4 KiB plus `hole_fill_bytes` of "
               "`tux3 stat --json`; *torn*: on devices of 1 ms or more, the daemon is stopped the moment the timed "
               "phase ends and the image copied as a crash would leave it; `fsck.tux3 -n` counts the copy's data "
               "blocks whose checksum fails (the most of the runs). A clean unmount leaves none in any mode: its "
               "last commit writes the changed pages again. FUSE requests per operation are in the first table of "
               "this file (scripts/bench.py): every mode runs the same writer, so the kernel sends the same "
               "requests.")
    out.append("")
    out += md_table(TABLE_HEADER, table_rows(results), left=4)
    out.append("")
    out.append("Commit load (medians; ms/commit is from the start of a commit's prepare stage to the end of its "
               "complete stage; max gap: the longest time the embedded writer could not run between two writes):")
    out.append("")
    out += md_table(LOAD_HEADER, load_rows(results), left=4)
    out.append("")
    out.append(f"Goals (a benchmark, not a test): on devices of {GOAL_DEVICE * 1e3:g} ms or more fork's p99 and "
               f"p99.9 at most {GOAL_RATIO:g} x wait's at equal or higher throughput (workloads a and b); everywhere "
               f"fork's p99 at most {NONE_RATIO:g} x none's; on the local image, and for the control everywhere, "
               "the three modes within the noise; forked pages never more than one copy per dirty page; fork and "
               "wait never torn. Every point:")
    out.append("")
    for line in goals:
        out.append(f"- {line}")
    for r in results:
        if r.error:
            out.append(f"- {r.path} {r.workload} {device_name(r.latency)} {r.mode} failed: "
                       f"`{r.error.splitlines()[0]}`")
    out.append("")
    for chart in charts:
        out.append(f"![{chart.removesuffix('.png')}]({chart})")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------


def parse_latencies(text: str) -> list[float]:
    """--latencies: comma-separated milliseconds (0: the local image)."""
    try:
        values = [float(x) / 1e3 for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v <= 10 for v in values):
        raise argparse.ArgumentTypeError("comma-separated device latencies in milliseconds, such as 0,0.2,1,5,20")
    return sorted(dict.fromkeys(values))


def run_one(path: str, mode: str, workload: Workload, latency: float, cfg: Config, image: Path) -> Result:
    """One run, its failure kept in the result (a tux3fuse bug keeps its traceback)."""
    started = time.monotonic()
    try:
        if mode == FLOOR:
            r = run_floor(cfg, workload)
        elif path == "embedded":
            r = run_embedded(mode, cfg, image, latency)
        else:
            r = run_mounted(mode, cfg, image, workload, latency, torn=latency >= GOAL_DEVICE)
    except (BenchError, subprocess.TimeoutExpired) as e:
        r = Result(path, mode, error=f"{type(e).__name__}: {e}", workload=workload.name, latency=latency)
        log(f"  {path:8s} {workload.name:8s} {device_name(latency):>7s} {mode:4s} FAILED: {e}")
    except Exception:
        r = Result(path, mode, error=traceback.format_exc(), workload=workload.name, latency=latency)
        log(f"  {path:8s} {workload.name:8s} {device_name(latency):>7s} {mode:4s} FAILED:\n{r.error}")
    else:
        log(f"  {path:8s} {workload.name:8s} {device_name(latency):>7s} {mode:4s} {num(r.rate):>7s} writes/s  p99 "
            f"{us(r.percentile(99)):>7s}  p99.9 {us(r.percentile(99.9)):>7s}  max {us(r.percentile(100)):>8s} µs"
            + (f"  torn {r.torn}" if r.torn is not None else "") + f"  ({time.monotonic() - started:.1f} s)")
    image.unlink(missing_ok=True)
    return r


def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench_fork", __doc__, "bench_fork.png",
                "devices 0 and 5 ms, 1 s runs, one run per point, output in bench-out/ (smoke run)", SECTION)
    ap = h.parser
    h.add_only(PATHS, "paths")
    ap.add_argument("--seconds", type=float, help="timed phase of each run (default 3, or 1 with --quick)")
    ap.add_argument("--modes", type=comma_choices(MODES), default=list(MODES),
                    help="stable modes (default fork,wait,none)")
    ap.add_argument("--latencies", type=parse_latencies, metavar="MS,...",
                    help="device latencies in ms, 0 for the local image (default 0,0.2,1,5,20; --quick 0,5)")
    ap.add_argument("--workloads", type=comma_choices(tuple(WORKLOADS)),
                    help=f"mounted workloads (default {','.join(WORKLOADS)})")
    ap.add_argument("--repeat", type=int, help="runs per point, the modes alternating (default 3, --quick 1)")
    ap.add_argument("--hot-pages", type=int, default=256,
                    help="hot set of the embedded path in 4 KiB pages (default 256)")
    ap.add_argument("--stream", type=float, default=32.0, metavar="MBPS",
                    help="background stream to a second file in MB/s, 0 for none (default 32)")
    ap.add_argument("--commit", type=float, default=0.01, metavar="SECONDS",
                    help="commit interval of the mount (default 0.01)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the mounted path's floor runs on scripts/nullfs.py --nowriteback")
    args = h.parse(argv)
    if args.hot_pages < 1:
        ap.error("--hot-pages must be at least 1")
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0)
    if seconds <= 0:
        ap.error("--seconds must be positive")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        ap.error("--repeat must be at least 1")
    latencies = args.latencies or list(QUICK_LATENCIES if args.quick else LATENCIES)
    workloads = [WORKLOADS[w] for w in (args.workloads or WORKLOADS)]
    paths = args.only
    if "mounted" in paths and not (VENV_BIN / "tux3fuse").exists():
        print(f"bench_fork: {VENV_BIN / 'tux3fuse'} not found (run 'make install')", file=sys.stderr)
        return 2
    if "mounted" in paths and (not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")):
        print("bench_fork: the mounted path needs /dev/fuse and fusermount3 (use --only embedded)", file=sys.stderr)
        return 2

    results: list[Result] = []
    with h.workdir("tux3fork-") as workdir:
        cfg = Config(seconds=seconds, hot_pages=args.hot_pages, stream_mbps=args.stream,
                     commit_interval=args.commit, seed=args.seed, workdir=workdir)
        log(f"bench_fork: work directory {workdir}; {seconds:g} s per run, {repeat} run(s) per point, devices "
            + ", ".join(device_name(x) for x in latencies) + f"; stream {args.stream:g} MB/s; load average "
            f"{h.loads[0]}")
        if "embedded" in paths:  # the local image only: the embedded API without FUSE in between
            embedded = Workload(f"hot{cfg.hot_pages}", "hot", cfg.hot_pages, True, "")
            for _rep in range(repeat):
                for mode in args.modes:
                    results.append(run_one("embedded", mode, embedded, 0.0, cfg, workdir / f"embedded-{mode}.img"))
        if "mounted" in paths:
            if not args.no_floor:
                for w in workloads:
                    results.append(run_one("mounted", FLOOR, w, 0.0, cfg, workdir / "floor.img"))
            for latency in latencies:
                for w in workloads:
                    for _rep in range(repeat):
                        for mode in args.modes:
                            results.append(run_one("mounted", mode, w, latency, cfg, workdir / f"mounted-{mode}.img"))
    if h.interrupted:
        return 130

    h.table(TABLE_HEADER, table_rows(results), left=4)
    h.table(LOAD_HEADER, load_rows(results), left=4)
    print()
    goals = goal_lines(results)
    for line in goals:
        print(line)
    if args.quick:
        print("(quick run: short runs, one per point; numbers are indicative only)")
    print(h.load_line())
    charts = [c for c in (h.chart(lambda plt: draw_chart(plt, results, cfg.commit_interval)),) if c]
    h.chart_name = "bench_fork_tails.png"
    charts += [c for c in (h.chart(lambda plt: draw_tails(plt, results)),) if c]
    md = h.outdir / "PERFORMANCE.md"
    if md.exists() and SECTION not in md.read_text().splitlines():  # the section this one replaces, in its place
        md.write_text("\n".join(SECTION if line == OLD_SECTION else line for line in md.read_text().split("\n")))
    h.write(section_text(results, cfg, h.command(), h.now(), goals, charts, h.loads, latencies, repeat),
            charts[0] if charts else None)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
