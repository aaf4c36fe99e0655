"""Process helpers shared by scripts/bench.py, scripts/bench_fsync.py, scripts/benchfs.py, scripts/demo.py and
scripts/bench_fork.py.

What they guarantee:

- Children are never left behind: `call` starts its child in a process group of its own and, when the child
  times out or the caller is interrupted (any exception, KeyboardInterrupt included), kills the whole group and
  waits until it is gone before re-raising, so nothing keeps files open in a directory about to be removed.
- No race with signals: SIGINT, SIGTERM and SIGHUP are blocked while the child is being started (and unblocked
  in the child), so a signal arriving then is delivered once `call` has a child to kill.
- `interrupt_on_signals` turns SIGTERM and SIGHUP into KeyboardInterrupt, like SIGINT, so that the scripts'
  `finally` clauses run (unmount, remove the work directory) whichever of the three stops them.
- `live_processes` lists only processes that are really alive (zombies left out), so a daemon that has exited
  counts as gone.
- `default_workdir` names a directory on local disk, never tmpfs or ramfs, so benchmarks do not measure memory.

The scripts import this module as `procutil`: each is run as `python scripts/NAME.py`, which puts scripts/ on
sys.path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["call", "default_workdir", "interrupt_on_signals", "live_processes"]

_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


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


def call(
    args: list[str], timeout: float, capture: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """subprocess.run that never leaves its child behind.

    The child runs in its own process group (fio forks its jobs), which is killed on a timeout or an exception.
    Signals are held while the child is being started, so the KeyboardInterrupt they raise (see
    interrupt_on_signals) always finds a child to kill."""
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


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, command line split at NULs) of every live (not zombie or dead) process but this one, from /proc.

    Processes that exit while /proc is being read are skipped."""
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


def default_workdir() -> Path:
    """A directory on local disk: /var/tmp unless it is missing or tmpfs."""
    def fstype(p: Path) -> str:
        best, kind = "", ""
        try:
            with open("/proc/self/mounts") as f:
                for line in f:
                    parts = line.split()
                    mp = parts[1]
                    if (str(p) == mp or str(p).startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                        best, kind = mp, parts[2]
        except OSError:
            pass
        return kind

    for cand in (Path("/var/tmp"), Path(tempfile.gettempdir())):
        if cand.is_dir() and fstype(cand.resolve()) not in ("tmpfs", "ramfs"):
            return cand
    return Path(tempfile.gettempdir())


def log(msg: str) -> None:
    print(msg, flush=True)


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


def daemon_pids(image: Path) -> list[int]:
    """Live (non-zombie) processes whose command line names IMAGE: the FUSE daemon serving it."""
    needle = str(image)
    return [pid for pid, args in live_processes() if any(needle in a for a in args)]


def reap_daemons(image: Path, timeout: float = 60) -> None:
    """Wait for the daemons serving IMAGE to exit; after TIMEOUT, terminate them."""
    if wait_until(lambda: not daemon_pids(image), timeout, 0.1):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in daemon_pids(image):
            log(f"  daemon {pid} for {image} did not exit, sending {sig.name}")
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if wait_until(lambda: not daemon_pids(image), 5, 0.1):
            return
