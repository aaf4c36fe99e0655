"""The skeleton the benchmarks share (scripts/bench.py, bench_fork.py, bench_fsync.py, bench_unify.py), and the
process helpers of scripts/benchfs.py and scripts/demo.py. A benchmark is its workload, its rows and its chart;
``Harness`` does the rest: the common arguments (--quick, --outdir, --workdir, --only), the work directory, the
signals, the load average, the tables, the chart and the section of PERFORMANCE.md.

What it guarantees:

- Children are never left behind: `call` starts its child in a process group of its own and, when the child
  times out or the caller is interrupted (any exception, KeyboardInterrupt included), kills the whole group and
  waits until it is gone before re-raising, so nothing keeps files open in a directory about to be removed.
  SIGINT, SIGTERM and SIGHUP are blocked while the child is being started, so a signal arriving then is
  delivered once `call` has a child to kill.
- `Harness.workdir` turns SIGTERM and SIGHUP into KeyboardInterrupt, like SIGINT, and on leaving (normally, on an
  exception or on one of the three signals) unmounts whatever is mounted under the work directory (lazily),
  waits for and then terminates only the daemons whose command line names a path inside it (a directory this run
  created), detaches the loop devices backed by its files, and removes it. An interrupt sets
  ``Harness.interrupted`` instead of propagating.
- The work directory is on local disk, never tmpfs or ramfs (`default_workdir`), so benchmarks do not measure
  memory.
- `update_section` replaces exactly one level-2 section of PERFORMANCE.md (its heading up to the next level-2
  heading) or adds it (at the end, or with ``first`` before the first level-2 section), and leaves every other
  line of the file as it was; `remove_section` takes one out the same way.

The scripts import this module as `benchkit`: each is run as `python scripts/NAME.py`, which puts scripts/ on
sys.path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the tux3fuse of this tree, also where another one is installed
    sys.path.insert(0, str(REPO))

from tux3fuse.mounts import mounted_type, mounts  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# processes


def _child_setup() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until no process is left in process group PGID (killed processes need a moment to close files)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def call(args: list[str], timeout: float, capture: bool = True, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    """subprocess.run that never leaves its child behind (see the module docstring)."""
    pipe = subprocess.PIPE if capture else None
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        proc = subprocess.Popen(args, stdout=pipe, stderr=pipe, text=True, cwd=cwd, process_group=0,
                                preexec_fn=_child_setup)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            _wait_group_gone(proc.pid, 5)
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run(cmd: Sequence[str | os.PathLike[str]], timeout: float = 120, check: bool = True, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run CMD with `call`; a timeout, a missing program or (with CHECK) a failure raises BenchError."""
    args = [str(c) for c in cmd]
    try:
        proc = call(args, timeout, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(args)}") from e
    except OSError as e:
        raise BenchError(f"cannot run {shlex.join(args)}: {e}") from e
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise BenchError(f"exit status {proc.returncode}: {shlex.join(args)}\n{detail}")
    return proc


def which(tool: str) -> str | None:
    return shutil.which(tool, path=SBIN_PATH)


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, command line split at NULs) of every live (not zombie or dead) process but this one, from /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry.name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            yield int(entry.name), args


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt (as SIGINT already is), so the finally clauses unmount."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll PRED until it holds (True) or TIMEOUT seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def end_process(proc: subprocess.Popen, what: str, timeout: float = 30) -> int | None:
    """Wait for ``proc`` to exit; after ``timeout`` seconds send it SIGTERM, and after as long again SIGKILL. Its
    exit status if it exited by itself, None if it had to be signalled."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            log(f"  {what} ({proc.pid}) did not exit; sending {sig.name}")
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        return code if sig is None else None
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process PID, all its threads, so far (/proc/PID/stat); OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields[0] is the state, field 3 of stat(5)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def daemon_pids(path: str | Path) -> list[int]:
    """Live (non-zombie) processes whose command line names PATH (or, ending in "/", a path below it)."""
    needle = str(path)
    return [pid for pid, args in live_processes() if any(needle in a for a in args)]


def reap_daemons(path: str | Path, timeout: float = 60) -> None:
    """Wait for the daemons naming PATH to exit; after TIMEOUT, terminate them."""
    if wait_until(lambda: not daemon_pids(path), timeout, 0.1):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in daemon_pids(path):
            log(f"  daemon {pid} for {path} did not exit, sending {sig.name}")
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if wait_until(lambda: not daemon_pids(path), 5, 0.1):
            return


# ---------------------------------------------------------------------------------------------------------------
# mounts and the work directory


def fusermount() -> str:
    return shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount3"


def force_umount(mnt: Path) -> None:
    """Lazy unmount of whatever is mounted on MNT (cleanup after a failure or an interrupt)."""
    kind = mounted_type(mnt)
    if kind is None:
        return
    if kind.startswith("fuse") and os.geteuid() != 0:
        run([fusermount(), "-u", "-z", mnt], check=False, timeout=60)
    else:
        run(["umount", "-l", mnt], check=False, timeout=60)


def loop_devices(image: Path) -> list[str]:
    """Loop devices backed by IMAGE (`losetup -j`)."""
    if not which("losetup"):
        return []
    try:
        out = run([which("losetup") or "losetup", "-j", image], check=False, timeout=30).stdout
    except BenchError:
        return []
    return [line.split(":", 1)[0] for line in out.splitlines() if line.startswith("/dev/")]


def cleanup(workdir: Path, prog: str) -> None:
    """Whatever a run left in WORKDIR: lazy unmounts of every mount below it, the daemons naming a path below it,
    the loop devices backed by its files, then the directory itself."""
    below = str(workdir.resolve()) + "/"
    try:
        targets = [m.target for m in mounts() if m.target.startswith(below)]
    except OSError:
        targets = [str(p) for p in workdir.glob("*.mnt") if os.path.ismount(p)]
    for target in reversed(targets):  # the topmost first
        log(f"{prog}: lazy unmount of {target}")
        force_umount(Path(target))
    reap_daemons(below, timeout=10)
    for image in workdir.glob("*.img"):
        for dev in loop_devices(image):
            log(f"{prog}: detaching {dev}")
            run([which("losetup") or "losetup", "-d", dev], check=False, timeout=60)
    shutil.rmtree(workdir, onerror=lambda _f, p, exc: log(f"{prog}: cannot remove {p}: {exc[1]}"))


def default_workdir() -> Path:
    """A directory on local disk: /var/tmp unless it is missing or tmpfs."""
    def fstype(p: Path) -> str:
        best, kind = "", ""
        try:
            table = mounts()
        except OSError:
            return ""
        for m in table:
            if (str(p) == m.target or str(p).startswith(m.target.rstrip("/") + "/")) and len(m.target) >= len(best):
                best, kind = m.target, m.fstype
        return kind

    for cand in (Path("/var/tmp"), Path(tempfile.gettempdir())):
        if cand.is_dir() and fstype(cand.resolve()) not in ("tmpfs", "ramfs"):
            return cand
    return Path(tempfile.gettempdir())


# ---------------------------------------------------------------------------------------------------------------
# reports


def machine_info() -> dict[str, str]:
    """What a benchmark ran on: CPUs, kernel, Python, CPU model and memory (when /proc tells)."""
    info = {"nproc": str(os.cpu_count()), "kernel": platform.release(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) // 1024:,} MiB"
                break
    except OSError:
        pass
    return info


def tool_version(tool: str, flag: str) -> str | None:
    """The line of ``TOOL FLAG``'s output that names TOOL (else its first line), or None if it cannot run."""
    try:
        out = subprocess.run([which(tool) or tool, flag], capture_output=True, text=True, timeout=10)
        lines = (out.stdout + out.stderr).strip().splitlines()
        return next((ln for ln in lines if ln.startswith(tool)), lines[0])
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("tux3fuse")
    except Exception:
        return None


def comma_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated, non-empty list of ``choices`` (duplicates dropped, order kept)."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(choices)}")
        return list(dict.fromkeys(names))
    return parse


def _left_columns(n: int, left: int, last_left: bool) -> list[bool]:
    return [i < left or (last_left and i == n - 1) for i in range(n)]


def text_table(header: list[str], rows: list[list[str]], left: int = 1, last_left: bool = False) -> list[str]:
    """Lines of an aligned table: the first LEFT columns (and with LAST_LEFT the last one) left-aligned, the others
    right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lefts = _left_columns(len(header), left, last_left)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if lefts[i] else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()

    head = line(header)
    return [head, "-" * len(head), *(line(r) for r in rows)]


def md_table(header: list[str], rows: list[list[str]], left: int = 1, last_left: bool = False) -> list[str]:
    """Lines of a markdown table: the first LEFT columns (and with LAST_LEFT the last one) left-aligned, the others
    right-aligned."""
    lefts = _left_columns(len(header), left, last_left)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if x else "---:" for x in lefts) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def generated_line(cmd: str, now: str, loads: Sequence[str]) -> str:
    """The first line of a report section: the command, when, the machine, and its load before and after."""
    info = machine_info()
    return (f"Generated by `{cmd}` on {now}; machine: nproc {info['nproc']}, kernel {info['kernel']}"
            + (f", {info['cpu']}" if "cpu" in info else "") + f", Python {info['python']}; load average "
            f"(1/5/15 min) {loads[0]} at the start, {loads[-1]} at the end.")


def _section_span(lines: list[str], heading: str) -> tuple[int, int] | None:
    """(first line, line after the last) of the level-2 section titled HEADING, or None."""
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end


def update_section(md: Path, heading: str, section: str, first: bool = False) -> None:
    """Replace the section titled HEADING of MD (up to the next level-2 heading) with SECTION, or add it: at the
    end, or with FIRST before the first level-2 section (at the end if there is none)."""
    text = md.read_text() if md.exists() else "# Performance\n"
    lines = text.splitlines()
    span = _section_span(lines, heading)
    if span is None:
        at = next((i for i, line in enumerate(lines) if line.startswith("## ")), None) if first else None
        if at is None:
            new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
        else:
            head = "\n".join(lines[:at]).rstrip("\n")
            new = (head + "\n\n" if head else "") + section.rstrip("\n") + "\n\n" + "\n".join(lines[at:]) + "\n"
    else:
        start, end = span
        head = "\n".join(lines[:start]).rstrip("\n")
        tail = "\n".join(lines[end:]).rstrip("\n")
        rest = "\n" + tail + "\n" if tail.strip() else ""
        new = (head + "\n\n" if head else "") + section.rstrip("\n") + "\n" + rest
    md.write_text(new)


def remove_section(md: Path, heading: str) -> bool:
    """Take the section titled HEADING (up to the next level-2 heading) out of MD; False if it has none."""
    if not md.exists():
        return False
    lines = md.read_text().splitlines()
    span = _section_span(lines, heading)
    if span is None:
        return False
    start, end = span
    head = "\n".join(lines[:start]).rstrip("\n")
    tail = "\n".join(lines[end:]).rstrip("\n")
    md.write_text(head + ("\n\n" + tail if tail.strip() else "") + "\n")
    return True


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------------------------
# the harness


class Harness:
    """One benchmark run. Construct it, add the benchmark's own arguments to ``parser``, ``parse``, run the
    workload inside ``with h.workdir(PREFIX) as wd``, return 130 if ``h.interrupted``, then print the tables
    (``table``), draw the chart (``chart``) and write the report (``section`` or ``write``).

    ``outdir`` is --outdir, else docs/, or bench-out/ with --quick; ``parent`` is --workdir, else a directory on
    local disk. ``loads`` holds the load average at the start of the work directory and at its end."""

    def __init__(self, prog: str, doc: str | None, chart: str, quick_help: str,
                 section: str | None = None) -> None:
        self.prog, self.chart_name, self.heading = prog, chart, section
        self.parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--quick", action="store_true", help=quick_help)
        self.parser.add_argument("--outdir", type=Path, help=f"where PERFORMANCE.md and {chart} go "
                                 "(default: docs/, or bench-out/ with --quick)")
        self.parser.add_argument("--workdir", type=Path,
                                 help="parent of the temporary image directory (default: /var/tmp)")
        self.argv: list[str] = []
        self.args = argparse.Namespace()
        self.outdir = self.parent = Path()
        self.loads: list[str] = []
        self.interrupted = False

    def add_only(self, choices: Sequence[str], what: str = "filesystems") -> None:
        """--only: a comma-separated subset of CHOICES (default: all of them, in their order)."""
        self.parser.add_argument("--only", type=comma_choices(choices), default=list(choices),
                                 help=f"comma-separated {what} to run: {','.join(choices)} (default: all)")

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.args = self.parser.parse_args(self.argv)
        self.outdir = self.args.outdir or (REPO / ("bench-out" if self.args.quick else "docs"))
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.parent = (self.args.workdir or default_workdir()).resolve()
        return self.args

    @contextmanager
    def workdir(self, prefix: str) -> Iterator[Path]:
        """A fresh work directory under ``parent``, cleaned up on leaving (see the module docstring)."""
        interrupt_on_signals()
        self.loads = [load_average()]
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.parent))
        try:
            yield path
        except KeyboardInterrupt:
            self.interrupted = True
            log(f"{self.prog}: interrupted; cleaning up")
        finally:
            cleanup(path, self.prog)
            self.loads.append(load_average())

    def load_line(self) -> str:
        return f"load average (1/5/15 min): {self.loads[0]} at the start, {self.loads[-1]} at the end"

    def busy(self) -> bool:
        """Was the 1-minute load average above the number of CPUs at either end?"""
        return max(float(x.split()[0]) for x in self.loads) > (os.cpu_count() or 1)

    def command(self) -> str:
        return shlex.join([f"scripts/{self.prog}.py", *self.argv])

    @staticmethod
    def now() -> str:
        return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    @staticmethod
    def table(header: list[str], rows: list[list[str]], left: int = 1, last_left: bool = False) -> None:
        print()
        for line in text_table(header, rows, left, last_left):
            print(line)

    def chart(self, draw: Callable[[Any], Any]) -> str | None:
        """``draw(pyplot)`` returns a figure (or None: nothing to draw); it is saved as OUTDIR/CHART. The chart's
        file name, or None when there is none (matplotlib missing: said once)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log("matplotlib not installed: skipping the chart (pip install matplotlib)")
            return None
        fig = draw(plt)
        if fig is None:
            return None
        fig.tight_layout()
        fig.savefig(self.outdir / self.chart_name, dpi=100)
        plt.close(fig)
        return self.chart_name

    def write(self, text: str, chart: str | None) -> None:
        """OUTDIR/PERFORMANCE.md: the section HEADING replaced by TEXT, or (no heading) the whole file."""
        md = self.outdir / "PERFORMANCE.md"
        if self.heading:
            update_section(md, self.heading, text)
        else:
            md.write_text(text)
        log(f"\nwrote {md}" + (f" and {self.outdir / chart}" if chart else ""))
