#!/usr/bin/env python3
"""The device model against a slow NBD device: does ``-o device_latency=5ms`` give the figures that a device of
5 ms per write gives?

The device model (tux3fuse/device.py, ``DeviceModel``) makes every write batch and flush of the image complete as on
a device that serves requests one at a time, in order, each in latency + size / bandwidth (a flush: the latency).
The real slow device here is nbdkit's ``delay`` filter over an image file, served by one thread (``--threads 1``:
one request at a time, in order, as in the model). Four configurations, each mounted with ``tux3fuse -f -o
nowriteback,stable=fork,commit=0.01[,device_latency=5ms] TARGET MNT`` (a child of the script):

  model       a local image file with ``-o device_latency=5ms``
  nbd-delay   ``nbdkit --threads 1 --filter=delay file file=IMAGE wdelay=5ms`` on a Unix socket
  local       the local image file, no model
  nbd         ``nbdkit --threads 1 file file=IMAGE``: what the NBD path costs by itself

Every image is a fully written (not sparse) file of 192 MiB in the work directory (default /var/tmp, never tmpfs),
so that neither path writes zeros into holes; each run makes a fresh filesystem on it (``mkfs.tux3 -f``, on the
URI for NBD). Each run, after writing and committing its files: (a) *fsync*: --fsyncs times a 4 KiB append to a
file and an fsync of it (fsyncs/s over the whole loop, p50 and p99 of the fsync alone); (b) *rewrite*: 4 KiB
writes at random pages of a 64 MiB file for --seconds (writes/s, p99 of a write), the commits every 10 ms
carrying them. ``tux3 stat --json`` is read before and after each workload: commits, blocks_written and flushes
per fsync, and commits/s, blocks/s and flushes per commit of the rewrites. The configurations alternate in rounds
(model, nbd-delay, local, nbd, model, ...), --repeat rounds (3, --quick 1); the table gives the median of the runs
with their min-max.

Within the noise: two figures are within the noise when each median lies inside the other's min-max, or when they
differ by at most 20 % of the smaller. Where the two must differ: nbdkit's delay filter delays writes only, never
flushes, while the model charges each flush its latency; and on NBD the superblock goes out as a FUA write in place
of a write and a flush. So a flush-heavy workload differs by about one latency per flush the model charges: the
fsync figures are compared after taking the model's flushes per fsync x 5 ms off the model's fsync time, and the
measured difference per fsync is printed beside that expectation. The flush counts themselves and the rewrites'
commit figures (every commit ends in flushes) are shown, not judged. The PASS/FAIL lines judge: the rewrites'
writes/s and p99, blocks per fsync and commits per fsync (no flush enters them), and fsyncs/s, fsync p50 and p99
after that correction; a last line sums them up. They do not change the exit status.

Output: a table on stdout, OUTDIR/bench_device.png (the figures per configuration with their spread; needs
matplotlib) and a section "## The device model against a slow NBD device" in OUTDIR/PERFORMANCE.md (replaced if
present, the rest of the file is kept). OUTDIR is docs/, or bench-out/ with --quick. Exit status: 0 when every run
finished, 1 if one failed, 2 when FUSE, nbdkit or the installed tools are missing, 130 if interrupted. Mounts, the
nbdkit servers (stopped by their process id) and the work directory are always cleaned up, also on Ctrl-C, SIGTERM
and SIGHUP.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchfs import Tux3Fs, fuse_missing
from benchkit import VENV_BIN, BenchError, Harness, end_process, generated_line, log, md_table, run

SECTION = "## The device model against a slow NBD device"
CONFIGS = ("model", "nbd-delay", "local", "nbd")
LABELS = {"model": "model 5 ms", "nbd-delay": "nbdkit delay 5 ms", "local": "local image", "nbd": "nbdkit"}
COLORS = {"model": "#1f77b4", "nbd-delay": "#ff7f0e", "local": "#2ca02c", "nbd": "#7f7f7f"}
LATENCY_MS = 5
IMAGE_MIB = 192
PAGE = 4096
COMMIT = 0.01
NOISE = 0.20  # two medians closer than this share of the smaller are within the noise


@dataclass
class Settings:
    fsyncs: int
    seconds: float
    file_mib: int
    latency_ms: int = LATENCY_MS
    seed: int = 1


@dataclass
class Result:
    config: str
    round: int
    fsync_lat: list[float] = field(default_factory=list)  # seconds, each fsync alone
    fsync_elapsed: float = 0.0  # seconds, the whole append + fsync loop
    fsync_stats: dict[str, float] = field(default_factory=dict)  # counter deltas over the loop
    write_lat: list[float] = field(default_factory=list)  # seconds, each rewrite
    write_elapsed: float = 0.0
    write_stats: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def per(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class Figure:
    workload: str
    name: str
    value: Callable[[Result], float]
    digits: int
    kind: str  # "same": must tie; "flush": a time the model's flush charge enters; "shown": not judged


FIGURES = (
    Figure("fsync", "fsyncs/s", lambda r: per(len(r.fsync_lat), r.fsync_elapsed), 1, "flush"),
    Figure("fsync", "fsync p50 ms", lambda r: percentile(r.fsync_lat, 50) * 1e3, 2, "flush"),
    Figure("fsync", "fsync p99 ms", lambda r: percentile(r.fsync_lat, 99) * 1e3, 2, "flush"),
    Figure("fsync", "commits/fsync", lambda r: per(r.fsync_stats.get("commits", 0), len(r.fsync_lat)), 2, "same"),
    Figure("fsync", "blocks/fsync", lambda r: per(r.fsync_stats.get("blocks_written", 0), len(r.fsync_lat)), 2,
           "same"),
    Figure("fsync", "flushes/fsync", lambda r: per(r.fsync_stats.get("flushes", 0), len(r.fsync_lat)), 2, "shown"),
    Figure("rewrite", "writes/s", lambda r: per(len(r.write_lat), r.write_elapsed), 0, "same"),
    Figure("rewrite", "write p99 µs", lambda r: percentile(r.write_lat, 99) * 1e6, 0, "same"),
    Figure("rewrite", "commits/s", lambda r: per(r.write_stats.get("commits", 0), r.write_elapsed), 1, "shown"),
    Figure("rewrite", "blocks/s", lambda r: per(r.write_stats.get("blocks_written", 0), r.write_elapsed), 0,
           "shown"),
    Figure("rewrite", "flushes/commit", lambda r: per(r.write_stats.get("flushes", 0),
                                                      r.write_stats.get("commits", 0)), 2, "shown"),
)
FIG = {f.name: f for f in FIGURES}


# ---------------------------------------------------------------------------------------------------------------
# the devices


class Nbdkit:
    """``nbdkit --threads 1 [--filter=delay] file file=IMAGE [wdelay=Nms]`` on a Unix socket in WORKDIR, a child
    of the script, stopped by its process id (``stop``)."""

    def __init__(self, workdir: Path, name: str, image: Path, delay_ms: int) -> None:
        self.socket = workdir / f"{name}.sock"
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.logpath = workdir / f"{name}.nbdkit.log"
        self.argv = ["nbdkit", "--unix", str(self.socket), "--foreground", "--exit-with-parent", "--threads", "1",
                     *(["--filter=delay"] if delay_ms else []), "file", f"file={image}",
                     *([f"wdelay={delay_ms}ms"] if delay_ms else [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        with open(self.logpath, "ab") as out:
            self.proc = proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self._listening():  # the socket file exists a moment before the server listens on it
            if proc.poll() is not None:
                raise BenchError(f"nbdkit exited with status {proc.returncode}: "
                                 f"{self.logpath.read_text(errors='replace').strip()[-500:]}")
            if time.monotonic() > deadline:
                raise BenchError("nbdkit did not listen within 20 s")
            time.sleep(0.01)

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            end_process(proc, "nbdkit", timeout=10)


class Target(Tux3Fs):
    """tux3fuse -f on TARGET: the image file itself, or the URI of the nbdkit serving it."""

    def __init__(self, workdir: Path, config: str, options: str, target: str) -> None:
        super().__init__(workdir, options=options, foreground=True, label=config)
        self.target = target

    def mkfs(self) -> None:
        run([VENV_BIN / "mkfs.tux3", "-f", "-q", self.target], timeout=120)

    def _mount(self) -> None:
        self._spawn([str(VENV_BIN / "tux3fuse"), "-f", "-o", self.options or "", self.target, str(self.mnt)])


def make_image(path: Path, mib: int = IMAGE_MIB) -> None:
    """A fully written image file of MIB MiB of zeros (no holes), made durable."""
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def mount_options(config: str, latency_ms: int) -> str:
    return f"nowriteback,stable=fork,commit={COMMIT:g}" + (f",device_latency={latency_ms}ms" if config == "model"
                                                             else "")


# ---------------------------------------------------------------------------------------------------------------
# the workloads


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in ("commits", "blocks_written", "flushes") if k in after}


def prepare(mnt: Path, file_mib: int, seed: int) -> None:
    """The rewrite file, written whole and fsync'd, and the empty fsync file, committed."""
    rnd = random.Random(seed)
    fd = os.open(mnt / "rewrite.dat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(file_mib):
            os.pwrite(fd, rnd.randbytes(1 << 20), i << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(mnt / "fsync.dat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_loop(mnt: Path, n: int, result: Result) -> None:
    payload = os.urandom(PAGE)
    fd = os.open(mnt / "fsync.dat", os.O_WRONLY)
    try:
        start = time.perf_counter()
        for i in range(n):
            if os.pwrite(fd, payload, i * PAGE) != PAGE:
                raise BenchError("short write in the fsync loop")
            t = time.perf_counter()
            os.fsync(fd)
            result.fsync_lat.append(time.perf_counter() - t)
        result.fsync_elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    if os.stat(mnt / "fsync.dat").st_size != n * PAGE:
        raise BenchError(f"the fsync file is not {n * PAGE} bytes long after the loop")


def rewrite_loop(mnt: Path, seconds: float, file_mib: int, seed: int, result: Result) -> None:
    rnd = random.Random(seed)
    payloads = [rnd.randbytes(PAGE) for _ in range(16)]
    pages = (file_mib << 20) // PAGE
    fd = os.open(mnt / "rewrite.dat", os.O_WRONLY)
    try:
        start = time.perf_counter()
        end = start + seconds
        i = 0
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            os.pwrite(fd, payloads[i & 15], rnd.randrange(pages) * PAGE)
            result.write_lat.append(time.perf_counter() - t)
            i += 1
        result.write_elapsed = time.perf_counter() - start
    finally:
        os.close(fd)


def run_one(workdir: Path, config: str, rnd_no: int, s: Settings) -> Result:
    """One run of both workloads on CONFIG; a failure is kept in the result."""
    result = Result(config, rnd_no)
    image = workdir / f"{config}.img"
    server = None
    fs = None
    started = time.monotonic()
    try:
        if not image.exists():
            make_image(image, IMAGE_MIB)
        target = str(image)
        if config.startswith("nbd"):
            server = Nbdkit(workdir, config, image, s.latency_ms if config == "nbd-delay" else 0)
            server.start()
            target = server.uri
        fs = Target(workdir, config, mount_options(config, s.latency_ms), target)
        fs.mkfs()
        fs.mount()
        prepare(fs.mnt, s.file_mib, s.seed + rnd_no)
        fs.sync()
        before = fs.stats()
        fsync_loop(fs.mnt, s.fsyncs, result)
        after = fs.stats()
        result.fsync_stats = delta(before, after)
        before = fs.stats()
        rewrite_loop(fs.mnt, s.seconds, s.file_mib, s.seed + rnd_no, result)
        after = fs.stats()
        result.write_stats = delta(before, after)
        if after.get("read_only"):
            raise BenchError(f"the volume went read-only during the run\n{fs.log_tail(20)}")
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        result.error = f"{type(e).__name__}: {e}"
    except Exception:
        result.error = traceback.format_exc()
    finally:
        if fs is not None:
            try:
                fs.teardown()  # tux3 umount, then the daemon's exit status
            except BenchError as e:
                result.error = result.error or f"unmount: {e}"
        if server is not None:
            server.stop()
    if result.error:
        log(f"  round {rnd_no + 1} {LABELS[config]:>18s}  FAILED: {result.error}")
    else:
        log(f"  round {rnd_no + 1} {LABELS[config]:>18s}  {FIG['fsyncs/s'].value(result):7.1f} fsyncs/s  p50 "
            f"{FIG['fsync p50 ms'].value(result):6.2f} ms  p99 {FIG['fsync p99 ms'].value(result):6.2f} ms  "
            f"{FIG['flushes/fsync'].value(result):.2f} flushes/fsync | {FIG['writes/s'].value(result):7.0f} "
            f"writes/s  p99 {FIG['write p99 µs'].value(result):7.0f} µs  {FIG['commits/s'].value(result):.1f} "
            f"commits/s  ({time.monotonic() - started:.1f} s)")
    return result


# ---------------------------------------------------------------------------------------------------------------
# the figures


@dataclass
class Spread:
    median: float
    low: float
    high: float

    def text(self, digits: int) -> str:
        if self.median != self.median:  # nan
            return "-"
        m = f"{self.median:,.{digits}f}"
        if self.low == self.high:
            return m
        return f"{m} ({self.low:,.{digits}f}–{self.high:,.{digits}f})"


def spread(results: list[Result], config: str, fig: Figure) -> Spread | None:
    values = [fig.value(r) for r in results if r.config == config and r.error is None]
    values = [v for v in values if v == v]
    if not values:
        return None
    return Spread(statistics.median(values), min(values), max(values))


def within_noise(a: Spread, b: Spread) -> bool:
    """Each median inside the other's min-max, or the two medians within NOISE of the smaller."""
    if a.low <= b.median <= a.high and b.low <= a.median <= b.high:
        return True
    small = min(abs(a.median), abs(b.median))
    return abs(a.median - b.median) <= NOISE * small if small else a.median == b.median


def flush_charge_ms(results: list[Result], latency_ms: int) -> float | None:
    """What the model charges per fsync for its flushes: its median flushes per fsync x the latency."""
    f = spread(results, "model", FIG["flushes/fsync"])
    return None if f is None else f.median * latency_ms


def corrected(s: Spread, fig: Figure, charge_ms: float) -> Spread:
    """The model's fsync figure with its flush charge taken off (per fsync: CHARGE_MS)."""
    if fig.name == "fsyncs/s":
        def fix(v: float) -> float:
            t = 1e3 / v - charge_ms
            return 1e3 / t if t > 0 else float("inf")
        return Spread(fix(s.median), fix(s.low), fix(s.high))  # fix keeps the order
    return Spread(s.median - charge_ms, s.low - charge_ms, s.high - charge_ms)


TABLE_HEADER = ["workload", "figure", *(LABELS[c] for c in CONFIGS), "model / nbdkit delay", "within noise"]


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for fig in FIGURES:
        cells = [fig.workload, fig.name]
        got = {c: spread(results, c, fig) for c in CONFIGS}
        cells += [s.text(fig.digits) if s else "-" for s in got.values()]
        m, n = got["model"], got["nbd-delay"]
        if m and n:
            cells.append(f"{per(m.median, n.median):.2f}")
            same = "yes" if within_noise(m, n) else "no"
            cells.append(same + {"flush": " (flush-bound)", "shown": " (not judged)"}.get(fig.kind, ""))
        else:
            cells += ["-", "-"]
        rows.append(cells)
    return rows


def judgement(results: list[Result], latency_ms: int) -> list[str]:
    """The PASS/FAIL lines, the measured flush difference beside its expectation, and the summary line."""
    lines = []
    verdicts = []
    charge = flush_charge_ms(results, latency_ms)
    for fig in FIGURES:
        if fig.kind == "shown":
            continue
        m, n = spread(results, "model", fig), spread(results, "nbd-delay", fig)
        if m is None or n is None:
            lines.append(f"FAIL: {fig.workload} {fig.name}: not measured on both the model and nbdkit delay")
            verdicts.append(False)
            continue
        what = f"{fig.workload} {fig.name}: model {m.text(fig.digits)} vs nbdkit delay {n.text(fig.digits)}"
        if fig.kind == "flush":
            if charge is None:
                continue
            m = corrected(m, fig, charge)
            what = (f"{fig.workload} {fig.name} with the model's flushes ({charge:.1f} ms per fsync) taken off: "
                    f"model {m.text(fig.digits)} vs nbdkit delay {n.text(fig.digits)}")
        ok = within_noise(m, n)
        verdicts.append(ok)
        lines.append(f"{'PASS' if ok else 'FAIL'}: {what} (ratio {per(m.median, n.median):.2f}), "
                     + ("within the noise" if ok else "not within the noise"))
    m_t = [1 / FIG["fsyncs/s"].value(r) * 1e3 for r in results if r.config == "model" and r.error is None]
    n_t = [1 / FIG["fsyncs/s"].value(r) * 1e3 for r in results if r.config == "nbd-delay" and r.error is None]
    m50, n50 = spread(results, "model", FIG["fsync p50 ms"]), spread(results, "nbd-delay", FIG["fsync p50 ms"])
    if m_t and n_t and m50 and n50 and charge is not None:
        text = (f"Per fsync the model takes {statistics.median(m_t) - statistics.median(n_t):.2f} ms longer than "
                f"nbdkit delay (mean time per append + fsync; p50 of the fsync: {m50.median - n50.median:.2f} ms); "
                f"expected: {charge:.2f} ms, {latency_ms} ms for each of the model's {charge / latency_ms:.2f} "
                "flushes per fsync, which nbdkit's delay filter does not delay")
        l_t = [1e3 / FIG["fsyncs/s"].value(r) for r in results if r.config == "local" and r.error is None]
        b_t = [1e3 / FIG["fsyncs/s"].value(r) for r in results if r.config == "nbd" and r.error is None]
        if l_t and b_t:
            own = statistics.median(l_t) - statistics.median(b_t)
            text += (f"; with the two paths' own costs (local image minus undelayed nbdkit: {own:+.2f} ms per "
                     f"append + fsync) {charge + own:.2f} ms")
        lines.append(text + ".")
    good = sum(verdicts)
    lines.append(f"{'PASS' if verdicts and all(verdicts) else 'FAIL'}: the device model at {latency_ms} ms against "
                 f"nbdkit's delay filter at {latency_ms} ms: {good} of {len(verdicts)} judged figures within the "
                 "noise")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# output


CHART_FIGURES = ("fsyncs/s", "fsync p50 ms", "fsync p99 ms", "writes/s", "write p99 µs", "commits/s")


def draw_chart(plt, results: list[Result], latency_ms: int):
    configs = [c for c in CONFIGS if any(r.config == c and r.error is None for r in results)]
    if not configs:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    charge = flush_charge_ms(results, latency_ms)
    for ax, name in zip(axes.flat, CHART_FIGURES, strict=True):
        f = FIG[name]
        spreads = [spread(results, c, f) for c in configs]
        meds = [s.median if s else 0.0 for s in spreads]
        err = [[s.median - s.low if s else 0 for s in spreads], [s.high - s.median if s else 0 for s in spreads]]
        ax.bar([LABELS[c].replace(" 5 ms", "\n5 ms") for c in configs], meds, yerr=err, capsize=4,
               color=[COLORS[c] for c in configs])
        if f.kind == "flush" and charge is not None and "model" in configs:
            s = spread(results, "model", f)
            if s is not None:
                ax.plot([0], [corrected(s, f, charge).median], marker="_", markersize=28, color="black",
                        label="model without its flush charge")
                ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{f.workload}: {name}", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"device model {latency_ms} ms vs nbdkit --threads 1 --filter=delay wdelay={latency_ms}ms "
                 "(median, min–max)", fontsize=11)
    return fig


def section_text(results: list[Result], s: Settings, repeat: int, cmd: str, now: str, loads: list[str],
                 lines: list[str], chart: str | None) -> str:
    out = [SECTION, ""]
    out.append(generated_line(cmd, now, loads))
    out.append("")
    out.append(f"The device model (`-o device_latency={s.latency_ms}ms`) is meant to behave like a device that "
               f"serves requests one at a time, in order, each write in {s.latency_ms} ms. Here it is set beside "
               f"such a device: nbdkit's `delay` filter (`nbdkit --threads 1 --filter=delay file file=IMAGE "
               f"wdelay={s.latency_ms}ms`, on a Unix socket), with the local image and undelayed nbdkit as the two "
               "baselines. Every configuration is mounted with `-o nowriteback,stable=fork,commit=0.01` on a "
               f"fully written {IMAGE_MIB} MiB image, freshly made. *fsync*: {s.fsyncs} x (4 KiB append + fsync); "
               f"*rewrite*: 4 KiB writes at random pages of a {s.file_mib} MiB file for {s.seconds:g} s. The "
               f"configurations alternate in rounds, {repeat} round(s); the cells give the median and, in brackets, "
               "the min–max. Counters come from `tux3 stat --json`.")
    out.append("")
    out.append(f"Within the noise: each median inside the other's min–max, or the two within {NOISE:.0%}. Where "
               "the two must differ: nbdkit's delay filter does not delay flushes, while the model charges each "
               "flush its latency (and on NBD the superblock goes out as a FUA write instead of a write and a "
               "flush). The fsync figures are therefore judged with the model's flush charge (its flushes per fsync "
               f"x {s.latency_ms} ms) taken off; flush counts and the rewrites' commit figures are shown, not "
               "judged.")
    out.append("")
    out += md_table(TABLE_HEADER, table_rows(results), left=2)
    out.append("")
    out += [f"- {line}" for line in lines]
    failed = [r for r in results if r.error]
    if failed:
        out.append("")
        out.append(f"{len(failed)} run(s) failed: " + "; ".join(f"{LABELS[r.config]} round {r.round + 1}: "
                                                              f"{r.error.splitlines()[-1]}" for r in failed))
    if chart:
        out.append("")
        out.append(f"![device model against nbdkit delay]({chart})")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    h = Harness("bench_device", __doc__, "bench_device.png",
                "one round, 60 fsyncs, 1 s of rewrites, output in bench-out/ (smoke run)", SECTION)
    ap = h.parser
    h.add_only(CONFIGS, "configurations")
    ap.add_argument("--repeat", type=int, help="rounds of the configurations (default 3, --quick 1)")
    ap.add_argument("--fsyncs", type=int, help="appends + fsyncs per run (default 300, --quick 60)")
    ap.add_argument("--seconds", type=float, help="rewrite phase of each run (default 3, --quick 1)")
    ap.add_argument("--file-mib", type=int, default=64, help="size of the rewritten file in MiB (default 64)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = h.parse(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    s = Settings(fsyncs=args.fsyncs if args.fsyncs is not None else (60 if args.quick else 300),
                 seconds=args.seconds if args.seconds is not None else (1.0 if args.quick else 3.0),
                 file_mib=args.file_mib, seed=args.seed)
    if repeat < 1 or s.fsyncs < 1 or s.seconds <= 0 or not 1 <= s.file_mib <= IMAGE_MIB // 2:
        ap.error(f"--repeat and --fsyncs take 1 or more, --seconds a positive time, --file-mib 1 to "
                 f"{IMAGE_MIB // 2}")
    for tool in ("mkfs.tux3", "tux3fuse", "tux3"):
        if not (VENV_BIN / tool).exists():
            print(f"bench_device: {VENV_BIN / tool} not found (run 'make install')", file=sys.stderr)
            return 2
    problem = fuse_missing() or (None if shutil.which("nbdkit") else "nbdkit not found (apt-get install nbdkit)")
    if problem:
        print(f"bench_device: {problem}", file=sys.stderr)
        return 2

    results: list[Result] = []
    with h.workdir("tux3device-") as workdir:
        log(f"bench_device: work directory {workdir}; {repeat} round(s) of {', '.join(args.only)}; "
            f"{s.fsyncs} fsyncs and {s.seconds:g} s of rewrites per run; load average {h.loads[0]}")
        for rnd_no in range(repeat):
            for config in args.only:
                results.append(run_one(workdir, config, rnd_no, s))
    if h.interrupted:
        return 130

    h.table(TABLE_HEADER, table_rows(results), left=2)
    print()
    lines = judgement(results, s.latency_ms)
    for line in lines:
        print(line)
    if args.quick:
        print("(quick run: one round, short runs; numbers are indicative only)")
    print(h.load_line())
    chart = h.chart(lambda plt: draw_chart(plt, results, s.latency_ms))
    h.write(section_text(results, s, repeat, h.command(), h.now(), h.loads, lines, chart), chart)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
