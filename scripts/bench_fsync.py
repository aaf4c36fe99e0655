#!/usr/bin/env python3
"""fsync scaling benchmark (the shape of Tux3's 2015 fsync test): tux3fuse, fuse2fs and kernel ext4 on a loop device,
with the floor that any pyfuse3 filesystem pays.

N tasks each append 1 KiB to a file of their own and fsync it, 10 times, for N = 1, 10, 100 and 1000 (1, 10 and 100
with --quick); then 1 task does 1,000 appends + fsyncs. Tasks are threads of this process (os.write and os.fsync
release the GIL); each configuration gets a fresh directory whose files are created and opened before the clock
starts, then committed (fsync of the directory, `tux3 sync` on tux3fuse, sync()), so the timed phase holds only the
appends and fsyncs. A threading.Barrier releases all tasks at once; the wall time runs from the barrier to the end of
the last task. Afterwards every file must be exactly 10 KiB (or 1,000 KiB) long.

Filesystems (--only takes their names), each in a temporary directory on local disk (default /var/tmp, never tmpfs);
the first three on a 2 GiB sparse image:

  tux3fuse        mkfs.tux3 -s 2G -f IMAGE; tux3fuse IMAGE MNT (default options); tux3 umount MNT
  fuse2fs         truncate -s 2G IMAGE; mkfs.ext4 -F -q IMAGE; fuse2fs IMAGE MNT -o fakeroot; fusermount -u MNT
  ext4            losetup --find --show IMAGE; mkfs.ext4 -F -q LOOP; mount -t ext4 -o noinit_itable LOOP MNT (kernel
                  ext4; noinit_itable keeps the lazy inode-table zeroing thread from writing during the runs);
                  umount MNT; losetup -d LOOP. Needs root and loop devices: skipped, with the reason, without them.
  null            "pyfuse3-null": scripts/nullfs.py MNT, an in-memory pyfuse3 filesystem with tux3fuse's FUSE
                  options whose fsync returns at once: what the same requests cost any pyfuse3 filesystem
  null-fdatasync  "pyfuse3-null+fdatasync": scripts/nullfs.py --fdatasync SCRATCH MNT, whose every fsync writes
                  and fdatasyncs 4 KiB of a scratch file on the same disk (one flush per fsync, no grouping)

tux3fuse, fuse2fs and ext4 end up calling fsync on their image file on the same local disk. On tux3fuse the script
also reads `tux3 stat --json MNT` before and after each configuration and reports the commits and device flushes per
fsync (the counters' deltas divided by the number of fsyncs).

Goal line (printed as PASS/FAIL; it does not change the exit status): tux3fuse runs 100 tasks x 10 in at most
1.0 x the time of kernel ext4 on the loop device. Beside it: the pyfuse3 floor (pyfuse3-null's time for the same
configuration), its ratio to ext4, and the share of tux3fuse's excess over ext4 that it accounts for.

Output: a table on stdout, OUTDIR/bench_fsync.png (time vs tasks, log-log, one line per filesystem, and the
1 x 1,000 run beside it; needs matplotlib) and a section "## fsync scaling" in OUTDIR/PERFORMANCE.md (replaced if
present, the rest of the file is kept). OUTDIR is docs/, or bench-out/ with --quick. Exit status: 0 if something
was measured, 1 if nothing was, 2 on bad usage, 130 if interrupted. Mounts, daemons, loop devices and the work
directory are always cleaned up, also on Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchfs import Fs, Unavailable, dispose, make_fs
from benchkit import BenchError, Harness, log, md_table, package_version, tool_version
from benchkit import machine_info as base_machine_info

FILESYSTEMS = ("tux3fuse", "fuse2fs", "ext4", "null", "null-fdatasync")
LABELS = {"tux3fuse": "tux3fuse", "fuse2fs": "fuse2fs", "ext4": "ext4-loop", "null": "pyfuse3-null",
          "null-fdatasync": "pyfuse3-null+fdatasync"}
COLORS = {"tux3fuse": "#1f77b4", "fuse2fs": "#ff7f0e", "ext4": "#2ca02c", "null": "#7f7f7f",
          "null-fdatasync": "#bcbd22"}
IMAGE_SIZE = "2G"
APPEND = 1024
SECTION = "## fsync scaling"
GOAL = (100, 10)  # tux3fuse time for this configuration <= GOAL_RATIO x ext4-loop's
GOAL_RATIO = 1.0
CONFIG_TIMEOUT = 600.0  # seconds for the timed phase of one configuration


@dataclass(frozen=True)
class Config:
    tasks: int
    appends: int

    @property
    def fsyncs(self) -> int:
        return self.tasks * self.appends

    @property
    def label(self) -> str:
        return f"{self.tasks:,} x {self.appends:,}"


FULL = (Config(1, 10), Config(10, 10), Config(100, 10), Config(1000, 10), Config(1, 1000))
QUICK = (Config(1, 10), Config(10, 10), Config(100, 10), Config(1, 1000))


@dataclass
class FsResult:
    seconds: dict[Config, float] = field(default_factory=dict)
    commits: dict[Config, float] = field(default_factory=dict)  # per fsync (tux3fuse)
    flushes: dict[Config, float] = field(default_factory=dict)  # per fsync (tux3fuse)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# the workload


class Workload:
    """The files of one configuration, created and opened before the timed phase."""

    def __init__(self, root: Path, cfg: Config) -> None:
        self.cfg = cfg
        self.dir = root / f"t{cfg.tasks}x{cfg.appends}"
        self.fds: list[int] = []
        self.payload = os.urandom(APPEND)

    def prepare(self) -> None:
        self.dir.mkdir()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        for i in range(self.cfg.tasks):
            self.fds.append(os.open(self.dir / f"f{i:04d}", flags, 0o644))
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def run(self, timeout: float) -> float:
        """Run the tasks; returns the wall time from the barrier to the end of the last task."""
        cfg = self.cfg
        barrier = threading.Barrier(cfg.tasks + 1)
        stop = threading.Event()
        errors: list[str] = []
        payload = self.payload

        def task(fd: int) -> None:
            try:
                barrier.wait()
                for _ in range(cfg.appends):
                    if stop.is_set():
                        return
                    n = os.write(fd, payload)
                    if n != len(payload):
                        raise OSError(f"short write: {n} of {len(payload)} bytes")
                    os.fsync(fd)
            except threading.BrokenBarrierError:
                return
            except Exception as e:  # report the exact error of the filesystem
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=task, args=(fd,), name=f"task{i}", daemon=True)
                   for i, fd in enumerate(self.fds)]
        try:
            for t in threads:
                t.start()
            barrier.wait(timeout=120)
            start = time.perf_counter()
            deadline = time.monotonic() + timeout
            for t in threads:
                while t.is_alive():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        busy = sum(t.is_alive() for t in threads)
                        raise BenchError(f"{cfg.label}: {busy} of {cfg.tasks} tasks still running after "
                                         f"{timeout:.0f}s (hung in write or fsync?)")
                    t.join(min(left, 0.5))
            elapsed = time.perf_counter() - start
        except BaseException:
            stop.set()
            barrier.abort()
            end = time.monotonic() + 5
            for t in threads:
                if t.ident is not None:
                    t.join(max(0.0, end - time.monotonic()))
            raise
        if errors:
            more = f" (and {len(errors) - 1} more tasks failed)" if len(errors) > 1 else ""
            raise BenchError(f"{cfg.label}: {errors[0]}{more}")
        want = cfg.appends * APPEND
        sizes = [os.fstat(fd).st_size for fd in self.fds]
        bad = [i for i, size in enumerate(sizes) if size != want]
        if bad:
            raise BenchError(f"{cfg.label}: {len(bad)} files have the wrong size after the run "
                             f"(f{bad[0]:04d}: {sizes[bad[0]]} bytes, expected {want})")
        return elapsed

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def bench_fs(fs: Fs, configs: Sequence[Config], timeout: float) -> FsResult:
    result = FsResult()
    why = fs.missing()
    if why:
        log(f"{LABELS[fs.name]}: skipped: {why}")
        result.skipped = why
        return result
    log(f"{LABELS[fs.name]}: " + (f"mkfs ({IMAGE_SIZE}) and mount" if fs.persistent else "mount (in memory)"))
    try:
        fs.setup()
        for cfg in configs:
            fs.mounted_check()
            work = Workload(fs.mnt, cfg)
            try:
                work.prepare()
                fs.sync()
                os.sync()  # the image files on the host disk, so earlier runs do not write back during this one
                before = fs.stats()
                elapsed = work.run(timeout)
                after = fs.stats()
            except (BenchError, OSError) as e:
                msg = str(e) or type(e).__name__
                result.errors[cfg.label] = msg
                log(f"  {cfg.label:>10s}  FAILED: {msg}")
                if "still running" in msg:
                    raise BenchError(f"giving up on {LABELS[fs.name]}: {msg}") from e
                continue
            finally:
                work.close()
            result.seconds[cfg] = elapsed
            extra = ""
            if before is not None and after is not None:
                result.commits[cfg] = (after["commits"] - before["commits"]) / cfg.fsyncs
                result.flushes[cfg] = (after["flushes"] - before["flushes"]) / cfg.fsyncs
                extra = f"  {result.commits[cfg]:.3f} commits/fsync  {result.flushes[cfg]:.3f} flushes/fsync"
            log(f"  {cfg.label:>10s}  {elapsed:8.3f} s  {cfg.fsyncs / elapsed:9,.0f} fsyncs/s{extra}")
    except Unavailable as e:
        result.skipped = str(e)
        log(f"{LABELS[fs.name]}: skipped: {e}")
    except BenchError as e:
        result.skipped = f"aborted: {str(e).splitlines()[0]}"
        log(f"{LABELS[fs.name]}: aborted: {e}")
    finally:
        error = dispose(fs)
        if error is not None:
            log(f"{LABELS[fs.name]}: teardown: {error}")
            result.errors.setdefault("teardown", str(error).splitlines()[0])
    return result


# ---------------------------------------------------------------------------------------------------------------
# output


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


TABLE_HEADER = ["configuration", *(f"{LABELS[n]} s" for n in FILESYSTEMS), "tux3fuse commits/fsync",
                "flushes/fsync"]


def table_rows(results: dict[str, FsResult], configs: Sequence[Config]) -> list[list[str]]:
    rows = []
    for cfg in configs:
        cells = [cfg.label]
        for name in FILESYSTEMS:
            r = results.get(name)
            if r is None:
                cells.append("-")
            elif cfg.label in r.errors:
                cells.append("error")
            else:
                cells.append(fmt_s(r.seconds.get(cfg)))
        t = results.get("tux3fuse", FsResult())
        cells += [fmt_ratio(t.commits.get(cfg)), fmt_ratio(t.flushes.get(cfg))]
        rows.append(cells)
    return rows


def goal_line(results: dict[str, FsResult]) -> str:
    cfg = Config(*GOAL)
    what = f"tux3fuse {cfg.label} in <= {GOAL_RATIO:.1f} x the time of kernel ext4 on loop"
    t = results.get("tux3fuse", FsResult()).seconds.get(cfg)
    e = results.get("ext4", FsResult()).seconds.get(cfg)
    if t is None or e is None:
        missing = [n for n, v in (("tux3fuse", t), ("ext4-loop", e)) if v is None]
        return f"FAIL: {what}: {' and '.join(missing)} not measured"
    verdict = "PASS" if t <= GOAL_RATIO * e else "FAIL"
    return f"{verdict}: {what}: {t:.3f} s vs {e:.3f} s ({t / e:.2f} x)" + floor_text(results, cfg, t, e)


def floor_text(results: dict[str, FsResult], cfg: Config, t: float, e: float) -> str:
    """What the pyfuse3 floor says about tux3fuse's time T against ext4's E: '' if pyfuse3-null was not measured.

    The share of the gap is (floor - E) / (T - E): the part of tux3fuse's excess over ext4 that a pyfuse3
    filesystem doing nothing pays too."""
    n = results.get("null", FsResult()).seconds.get(cfg)
    if n is None:
        return ""
    text = f"; pyfuse3 floor: {n:.3f} s (a filesystem doing nothing takes {n / e:.2f} x ext4"
    if t > e:
        text += f", {max(0.0, n - e) / (t - e):.0%} of tux3fuse's excess over ext4"
    text += ")"
    d = results.get("null-fdatasync", FsResult()).seconds.get(cfg)
    if d is not None:
        text += f"; with one fdatasync per fsync: {d:.3f} s ({d / e:.2f} x ext4)"
    return text


def chart_label(name: str) -> str:
    return LABELS[name].replace("-null", "\nnull").replace("+", "\n+")


def draw_chart(plt, results: dict[str, FsResult], configs: Sequence[Config]):
    """Time vs tasks (log-log) for the N x 10 configurations, and a bar chart of the 1 x 1,000 run."""
    names = [n for n in FILESYSTEMS if n in results and results[n].seconds]
    if not names:
        return None
    scaling = [c for c in configs if c.appends == 10]
    single = [c for c in configs if c.appends != 10]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1.2]})
    for name in names:
        pts = [(c.tasks, results[name].seconds[c]) for c in scaling if c in results[name].seconds]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS[name], label=LABELS[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks (each: 10 x append 1 KiB + fsync)")
    ax.set_ylabel("wall time (s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title("fsync scaling (lower is better)")
    if single:
        cfg = single[0]
        vals = [results[n].seconds.get(cfg, 0.0) for n in names]
        bars = bx.bar([chart_label(n) for n in names], vals, color=[COLORS[n] for n in names])
        bx.bar_label(bars, labels=[fmt_s(results[n].seconds.get(cfg)) for n in names], fontsize=8)
        bx.set_title(f"1 task x {cfg.appends:,} appends + fsyncs")
        bx.set_ylabel("wall time (s)")
        bx.margins(y=0.15)
        bx.tick_params(axis="x", labelsize=8)
    else:
        bx.axis("off")
    return fig


def machine_info() -> dict[str, str]:
    info = base_machine_info()
    fuse2fs = tool_version("fuse2fs", "-V")
    if fuse2fs:
        info["fuse2fs"] = fuse2fs.removeprefix("fuse2fs ")
    if package_version():
        info["tux3fuse"] = package_version()
    return info


def section_text(results: dict[str, FsResult], configs: Sequence[Config], cmd: str, now: str, goal: str,
                 chart: str | None, loads: list[str], workdir: Path) -> str:
    info = machine_info()
    out = [SECTION, ""]
    out.append(f"Generated by `{cmd}` on {now}; machine: " + ", ".join(f"{k} {v}" for k, v in info.items())
               + f"; load average (1/5/15 min) {loads[0]} at the start, {loads[1]} at the end (tasks blocked "
               "in fsync count in it, so the benchmark's own 1,000 tasks raise it).")
    out.append("")
    out.append("The shape of Tux3's 2015 fsync test: N tasks each append 1 KiB to a file of their own and fsync it, "
               "10 times; then 1 task does 1,000 appends + fsyncs. Tasks are threads of one Python process "
               "released together by a barrier; files are created, opened and committed before the clock starts; "
               "the time is the wall time until the last task is done (one run per configuration, so the small "
               "ones are noisy). tux3fuse, fuse2fs and ext4-loop are each on a 2 GiB sparse image in "
               f"{workdir} (local disk); the pyfuse3 floors are measured on an in-memory filesystem:")
    out.append("")
    out.append(f"- tux3fuse: `mkfs.tux3 -s {IMAGE_SIZE} -f IMAGE`; `tux3fuse IMAGE MNT` (default options); "
               "`tux3 umount MNT`. Commits and flushes per fsync are the deltas of `commits` and `flushes` in "
               "`tux3 stat --json MNT` over the configuration, divided by its number of fsyncs.")
    out.append(f"- fuse2fs: `truncate -s {IMAGE_SIZE} IMAGE; mkfs.ext4 -F -q IMAGE`; `fuse2fs IMAGE MNT -o fakeroot`;"
               " `fusermount -u MNT`")
    out.append(f"- ext4-loop (kernel ext4): `truncate -s {IMAGE_SIZE} IMAGE; losetup --find --show IMAGE`; "
               "`mkfs.ext4 -F -q LOOP`; `mount -t ext4 -o noinit_itable LOOP MNT` (no lazy inode-table zeroing "
               "during the runs); `umount MNT; losetup -d LOOP`")
    out.append("- pyfuse3-null: `python scripts/nullfs.py MNT`; `fusermount -u MNT`. An in-memory pyfuse3 + trio "
               "filesystem with tux3fuse's FUSE options (default_permissions, writeback cache, 300 s timeouts, "
               "up to 256 requests at once) whose fsync returns at once: what the same requests cost any pyfuse3 "
               "filesystem, the kernel round trips and pyfuse3's per-request machinery.")
    out.append("- pyfuse3-null+fdatasync: `python scripts/nullfs.py --fdatasync SCRATCH MNT`: the same, but every "
               "fsync writes 4 KiB of a scratch file in the same directory and fdatasyncs it in a worker thread "
               "(one device flush per fsync, concurrent fsyncs not grouped).")
    out.append("")
    out += md_table(TABLE_HEADER, table_rows(results, configs))
    out.append("")
    out.append(f"- {goal}")
    for name in FILESYSTEMS:
        r = results.get(name)
        if r is None:
            continue
        if r.skipped:
            out.append(f"- {LABELS[name]}: {r.skipped}")
        for what, err in r.errors.items():
            out.append(f"- {LABELS[name]} {what} failed: `{err.splitlines()[0]}`")
    out.append("")
    if chart:
        out.append(f"![fsync scaling]({chart})")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------




def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench_fsync", __doc__, "bench_fsync.png", "up to 100 tasks, output in bench-out/ (smoke run)",
                SECTION)
    h.add_only(FILESYSTEMS)
    args = h.parse(argv)
    configs = QUICK if args.quick else FULL
    threading.stack_size(256 << 10)  # up to 1,000 task threads that only call os.write and os.fsync

    results: dict[str, FsResult] = {}
    with h.workdir("tux3fsync-") as workdir:
        log(f"bench_fsync: work directory {workdir}{' (quick)' if args.quick else ''}; configurations "
            f"{', '.join(c.label for c in configs)} (tasks x appends+fsyncs); load average {h.loads[0]}")
        for name in args.only:
            results[name] = bench_fs(make_fs(name, workdir, IMAGE_SIZE), configs, CONFIG_TIMEOUT)
    if h.interrupted:
        return 130

    h.table(TABLE_HEADER, table_rows(results, configs))
    print()
    goal = goal_line(results)
    print(goal)
    if args.quick:
        print("(quick run: up to 100 tasks, one run per configuration; numbers are indicative only)")
    print(h.load_line())
    chart = h.chart(lambda plt: draw_chart(plt, results, configs))
    h.write(section_text(results, configs, h.command(), h.now(), goal, chart, h.loads, h.parent), chart)
    return 0 if any(r.seconds for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
