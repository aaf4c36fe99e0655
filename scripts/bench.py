#!/usr/bin/env python3
"""Benchmark tux3fuse beside other filesystems and the floors of a Python filesystem, with fio, in one run.

Filesystems (--only takes their names), one after the other, each in a temporary directory on local disk:

  tux3fuse     mkfs.tux3 -s SIZE IMAGE; tux3fuse IMAGE MNT; tux3 umount MNT
  fuse2fs      ext4 through FUSE: truncate -s SIZE IMAGE; mkfs.ext4 -F -q IMAGE; fuse2fs IMAGE MNT -o fakeroot
  ext4         "ext4-loop": kernel ext4 on a loop device over the same kind of image (root and loop devices)
  passthrough  pyfuse3's own example, examples/passthroughfs.py of the sdist of the installed pyfuse3 (fetched
               once with pip download into ~/.cache/tux3fuse-bench), with the writeback cache, mirroring a
               directory on local disk, run under scripts/fusecount.py: a Python floor
  null         "nullfs": scripts/nullfs.py, in memory, with tux3fuse's FUSE options: the other Python floor
  null-group   "nullfs+flush": nullfs --fdatasync SCRATCH --group, fsync and fsync100 only: every fsync waits for a
               4 KiB write + fdatasync of a scratch file beside the images, concurrent ones sharing flushes (group
               commit): the floor of a Python filesystem whose fsync is durable (the two floors above make
               nothing durable: nullfs's fsync returns at once, the passthrough example has none)
  native       "native ext4": fio in a directory on the local disk itself (ext4): the limit

Jobs:

  seqwrite       1 MiB sequential writes, end_fsync                                     MB/s
  seqread        1 MiB sequential reads of that file, cold                              MB/s
  randwrite      4 KiB random writes over a file, time based                            IOPS
  randread       4 KiB random reads of that file, cold, time based                      IOPS
  randread-warm  the same, the daemon's cache warm and the kernel's cold                IOPS
  fsync          4 KiB write + fsync, time based                                        ops/s
  create         create + write 4 KiB + close, many small files                         files/s
  fsync100       100 tasks x 10 (append 1 KiB + fsync), bench_fsync.py's runner         s (lower is better)

Cold: unmount, drop_caches, mount again (native ext4: drop_caches; nullfs keeps nothing across an unmount, so it
skips the cold jobs). randread-warm reads the whole file once, then writes 3 to /proc/sys/vm/drop_caches without
unmounting: the kernel forgets its pages of the file, the daemon keeps its own cache.

Beside each result: the FUSE requests per operation, in all and by operation (tux3fuse: the fuse.OP counters of
`tux3 stat --json`; passthrough and nullfs: counted by scripts/fusecount.py's wrappers), and the daemon's CPU time
(user + system, all threads, from /proc/PID/stat) per operation. Both are the differences over the job, up to a
sync() after it (so the writeback it left in the kernel's cache counts), divided by its operations: fio's I/Os,
the files created, the appends of fsync100.

Goal lines (PASS/FAIL; they do not change the exit status): every job of tux3fuse at >= 0.9 x the better Python
floor (fsync100: time <= 1/0.9 x); fsync and fsync100 ahead of fuse2fs; seqread >= 0.9 x native ext4; randread
(cold): time per read <= 1.2 x (native ext4's time per cold read + the better floor's time per warm read).

Output: the tables on stdout, and the section "## Filesystems side by side" of OUTDIR/PERFORMANCE.md (replaced,
every other section kept) with OUTDIR/bench.png (each job as the ratio to the better Python floor; needs
matplotlib). OUTDIR is docs/, or bench-out/ with --quick. Exit status: 0 if something was measured, 1 if nothing
was, 2 on bad usage, 130 if interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from bench_fsync import CONFIG_TIMEOUT, Config, Workload
from benchfs import Fs, Unavailable, dispose, drop_caches, make_fs
from benchkit import (
    BenchError,
    Harness,
    comma_choices,
    cpu_seconds,
    generated_line,
    log,
    md_table,
    package_version,
    remove_section,
    run,
    tool_version,
    update_section,
)

FILESYSTEMS = ("tux3fuse", "fuse2fs", "ext4", "passthrough", "null", "null-group", "native")
LABELS = {"tux3fuse": "tux3fuse", "fuse2fs": "fuse2fs", "ext4": "ext4-loop", "passthrough": "passthrough",
          "null": "nullfs", "null-group": "nullfs+flush", "native": "native ext4"}
COLORS = {"tux3fuse": "#1f77b4", "fuse2fs": "#ff7f0e", "ext4": "#2ca02c", "passthrough": "#9467bd",
          "null": "#7f7f7f", "null-group": "#bcbd22", "native": "#8c564b"}
FLOORS = ("passthrough", "null")  # the Python floors
COUNTED = ("tux3fuse", "passthrough", "null", "null-group")  # the filesystems whose requests are counted
DAEMONS = ("tux3fuse", "fuse2fs", "passthrough", "null", "null-group")  # served by a process of their own
DURABLE_JOBS = ("fsync", "fsync100")  # the jobs of the durable floor (null-group)
SECTION = "## Filesystems side by side"
# What scripts/bench.py wrote before it owned one section: taken out when the section is written.
OLD_SECTIONS = ("## Machine", "## Results", "## Setup", "## Jobs")
OLD_INTRO = "Generated by `scripts/bench.py"

FLOOR_RATIO = 0.9  # tux3fuse >= 0.9 x the better Python floor, for every job
NATIVE_SEQREAD_RATIO = 0.9  # seqread >= 0.9 x native ext4
COLD_READ_SLACK = 1.2  # randread: time per read <= 1.2 x (native cold + floor warm)
FSYNC100 = Config(100, 10)


@dataclass(frozen=True)
class Params:
    image_size: str
    seq_size_mib: int
    rand_size_mib: int
    rand_runtime: int
    fsync_runtime: int
    create_files: int


FULL = Params(image_size="2G", seq_size_mib=512, rand_size_mib=128, rand_runtime=15, fsync_runtime=10,
              create_files=2000)
QUICK = Params(image_size="2G", seq_size_mib=64, rand_size_mib=32, rand_runtime=3, fsync_runtime=2,
               create_files=500)


@dataclass(frozen=True)
class Job:
    name: str
    unit: str
    description: str
    op: str  # what one operation is
    cold: bool = False  # unmount, drop_caches, mount before it
    lower_is_better: bool = False


JOBS: tuple[Job, ...] = (
    Job("seqwrite", "MB/s", "sequential write, 1 MiB blocks, end_fsync", "1 MiB write"),
    Job("seqread", "MB/s", "sequential read of that file, 1 MiB blocks, cold", "1 MiB read", cold=True),
    Job("randwrite", "IOPS", "random write, 4 KiB blocks, time based", "4 KiB write"),
    Job("randread", "IOPS", "random read of that file, 4 KiB blocks, cold, time based", "4 KiB read", cold=True),
    Job("randread-warm", "IOPS", "random read, 4 KiB blocks, time based, after one whole read of the file and "
        "drop_caches without an unmount: the daemon's cache warm, the kernel's cold", "4 KiB read"),
    Job("fsync", "ops/s", "4 KiB sequential write + fsync after each write, time based", "write + fsync"),
    Job("create", "files/s", "create + write 4 KiB + close, one directory", "file"),
    Job("fsync100", "s", "100 tasks (threads) x 10 (append 1 KiB + fsync), each to a file of its own, "
        "scripts/bench_fsync.py's runner; wall time", "append + fsync", lower_is_better=True),
)
JOB = {j.name: j for j in JOBS}


def runs(name: str, job: Job) -> bool:
    """Does filesystem NAME run JOB? nullfs keeps nothing across an unmount: no cold jobs; the durable floor
    runs the fsync jobs only."""
    if name == "null-group":
        return job.name in DURABLE_JOBS
    return not (name == "null" and job.cold)


# ---------------------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Measure:
    """One job on one filesystem: its value (in the job's unit), its operations, and over the job the FUSE
    requests by operation and the daemon's CPU seconds (None where not known)."""

    value: float
    ops: int
    requests: dict[str, int] | None = None
    cpu: float | None = None

    def requests_per_op(self) -> dict[str, float] | None:
        if self.requests is None or self.ops <= 0:
            return None
        return {k: v / self.ops for k, v in self.requests.items() if v}

    def total_per_op(self) -> float | None:
        per = self.requests_per_op()
        return None if per is None else sum(per.values())

    def cpu_us_per_op(self) -> float | None:
        return None if self.cpu is None or self.ops <= 0 else self.cpu * 1e6 / self.ops


@dataclass
class FsResult:
    measures: dict[str, Measure] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def value(self, job: str) -> float | None:
        m = self.measures.get(job)
        return None if m is None else m.value


@dataclass(frozen=True)
class Snapshot:
    requests: dict[str, int] | None
    pid: int | None
    cpu: float | None


def snapshot(fs: Fs, notes: list[str]) -> Snapshot:
    """The requests counted so far and the daemon's CPU time; what cannot be read is None, with a note."""
    requests = pid = cpu = None
    try:
        requests = fs.requests()
    except (BenchError, OSError, ValueError) as e:
        notes.append(f"requests: {str(e).splitlines()[0]}")
    try:
        pid = fs.daemon_pid()
        cpu = None if pid is None else cpu_seconds(pid)
    except (BenchError, OSError) as e:
        notes.append(f"daemon CPU: {str(e).splitlines()[0]}")
    return Snapshot(requests, pid, cpu)


def difference(before: Snapshot, after: Snapshot) -> tuple[dict[str, int] | None, float | None]:
    """The requests by operation and the CPU seconds between two snapshots (None where either lacks them, or the
    daemon is another process)."""
    requests = None
    if before.requests is not None and after.requests is not None:
        requests = {k: after.requests.get(k, 0) - before.requests.get(k, 0)
                    for k in sorted(set(before.requests) | set(after.requests))}
        requests = {k: v for k, v in requests.items() if v}
    cpu = None
    if before.cpu is not None and after.cpu is not None and before.pid == after.pid:
        cpu = after.cpu - before.cpu
    return requests, cpu


# ---------------------------------------------------------------------------------------------------------------
# the jobs


def fio_args(job: str, p: Params) -> list[str]:
    """fio arguments for JOB, without --directory and output options."""
    common = ["--ioengine=psync", "--numjobs=1", "--group_reporting"]
    seq = f"--size={p.seq_size_mib}M"
    rand = f"--size={p.rand_size_mib}M"
    randread = ["--filename=rand.dat", "--rw=randread", "--bs=4k", rand, f"--runtime={p.rand_runtime}",
                "--time_based"]
    table = {
        "seqwrite": ["--name=seqwrite", "--filename=seq.dat", "--rw=write", "--bs=1M", seq, "--end_fsync=1"],
        "seqread": ["--name=seqread", "--filename=seq.dat", "--rw=read", "--bs=1M", seq],
        "randwrite": ["--name=randwrite", "--filename=rand.dat", "--rw=randwrite", "--bs=4k", rand,
                      f"--runtime={p.rand_runtime}", "--time_based"],
        "randread": ["--name=randread", *randread],
        "randread-warm": ["--name=randread-warm", *randread],
        "fsync": ["--name=fsync", "--filename=fsync.dat", "--rw=write", "--bs=4k", "--size=64M", "--fsync=1",
                  f"--runtime={p.fsync_runtime}", "--time_based"],
    }
    return table[job] + common


def fio_result(job: str, data: dict) -> tuple[float, int]:
    """(value in the job's unit, I/Os done) from fio's JSON output for JOB."""
    j = data["jobs"][0]
    if j.get("error"):
        raise BenchError(f"fio job {job} reported error {j['error']}")
    side = j["write"] if job in ("seqwrite", "randwrite", "fsync") else j["read"]
    ios = int(side["total_ios"])
    if ios <= 0:
        raise BenchError(f"fio job {job} did no I/O")
    if job in ("seqwrite", "seqread"):
        return side["bw_bytes"] / 1e6, ios
    return float(side["iops"]), ios


def run_fio(fs: Fs, job: str, params: Params, outdir: Path) -> tuple[float, int]:
    out = outdir / f"fio-{fs.name}-{job}.json"
    # --directory must come before --filename: fio ignores it for files named earlier on the command line.
    args = ["fio", f"--directory={fs.mnt}", *fio_args(job, params), "--output-format=json", f"--output={out}"]
    run(args, timeout=900, cwd=outdir)
    datafile = next(a.split("=", 1)[1] for a in args if a.startswith("--filename="))
    if not (fs.mnt / datafile).is_file():
        raise BenchError(f"fio did not create {datafile} in {fs.mnt}")
    return fio_result(job, json.loads(out.read_text()))


def run_create(fs: Fs, count: int) -> tuple[float, int]:
    d = fs.mnt / "create"
    payload = os.urandom(4096)
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(d / f"f{i:06d}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    return count / elapsed, count


def read_whole(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def prepare(fs: Fs, job: Job) -> Workload | None:
    """What JOB needs before its clock starts (and before the counters are read): a cold start, a warm daemon
    cache, the files of fsync100. The fsync100 workload is returned (its files are open)."""
    if job.cold:
        fs.remount()
    elif job.name == "randread-warm":
        read_whole(fs.mnt / "rand.dat")
        drop_caches()  # the kernel's pages of the file go; the daemon's cache stays
    elif job.name == "create":
        (fs.mnt / "create").mkdir()
    elif job.name == "fsync100":
        work = Workload(fs.mnt, FSYNC100)
        try:
            work.prepare()
            fs.sync()
            os.sync()
        except BaseException:
            work.close()
            raise
        return work
    return None


def execute(fs: Fs, job: Job, params: Params, scratch: Path, work: Workload | None) -> tuple[float, int]:
    """Run JOB: (value in its unit, operations)."""
    if job.name == "create":
        return run_create(fs, params.create_files)
    if job.name == "fsync100":
        assert work is not None
        return work.run(CONFIG_TIMEOUT), FSYNC100.fsyncs
    return run_fio(fs, job.name, params, scratch)


def bench_fs(fs: Fs, params: Params, scratch: Path, jobs: Sequence[Job] = JOBS) -> FsResult:
    result = FsResult()
    label = LABELS.get(fs.name, fs.name)
    why = fs.missing()
    if why:
        log(f"{label}: skipped: {why}")
        result.skipped = why
        return result
    log(f"{label}: " + ("a directory on local disk" if fs.name == "native" else
                        f"mkfs ({params.image_size}) and mount" if fs.persistent else "mount (in memory)"))
    try:
        fs.setup()
        for job in jobs:
            if not runs(fs.name, job):
                continue
            notes: list[str] = []
            start = time.monotonic()
            work = None
            try:
                work = prepare(fs, job)
                fs.mounted_check()
                before = snapshot(fs, notes)
                value, ops = execute(fs, job, params, scratch, work)
                os.sync()  # the writeback the job left in the kernel's cache is the job's
                after = snapshot(fs, notes)
            except (BenchError, OSError, KeyError, ValueError) as e:
                result.errors[job.name] = str(e).splitlines()[0] if str(e) else type(e).__name__
                log(f"  {job.name:13s} FAILED: {e}")
                if "still running" in str(e):  # a hung fsync100 task: the filesystem is stuck
                    raise BenchError(f"giving up on {label}: {e}") from e
                continue
            finally:
                if work is not None:
                    work.close()
            requests, cpu = difference(before, after)
            m = result.measures[job.name] = Measure(value, ops, requests, cpu)
            result.notes += [f"{job.name}: {n}" for n in notes]
            total, us = m.total_per_op(), m.cpu_us_per_op()
            log(f"  {job.name:13s} {fmt(value):>10s} {job.unit:8s} ({time.monotonic() - start:.1f}s)"
                + (f"  {total:.2f} requests/op" if total is not None else "")
                + (f"  {us:,.0f} us CPU/op" if us is not None else ""))
    except Unavailable as e:
        result.skipped = str(e)
        log(f"{label}: skipped: {e}")
    except BenchError as e:
        result.skipped = f"aborted: {str(e).splitlines()[0]}"
        log(f"{label}: aborted: {e}")
    finally:
        error = dispose(fs)
        if error is not None:
            log(f"{label}: unmount: {error}")
            result.errors.setdefault("umount", str(error).splitlines()[0])
    return result


# ---------------------------------------------------------------------------------------------------------------
# goals


def speed(job: Job, value: float, reference: float) -> float:
    """VALUE against REFERENCE as a speed ratio (> 1: faster), whichever way the job's unit goes."""
    return reference / value if job.lower_is_better else value / reference


def at_least(value: float, bound: float) -> bool:
    """VALUE >= BOUND, a value on the bound (up to rounding) included."""
    return value >= bound * (1 - 1e-9)


def better_floor(results: dict[str, FsResult], job: Job) -> tuple[str, float] | None:
    """The faster of the Python floors on JOB: (name, value), or None if neither ran it."""
    got = [(n, v) for n in FLOORS if (v := results.get(n, FsResult()).value(job.name)) is not None]
    if not got:
        return None
    pick = min if job.lower_is_better else max
    return pick(got, key=lambda nv: nv[1])


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def value_text(job: Job, value: float) -> str:
    return f"{fmt(value)} {job.unit}"


def goal_lines(results: dict[str, FsResult]) -> list[str]:
    """Every goal, PASS or FAIL (FAIL also when a side was not measured)."""
    t = results.get("tux3fuse", FsResult())
    lines = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def compare(job: Job, what: str, other: str, ref: float | None, ratio: float) -> str:
        v = t.value(job.name)
        if v is None or ref is None:
            missing = [n for n, x in (("tux3fuse", v), (other, ref)) if x is None]
            return f"FAIL: {what}: {' and '.join(missing)} not measured"
        got = speed(job, v, ref)
        return (f"{verdict(at_least(got, ratio))}: {what}: {value_text(job, v)} vs {value_text(job, ref)} "
                f"({got:.2f} x as fast)")

    for job in JOBS:
        floor = better_floor(results, job)
        which = f" ({LABELS[floor[0]]})" if floor else ""
        what = (f"tux3fuse {job.name} time <= 1/{FLOOR_RATIO} x the better Python floor's{which}"
                if job.lower_is_better else f"tux3fuse {job.name} >= {FLOOR_RATIO} x the better Python floor{which}")
        lines.append(compare(job, what, "a Python floor", floor[1] if floor else None, FLOOR_RATIO))
    for name in ("fsync", "fsync100"):
        job = JOB[name]
        ref = results.get("fuse2fs", FsResult()).value(name)
        v = t.value(name)
        what = f"tux3fuse {name} ahead of fuse2fs"
        if v is None or ref is None:
            lines.append(compare(job, what, "fuse2fs", ref, 1.0))
        else:
            ahead = v < ref if job.lower_is_better else v > ref
            lines.append(f"{verdict(ahead)}: {what}: {value_text(job, v)} vs {value_text(job, ref)} "
                         f"({speed(job, v, ref):.2f} x as fast)")
    for name in DURABLE_JOBS:  # beside the goal: the floor of a Python filesystem whose fsync is durable
        job = JOB[name]
        ref = results.get("null-group", FsResult()).value(name)
        lines.append(compare(job, f"(beside the goal) tux3fuse {name} against the durable floor, nullfs+flush",
                             LABELS["null-group"], ref, FLOOR_RATIO))
    lines.append(compare(JOB["seqread"], f"tux3fuse seqread >= {NATIVE_SEQREAD_RATIO} x native ext4",
                         LABELS["native"], results.get("native", FsResult()).value("seqread"),
                         NATIVE_SEQREAD_RATIO))
    lines.append(cold_read_line(results))
    return lines


def cold_read_line(results: dict[str, FsResult]) -> str:
    """randread (cold): tux3fuse's time per read <= COLD_READ_SLACK x (native ext4's per cold read + the better
    floor's per warm read): a cold read may cost the disk's read plus a Python filesystem's warm read."""
    what = (f"tux3fuse randread (cold) time per read <= {COLD_READ_SLACK} x (native ext4's per cold read + the "
            "better Python floor's per warm read)")
    t = results.get("tux3fuse", FsResult()).value("randread")
    n = results.get("native", FsResult()).value("randread")
    floor = better_floor(results, JOB["randread-warm"])
    if t is None or n is None or floor is None:
        missing = [w for w, x in (("tux3fuse randread", t), ("native ext4 randread", n),
                                  ("a floor's randread-warm", floor)) if x is None]
        return f"FAIL: {what}: {' and '.join(missing)} not measured"
    t_us, n_us, f_us = 1e6 / t, 1e6 / n, 1e6 / floor[1]
    bound = COLD_READ_SLACK * (n_us + f_us)
    ok = "PASS" if at_least(bound, t_us) else "FAIL"
    return (f"{ok}: {what}: {t_us:,.0f} us vs {COLD_READ_SLACK} x ({n_us:,.0f} + {f_us:,.0f} ({LABELS[floor[0]]})) "
            f"= {bound:,.0f} us")


# ---------------------------------------------------------------------------------------------------------------
# tables


def cell(results: dict[str, FsResult], name: str, job: Job, get: Callable[[Measure], float | None],
         form: Callable[[float | None], str] = fmt) -> str:
    r = results.get(name)
    if r is None or not runs(name, job):
        return "-"
    m = r.measures.get(job.name)
    if m is None:
        return "error" if job.name in r.errors else "skipped" if r.skipped else "-"
    return form(get(m))


def value_header(names: Sequence[str]) -> list[str]:
    return ["job", *(LABELS[n] for n in names), "tux3fuse / floor"]


def value_rows(results: dict[str, FsResult], names: Sequence[str]) -> list[list[str]]:
    rows = []
    for job in JOBS:
        cells = [cell(results, n, job, lambda m: m.value) for n in names]
        v, floor = results.get("tux3fuse", FsResult()).value(job.name), better_floor(results, job)
        ratio = f"{speed(job, v, floor[1]):.2f}" if v is not None and floor else "-"
        rows.append([f"{job.name} ({job.unit})", *cells, ratio])
    return rows


def per_op_header(names: Sequence[str]) -> list[str]:
    return ["job (one op)", *(LABELS[n] for n in names)]


def requests_rows(results: dict[str, FsResult], names: Sequence[str]) -> list[list[str]]:
    return [[f"{job.name} ({job.op})",
             *(cell(results, n, job, Measure.total_per_op, lambda x: "-" if x is None else f"{x:.2f}")
               for n in names)] for job in JOBS]


def cpu_rows(results: dict[str, FsResult], names: Sequence[str]) -> list[list[str]]:
    return [[f"{job.name} ({job.op})",
             *(cell(results, n, job, Measure.cpu_us_per_op) for n in names)] for job in JOBS]


def breakdown(per_op: dict[str, float]) -> str:
    """Requests per operation by opcode, the most frequent first: "write 8.00, getattr 0.01, other 0.003"."""
    shown = sorted(((k, v) for k, v in per_op.items() if v >= 0.005), key=lambda kv: (-kv[1], kv[0]))
    rest = sum(v for v in per_op.values() if v < 0.005)
    parts = [f"{k} {v:.2f}" for k, v in shown]
    if rest:
        parts.append(f"other {rest:.3f}" if rest >= 0.001 else "other <0.001")
    return ", ".join(parts) or "none"


BREAKDOWN_HEADER = ["job", "filesystem", "requests/op", "by operation"]


def breakdown_rows(results: dict[str, FsResult], names: Sequence[str]) -> list[list[str]]:
    rows = []
    for job in JOBS:
        for n in names:
            m = results.get(n, FsResult()).measures.get(job.name)
            per = None if m is None else m.requests_per_op()
            if per is not None:
                rows.append([job.name, LABELS[n], f"{sum(per.values()):.2f}", breakdown(per)])
    return rows


def present(results: dict[str, FsResult], among: Sequence[str]) -> list[str]:
    return [n for n in among if n in results]


def tables(results: dict[str, FsResult]) -> list[tuple[str, list[str], list[list[str]], bool]]:
    """(title, header, rows, last column left-aligned) of every table, in order."""
    names = present(results, FILESYSTEMS)
    counted, daemons = present(results, COUNTED), present(results, DAEMONS)
    out = [("Results (higher is better, but fsync100: seconds, lower is better; tux3fuse / floor: speed against "
            "the better Python floor)", value_header(names), value_rows(results, names), False)]
    if counted:
        out.append(("FUSE requests per operation", per_op_header(counted), requests_rows(results, counted), False))
    if daemons:
        out.append(("daemon CPU per operation, us (user + system, all threads; ext4-loop and native ext4 have no "
                    "daemon)", per_op_header(daemons), cpu_rows(results, daemons), False))
    if counted:
        out.append(("FUSE requests per operation, by operation", BREAKDOWN_HEADER,
                    breakdown_rows(results, counted), True))
    return out


def notes(results: dict[str, FsResult]) -> list[str]:
    out = []
    for name in FILESYSTEMS:
        r = results.get(name)
        if r is None:
            continue
        if r.skipped:
            out.append(f"{LABELS[name]}: {r.skipped}")
        for job, err in r.errors.items():
            out.append(f"{LABELS[name]} {job} failed: {err}")
        out += [f"{LABELS[name]} {n}" for n in r.notes]
    return out


# ---------------------------------------------------------------------------------------------------------------
# the report


def machine_extra(params: Params, workdir: Path) -> list[str]:
    out = []
    for key, flag in (("fio", "--version"), ("fuse2fs", "-V")):
        v = tool_version(key, flag)
        if v:
            out.append(f"{key} {v.removeprefix(key + ' ')}")
    try:
        out.append(f"pyfuse3 {version('pyfuse3')}")
    except Exception:
        pass
    if package_version():
        out.append(f"tux3fuse {package_version()}")
    out.append(f"images: {params.image_size} sparse files in {workdir} (local disk)")
    return out


def section_text(results: dict[str, FsResult], params: Params, h: Harness, chart: str | None,
                 tux3_options: str | None, quick: bool) -> str:
    out = [SECTION, ""]
    out.append(generated_line(h.command(), h.now(), h.loads) + " " + "; ".join(machine_extra(params, h.parent))
               + ".")
    out.append("")
    out.append("Every job on every filesystem in one run, one filesystem after the other; beside each result the "
               "FUSE requests per operation and the daemon's CPU time per operation. The Python floors are two "
               "pyfuse3 filesystems that do (almost) nothing: what tux3fuse should match. Setup and jobs below.")
    out.append("")
    for title, header, rows, last_left in tables(results):
        out.append(f"{title}:")
        out.append("")
        out += md_table(header, rows, last_left=last_left)
        out.append("")
    out.append("Goals:")
    out.append("")
    out += [f"- {line}" for line in goal_lines(results)]
    if quick:
        out.append("- (quick run: sizes and runtimes are reduced, the goals are indicative only)")
    out.append("")
    extra = notes(results)
    if extra:
        out += [f"- {n}" for n in extra]
        out.append("")
    if chart:
        out.append(f"![benchmark chart]({chart})")
        out.append("")
    out.append("### Filesystems")
    out.append("")
    out.append(f"- tux3fuse: `mkfs.tux3 -s {params.image_size} -f IMAGE`; "
               f"`tux3fuse {'-o ' + tux3_options + ' ' if tux3_options else ''}IMAGE MNT`; `tux3 umount MNT`. "
               "Requests: the `fuse.OP` counters of `tux3 stat --json MNT`.")
    out.append(f"- fuse2fs: `truncate -s {params.image_size} IMAGE; mkfs.ext4 -F -q IMAGE`; "
               "`fuse2fs IMAGE MNT -o fakeroot`; `fusermount -u MNT` (its requests are not counted).")
    out.append(f"- ext4-loop: kernel ext4 on a loop device: `truncate -s {params.image_size} IMAGE; losetup --find "
               "--show IMAGE; mkfs.ext4 -F -q LOOP; mount -t ext4 -o noinit_itable LOOP MNT`.")
    out.append("- passthrough: pyfuse3's own example `examples/passthroughfs.py` from the sdist of the installed "
               "pyfuse3 (`pip download --no-deps --no-binary :all: pyfuse3==VERSION`, kept in "
               "~/.cache/tux3fuse-bench), `passthroughfs.py --enable-writeback-cache SRC MNT` mirroring a "
               "directory SRC beside the images, run under `scripts/fusecount.py` (which counts its requests). "
               "Its fsync and flush reply ENOSYS, so the kernel stops sending them: its fsync costs nothing.")
    out.append("- nullfs: `python scripts/nullfs.py --stats FILE MNT`: in memory, with tux3fuse's FUSE options "
               "(default_permissions, writeback cache, 300 s timeouts, up to 256 requests at once); fsync returns "
               "at once, flush replies ENOSYS. It keeps nothing across an unmount: no cold jobs.")
    out.append("- nullfs+flush: `python scripts/nullfs.py --fdatasync SCRATCH --group --stats FILE MNT`, fsync jobs "
               "only: every fsync waits for a 4 KiB write + fdatasync of a scratch file beside the images, those "
               "that arrive while one is in flight sharing the next (group commit). The floor of a Python "
               "filesystem whose fsync is durable; beside the goal, which is set against the two floors above.")
    out.append("- native ext4: fio in a directory on the local disk the images are on; a cold start is sync + "
               "drop_caches.")
    out.append("- Cold (seqread, randread): unmount, sync and drop_caches, mount. randread-warm: one whole read of "
               "the file, then sync and drop_caches without an unmount (the kernel's page cache of the file goes, "
               "a daemon's own cache stays); on ext4-loop and native ext4 it is a cold read too.")
    out.append("- Requests and CPU: read before the job and after a sync() that follows it; per operation = the "
               "difference / the job's operations (fio's I/Os, the files created, fsync100's appends).")
    out.append("")
    out.append("### Jobs")
    out.append("")
    for job in JOBS:
        out.append(f"- **{job.name}** ({job.unit}): {job.description}; one operation: {job.op}")
        if job.name == "create":
            out.append(f"  - Python loop: `os.open(O_CREAT|O_EXCL)`, write 4 KiB, close; "
                       f"{params.create_files:,} files; files/s from wall time")
        elif job.name == "fsync100":
            out.append(f"  - `scripts/bench_fsync.py`'s `Workload` for {FSYNC100.label}: files created, opened and "
                       "committed before the clock starts; a barrier releases the threads")
        else:
            out.append(f"  - `fio --directory=MNT {' '.join(fio_args(job.name, params))} --output-format=json`")
    out.append("")
    return "\n".join(out)


def write_report(md: Path, text: str) -> None:
    """Replace this script's section of MD (first in the file when it is new), taking out what it wrote before it
    owned one section; every other section is kept."""
    for heading in OLD_SECTIONS:
        remove_section(md, heading)
    if md.exists():
        lines = md.read_text().splitlines()
        kept = [line for line in lines if not line.startswith(OLD_INTRO)]
        if kept != lines:
            md.write_text("\n".join(kept) + "\n")
    update_section(md, SECTION, text, first=True)


def draw_chart(plt, results: dict[str, FsResult]):
    """Each job as the speed against the better Python floor (log scale), one bar per filesystem."""
    names = [n for n in FILESYSTEMS if n in results and results[n].measures]
    jobs = [j for j in JOBS if better_floor(results, j)]
    if not names or not jobs:
        return None
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys = [], []
        for k, job in enumerate(jobs):
            v, floor = results[name].value(job.name), better_floor(results, job)
            if v is not None and floor is not None and v > 0:
                xs.append(k + (i - (len(names) - 1) / 2) * width)
                ys.append(speed(job, v, floor[1]))
        ax.bar(xs, ys, width, color=COLORS[name], label=LABELS[name])
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(FLOOR_RATIO, color="red", linewidth=0.8, linestyle="--", label=f"goal: {FLOOR_RATIO} x floor")
    ax.set_xticks(range(len(jobs)), [j.name for j in jobs])
    ax.set_ylabel("speed / the better Python floor (log)")
    ax.set_title("Each job against the better Python floor (passthrough, nullfs); higher is better")
    ax.legend(fontsize=8, ncol=4)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench", __doc__, "bench.png", "small sizes and short runtimes (smoke run)", SECTION)
    h.add_only(FILESYSTEMS)
    h.parser.add_argument("--jobs", type=comma_choices(tuple(JOB)), default=list(JOB), metavar="JOBS",
                          help=f"comma-separated jobs to run (default: all): {','.join(JOB)}")
    h.parser.add_argument("--tux3-options", metavar="OPTS", help="mount options for tux3fuse (-o OPTS)")
    args = h.parse(argv)
    if not shutil.which("fio"):
        print("bench: fio not found (apt-get install fio, or 'make deps')", file=sys.stderr)
        return 2
    params = QUICK if args.quick else FULL

    results: dict[str, FsResult] = {}
    with h.workdir("tux3bench-") as workdir:
        log(f"bench: work directory {workdir}{' (quick)' if args.quick else ''}; load average {h.loads[0]}")
        with tempfile.TemporaryDirectory(prefix="fio-json-") as scratch:
            for name in args.only:
                fs = make_fs(name, workdir, params.image_size, args.tux3_options)
                results[name] = bench_fs(fs, params, Path(scratch), [j for j in JOBS if j.name in args.jobs])
    if h.interrupted:
        return 130

    for title, header, rows, last_left in tables(results):
        print(f"\n{title}:")
        h.table(header, rows, last_left=last_left)
    print()
    for line in goal_lines(results):
        print(line)
    if args.quick:
        print("(quick run: sizes and runtimes are reduced, the goals are indicative only)")
    for n in notes(results):
        print(f"note: {n}")
    print(h.load_line())
    chart = h.chart(lambda plt: draw_chart(plt, results))
    md = h.outdir / "PERFORMANCE.md"
    write_report(md, section_text(results, params, h, chart, args.tux3_options, args.quick))
    log(f"\nwrote {md}" + (f" and {h.outdir / chart}" if chart else ""))
    measured = any(r.measures for r in results.values())
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
