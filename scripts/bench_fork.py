#!/usr/bin/env python3
"""Page forking benchmark: write latency while commits run, for stable=fork, wait and none.

A writer rewrites random pages of a small hot set (default 256 pages of 4 KiB) while commits run all the time.
Whenever a commit is writing a hot page, the stable-page mode decides what the writer's next write to that page
does: with fork the page is copied and the write goes on at once, with wait the write waits until the commit in
flight has written its blocks (not for its flush, as Linux's stable pages), and with none the page is changed
while it is being written (no stable pages at all, the baseline).

Two paths, each on a fresh 1 GiB sparse image in a temporary directory (default /var/tmp, not tmpfs):

  embedded  the embedded API in one trio run: ``Volume(image, Options(stable=MODE))``, then two tasks for
            --seconds: a committer calling ``await vol.flusher.commit_async()`` back to back (its I/O runs in a worker
            thread, so the frontend keeps running), and a writer calling ``await vol.call(vol.write, ...)`` for
            random 4 KiB hot pages, timing each call, with ``await trio.sleep(0)`` between writes so the
            committer gets to run. The latency is that of the write call alone: the committer's prepare and
            complete stages (and garbage collections) run on the same event loop between writes: they show up as the
            "max gap" column of the commit-load table. The garbage collector is set as the daemon sets it
            (``gc.freeze()`` after the setup, thresholds ``Options.gc_thresholds``) for the timed phase.
  mounted   ``tux3fuse -f -o nowriteback,stable=MODE,commit=0.01 IMAGE MNT`` in a subprocess. With the kernel's
            writeback cache off every pwrite() is a request to the daemon, so the latency the writer sees is the
            daemon's. The daemon's flusher commits every 10 ms; the script times os.pwrite() of random 4 KiB hot
            pages for --seconds. Then the same writer and stream run once more on ``scripts/nullfs.py
            --nowriteback``, an in-memory pyfuse3 filesystem that does nothing ("pyfuse3-null"): the latency any
            pyfuse3 filesystem has under this load, the floor of the mounted rows (--no-floor skips it).

Background stream (--stream MB/s, default 32; 0 turns it off): beside the writer, a second task (embedded) or
thread (mounted) appends 128 KiB chunks to a second file at that rate, so that every commit carries some data
besides the hot pages and takes real time (a commit of a few hot pages is little more than two fdatasyncs).
Commits run back to back on the embedded path, so each one carries what was streamed while the previous one was
being written; on the mount each 10 ms commit carries about rate x 10 ms. The stream wraps at 512 MiB.
Its writes are not timed.

Per run the script records the write count, the latencies (p50, p99, p99.9, max; and the share of writes that
waited, since a p99 shows the waits only when more than 1 % of the writes wait) and the volume's counters over the
timed phase (forks, waits, wait_seconds, forked_pages_peak, commits, blocks written, commit time). On the
embedded path it also records the dirty pages of each delta as its commit starts, and checks, for every commit
during which forked_pages_peak rose, that the new peak is at most that delta's dirty pages (one copy per dirty
page at most). After each run the image is unmounted and opened again read-only to check that every hot page
holds the data last written to it.

Goal lines (printed as PASS/FAIL; they do not change the exit status):
- latency: fork p99 <= 0.1 x wait p99, at equal or higher throughput (writes/s), per path;
- memory: forked_pages_peak never exceeds the dirty pages of the committing delta; reported with the hot set
  size, which bounds it (only hot pages are ever rewritten).
INFO lines beside them: p99.9 and the share of wait's writes that waited; fork against none (no stable pages at
all: the most forking could hope for); and on the mount the floor against what the goal allows fork.

Output: a table on stdout, latency CDFs in OUTDIR/bench_fork.png (matplotlib, log x axis), and a section
"## Page forking" in OUTDIR/PERFORMANCE.md (replaced if present, the rest of the file is kept). OUTDIR is docs/,
or bench-out/ with --quick. Exit status: 0 if every run finished, 1 if one failed (a tux3fuse error), 130 if
interrupted.
"""

from __future__ import annotations

import gc
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchfs import NullFs, Tux3Fs, dispose
from benchkit import VENV_BIN, BenchError, Harness, comma_choices, log, machine_info, md_table

PATHS = ("embedded", "mounted")
MODES = ("fork", "wait", "none")
FLOOR = "null"  # the mounted path's floor: a do-nothing pyfuse3 filesystem under the same load
BLOCK = 4096
IMAGE_SIZE = 1 << 30
STREAM_CHUNK = 128 << 10
STREAM_WRAP = 512 << 20
PAYLOADS = 16  # distinct 4 KiB payloads; each write also stamps the page with a sequence number
COUNTERS = ("forks", "waits", "wait_seconds", "commits", "blocks_written", "commit_seconds", "in_place_writes")
GOAL_RATIO = 0.1
SECTION = "## Page forking"


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


# ---------------------------------------------------------------------------------------------------------------
# embedded


def run_embedded(mode: str, cfg: Config, image: Path) -> Result:
    import trio

    from mkfs import mkfs

    mkfs(str(image), BLOCK, IMAGE_SIZE, force=True)
    result = Result("embedded", mode)
    expected = trio.run(_embedded, mode, cfg, image, result)
    verify_image(image, expected)
    return result


async def _embedded(mode: str, cfg: Config, image: Path, result: Result) -> list[bytes]:
    import trio

    from tux3fuse.format import ROOT_INO
    from tux3fuse.fs import Options, Volume

    rnd = random.Random(cfg.seed)
    payloads = make_payloads(rnd)
    vol = Volume(str(image), Options(stable=mode))
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


def run_mounted(mode: str, cfg: Config, image: Path) -> Result:
    """``tux3fuse -f`` on IMAGE (a child of the script); the timed phase reads ``tux3 stat --json``."""
    from mkfs import mkfs

    fs = Tux3Fs(image.parent, options=f"nowriteback,stable={mode},commit={cfg.commit_interval:g}",
                foreground=True, label=image.stem)
    mkfs(str(fs.image), BLOCK, IMAGE_SIZE, force=True)
    result = Result("mounted", mode)
    try:
        fs.mount()
        expected = timed_writes(fs.mnt, cfg, result, fs.stats)
        if result.stats.get("read_only"):
            raise BenchError(f"the volume went read-only during the run\n{fs.log_tail(30)}")
    except BaseException:
        dispose(fs)  # unmount and reap what the failure left; the failure is what is reported
        raise
    fs.umount()  # tux3 umount, then the daemon's exit status
    verify_image(fs.image, expected)
    return result


def run_floor(cfg: Config) -> Result:
    """The same writer and stream on scripts/nullfs.py --nowriteback: what any pyfuse3 filesystem costs."""
    fs = NullFs(cfg.workdir, nowriteback=True)
    result = Result("mounted", FLOOR)
    try:
        fs.setup()
        expected = timed_writes(fs.mnt, cfg, result, None)
        with open(fs.mnt / "hot", "rb") as f:  # the floor keeps its data in memory: check it there
            data = f.read()
        if any(data[i * BLOCK: (i + 1) * BLOCK] != page for i, page in enumerate(expected)):
            raise BenchError("nullfs returned other data than was written")
    finally:
        error = dispose(fs)
    if error is not None:
        raise error
    return result


def timed_writes(mnt: Path, cfg: Config, result: Result, counters) -> list[bytes]:
    """The timed phase on a mount: random 4 KiB pwrites of the hot set beside the stream thread. ``counters``
    (or None) returns the filesystem's counters; their change over the phase goes to ``result.stats``. Returns
    what each hot page should hold."""
    rnd = random.Random(cfg.seed)
    payloads = make_payloads(rnd)
    expected: list[bytes] = []
    fd = os.open(mnt / "hot", os.O_CREAT | os.O_RDWR, 0o644)
    sfd = os.open(mnt / "stream", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        seq = 0
        for index in range(cfg.hot_pages):
            expected.append(page_data(payloads, seq))
            os.pwrite(fd, expected[-1], index * BLOCK)
            seq += 1
        os.fsync(fd)  # the hot set starts clean, on disk
        before = counters() if counters else {}
        gc.collect()
        stop = threading.Event()
        stream_error: list[BaseException] = []
        chunk = rnd.randbytes(STREAM_CHUNK)

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
        if cfg.stream_mbps > 0:
            thread.start()
        lat = result.latencies
        clock = time.perf_counter
        pwrite = os.pwrite
        try:
            start = now = clock()
            end = start + cfg.seconds
            while now < end:
                index = rnd.randrange(cfg.hot_pages)
                data = page_data(payloads, seq)
                seq += 1
                t0 = clock()
                pwrite(fd, data, index * BLOCK)
                now = clock()
                lat.append(now - t0)
                expected[index] = data
            result.elapsed = now - start
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
    return expected


# ---------------------------------------------------------------------------------------------------------------
# reporting


def us(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    v = seconds * 1e6
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def num(v: float) -> str:
    return f"{v:,.0f}"


TABLE_HEADER = ["path", "mode", "writes/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "forks", "waits",
                "waits %", "forked_pages_peak", "commits"]
LOAD_HEADER = ["path", "mode", "commits/s", "MiB/commit", "ms/commit", "stream MB/s", "wait s", "max gap µs"]


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.error:
            rows.append([r.path, r.mode, "error", *["-"] * (len(TABLE_HEADER) - 3)])
            continue
        s = r.stats
        latency = [num(r.rate), us(r.percentile(50)), us(r.percentile(99)), us(r.percentile(99.9)),
                   us(r.percentile(100))]
        if r.mode == FLOOR:  # no commits, no counters
            rows.append([r.path, "pyfuse3-null", *latency, *["-"] * (len(TABLE_HEADER) - 7)])
            continue
        rows.append([r.path, r.mode, *latency, num(s["forks"]), num(s["waits"]),
                     f"{100 * s['waits'] / max(1, len(r.latencies)):.2f}", num(s["forked_pages_peak"]),
                     num(s["commits"])])
    return rows


def load_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.error or r.mode == FLOOR:
            continue
        s = r.stats
        commits = s["commits"] or math.nan
        rows.append([r.path, r.mode, f"{s['commits'] / r.elapsed:,.0f}" if r.elapsed else "-",
                     f"{s['blocks_written'] * BLOCK / 2**20 / commits:.2f}",
                     f"{s['commit_seconds'] * 1e3 / commits:.2f}",
                     f"{r.stream_bytes / 1e6 / r.elapsed:.1f}" if r.elapsed else "-",
                     f"{s['wait_seconds']:.2f}", us(r.max_gap) if r.max_gap is not None else "-"])
    return rows


def goal_lines(results: list[Result], hot_pages: int) -> list[str]:
    lines = []
    by = {(r.path, r.mode): r for r in results if not r.error}
    for path in PATHS:
        fork, wait = by.get((path, "fork")), by.get((path, "wait"))
        if fork is None and wait is None:
            continue
        if fork is None or wait is None:
            lines.append(f"SKIP: {path}: latency goal not measured (needs both fork and wait)")
            continue
        fp99, wp99 = fork.percentile(99), wait.percentile(99)
        ok = fp99 <= GOAL_RATIO * wp99 and fork.rate >= wait.rate
        lines.append(f"{'PASS' if ok else 'FAIL'}: {path}: fork p99 {us(fp99)} µs vs wait p99 {us(wp99)} µs "
                     f"(ratio {fp99 / wp99:.3f}, goal <= {GOAL_RATIO}); throughput fork {num(fork.rate)} vs wait "
                     f"{num(wait.rate)} writes/s (goal: fork >= wait)")
        lines.append(f"INFO: {path}: p99.9 fork {us(fork.percentile(99.9))} µs vs wait {us(wait.percentile(99.9))} µs; "
                     f"{100 * wait.stats['waits'] / max(1, len(wait.latencies)):.2f} % of wait's writes waited (a p99 "
                     "shows the waits only when more than 1 % of the writes wait)")
        none = by.get((path, "none"))
        if none is not None:
            lines.append(f"INFO: {path}: fork against none (no stable pages at all, what forking must not cost "
                         f"more than): p99 {us(fp99)} vs {us(none.percentile(99))} µs, {num(fork.rate)} vs "
                         f"{num(none.rate)} writes/s")
        floor = by.get((path, FLOOR))
        if floor is not None:
            lines.append(f"INFO: {path}: a pyfuse3 filesystem that does nothing, under the same writer and stream: "
                         f"p99 {us(floor.percentile(99))} µs, against the {us(GOAL_RATIO * wp99)} µs the goal "
                         f"allows fork ({num(floor.rate)} writes/s)")
    for r in results:
        if r.error or r.mode != "fork":
            continue
        peak = int(r.stats["forked_pages_peak"])
        ok = peak <= hot_pages and not r.peak_violations
        extra = ""
        if r.max_delta_dirty is not None:
            extra = (f", most dirty pages in a committing delta {r.max_delta_dirty}; checked at every commit: "
                     + (f"{len(r.peak_violations)} violations ({r.peak_violations[0]})" if r.peak_violations
                        else "the peak never passed the committing delta's dirty pages"))
        lines.append(f"{'PASS' if ok else 'FAIL'}: {r.path}: forked_pages_peak {peak} <= hot set {hot_pages} pages "
                     f"(at most one copy per dirty page{extra})")
    for r in results:
        if r.notes:
            lines.append(f"NOTE: {r.path} {r.mode}: {len(r.notes)} commits forked more than their dirty hot pages "
                         f"(the only pages rewritten), e.g. {r.notes[0]}")
        if not r.error and r.mode not in ("fork", FLOOR) and r.stats["forked_pages_peak"]:
            lines.append(f"NOTE: {r.path} {r.mode}: forked_pages_peak {int(r.stats['forked_pages_peak'])} "
                         "(expected 0 without forking)")
    return lines


def draw_chart(plt, results: list[Result], commit_interval: float):
    colors = {"fork": "#1f77b4", "wait": "#d62728", "none": "#7f7f7f", FLOOR: "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, p in zip(axes, PATHS, strict=True):
        ax.set_title({"embedded": "embedded API (trio, commits back to back)",
                      "mounted": f"FUSE mount, nowriteback (commit every {commit_interval * 1e3:g} ms)"}[p],
                     fontsize=10)
        shown = False
        for r in results:
            if r.path != p or r.error or not r.latencies:
                continue
            data = sorted(x * 1e6 for x in r.latencies)
            n = len(data)
            step = max(1, n // 4000)  # enough points for a smooth curve, always with the tail
            idx = list(range(0, n, step))
            if idx[-1] != n - 1:
                idx.append(n - 1)
            ax.step([data[i] for i in idx], [(i + 1) / n for i in idx], where="post", color=colors[r.mode],
                    linestyle="--" if r.mode == FLOOR else "-",
                    label=f"{'pyfuse3-null' if r.mode == FLOOR else r.mode} (p99 {us(r.percentile(99))} µs)")
            shown = True
        ax.axhline(0.99, color="black", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("write latency (µs, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        if shown:
            ax.legend(loc="lower right", fontsize=9)
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center")
    axes[0].set_ylabel("fraction of writes")
    axes[0].set_ylim(0, 1.01)
    fig.suptitle("4 KiB rewrites of a hot set while commits run: latency CDF by stable-page mode (dotted: p99)")
    return fig



def section_text(results: list[Result], cfg: Config, cmd: str, now: str, goals: list[str], chart: str | None,
                 loads: list[str]) -> str:
    info = machine_info()
    out = [SECTION, ""]
    out.append(f"Generated by `{cmd}` on {now}; machine: nproc {info['nproc']}, kernel {info['kernel']}"
               + (f", {info['cpu']}" if "cpu" in info else "") + f", Python {info['python']}; load average "
               f"(1/5/15 min) {loads[0]} at the start, {loads[1]} at the end.")
    out.append("")
    out.append(f"A writer rewrites random 4 KiB pages of a hot set of {cfg.hot_pages} pages for {cfg.seconds:g} s "
               f"per run while commits run all the time, beside a background stream of {cfg.stream_mbps:g} MB/s "
               "appended to a second file (so that commits carry data besides the hot pages). *embedded*: the "
               "embedded API in one trio run, `await vol.flusher.commit_async()` back to back in one task and timed "
               "`await vol.call(vol.write, ...)` in another, with the garbage collector set as the daemon sets "
               "it. *mounted*: `tux3fuse -f -o "
               f"nowriteback,stable=MODE,commit={cfg.commit_interval:g}`, timed `os.pwrite()`; every write is a "
               "request to the daemon. *pyfuse3-null*: the mounted writer and stream on `scripts/nullfs.py "
               "--nowriteback`, an in-memory pyfuse3 filesystem that does nothing: the floor of the mounted rows. "
               "Each run uses a fresh 1 GiB sparse image on local disk; after it the image "
               "is checked to hold the last data written to every hot page. Counters are over the timed phase.")
    out.append("")
    out += md_table(TABLE_HEADER, table_rows(results), left=2)
    out.append("")
    out.append("Commit load (ms/commit is from the start of a commit's prepare stage to the end of its complete "
               "stage; max gap: the longest time the embedded writer could not run between two writes: the event "
               "loop held by the committer's prepare or complete stage, or by a garbage collection):")
    out.append("")
    out += md_table(LOAD_HEADER, load_rows(results), left=2)
    out.append("")
    for line in goals:
        out.append(f"- {line}")
    for r in results:
        if r.error:
            out.append(f"- {r.path} {r.mode} failed: `{r.error.splitlines()[0]}`")
    out.append("")
    if chart:
        out.append(f"![latency CDFs]({chart})")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------




def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench_fork", __doc__, "bench_fork.png", "1 s runs, output in bench-out/ (smoke run)", SECTION)
    ap = h.parser
    h.add_only(PATHS, "paths")
    ap.add_argument("--seconds", type=float, help="timed phase of each run (default 5, or 1 with --quick)")
    ap.add_argument("--modes", type=comma_choices(MODES), default=list(MODES),
                    help="stable modes (default fork,wait,none)")
    ap.add_argument("--hot-pages", type=int, default=256, help="hot set size in 4 KiB pages (default 256)")
    ap.add_argument("--stream", type=float, default=32.0, metavar="MBPS",
                    help="background stream to a second file in MB/s, 0 for none (default 32)")
    ap.add_argument("--commit", type=float, default=0.01, metavar="SECONDS",
                    help="commit interval of the mount (default 0.01)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the mounted path's floor run on scripts/nullfs.py --nowriteback")
    args = h.parse(argv)
    if args.hot_pages < 1:
        ap.error("--hot-pages must be at least 1")
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 5.0)
    if seconds <= 0:
        ap.error("--seconds must be positive")
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
        log(f"bench_fork: work directory {workdir}; {seconds:g} s per run, hot set {args.hot_pages} pages, "
            f"stream {args.stream:g} MB/s; load average {h.loads[0]}")
        for path in paths:
            modes = [*args.modes, *([FLOOR] if path == "mounted" and not args.no_floor else [])]
            for mode in modes:
                image = workdir / f"{path}-{mode}.img"
                started = time.monotonic()
                try:
                    if mode == FLOOR:
                        r = run_floor(cfg)
                    elif path == "embedded":
                        r = run_embedded(mode, cfg, image)
                    else:
                        r = run_mounted(mode, cfg, image)
                except (BenchError, subprocess.TimeoutExpired) as e:
                    r = Result(path, mode, error=f"{type(e).__name__}: {e}")
                    log(f"  {path:8s} {mode:4s} FAILED: {e}")
                except Exception:  # a tux3fuse bug: keep the traceback for the report
                    r = Result(path, mode, error=traceback.format_exc())
                    log(f"  {path:8s} {mode:4s} FAILED:\n{r.error}")
                else:
                    log(f"  {path:8s} {mode:4s} {num(r.rate):>8s} writes/s  p50 {us(r.percentile(50)):>6s}  p99 "
                        f"{us(r.percentile(99)):>7s}  max {us(r.percentile(100)):>8s} µs  "
                        f"({time.monotonic() - started:.1f} s)")
                results.append(r)
                image.unlink(missing_ok=True)
    if h.interrupted:
        return 130

    h.table(TABLE_HEADER, table_rows(results), left=2)
    h.table(LOAD_HEADER, load_rows(results), left=2)
    print()
    goals = goal_lines(results, args.hot_pages)
    for line in goals:
        print(line)
    if args.quick:
        print("(quick run: 1 s per run, numbers are indicative only)")
    print(h.load_line())
    chart = h.chart(lambda plt: draw_chart(plt, results, cfg.commit_interval))
    h.write(section_text(results, cfg, h.command(), h.now(), goals, chart, h.loads), chart)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
