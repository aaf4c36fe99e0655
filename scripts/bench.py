#!/usr/bin/env python3
"""Benchmark tux3fuse against fuse2fs (ext4 through FUSE) with fio, beside the floor of any pyfuse3 filesystem.

Both filesystems get a sparse image of the same size in a temporary directory
on local disk and run the same jobs, one filesystem after the other:

  seqwrite    1 MiB sequential writes, end_fsync               MB/s
  seqread     1 MiB sequential reads of that file, cold cache   MB/s
  randwrite   4 KiB random writes over a file, time based       IOPS
  randread    4 KiB random reads of that file, cold cache       IOPS
  fsync       4 KiB write + fsync, time based                   ops/s
  create      create + write 4 KiB + close, many small files    files/s

"Cold cache" means the filesystem is unmounted and mounted again before the job
(and, when running as root, /proc/sys/vm/drop_caches is written).

Two more columns measure the pyfuse3 floor: scripts/nullfs.py, an in-memory
pyfuse3 filesystem with tux3fuse's FUSE options whose fsync returns at once
("pyfuse3-null": seqwrite, randwrite, fsync and create; it keeps nothing across
the remount the reads need), and the same with one 4 KiB write + fdatasync of a
scratch file per fsync ("pyfuse3-null+fdatasync": fsync only). Beside each
floor line of tux3fuse (seqwrite, fsync, create) the script prints the pyfuse3-null rate
and what share of tux3fuse's time per operation, and of the time per operation
the floor allows, a filesystem doing nothing already takes.

--only takes a comma-separated list of tux3fuse, fuse2fs, null, null-fdatasync.
Results are printed as a table and written to OUTDIR/PERFORMANCE.md (the whole
file is rewritten) and OUTDIR/bench.png (the chart needs matplotlib). OUTDIR is
docs/, or bench-out/ with --quick.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchfs import Fs, dispose, make_fs
from benchkit import BenchError, Harness, log, md_table, package_version, run, tool_version
from benchkit import machine_info as base_machine_info

FILESYSTEMS = ("tux3fuse", "fuse2fs", "null", "null-fdatasync")
LABELS = {"tux3fuse": "tux3fuse", "fuse2fs": "fuse2fs", "null": "pyfuse3-null",
          "null-fdatasync": "pyfuse3-null+fdatasync"}
COLORS = {"tux3fuse": "#1f77b4", "fuse2fs": "#ff7f0e", "null": "#7f7f7f", "null-fdatasync": "#bcbd22"}
# The jobs of the pyfuse3 floors (tux3fuse and fuse2fs run them all): no reads, nullfs forgets all at unmount.
JOBS_OF = {"null": ("seqwrite", "randwrite", "fsync", "create"), "null-fdatasync": ("fsync",)}

# Floors from the spec (tux3fuse only): job -> minimum value.
FLOORS: dict[str, float] = {"seqwrite": 300.0, "fsync": 2000.0, "create": 3000.0}


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


JOBS: tuple[Job, ...] = (
    Job("seqwrite", "MB/s", "sequential write, 1 MiB blocks, end_fsync"),
    Job("seqread", "MB/s", "sequential read, 1 MiB blocks, after remount"),
    Job("randwrite", "IOPS", "random write, 4 KiB blocks, time based"),
    Job("randread", "IOPS", "random read, 4 KiB blocks, after remount, time based"),
    Job("fsync", "ops/s", "4 KiB sequential write + fsync after each write, time based"),
    Job("create", "files/s", "create + write 4 KiB + close, one directory"),
)


@dataclass
class FsResult:
    values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None


def fio_args(job: str, p: Params) -> list[str]:
    """fio arguments for JOB, without --directory and output options."""
    common = ["--ioengine=psync", "--numjobs=1", "--group_reporting"]
    seq = f"--size={p.seq_size_mib}M"
    rand = f"--size={p.rand_size_mib}M"
    table = {
        "seqwrite": ["--name=seqwrite", "--filename=seq.dat", "--rw=write", "--bs=1M", seq, "--end_fsync=1"],
        "seqread": ["--name=seqread", "--filename=seq.dat", "--rw=read", "--bs=1M", seq],
        "randwrite": ["--name=randwrite", "--filename=rand.dat", "--rw=randwrite", "--bs=4k", rand,
                      f"--runtime={p.rand_runtime}", "--time_based"],
        "randread": ["--name=randread", "--filename=rand.dat", "--rw=randread", "--bs=4k", rand,
                     f"--runtime={p.rand_runtime}", "--time_based"],
        "fsync": ["--name=fsync", "--filename=fsync.dat", "--rw=write", "--bs=4k", "--size=64M", "--fsync=1",
                  f"--runtime={p.fsync_runtime}", "--time_based"],
    }
    return table[job] + common


def run_fio(fs: Fs, job: str, params: Params, outdir: Path) -> float:
    out = outdir / f"fio-{fs.name}-{job}.json"
    # --directory must come before --filename: fio ignores it for files named earlier on the command line.
    args = ["fio", f"--directory={fs.mnt}", *fio_args(job, params), "--output-format=json", f"--output={out}"]
    run(args, timeout=900, cwd=outdir)
    datafile = next(a.split("=", 1)[1] for a in args if a.startswith("--filename="))
    if not (fs.mnt / datafile).is_file():
        raise BenchError(f"fio did not create {datafile} in {fs.mnt}")
    data = json.loads(out.read_text())
    j = data["jobs"][0]
    if j.get("error"):
        raise BenchError(f"fio job {job} reported error {j['error']}")
    if job in ("seqwrite", "seqread"):
        side = "write" if job == "seqwrite" else "read"
        return j[side]["bw_bytes"] / 1e6
    if job in ("randwrite", "fsync"):
        return float(j["write"]["iops"])
    return float(j["read"]["iops"])


def run_create(fs: Fs, count: int) -> float:
    d = fs.mnt / "create"
    d.mkdir()
    payload = os.urandom(4096)
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(d / f"f{i:06d}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    return count / elapsed


def bench_fs(fs: Fs, params: Params, scratch: Path) -> FsResult:
    result = FsResult()
    why = fs.missing()
    if why:
        log(f"{fs.name}: skipped: {why}")
        result.skipped = why
        return result
    log(f"{fs.name}: " + (f"mkfs ({params.image_size}) and mount" if fs.persistent else "mount (in memory)"))
    try:
        fs.setup()
        for job in JOBS:
            if job.name not in JOBS_OF.get(fs.name, job.name):
                continue
            if job.name in ("seqread", "randread"):
                fs.remount()
            fs.mounted_check()
            start = time.monotonic()
            try:
                if job.name == "create":
                    value = run_create(fs, params.create_files)
                else:
                    value = run_fio(fs, job.name, params, scratch)
            except (BenchError, OSError, KeyError, ValueError) as e:
                result.errors[job.name] = str(e).splitlines()[0] if str(e) else type(e).__name__
                log(f"  {job.name:10s} FAILED: {e}")
                continue
            result.values[job.name] = value
            log(f"  {job.name:10s} {value:12.1f} {job.unit:8s} ({time.monotonic() - start:.1f}s)")
    except BenchError as e:
        result.skipped = str(e).splitlines()[0]
        log(f"{fs.name}: aborted: {e}")
    finally:
        error = dispose(fs)
        if error is not None:
            log(f"{fs.name}: unmount: {error}")
            result.errors.setdefault("umount", str(error).splitlines()[0])
    return result


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


TABLE_HEADER = ["job", "tux3fuse", "fuse2fs", "ratio", LABELS["null"], LABELS["null-fdatasync"]]


def table_rows(results: dict[str, FsResult]) -> list[list[str]]:
    rows = []
    for job in JOBS:
        values = {name: results.get(name, FsResult()).values.get(job.name) for name in FILESYSTEMS}
        cells = {}
        for name, v in values.items():
            err = results.get(name, FsResult()).errors.get(job.name)
            cells[name] = "error" if err and v is None else fmt(v)
        t, f = values["tux3fuse"], values["fuse2fs"]
        ratio = f"{t / f:.2f}" if t is not None and f else "-"
        rows.append([f"{job.name} ({job.unit})", cells["tux3fuse"], cells["fuse2fs"], ratio, cells["null"],
                     cells["null-fdatasync"]])
    return rows


def print_table(rows: list[list[str]]) -> None:
    Harness.table(TABLE_HEADER, rows)
    print("ratio = tux3fuse / fuse2fs; higher is better for every job")


def floor_lines(results: dict[str, FsResult], quick: bool) -> list[str]:
    lines = []
    t = results.get("tux3fuse")
    if t is None or t.skipped and not t.values:
        return ["floors: tux3fuse not measured"]
    units = {j.name: j.unit for j in JOBS}
    for job, floor in FLOORS.items():
        v = t.values.get(job)
        verdict = "FAIL" if v is None or v < floor else "PASS"
        got = "no result" if v is None else f"{fmt(v)} {units[job]}"
        lines.append(f"{verdict}: tux3fuse {job} {got} (floor {floor:,.0f} {units[job]})"
                     + pyfuse3_floor_text(results, job, floor))
    if quick:
        lines.append("(quick run: sizes and runtimes are reduced, floors are indicative only)")
    return lines


PER = {"MB/s": "MB", "ops/s": "op", "files/s": "file"}


def pyfuse3_floor_text(results: dict[str, FsResult], job: str, floor: float) -> str:
    """pyfuse3-null's rate for JOB, and its time per operation against tux3fuse's and against the time per
    operation that FLOOR allows: '' if pyfuse3-null did not run JOB."""
    n = results.get("null", FsResult()).values.get(job)
    if not n:
        return ""
    unit = next(j.unit for j in JOBS if j.name == job)
    per = PER[unit]
    t = results.get("tux3fuse", FsResult()).values.get(job)
    n_us, floor_us = 1e6 / n, 1e6 / floor
    text = f"; pyfuse3 floor: {fmt(n)} {unit} (a filesystem doing nothing takes {n_us:,.0f} us per {per}"
    if t:
        text += f": {n_us * t / 1e6:.0%} of tux3fuse's {1e6 / t:,.0f} us"
    text += f", {n_us / floor_us:.0%} of the {floor_us:,.0f} us that {floor:,.0f} {unit} allows)"
    d = results.get("null-fdatasync", FsResult()).values.get(job)
    if d:
        text += f"; with one fdatasync per fsync: {fmt(d)} {unit}"
    return text


def machine_info() -> dict[str, str]:
    info = base_machine_info()
    info["load average (1/5/15 min, at the end)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for key, flag in (("fio", "--version"), ("fuse2fs", "-V")):
        version = tool_version(key, flag)
        if version:
            info[key] = version
    if package_version():
        info["tux3fuse"] = package_version()
    return info


def markdown(results: dict[str, FsResult], rows: list[list[str]], params: Params, quick: bool,
             tux3_options: str | None, workdir: Path, chart: str | None) -> str:
    info = machine_info()
    now = Harness.now()
    out = ["# Performance", ""]
    out.append(f"Generated by `scripts/bench.py{' --quick' if quick else ''}` (`make bench`) on {now}.")
    out.append("")
    out.append("## Machine")
    out.append("")
    for k, v in info.items():
        out.append(f"- {k}: {v}")
    out.append(f"- images: {params.image_size} sparse files in {workdir} (local disk)")
    out.append("")
    out.append("## Results")
    out.append("")
    out += md_table(TABLE_HEADER, rows)
    out.append("")
    out.append("ratio = tux3fuse / fuse2fs; higher is better for every job. The pyfuse3-null columns are the floor "
               "of any pyfuse3 filesystem (see Setup).")
    out.append("")
    notes = []
    for name in FILESYSTEMS:
        r = results.get(name)
        if r is None:
            continue
        if r.skipped:
            notes.append(f"- {LABELS[name]}: {r.skipped}")
        for job, err in r.errors.items():
            notes.append(f"- {LABELS[name]} {job} failed: `{err}`")
    if notes:
        out += [*notes, ""]
    out.append("Floors (tux3fuse):")
    out.append("")
    for line in floor_lines(results, quick):
        out.append(f"- {line}")
    out.append("")
    if chart:
        out.append(f"![benchmark chart]({chart})")
        out.append("")
    out.append("## Setup")
    out.append("")
    out.append(f"- tux3fuse: `mkfs.tux3 -s {params.image_size} IMAGE`; "
               f"`tux3fuse {'-o ' + tux3_options + ' ' if tux3_options else ''}IMAGE MNT`; `tux3 umount MNT`")
    out.append(f"- fuse2fs: `truncate -s {params.image_size} IMAGE; mkfs.ext4 -F -q IMAGE`; "
               "`fuse2fs IMAGE MNT -o fakeroot`; `fusermount -u MNT`")
    out.append(f"- pyfuse3-null: `python scripts/nullfs.py MNT`; `fusermount -u MNT`. An in-memory pyfuse3 + trio "
               "filesystem with tux3fuse's FUSE options (default_permissions, writeback cache, 300 s timeouts, up "
               "to 256 requests at once) whose fsync returns at once: what the same requests cost any pyfuse3 "
               f"filesystem. Jobs: {', '.join(JOBS_OF['null'])} (it keeps nothing across a remount).")
    out.append("- pyfuse3-null+fdatasync: `python scripts/nullfs.py --fdatasync SCRATCH MNT`: the same, but every "
               "fsync writes 4 KiB of a scratch file beside the images and fdatasyncs it (one device flush per "
               f"fsync). Jobs: {', '.join(JOBS_OF['null-fdatasync'])}.")
    out.append("- seqread and randread run right after an unmount + mount (and drop_caches when root), "
               "so they start with a cold page cache.")
    out.append("")
    out.append("## Jobs")
    out.append("")
    for job in JOBS:
        out.append(f"- **{job.name}** ({job.unit}): {job.description}")
        if job.name == "create":
            out.append(f"  - Python loop: `os.open(O_CREAT|O_EXCL)`, write 4 KiB, close; "
                       f"{params.create_files:,} files; files/s from wall time")
        else:
            args = " ".join(fio_args(job.name, params))
            out.append(f"  - `fio --directory=MNT {args} --output-format=json`")
    out.append("")
    return "\n".join(out)


def chart_label(name: str) -> str:
    return LABELS[name].replace("-null", "\nnull").replace("+", "\n+")


def draw_chart(plt, results: dict[str, FsResult]):
    """Bar chart, one panel per job (None: nothing measured)."""
    names = [n for n in FILESYSTEMS if n in results and results[n].values]
    if not names:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5))
    for ax, job in zip(axes.flat, JOBS, strict=True):
        shown = [n for n in names if n in ("tux3fuse", "fuse2fs") or job.name in results[n].values]
        vals = [results[n].values.get(job.name, 0.0) for n in shown]
        bars = ax.bar([chart_label(n) for n in shown], vals, color=[COLORS[n] for n in shown])
        ax.set_title(job.name)
        ax.set_ylabel(job.unit)
        ax.bar_label(bars, labels=[fmt(v) for v in vals], fontsize=8)
        ax.margins(y=0.15)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("tux3fuse vs fuse2fs, and the pyfuse3 floor (higher is better)")
    return fig




def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench", __doc__, "bench.png", "small sizes and short runtimes (smoke run)")
    h.add_only(FILESYSTEMS)
    h.parser.add_argument("--tux3-options", metavar="OPTS", help="mount options for tux3fuse (-o OPTS)")
    args = h.parse(argv)
    if not shutil.which("fio"):
        print("bench: fio not found (apt-get install fio, or 'make deps')", file=sys.stderr)
        return 2
    params = QUICK if args.quick else FULL

    results: dict[str, FsResult] = {}
    with h.workdir("tux3bench-") as workdir:
        log(f"bench: work directory {workdir}{' (quick)' if args.quick else ''}")
        with tempfile.TemporaryDirectory(prefix="fio-json-") as scratch:
            for name in args.only:
                fs = make_fs(name, workdir, params.image_size, args.tux3_options)
                results[name] = bench_fs(fs, params, Path(scratch))
    if h.interrupted:
        return 130

    rows = table_rows(results)
    print_table(rows)
    print()
    for line in floor_lines(results, args.quick) if "tux3fuse" in results else []:
        print(line)
    chart = h.chart(lambda plt: draw_chart(plt, results))
    h.write(markdown(results, rows, params, args.quick, args.tux3_options, h.parent, chart), chart)
    measured = any(r.values for r in results.values())
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
