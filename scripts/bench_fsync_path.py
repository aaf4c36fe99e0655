#!/usr/bin/env python3
"""Where the time of an fsync goes on tux3fuse, stage by stage, beside what a flush alone and the pyfuse3 floor
cost on the same disk.

Two workloads, each on a fresh tux3fuse mount of a 2 GiB sparse image on local disk:

  fio      one task: 4 KiB write + fsync, time based (fio --rw=write --bs=4k --fsync=1 --ioengine=psync)
  100x10   Tux3's fsync test: 100 tasks (threads) each append 1 KiB to a file of their own and fsync it, 10 times

For each, the script reads `tux3 stat --json MNT` before and after and the daemon's CPU time (utime + stime of all
its threads, /proc/PID/stat), and divides the differences by the number of fsyncs:

  client fsync latency  what the caller saw: fio's mean sync latency (fio), the tasks' mean fsync time (100x10)
  prepare               stage 1 of the commits, on the event loop (commit_prepare_seconds)
  data write            the delta's blocks written, hole filling of the sparse image included (commit_data_seconds)
  superblock            the superblock written (commit_super_seconds)
  flush                 the device flush (commit_flush_seconds)
  thread hop            stage 2's time not in its system calls: handing the I/O to a worker thread and back
  complete              stage 3, on the event loop (commit_complete_seconds)
  outside the commit    the client latency less the commit's (commit_seconds): the FUSE round trips of the write,
                        setattr and fsync requests, the kernel's writeback of the page, and the wait for a commit
                        already in flight
  daemon CPU            all threads of the daemon

Two references, measured in the same run:
  flush alone   4 KiB pwrite + fdatasync of a file in the work directory, overwriting (the disk's own cost of one
                durable write: the least any fsync that writes data can cost here)
  pyfuse3-null  scripts/nullfs.py (tux3fuse's FUSE options, fsync returns at once): the same workload's latency,
                what the requests alone cost any pyfuse3 filesystem
  embedded      the fio workload's steps through the embedded API, without FUSE or trio: 4 KiB append, setattr
                (the kernel's mtime update), transition, prepare, write + flush, complete, each timed

Output: a table on stdout and a section "## fsync, where the time goes" in OUTDIR/PERFORMANCE.md (OUTDIR is docs/,
or bench-out/ with --quick).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchfs import Fs, NullFs, Tux3Fs, dispose
from benchkit import BenchError, Harness, generated_line, log, md_table, run

SECTION = "## fsync, where the time goes"
STAGES = (("prepare", "commit_prepare_seconds"), ("data write", "commit_data_seconds"),
          ("superblock", "commit_super_seconds"), ("flush", "commit_flush_seconds"))


@dataclass
class Result:
    fsyncs: int = 0
    latency_us: float = 0.0  # mean client fsync latency
    write_us: float = 0.0  # mean client write latency
    counters: dict[str, float] = field(default_factory=dict)  # per fsync
    cpu_us: float = 0.0  # daemon CPU per fsync
    requests: dict[str, float] = field(default_factory=dict)  # FUSE requests per fsync, by operation


def daemon_cpu(pid: int) -> float:
    """Seconds of CPU (user + system, all threads) the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio_fsync(mnt: Path, runtime: int) -> tuple[int, float, float]:
    """(fsyncs, mean fsync latency us, mean write latency us) of the fio job."""
    proc = run(["fio", f"--directory={mnt}", "--name=fsync", "--filename=fsync.dat", "--rw=write", "--bs=4k",
                "--size=64M", "--fsync=1", f"--runtime={runtime}", "--time_based", "--ioengine=psync",
                "--output-format=json"], timeout=runtime + 120)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    return (int(job["write"]["total_ios"]), job["sync"]["lat_ns"]["mean"] / 1e3,
            job["write"]["clat_ns"]["mean"] / 1e3)


def tasks_fsync(mnt: Path, tasks: int = 100, appends: int = 10) -> tuple[int, float, float]:
    """(fsyncs, mean fsync latency us, mean write latency us) of N tasks x appends (append 1 KiB + fsync)."""
    root = mnt / f"t{tasks}x{appends}"
    root.mkdir()
    fds = [os.open(root / f"f{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
           for i in range(tasks)]
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    payload = os.urandom(1024)
    barrier = threading.Barrier(tasks)
    syncs: list[float] = []
    writes: list[float] = []
    errors: list[str] = []

    def task(fd: int) -> None:
        try:
            barrier.wait(60)
            for _ in range(appends):
                t0 = time.perf_counter()
                os.write(fd, payload)
                t1 = time.perf_counter()
                os.fsync(fd)
                t2 = time.perf_counter()
                writes.append(t1 - t0)
                syncs.append(t2 - t1)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=task, args=(fd,), daemon=True) for fd in fds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for fd in fds:
        os.close(fd)
    if errors or any(t.is_alive() for t in threads):
        raise BenchError(f"{tasks}x{appends}: {errors[0] if errors else 'tasks hung'}")
    return len(syncs), statistics.fmean(syncs) * 1e6, statistics.fmean(writes) * 1e6


WORKLOADS = {"fio": lambda mnt, rt: fio_fsync(mnt, rt), "100x10": lambda mnt, rt: tasks_fsync(mnt)}


def measure(fs: Fs, workload: str, runtime: int) -> Result:
    """One workload on a fresh mount of FS."""
    fs.setup()
    try:
        pid = fs.proc.pid if fs.proc is not None else None
        before = fs.stats() or {}
        cpu0 = daemon_cpu(pid) if pid else 0.0
        n, lat, wlat = WORKLOADS[workload](fs.mnt, runtime)
        cpu1 = daemon_cpu(pid) if pid else 0.0
        after = fs.stats() or {}
    finally:
        fs.teardown()
    per = {k: (after[k] - before.get(k, 0.0)) / n for k in after}
    return Result(n, lat, wlat, per, (cpu1 - cpu0) / n * 1e6,
                  {k[5:]: v for k, v in per.items() if k.startswith("fuse.") and v > 0.004})


def flush_alone(workdir: Path, count: int) -> float:
    """Mean microseconds of a 4 KiB pwrite + fdatasync, overwriting a file written and synced before."""
    path = workdir / "flush.dat"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        block = os.urandom(4096)
        os.pwrite(fd, block, 0)
        os.fsync(fd)
        t0 = time.perf_counter()
        for _ in range(count):
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
        return (time.perf_counter() - t0) / count * 1e6
    finally:
        os.close(fd)
        path.unlink()


def embedded(workdir: Path, count: int) -> dict[str, float]:
    """The fio workload's steps without FUSE or trio, through the embedded API in this process: microseconds per
    4 KiB append + setattr (the kernel's mtime) + commit, by step."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mkfs import mkfs
    from tux3fuse.fs import Volume

    image = workdir / "embedded.img"
    mkfs(str(image), size=1 << 30)
    vol = Volume(str(image))
    try:
        ino = vol.create(1, b"f", 0o644).ino
        vol.flusher.commit_now()
        payload = os.urandom(4096)
        steps = ("write", "setattr", "transition", "prepare", "write + flush", "complete")
        spent = dict.fromkeys(steps, 0.0)
        clock = time.perf_counter
        for i in range(count + count // 10):
            t0 = clock()
            vol.write(ino, vol.getattr(ino).size, payload)
            t1 = clock()
            vol.setattr(ino, mtime_ns=time.time_ns())
            t2 = clock()
            job = vol.flusher.start_commit(prepare=False)
            t3 = clock()
            vol.runner.prepare(job)
            t4 = clock()
            job.write()
            t5 = clock()
            job.complete()
            t6 = clock()
            if i >= count // 10:  # the first tenth warms up
                for step, a, b in zip(steps, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6), strict=True):
                    spent[step] += b - a
        return {step: t / count * 1e6 for step, t in spent.items()}
    finally:
        vol.unmount()
        image.unlink()


def rows(results: dict[str, Result], flush_us: float, floors: dict[str, Result]) -> list[list[str]]:
    out: list[list[str]] = []

    def line(label: str, values: list[float | str]) -> None:
        out.append([label, *(v if isinstance(v, str) else f"{v:,.0f}" for v in values)])

    names = list(results)
    line("client fsync latency", [results[n].latency_us for n in names])
    for label, key in STAGES:
        line(f"  {label}", [results[n].counters.get(key, 0) * 1e6 for n in names])
    for n in names:
        c = results[n].counters
        c["hop"] = max(0.0, c.get("commit_write_seconds", 0) - sum(c.get(k, 0) for _, k in STAGES[1:]))
    line("  thread hop", [results[n].counters["hop"] * 1e6 for n in names])
    line("  complete", [results[n].counters.get("commit_complete_seconds", 0) * 1e6 for n in names])
    line("  outside the commit", [max(0.0, results[n].latency_us - results[n].counters.get("commit_seconds", 0) * 1e6)
                                  for n in names])
    line("daemon CPU", [results[n].cpu_us for n in names])
    line("client write latency", [results[n].write_us for n in names])
    out.append(["fsyncs per commit", *(f"{1 / results[n].counters['commits']:.1f}"
                                       if results[n].counters.get("commits") else "-" for n in names)])
    out.append(["flushes per fsync", *(f"{results[n].counters.get('flushes', 0):.2f}" for n in names)])
    out.append(["hole fill per commit (KiB)", *(
        f"{results[n].counters.get('hole_fill_bytes', 0) / results[n].counters['commits'] / 1024:.1f}"
        if results[n].counters.get("commits") else "-" for n in names)])
    out.append(["requests per fsync", *(", ".join(f"{op} {v:.2f}" for op, v in sorted(results[n].requests.items()))
                                        for n in names)])
    line("flush alone (4 KiB pwrite + fdatasync)", [flush_us for _ in names])
    line("pyfuse3-null fsync latency", [floors[n].latency_us if n in floors else "-" for n in names])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench_fsync_path", __doc__, "bench_fsync_path.png", "a short fio run, output in bench-out/",
                SECTION)
    args = h.parse(argv)
    runtime = 3 if args.quick else 10
    results: dict[str, Result] = {}
    floors: dict[str, Result] = {}
    with h.workdir("tux3fsyncpath-") as workdir:
        flush_us = flush_alone(workdir, 200 if args.quick else 1000)
        steps = embedded(workdir, 200 if args.quick else 2000)
        for workload in WORKLOADS:
            for fs, into in ((Tux3Fs(workdir / f"t-{workload}", foreground=True), results),
                             (NullFs(workdir / f"n-{workload}"), floors)):
                fs.image.parent.mkdir()
                log(f"bench_fsync_path: {workload} on {fs.name}")
                try:
                    into[workload] = measure(fs, workload, runtime)
                finally:
                    dispose(fs)
    if h.interrupted:
        return 130
    header = ["per fsync (us)", *results]
    table = rows(results, flush_us, floors)
    h.table(header, table)
    steps_header = ["embedded, per 4 KiB append + fsync (us)", "time"]
    steps_rows = [[step, f"{us:,.1f}"] for step, us in steps.items()]
    steps_rows.append(["all", f"{sum(steps.values()):,.1f}"])
    h.table(steps_header, steps_rows)
    print(h.load_line())
    text = [SECTION, "", generated_line(h.command(), h.now(), h.loads), "",
            *md_table(header, table), "",
            "The fio workload's steps without FUSE and without the event loop, through the embedded API in one "
            "process (`Volume.write`, `Volume.setattr` as the kernel's mtime update, then the commit's stages "
            "called one after the other):", "",
            *md_table(steps_header, steps_rows), "",
            "Stages are the daemon's own counters (`tux3 stat --json`: commit_prepare_seconds, commit_data_seconds, "
            "commit_super_seconds, commit_flush_seconds, commit_write_seconds, commit_complete_seconds, "
            "commit_seconds) divided by the fsyncs; with several fsyncs per commit each fsync's share is smaller "
            "than one commit's stage. `outside the commit` is the client's latency less the commit's time: the "
            "FUSE requests of the write and the fsync, the kernel's writeback of the page, and waiting for a commit "
            "that was already in flight when the fsync came."]
    h.write("\n".join(text) + "\n", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
