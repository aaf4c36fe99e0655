#!/usr/bin/env python3
"""End-to-end demo of tux3fuse: make, mount, exercise, unmount and check a 1 GiB image.

Steps: mkfs.tux3 -> tux3fuse (detached) -> fio random write + verify -> fsx -> tux3 stat -> tux3 umount
-> fsck.tux3 -> mount again -> fio verify of the data written before -> tux3 umount -> fork versus wait on a 5 ms
device: a few seconds of 4 KiB rewrites of a hot set while commits run, once with stable=fork and once with
stable=wait, on fresh images mounted with ``-o nowriteback,device_latency=5ms`` (the workload of
scripts/bench_fork.py), printed as a small table.

Everything happens in a temporary directory that is removed at the end; the filesystem is always unmounted, even
when a step fails. The summary at the end lists the steps, then the counters of `tux3 stat` that tell what
happened (commits, forks, waits, blocks written, flushes), one line of meaning each. Exit status 0 when every step
passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchkit import BenchError, call, interrupt_on_signals, live_processes

from tux3fuse.mounts import is_mounted

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    note: str = ""


class StepFailed(Exception):
    pass


def run(
    cmd: Sequence[str | os.PathLike[str]], timeout: float, capture: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    args = [str(c) for c in cmd]
    print(f"$ {shlex.join(args)}", flush=True)
    try:
        proc = call(args, timeout, capture=capture, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise StepFailed(f"timed out after {timeout:.0f}s") from e
    except OSError as e:
        raise StepFailed(f"cannot run {args[0]}: {e}") from e
    if proc.returncode != 0:
        detail = ((proc.stderr or "") + (proc.stdout or "")).strip() if capture else ""
        raise StepFailed(f"exit status {proc.returncode}" + (f": {detail[-1500:]}" if detail else ""))
    return proc


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def daemon_pids(image: Path) -> list[int]:
    """Live processes whose command line names IMAGE (the daemon this demo started)."""
    return [pid for pid, args in live_processes() if str(image) in args]


def force_cleanup(mnt: Path, image: Path) -> None:
    """Unmount if still mounted (tux3 umount, else a lazy unmount); stop the daemon serving IMAGE if it lingers."""
    if is_mounted(mnt):
        print(f"cleanup: tux3 umount {mnt}", flush=True)
        try:
            subprocess.run([str(VENV_BIN / "tux3"), "umount", str(mnt)], check=False, timeout=120)
        except subprocess.TimeoutExpired:
            print("cleanup: tux3 umount timed out", flush=True)
    if is_mounted(mnt):
        fm = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        print(f"cleanup: {fm} -u -z {mnt}", flush=True)
        subprocess.run([fm, "-u", "-z", str(mnt)], check=False, timeout=30)
    if wait_until(lambda: not daemon_pids(image), 30):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in daemon_pids(image):
            print(f"cleanup: daemon {pid} still running, sending {sig.name}", flush=True)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if wait_until(lambda: not daemon_pids(image), 10):
            return


STORY = (  # the counters of `tux3 stat` that tell what happened, and what each one means
    ("commits", "deltas committed: each makes one atomic group of changes durable"),
    ("forks", "pages copied instead of waited for: a write hit a page its commit was still writing"),
    ("waits", "times a writer waited for a commit (stable=wait, or a page not forked)"),
    ("blocks_written", "blocks the commits wrote: data, log, and tree nodes at a unify"),
    ("flushes", "cache flushes of the image: the cost of making commits durable"),
)


def story(counters: dict) -> list[str]:
    """The lines of the demo's counter summary: each counter of STORY with its value and what it means."""
    width = max(len(name) for name, _ in STORY)
    return [f"  {name.ljust(width)} {counters.get(name, 0):>9}  {meaning}" for name, meaning in STORY]


COMPARE_LATENCY = 0.005  # seconds: the modelled device of the closing comparison
COMPARE_SECONDS = 2.0  # timed phase of each of its two runs


def compare_modes(workdir: Path, seconds: float = COMPARE_SECONDS) -> tuple[list[str], str]:
    """fork, then wait, on a device of COMPARE_LATENCY (bench_fork's hot-set workload): the table's lines and a
    sentence saying what it shows."""
    import bench_fork as bf

    cfg = bf.Config(seconds=seconds, hot_pages=64, stream_mbps=32.0, commit_interval=0.01, seed=1, workdir=workdir)
    runs = {}
    for mode in ("fork", "wait"):
        try:
            runs[mode] = bf.run_mounted(mode, cfg, workdir / f"compare-{mode}.img", bf.WORKLOADS["hot64"],
                                        COMPARE_LATENCY)
        except BenchError as e:
            raise StepFailed(f"{mode}: {str(e).splitlines()[0]}") from e
        finally:
            (workdir / f"compare-{mode}.img").unlink(missing_ok=True)
    rows = [[mode, bf.num(r.rate), bf.us(r.percentile(99)), bf.us(r.percentile(100))] for mode, r in runs.items()]
    header = ["mode", "writes/s", "p99 µs", "max µs"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                  strict=True)))
             for row in [header, *rows]]
    fork, wait = runs["fork"], runs["wait"]
    ratio = wait.percentile(99) / fork.percentile(99) if fork.percentile(99) > 0 else float("inf")
    sentence = (f"On a device of {COMPARE_LATENCY * 1e3:g} ms, a write that meets a page being committed copies it "
                f"and goes on with stable=fork, but waits for the device with stable=wait: wait's p99 is "
                f"{ratio:,.1f} times fork's, its slowest write took {wait.percentile(100) * 1e3:,.0f} ms against "
                f"{fork.percentile(100) * 1e3:,.0f} ms, and it managed {bf.num(wait.rate)} writes/s against "
                f"{bf.num(fork.rate)}.")
    return lines, sentence


def fio_summary(path: Path) -> str:
    data = json.loads(path.read_text())
    job = data["jobs"][0]
    parts = []
    for side, label in (("write", "write"), ("read", "verify read")):
        io = job[side]
        if io["io_bytes"] and io["bw_bytes"]:
            parts.append(f"{label} {io['bw_bytes'] / 1e6:.0f} MB/s ({io['io_bytes'] / (1 << 20):.0f} MiB)")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M", help="fio data size (default 256M)")
    ap.add_argument("--fsx-ops", type=int, default=20000, help="fsx operations (default 20000)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (image and logs)")
    ap.add_argument("-o", dest="options", help="tux3fuse mount options")
    args = ap.parse_args(argv)

    for tool in ("mkfs.tux3", "tux3fuse", "tux3", "fsck.tux3"):
        if not (VENV_BIN / tool).exists():
            print(f"demo: {VENV_BIN / tool} not found; run 'make install'", file=sys.stderr)
            return 2
    if not shutil.which("fio"):
        print("demo: fio not found; run 'make deps'", file=sys.stderr)
        return 2

    interrupt_on_signals()

    tmp = Path(tempfile.mkdtemp(prefix="tux3demo-")).resolve()
    image = tmp / "fs.img"
    mnt = tmp / "mnt"
    mnt.mkdir()
    mount_opts = ["-o", args.options] if args.options else []
    fio_base = ["fio", "--name=demo", f"--directory={mnt}", "--rw=randwrite", "--bsrange=4k-1m", f"--size={args.size}",
                "--verify=crc32c", "--verify_fatal=1", "--ioengine=psync", "--end_fsync=1", "--output-format=json"]
    steps: list[Step] = []
    counters: dict = {}  # from tux3 stat --json
    comparison: list[str] = []  # the closing table and its sentence

    def step(name: str, fn: Callable[[], str | None]) -> bool:
        print(f"\n== {name}", flush=True)
        start = time.monotonic()
        try:
            note = fn() or ""
            ok = True
        except (StepFailed, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            note, ok = str(e), False
        elapsed = time.monotonic() - start
        steps.append(Step(name, ok, elapsed, note))
        print(f"-- {name}: {'ok' if ok else 'FAIL'} ({elapsed:.1f}s){': ' + note if note else ''}", flush=True)
        return ok

    def mkfs() -> None:
        run([VENV_BIN / "mkfs.tux3", "-s", "1G", "-L", "demo", image], timeout=60, capture=False)

    def mount() -> None:
        run([VENV_BIN / "tux3fuse", *mount_opts, image, mnt], timeout=60)
        if not wait_until(lambda: is_mounted(mnt), 10):
            raise StepFailed(f"tux3fuse returned but {mnt} is not mounted")

    def fio_write() -> str:
        out = tmp / "fio-write.json"
        run([*fio_base, f"--output={out}"], timeout=900, cwd=tmp)  # fio leaves a verify state file in cwd
        return fio_summary(out)

    def fsx() -> None:
        run([sys.executable, REPO / "scripts" / "fsx.py", "-N", str(args.fsx_ops), "-S", "1", "-q", mnt / "fsxfile"],
            timeout=1800, capture=False)

    def stat() -> str:
        proc = run([VENV_BIN / "tux3", "stat", "--json", mnt], timeout=30)
        counters.update(json.loads(proc.stdout))
        for line in story(counters):
            print(line, flush=True)
        return "see the counters below"

    def umount() -> None:
        run([VENV_BIN / "tux3", "umount", mnt], timeout=300)
        if is_mounted(mnt):
            raise StepFailed(f"{mnt} is still mounted")

    def fsck() -> str:
        proc = call([str(VENV_BIN / "fsck.tux3"), str(image)], timeout=600)
        print(proc.stdout + proc.stderr, end="", flush=True)
        meaning = {0: "clean", 1: "errors corrected", 4: "errors left uncorrected", 8: "operational error"}
        verdict = meaning.get(proc.returncode, f"exit status {proc.returncode}")
        if proc.returncode != 0:
            raise StepFailed(verdict)
        return verdict

    def fio_reverify() -> str:
        out = tmp / "fio-verify.json"
        run([*fio_base, "--verify_only", f"--output={out}"], timeout=900, cwd=tmp)
        return fio_summary(out)

    def compare() -> str:
        lines, sentence = compare_modes(tmp)
        comparison.extend([*lines, "", sentence])
        for line in comparison:
            print(line, flush=True)
        return "see the table below"

    try:
        if step("mkfs.tux3 (1 GiB sparse image)", mkfs) and step("mount (tux3fuse, detached)", mount):
            step(f"fio randwrite {args.size} + crc32c verify", fio_write)
            step(f"fsx {args.fsx_ops} ops", fsx)
            step("tux3 stat", stat)
            if step("tux3 umount", umount):
                step("fsck.tux3", fsck)
                if step("mount again", mount):
                    step("fio verify after remount", fio_reverify)
                    step("tux3 umount", umount)
        step(f"fork versus wait on a {COMPARE_LATENCY * 1e3:g} ms device", compare)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        steps.append(Step("interrupted", False, 0.0))
    finally:
        force_cleanup(mnt, image)
        if args.keep:
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    failed = any(not s.ok for s in steps)
    width = max(len(s.name) for s in steps)
    print("\nSummary")
    for s in steps:
        note = f"  {s.note.splitlines()[0]}" if s.note else ""
        print(f"  {'ok  ' if s.ok else 'FAIL'}  {s.name.ljust(width)}  {s.seconds:7.1f}s{note}")
    if counters:
        print("\nCounters (tux3 stat, before the unmount)")
        for line in story(counters):
            print(line)
    if comparison:
        print(f"\nfork versus wait on a {COMPARE_LATENCY * 1e3:g} ms device (-o nowriteback,device_latency="
              f"{COMPARE_LATENCY * 1e3:g}ms; 4 KiB rewrites of a 64-page hot set, commits every 10 ms)")
        for line in comparison:
            print(line)
    print("demo: " + ("FAILED" if failed else "all steps passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
