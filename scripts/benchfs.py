"""The filesystems that scripts/bench.py, bench_fsync.py and bench_fork.py measure: make, mount, unmount, clean up.

  tux3fuse        mkfs.tux3 -s SIZE -f IMAGE; tux3fuse [-f] [-o OPTS] IMAGE MNT; tux3 umount MNT
  fuse2fs         truncate -s SIZE IMAGE; mkfs.ext4 -F -q IMAGE; fuse2fs IMAGE MNT -o fakeroot; fusermount -u MNT
  ext4            losetup --find --show IMAGE; mkfs.ext4 -F -q LOOP; mount -t ext4 -o noinit_itable LOOP MNT;
                  umount MNT; losetup -d LOOP (kernel ext4; needs root and loop devices)
  null            python scripts/nullfs.py --stats STATS MNT, a child of the script; fusermount -u MNT
  null-fdatasync  python scripts/nullfs.py --fdatasync IMAGE --stats STATS MNT (IMAGE: the 4 KiB scratch file)
  passthrough     python scripts/fusecount.py --stats STATS passthroughfs.py --enable-writeback-cache SRC MNT, a
                  child of the script: pyfuse3's own example filesystem (examples/passthroughfs.py of the sdist of
                  the installed pyfuse3, fetched once with pip download into ~/.cache/tux3fuse-bench) mirroring
                  SRC, a directory beside the images; fusermount -u MNT
  native          no filesystem of its own: MNT is a directory on the local disk the work directory is on

Guarantees:
- `Fs.setup` returns with the filesystem mounted, or raises BenchError, or Unavailable when the filesystem cannot be
  set up on this machine (the caller skips it).
- `Fs.teardown` leaves nothing mounted on the mountpoint and no daemon serving it: three unmount attempts, then a
  lazy unmount, then the daemon is waited for and terminated after a timeout; loop devices are detached. It
  raises the unmount error, if there was one, only after all that.
- A daemon run in the foreground (nullfs, and tux3fuse with ``foreground``) is a child of the script in its own
  session (a Ctrl-C reaches only the script), logging to NAME.log beside the image; its exit status after the
  unmount must be 0.
- `benchkit.cleanup` does the same for whatever a failed or interrupted run left in a work directory.
- `Fs.requests` is the FUSE requests the daemon has answered since the mount, by operation (tux3fuse: the
  ``fuse.OP`` counters of ``tux3 stat --json``; nullfs and passthrough: their counts dumped on SIGUSR1), or None
  where nobody counts them; `Fs.daemon_pid` is the process serving the mount, or None where there is none.

The scripts import this module as `benchfs` (scripts/ is on sys.path when they run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from benchkit import (
    BenchError,
    daemon_pids,
    end_process,
    force_umount,
    fusermount,
    log,
    loop_devices,
    reap_daemons,
    run,
    wait_until,
    which,
)
from fusecount import read_counts

from tux3fuse.mounts import is_mounted

VENV_BIN = Path(sys.executable).parent
NULLFS = Path(__file__).resolve().parent / "nullfs.py"
FUSECOUNT = Path(__file__).resolve().parent / "fusecount.py"
CACHE = Path.home() / ".cache" / "tux3fuse-bench"  # pyfuse3's sdist, for its passthrough example
NAMES = ("tux3fuse", "fuse2fs", "ext4", "null", "null-fdatasync", "null-group", "passthrough", "native")


class Unavailable(Exception):
    """The filesystem cannot be set up on this machine (for instance: no loop devices); it is skipped."""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def drop_caches() -> None:
    os.sync()
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass


class Fs:
    """One filesystem under test in WORKDIR: IMAGE (NAME.img) mounted on MNT (NAME.mnt)."""

    name = ""
    persistent = True  # what is written survives an unmount (so remount makes sense)

    def __init__(self, workdir: Path, size: str = "2G") -> None:
        self.image = workdir / f"{self.name}.img"
        self.mnt = workdir / f"{self.name}.mnt"
        self.logpath = workdir / f"{self.name}.log"  # a foreground daemon's output
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None  # the foreground daemon

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _spawn(self, args: list[str]) -> None:
        """Start ARGS, a daemon that stays in the foreground, as a child in a session of its own; wait for it to
        mount (BenchError, with its log, if it exits or does not mount within 30 s)."""
        with open(self.logpath, "ab") as out:
            self.proc = proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        if not wait_until(lambda: is_mounted(self.mnt) or proc.poll() is not None, 30, 0.02):
            raise BenchError(f"{shlex.join(args)}: no mount after 30 s\n{self.log_tail()}")
        if not is_mounted(self.mnt):
            raise BenchError(f"{shlex.join(args)}: exit status {proc.returncode}\n{self.log_tail()}")

    def _reap_child(self) -> None:
        """Wait for the foreground daemon to exit (terminate it after a while); BenchError unless its status is 0."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        code = end_process(proc, f"{self.name} daemon")
        if code:
            raise BenchError(f"{self.name} exited with status {code}\n{self.log_tail()}")

    def missing(self) -> str | None:
        """Why this filesystem cannot run here (a tool is missing), or None."""
        raise NotImplementedError

    def mkfs(self) -> None:
        raise NotImplementedError

    def _mount(self) -> None:
        raise NotImplementedError

    def _umount(self) -> None:
        raise NotImplementedError

    def _reap(self) -> None:
        """Wait for the daemon serving the mount to exit (terminate it after a while)."""
        reap_daemons(self.image)

    def setup(self) -> None:
        self.mkfs()
        self.mount()

    def mount(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        self._mount()
        if not wait_until(lambda: is_mounted(self.mnt), 30):
            raise BenchError(f"{self.name}: {self.mnt} is not mounted after the mount command returned")

    def umount(self) -> None:
        """Unmount and wait for the daemon to exit; falls back to a lazy unmount. Raises the unmount error."""
        error: BenchError | None = None
        for attempt in range(3):
            if not is_mounted(self.mnt):
                break
            if attempt:
                time.sleep(1)  # busy: files of a killed job may still be being released
            try:
                self._umount()
                error = None
            except BenchError as e:
                error = e
        if is_mounted(self.mnt):
            log(f"  {self.name}: unmount failed ({error}); lazy unmount")
            force_umount(self.mnt)
        self._reap()
        if error is not None:
            raise error

    def teardown(self) -> None:
        self.umount()

    def remount(self) -> None:
        """Unmount, drop the page cache (when root), mount again: the next job starts cold."""
        self.umount()
        drop_caches()
        self.mount()

    def sync(self) -> None:
        """Make what was done so far durable before a timed phase (beyond a directory fsync)."""

    def stats(self) -> dict[str, float] | None:
        """The filesystem's own counters (commits, flushes), where it has them."""
        return None

    def mounted_check(self) -> None:
        if not is_mounted(self.mnt):
            raise BenchError(f"{self.mnt} is no longer mounted")

    def requests(self) -> dict[str, int] | None:
        """FUSE requests answered since the mount, by operation; None if they are not counted."""
        return None

    def daemon_pid(self) -> int | None:
        """The process serving the mount (its CPU time is the filesystem's); None if there is none."""
        return None

    def _single_daemon(self) -> int:
        """The one live process whose command line names IMAGE (a detached daemon); BenchError otherwise."""
        wait_until(lambda: len(daemon_pids(self.image)) == 1, 5, 0.05)
        pids = daemon_pids(self.image)
        if len(pids) != 1:
            raise BenchError(f"{self.name}: {len(pids)} processes name {self.image}, expected its daemon alone")
        return pids[0]

    def _child_pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"{self.name}: the daemon is not running")
        return self.proc.pid

    def _dumped_requests(self, stats: Path) -> dict[str, int]:
        """Ask the foreground daemon for its counts (SIGUSR1) and read them from STATS."""
        pid = self._child_pid()
        stats.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
        if not wait_until(stats.exists, 10, 0.01):
            raise BenchError(f"{self.name}: no request counts in {stats} 10 s after SIGUSR1\n{self.log_tail()}")
        return read_counts(stats)


def fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse not found"
    if not (shutil.which("fusermount") or shutil.which("fusermount3")):
        return "neither fusermount nor fusermount3 found"
    return None


class Tux3Fs(Fs):
    """tux3fuse; with ``foreground``, ``tux3fuse -f`` as a child of the script (its exit status is checked)."""

    name = "tux3fuse"

    def __init__(self, workdir: Path, size: str = "2G", options: str | None = None, foreground: bool = False,
                 label: str | None = None) -> None:
        if label:
            self.name = label
        super().__init__(workdir, size)
        self.options, self.foreground = options, foreground

    def missing(self) -> str | None:
        for tool in ("mkfs.tux3", "tux3fuse", "tux3"):
            if not (VENV_BIN / tool).exists():
                return f"{VENV_BIN / tool} not found (run 'make install')"
        return fuse_missing()

    def mkfs(self) -> None:
        run([VENV_BIN / "mkfs.tux3", "-s", self.size, "-f", self.image])

    def _mount(self) -> None:
        opts = ["-o", self.options] if self.options else []
        if self.foreground:
            self._spawn([str(VENV_BIN / "tux3fuse"), "-f", *opts, str(self.image), str(self.mnt)])
        else:
            run([VENV_BIN / "tux3fuse", *opts, self.image, self.mnt], timeout=60)

    def _umount(self) -> None:
        run([VENV_BIN / "tux3", "umount", self.mnt], timeout=300)

    def _reap(self) -> None:
        if self.foreground:
            self._reap_child()
        else:
            super()._reap()

    def sync(self) -> None:
        run([VENV_BIN / "tux3", "sync", self.mnt], timeout=300)

    def requests(self) -> dict[str, int] | None:
        """The ``fuse.OP`` counters of ``tux3 stat --json`` (None if the daemon has none)."""
        counts = {k.removeprefix("fuse."): int(v) for k, v in self.stats().items() if k.startswith("fuse.")}
        return counts or None

    def daemon_pid(self) -> int | None:
        return self._child_pid() if self.foreground else self._single_daemon()

    def stats(self) -> dict[str, float]:
        """The numeric counters of ``tux3 stat --json`` (commits and flushes at least)."""
        proc = run([VENV_BIN / "tux3", "stat", "--json", self.mnt], timeout=60, check=False)
        try:
            data = json.loads(proc.stdout)
            out = {k: float(v) for k, v in data.items() if isinstance(v, int | float)}
            out["commits"], out["flushes"] = float(data["commits"]), float(data["flushes"])
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BenchError(f"tux3 stat --json {self.mnt}: exit status {proc.returncode}, unusable output "
                             f"({type(e).__name__}: {e}): {(proc.stdout + proc.stderr).strip()[:500]}") from e


class Fuse2Fs(Fs):
    name = "fuse2fs"

    def missing(self) -> str | None:
        for tool in ("fuse2fs", "mkfs.ext4"):
            if not which(tool):
                return f"{tool} not found (apt-get install fuse2fs e2fsprogs)"
        return fuse_missing()

    def mkfs(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(parse_size(self.size))
        run([which("mkfs.ext4") or "mkfs.ext4", "-F", "-q", self.image])

    def _mount(self) -> None:
        run([which("fuse2fs") or "fuse2fs", self.image, self.mnt, "-o", "fakeroot"], timeout=60)

    def _umount(self) -> None:
        run([fusermount(), "-u", self.mnt], timeout=60)

    def daemon_pid(self) -> int | None:
        return self._single_daemon()


class NullFs(Fs):
    """scripts/nullfs.py in the foreground as a child process. With fdatasync, IMAGE is its scratch file: every
    fsync writes and fdatasyncs 4 KiB of it."""

    name = "null"
    persistent = False

    def __init__(self, workdir: Path, size: str = "2G", fdatasync: bool = False, nowriteback: bool = False,
                 group: bool = False) -> None:
        if fdatasync:
            self.name = "null-group" if group else "null-fdatasync"
        super().__init__(workdir, size)
        self.fdatasync = fdatasync
        self.group = group  # with fdatasync: concurrent fsyncs share flushes (nullfs --group)
        self.nowriteback = nowriteback  # the kernel's writeback cache off: every write() is a request
        self.statsfile = workdir / f"{self.name}.stats.json"

    def missing(self) -> str | None:
        return fuse_missing()

    def mkfs(self) -> None:
        pass

    def _mount(self) -> None:
        self._spawn([sys.executable, str(NULLFS), *(["--fdatasync", str(self.image)] if self.fdatasync else []),
                     *(["--group"] if self.group else []), *(["--nowriteback"] if self.nowriteback else []),
                     "--stats", str(self.statsfile),
                     str(self.mnt)])

    def _umount(self) -> None:
        run([fusermount(), "-u", self.mnt], timeout=60)

    def _reap(self) -> None:
        self._reap_child()

    def requests(self) -> dict[str, int]:
        # "fdatasync" counts nullfs's flushes of its scratch file, not a request
        return {k: v for k, v in self._dumped_requests(self.statsfile).items() if k != "fdatasync"}

    def daemon_pid(self) -> int:
        return self._child_pid()


def passthrough_example(cache: Path = CACHE) -> Path:
    """pyfuse3's examples/passthroughfs.py for the installed pyfuse3, from its sdist (``pip download`` into CACHE
    the first time, then kept there). Unavailable, with the reason, if it cannot be had."""
    try:
        ver = version("pyfuse3")
    except PackageNotFoundError as e:
        raise Unavailable("pyfuse3 is not installed") from e
    target = cache / f"passthroughfs-{ver}.py"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob(f"pyfuse3-{ver}.tar.gz"))
    if not sdists:
        log(f"passthrough: fetching the sdist of pyfuse3 {ver} into {cache} (once)")
        try:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                 f"pyfuse3=={ver}", "-d", cache], timeout=900)
        except BenchError as e:
            raise Unavailable(f"cannot fetch the sdist of pyfuse3 {ver}: {str(e).splitlines()[-1]}") from e
        sdists = sorted(cache.glob(f"pyfuse3-{ver}.tar.gz"))
        if not sdists:
            raise Unavailable(f"pip download left no pyfuse3-{ver}.tar.gz in {cache}")
    member = f"pyfuse3-{ver}/examples/passthroughfs.py"
    try:
        with tarfile.open(sdists[0]) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            data = f.read()
    except (OSError, tarfile.TarError, KeyError) as e:
        raise Unavailable(f"no {member} in {sdists[0]}: {e}") from e
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


class PassthroughFs(Fs):
    """pyfuse3's passthroughfs.py example mirroring SRC (a directory beside the images), with the kernel's
    writeback cache as tux3fuse's, under scripts/fusecount.py; a child of the script. Its fsync and flush reply
    ENOSYS (the kernel then stops sending them)."""

    name = "passthrough"

    def __init__(self, workdir: Path, size: str = "2G") -> None:
        super().__init__(workdir, size)
        self.src = workdir / f"{self.name}.src"
        self.statsfile = workdir / f"{self.name}.stats.json"
        self.example: Path | None = None

    def missing(self) -> str | None:
        why = fuse_missing()
        if why:
            return why
        try:
            self.example = passthrough_example()
        except Unavailable as e:
            return str(e)
        return None

    def mkfs(self) -> None:
        if self.example is None:
            self.example = passthrough_example()
        self.src.mkdir(exist_ok=True)

    def _mount(self) -> None:
        self._spawn([sys.executable, str(FUSECOUNT), "--stats", str(self.statsfile), str(self.example),
                     "--enable-writeback-cache", str(self.src), str(self.mnt)])

    def _umount(self) -> None:
        run([fusermount(), "-u", self.mnt], timeout=60)

    def _reap(self) -> None:
        self._reap_child()

    def requests(self) -> dict[str, int]:
        return self._dumped_requests(self.statsfile)

    def daemon_pid(self) -> int:
        return self._child_pid()


class NativeFs(Fs):
    """No filesystem of its own: MNT is a directory on the local disk the work directory is on (the limit). A cold
    start is sync + drop_caches."""

    name = "native"

    def missing(self) -> str | None:
        return None

    def mkfs(self) -> None:
        pass

    def mount(self) -> None:
        self.mnt.mkdir(exist_ok=True)

    def umount(self) -> None:
        pass

    def remount(self) -> None:
        drop_caches()

    def sync(self) -> None:
        os.sync()

    def mounted_check(self) -> None:
        if not self.mnt.is_dir():
            raise BenchError(f"{self.mnt} is gone")


class Ext4LoopFs(Fs):
    name = "ext4"

    def __init__(self, workdir: Path, size: str = "2G") -> None:
        super().__init__(workdir, size)
        self.device: str | None = None

    def missing(self) -> str | None:
        if os.geteuid() != 0:
            return "loop devices unavailable: losetup and mount need root"
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            if not which(tool):
                return f"{tool} not found"
        if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
            return "loop devices unavailable: neither /dev/loop-control nor /dev/loop0 exists"
        return None

    def mkfs(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(parse_size(self.size))
        proc = run([which("losetup") or "losetup", "--find", "--show", self.image], check=False, timeout=60)
        if proc.returncode != 0 or not proc.stdout.strip().startswith("/dev/"):
            raise Unavailable(f"loop devices unavailable: losetup --find --show: exit status {proc.returncode}: "
                              f"{(proc.stderr or proc.stdout).strip()}")
        self.device = proc.stdout.strip()
        run([which("mkfs.ext4") or "mkfs.ext4", "-F", "-q", self.device])

    def _mount(self) -> None:
        run([which("mount") or "mount", "-t", "ext4", "-o", "noinit_itable", self.device, self.mnt], timeout=60)

    def _umount(self) -> None:
        run([which("umount") or "umount", self.mnt], timeout=120)

    def _reap(self) -> None:
        pass

    def sync(self) -> None:
        os.sync()

    def teardown(self) -> None:
        """Unmount, then detach the loop device (also when the unmount failed)."""
        error: BenchError | None = None
        try:
            self.umount()
        except BenchError as e:
            error = e
        finally:
            devices = {self.device} if self.device else set()
            devices.update(loop_devices(self.image))
            for dev in sorted(d for d in devices if d):
                proc = run([which("losetup") or "losetup", "-d", dev], check=False, timeout=60)
                if proc.returncode != 0:
                    error = error or BenchError(f"losetup -d {dev}: {proc.stderr.strip()}")
            self.device = None
        if error is not None:
            raise error


def dispose(fs: Fs) -> BenchError | None:
    """Tear ``fs`` down and remove its image (also when the teardown failed); the teardown's error, if any."""
    error = None
    try:
        fs.teardown()
    except BenchError as e:
        error = e
    try:
        fs.image.unlink(missing_ok=True)
    except OSError:
        pass
    return error


def make_fs(name: str, workdir: Path, size: str = "2G", tux3_options: str | None = None) -> Fs:
    """The filesystem called NAME (one of NAMES) in WORKDIR."""
    if name == "tux3fuse":
        return Tux3Fs(workdir, size, tux3_options)
    if name in ("null", "null-fdatasync", "null-group"):
        return NullFs(workdir, size, fdatasync=name != "null", group=name == "null-group")
    return {"fuse2fs": Fuse2Fs, "ext4": Ext4LoopFs, "passthrough": PassthroughFs, "native": NativeFs}[name](
        workdir, size)
