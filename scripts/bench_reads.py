#!/usr/bin/env python3
"""Reads through a tux3fuse mount: where the daemon should read uncached blocks (on its event loop or in worker
threads), and what its readahead buys, measured in one run.

Configurations, each a fresh tux3fuse mount (`tux3fuse -f`), the configurations alternating in rounds:

  image            a 1 GiB image file on local disk, default options: a read of uncached blocks runs on the event
                   loop while the device is quick (-o read_inline_max, 0.5 ms) and, for more than one block, no
                   request waits; else in worker threads; no readahead in the daemon (the host's kernel reads the
                   image file ahead)
  image-threads    the same with -o read_inline_max=0: every read of uncached blocks in a worker thread
  image-readahead  the same with -o readahead=2M: the daemon reads ahead as well
  nbd              the image served by nbdkit (file plugin, 4 threads, Unix socket), default options: its reads
                   miss every cache of this host's, so sequential streams are read ahead (2 MiB by default)
  nbd-noreadahead  the same with -o readahead=0

Jobs (fio --ioengine=psync), each after a remount and drop_caches (cold):

  randread    4 KiB random reads of a 128 MiB file, one job, time based                     IOPS
  randread4   the same with four jobs at once                                               IOPS
  seqread     1 MiB sequential reads of a 256 MiB file                                      MB/s
  afterwrite  1 MiB sequential reads of a 256 MiB file right after writing it, no remount   MB/s
              (drop_caches only, so the daemon's commits of it compete with the read)

Beside each rate: the daemon's CPU per operation (utime + stime of all its threads), and from `tux3 stat --json`
how the blocks were read: on the loop (read_inline_blocks), from the host's page cache on the loop
(read_host_cached), by readahead (readahead_blocks), and in worker threads (the rest of blocks_read). Before the
mounts the script times one round trip through a trio worker thread (trio.to_thread.run_sync of a cached 4 KiB
pread) against the pread alone: the cost a worker thread adds to every read it carries.

Output: tables on stdout and the section "## Reads: on the event loop or in worker threads" of OUTDIR/PERFORMANCE.md
(docs/, or bench-out/ with --quick).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_device import Nbdkit, Target
from benchfs import dispose, drop_caches
from benchkit import BenchError, Harness, cpu_seconds, generated_line, log, md_table, run

SECTION = "## Reads: on the event loop or in worker threads"
CONFIGS = ("image", "image-threads", "image-readahead", "nbd", "nbd-noreadahead")
OPTIONS = {"image": "", "image-threads": "read_inline_max=0", "image-readahead": "readahead=2M", "nbd": "",
           "nbd-noreadahead": "readahead=0"}
JOBS = ("randread", "randread4", "seqread", "afterwrite")
UNITS = {"randread": "IOPS", "randread4": "IOPS", "seqread": "MB/s", "afterwrite": "MB/s"}
IMAGE_MIB = 1024
HOW = ("read_inline_blocks", "read_host_cached", "readahead_blocks")


@dataclass
class Cell:
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    how: dict[str, float] = field(default_factory=dict)  # blocks by how they were read (the last run)


def hop_cost(n: int = 3000) -> tuple[float, float, float, float]:
    """(pread us wall, cpu; through a worker thread us wall, cpu) of a cached 4 KiB pread, in this process."""
    import trio

    path = Path(os.environ.get("TMPDIR", "/var/tmp")) / f"bench_reads.{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, os.urandom(1 << 20), 0)

        async def main() -> tuple[float, float, float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(n):
                os.pread(fd, 4096, (i % 256) * 4096)
            t1, c1 = time.perf_counter(), time.process_time()
            for i in range(n):
                await trio.to_thread.run_sync(os.pread, fd, 4096, (i % 256) * 4096)
            t2, c2 = time.perf_counter(), time.process_time()
            return ((t1 - t0) / n * 1e6, (c1 - c0) / n * 1e6, (t2 - t1) / n * 1e6, (c2 - c1) / n * 1e6)

        return trio.run(main)
    finally:
        os.close(fd)
        path.unlink()


def fio(mnt: Path, *args: str, runtime: int = 0) -> tuple[float, int]:
    """(rate, operations) of a fio read job: IOPS for 4 KiB jobs, MB/s for 1 MiB ones."""
    proc = run(["fio", f"--directory={mnt}", "--ioengine=psync", "--group_reporting", "--output-format=json", *args],
               timeout=runtime + 300)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
    ops = int(job["total_ios"])
    return (job["iops"] if "--bs=4k" in args else job["bw"] / 1024), ops


def stats(fs: Target) -> dict[str, float]:
    return fs.stats()


def measure(fs: Target, job: str, runtime: int, rand_mib: int, seq_mib: int) -> tuple[float, float, dict]:
    """One job on the mounted FS: (rate, daemon CPU us per operation, blocks by how they were read)."""
    mnt = fs.mnt
    if job == "afterwrite":
        run(["fio", f"--directory={mnt}", "--name=w", "--filename=after.dat", "--rw=write", "--bs=1M",
             f"--size={seq_mib}M", "--ioengine=psync"], timeout=600)
        os.sync()
        drop_caches()
        (mnt / "after.dat").stat()
    else:
        fs.remount()
    pid = fs.proc.pid if fs.proc is not None else 0
    before, cpu0 = stats(fs), cpu_seconds(pid)
    rand = [f"--size={rand_mib}M", "--filename=rand.dat", "--rw=randread", "--bs=4k", f"--runtime={runtime}",
            "--time_based"]
    if job == "randread":
        rate, ops = fio(mnt, "--name=r", *rand, runtime=runtime)
    elif job == "randread4":
        rate, ops = fio(mnt, "--name=r", *rand, "--numjobs=4", runtime=runtime)
    else:
        name = "seq.dat" if job == "seqread" else "after.dat"
        rate, ops = fio(mnt, "--name=s", f"--filename={name}", "--rw=read", "--bs=1M", f"--size={seq_mib}M")
    cpu1, after = cpu_seconds(pid), stats(fs)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in (*HOW, "blocks_read")}
    d["threads"] = max(0.0, d.pop("blocks_read") - sum(d[k] for k in HOW))
    if job == "afterwrite":
        (mnt / "after.dat").unlink()
    return rate, (cpu1 - cpu0) / max(ops, 1) * 1e6, d


def prepare(fs: Target, rand_mib: int, seq_mib: int) -> None:
    for name, mib in (("rand.dat", rand_mib), ("seq.dat", seq_mib)):
        run(["fio", f"--directory={fs.mnt}", "--name=w", f"--filename={name}", "--rw=write", "--bs=1M",
             f"--size={mib}M", "--ioengine=psync", "--end_fsync=1"], timeout=600)


def run_config(workdir: Path, config: str, rnd: int, runtime: int, rand_mib: int, seq_mib: int,
               cells: dict[tuple[str, str], Cell]) -> None:
    image = workdir / f"{config}-{rnd}.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_MIB << 20)
    server = None
    target = str(image)
    if config.startswith("nbd"):
        server = Nbdkit(workdir, f"{config}-{rnd}", image, 0)
        server.argv[server.argv.index("--threads") + 1] = "4"
        server.start()
        target = server.uri
    fs = Target(workdir, f"{config}-{rnd}", OPTIONS[config], target)
    try:
        fs.setup()
        prepare(fs, rand_mib, seq_mib)
        for job in JOBS:
            rate, cpu, how = measure(fs, job, runtime, rand_mib, seq_mib)
            cell = cells.setdefault((config, job), Cell())
            cell.rates.append(rate)
            cell.cpu_us.append(cpu)
            cell.how = how
            log(f"  {config} {job}: {rate:,.0f} {UNITS[job]}, {cpu:,.0f} us CPU per op")
    finally:
        error = dispose(fs)
        if server is not None:
            server.stop()
        image.unlink(missing_ok=True)
        if error is not None:
            raise error


def rows(cells: dict[tuple[str, str], Cell], configs: Sequence[str]) -> list[list[str]]:
    out = []
    for job in JOBS:
        for config in configs:
            cell = cells.get((config, job))
            if cell is None:
                continue
            rates = cell.rates
            spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
            how = cell.how
            total = sum(how.values()) or 1
            shares = ", ".join(f"{k.replace('_blocks', '').replace('read_', '')} {100 * v / total:.0f}%"
                               for k, v in how.items() if v)
            out.append([job, config, f"{statistics.median(rates):,.0f}{spread} {UNITS[job]}",
                        f"{statistics.median(cell.cpu_us):,.0f}", shares or "-"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench_reads", __doc__, "bench_reads.png", "short runs, one round, output in bench-out/", SECTION)
    h.add_only(CONFIGS, "configurations")
    h.parser.add_argument("--rounds", type=int, default=None, help="rounds of all configurations (default 2; "
                          "--quick 1)")
    args = h.parse(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    runtime, rand_mib, seq_mib = (3, 32, 64) if args.quick else (10, 128, 256)
    cells: dict[tuple[str, str], Cell] = {}
    hop = hop_cost()
    log(f"bench_reads: cached 4 KiB pread {hop[0]:.1f} us ({hop[1]:.1f} us CPU); through a trio worker thread "
        f"{hop[2]:.1f} us ({hop[3]:.1f} us CPU)")
    with h.workdir("tux3reads-") as workdir:
        for rnd in range(rounds):
            for config in args.only:
                log(f"bench_reads: round {rnd + 1}, {config}")
                try:
                    run_config(workdir, config, rnd, runtime, rand_mib, seq_mib, cells)
                except BenchError as e:
                    log(f"  {config} failed: {e}")
    if h.interrupted:
        return 130
    header = ["job", "configuration", "rate (median, min-max)", "daemon CPU us/op", "blocks read: how"]
    table = rows(cells, args.only)
    h.table(header, table)
    print(h.load_line())
    text = [SECTION, "", generated_line(h.command(), h.now(), h.loads), "",
            f"A cached 4 KiB `pread` takes {hop[0]:.1f} us ({hop[1]:.1f} us of CPU); through a trio worker thread "
            f"and back, {hop[2]:.1f} us ({hop[3]:.1f} us of CPU): the price a worker thread adds to each read it "
            "carries, on this machine. Configurations alternate in rounds "
            f"({rounds}); each job starts cold (remount and drop_caches; `afterwrite`: drop_caches only, right "
            "after the file was written). *blocks read: how*: on the event loop (`inline`), from the host's page "
            "cache on the loop (`host_cached`), by readahead (`readahead`), in worker threads (`threads`), as shares "
            "of the blocks the last run read.", "",
            *md_table(header, table), ""]
    h.write("\n".join(text), None)
    return 0 if cells else 1


if __name__ == "__main__":
    sys.exit(main())
