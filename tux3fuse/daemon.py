"""The mount daemon: mount, detach, serve requests, commit periodically, and finish with a last commit.

Guarantees:
- Mount errors (bad image, bad mountpoint, FUSE refusing) are reported before the command returns: the daemon
  detaches only after the kernel mount exists.
- On unmount, SIGTERM or SIGINT the daemon commits everything (with a unify) before it exits; it records its exit
  status in its state file, which ``tux3 umount`` waits for. A daemon that was killed leaves "running" there, with
  a pid and start time that no live process has (``daemon_alive``): the tools say that it died.
- A control socket beside the state file answers ``stat`` (counters as JSON) and ``sync`` (a sync item on the
  flusher's queue: it returns once everything changed before it is durable); both replies also name where the
  daemon logs and hold its last WARNING and ERROR records with their times.
- The daemon always keeps a log (see ``DaemonLog``): in the foreground on stderr; detached in syslog when
  ``/dev/log`` exists, otherwise in a file (``default_log_file``); with ``-o log=FILE`` in FILE as well.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import json
import logging
import logging.handlers
import os
import select
import signal
import sys
from collections.abc import Callable

import pyfuse3
import trio

from .flusher import Flusher
from .fs import Volume, VolumeError
from .mounts import mount_device

log = logging.getLogger("tux3fuse")
RECENT_ERRORS = 8  # WARNING and ERROR records the daemon keeps for ``tux3 stat``
LOG_FILE_BYTES = 1 << 20  # a log file is rotated (one old copy, FILE.1) when it reaches this size
LOG_FORMAT = "%(asctime)s tux3fuse[%(process)d] %(levelname)s: %(message)s"


def state_dir() -> str:
    base = "/run/tux3fuse" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", f"/tmp/tux3fuse-{os.getuid()}")
    if os.geteuid() != 0 and "XDG_RUNTIME_DIR" in os.environ:
        base = os.path.join(base, "tux3fuse")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def state_paths(mountpoint: str) -> tuple[str, str]:
    """(state file, control socket) of the daemon serving a mountpoint (an absolute, resolved path)."""
    key = hashlib.sha1(mountpoint.encode()).hexdigest()[:16]
    base = os.path.join(state_dir(), key)
    return base + ".json", base + ".sock"


def write_state(path: str, **fields) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(fields, f)
    os.replace(tmp, path)


def read_state(mountpoint: str) -> dict:
    """What the daemon serving ``mountpoint`` (resolved) last recorded: pid, started, image, mountpoint, status
    ("running", then "done" or "error"), error, log; {} when there is no readable record."""
    try:
        with open(state_paths(mountpoint)[0]) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/PID/stat), or None: no such process, or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])  # the state is field 3, the start time field 22
    except (OSError, IndexError, ValueError):
        return None


def daemon_alive(state: dict) -> bool:
    """Is the daemon of a state record (``read_state``) still running: its pid names a live process that started
    when the daemon did (a pid used again by another process is not the daemon)?"""
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    started = process_start(pid)
    return started is not None and state.get("started") in (None, started)


def requests_waiting() -> Callable[[], bool]:
    """A check whether the kernel holds a request for this process that no task has read yet: a poll of the
    /dev/fuse descriptor (pyfuse3 does not export it, so it is found among the open descriptors)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd") if _points_to(fd, "/dev/fuse")]
    except OSError:  # no /proc: commits then give the frontend a turn only for tasks already runnable
        fds = []
    if not fds:
        return lambda: False
    poller = select.poll()
    poller.register(max(fds), select.POLLIN)
    return lambda: bool(poller.poll(0))


def _points_to(fd: str, path: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == path
    except OSError:  # closed meanwhile (the listing's own descriptor)
        return False


class Daemon:
    def __init__(self, vol: Volume, ops: pyfuse3.Operations, mountpoint: str, image: str,
                 logs: DaemonLog | None = None) -> None:
        """``mountpoint`` must be resolved before the mount: the daemon never looks at its own mount. ``logs``:
        where it logs and its recent errors, for the state file and the control socket's replies."""
        self.vol = vol
        self.ops = ops
        self.mountpoint = mountpoint
        self.image = image
        self.logs = logs
        self.state, self.sock = state_paths(self.mountpoint)
        self.signalled: int | None = None

    def _record(self, status: str) -> None:
        write_state(self.state, pid=os.getpid(), started=process_start(os.getpid()), image=self.image,
                    mountpoint=self.mountpoint, status=status, error=self.vol.failed,
                    log=self.logs.places if self.logs else [])

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                self.signalled = signum
                pyfuse3.terminate()
                return

    async def _control(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(self.sock)
        listener.listen(8)
        os.chmod(self.sock, 0o666)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(self._answer, conn)

    async def _answer(self, conn) -> None:
        with conn:
            try:
                request = (await conn.recv(256)).decode().strip()
                failed = None
                if request == "sync" and self.vol.failed is None and not self.vol.readonly:
                    try:
                        await self.vol.sync()
                    except VolumeError as e:  # the commit failed: the volume is read-only, the reply says why
                        failed = str(e)
                if request in ("stat", "sync"):
                    requests = getattr(self.ops, "requests", {})
                    stat = {**self.vol.stats(), **{f"fuse.{op}": n for op, n in requests.items()}}
                    reply = {"stat": stat, "error": self.vol.failed or failed,
                             "log": self.logs.places if self.logs else [],
                             "errors": self.logs.recent() if self.logs else []}
                else:
                    reply = {"error": f"unknown request {request!r}"}
                data = memoryview(json.dumps(reply).encode())
                while data:
                    data = data[await conn.send(data):]
            except Exception:
                log.exception("control request failed")

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            await nursery.start(self._control)
            await nursery.start(Flusher(self.vol).run)
            await nursery.start(self.vol.reads.readahead.run)
            await pyfuse3.main(min_tasks=2, max_tasks=self.vol.options.max_tasks)
            nursery.cancel_scope.cancel()

    def run(self) -> int:
        """Serve until unmounted; then commit and close. Returns the exit status."""
        self._record("running")
        self.vol.runner.frontend_pending = requests_waiting()
        kernel = getattr(self.ops, "kernel", None)
        device = mount_device(self.mountpoint)
        if kernel is not None and device is not None:
            kernel.attach(device)  # the kernel's dirty limit for the mount follows the volume's room
        # The cache holds many long-lived objects; full collections of them would stall requests for tens of
        # milliseconds. Freeze what exists now and collect the young generation less often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*self.vol.options.gc_thresholds)
        crashed = False
        try:
            trio.run(self.main)
        except BaseException:
            log.exception("the daemon failed")
            crashed = True
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("closing the FUSE session")
        try:
            self.vol.unmount()
        except Exception as e:
            log.exception("final commit failed")
            self.vol.fail(f"final commit failed: {e}")
        for path in (self.sock,):
            if os.path.exists(path):
                os.unlink(path)
        ok = not crashed and self.vol.failed is None
        self._record("done" if ok else "error")
        return 0 if ok else 1


def detach() -> None:
    """Become a background daemon: the parent returns to the shell once this is called."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def default_log_file(mountpoint: str) -> str:
    """The file a detached daemon logs to when there is no syslog (no ``/dev/log``): NAME.log in
    ``$XDG_STATE_HOME/tux3fuse`` when that is set, else in ``/var/log/tux3fuse`` for root and in
    ``~/.local/state/tux3fuse`` for other users. NAME is the mountpoint without its first slash and with the others
    turned into dashes (``/mnt/data``: ``mnt-data.log``; ``/``: ``root.log``)."""
    if os.environ.get("XDG_STATE_HOME"):
        base = os.path.join(os.environ["XDG_STATE_HOME"], "tux3fuse")
    elif os.geteuid() == 0:
        base = "/var/log/tux3fuse"
    else:
        base = os.path.join(os.path.expanduser("~"), ".local", "state", "tux3fuse")
    name = mountpoint.strip("/").replace("/", "-") or "root"
    return os.path.join(base, f"{name}.log")


class RecentErrors(logging.Handler):
    """Keeps the last ``capacity`` WARNING and ERROR records: time (seconds since the epoch), level and the
    message's first line (with the exception's type and text when the message is not followed by them)."""

    def __init__(self, capacity: int = RECENT_ERRORS) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            lines = record.getMessage().splitlines() or [""]
            message = lines[0]
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None and str(exc) not in message:
                message += f" ({type(exc).__name__}: {exc})"
            self.records.append({"time": record.created, "level": record.levelname, "message": message})
        except Exception:
            self.handleError(record)


def _log_file_handler(path: str, make_dir: bool = False) -> logging.Handler:
    if make_dir:
        os.makedirs(os.path.dirname(path), mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_FILE_BYTES, backupCount=1)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


class DaemonLog:
    """Where a mount daemon logs, set up on the root logger when made.

    Guarantees:
    - Until ``detached`` every record also goes to stderr, so what happens while mounting is seen by the command.
    - In the foreground the log is stderr. Detached, it is syslog when ``/dev/log`` exists, otherwise the file
      ``default_log_file(mountpoint)`` (or, if that cannot be created, the same name in the runtime state
      directory). ``logfile`` (``-o log=FILE``) is written in every mode, in addition; its directory must exist.
    - Every file is opened here: a file that cannot be written raises OSError before the daemon detaches.
    - ``places`` names every place the log goes ("stderr", "syslog" or a file path); ``recent`` returns the last
      ``RECENT_ERRORS`` WARNING and ERROR records, oldest first.
    """

    def __init__(self, mountpoint: str, debug: bool = False, foreground: bool = True,
                 logfile: str | None = None) -> None:
        root = logging.getLogger()
        root.setLevel(logging.DEBUG if debug else logging.INFO)
        self.stderr = logging.StreamHandler(sys.stderr)
        self.stderr.setFormatter(logging.Formatter(LOG_FORMAT))
        self.errors = RecentErrors()
        handlers: list[logging.Handler] = [self.stderr, self.errors]
        self.places: list[str] = []
        if foreground:
            self.places.append("stderr")
        elif os.path.exists("/dev/log"):
            syslog = logging.handlers.SysLogHandler("/dev/log")
            syslog.setFormatter(logging.Formatter("tux3fuse[%(process)d]: %(levelname)s: %(message)s"))
            handlers.append(syslog)
            self.places.append("syslog")
        else:
            path = default_log_file(mountpoint)
            try:
                handlers.append(_log_file_handler(path, make_dir=True))
            except OSError:  # e.g. a read-only home: the runtime state directory is writable (the daemon needs it)
                path = os.path.join(state_dir(), os.path.basename(path))
                handlers.append(_log_file_handler(path))
            self.places.append(path)
        if logfile is not None and logfile not in self.places:
            handlers.append(_log_file_handler(logfile))
            self.places.append(logfile)
        for old in root.handlers:
            if old not in handlers:
                old.close()
        root.handlers[:] = handlers

    def detached(self) -> None:
        """The daemon has left the terminal: stop logging to stderr (if it does not log there by choice)."""
        if "stderr" not in self.places:
            logging.getLogger().removeHandler(self.stderr)

    def recent(self) -> list[dict]:
        return list(self.errors.records)
