"""Shared fixtures: real images, real mounts.

A mounted test gets a ``Mount``: mkfs into a temp dir, the daemon started in the foreground as a subprocess,
and at the end ``tux3 umount`` (which must succeed), the daemon's exit, and an fsck that must be clean.
With CI=true a machine without FUSE fails the mounted tests instead of skipping them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

BIN = Path(sys.executable).parent
# every volume the tests open, and every daemon they start, checks after each commit that the image replays to
# the state in memory (Options.verify_log): a log that does not replay fails the test at the delta that wrote it
os.environ.setdefault("TUX3FUSE_VERIFY_LOG", "1")
ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module, importing its sibling modules (benchfs, benchkit) as it would."""
    scripts = ROOT / "scripts"
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def fuse_problem() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e}"
    return None


def require_fuse() -> None:
    problem = fuse_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"FUSE is required on CI: {problem}")
        pytest.skip(problem)


def nbd_problem() -> str | None:
    """Why NBD volumes cannot be tested here, or None: the nbdkit server or libnbd's Python module is missing."""
    if shutil.which("nbdkit") is None:
        return "nbdkit is missing (apt-get install nbdkit)"
    try:
        import nbd  # noqa: F401
    except ImportError:
        return "libnbd's Python module is missing (apt-get install python3-libnbd, then make install)"
    return None


def require_nbd() -> None:
    problem = nbd_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"NBD is required on CI: {problem}")
        pytest.skip(problem)


class Nbdkit:
    """An nbdkit server on a Unix socket in ``directory``, started by the test and killed by its PID at the end
    (``stop``): ``Nbdkit(tmp_path, "file", "file=IMG", "error-rate=10%", filters=["--filter=error"])`` (the
    parameters of the filters come after the plugin's name, with the plugin's). ``uri``
    is the URI the tools take."""

    def __init__(self, directory: Path, plugin: str, *args: str, filters: list[str] = (), name: str = "nbd"
                 ) -> None:
        self.socket = directory / f"{name}.sock"
        self.log = directory / f"{name}.nbdkit.log"
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.argv = ["nbdkit", "--unix", str(self.socket), "--foreground", "--exit-with-parent", *filters, plugin,
                     *args]
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> Nbdkit:
        if self.socket.exists():
            self.socket.unlink()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self._listening():  # the socket file exists a moment before the server listens on it
            if self.proc.poll() is not None:
                raise AssertionError(f"nbdkit exited with {self.proc.returncode}: {self.log.read_text()}")
            assert time.monotonic() < deadline, "nbdkit did not listen within 20 s"
            time.sleep(0.01)
        return self

    def _listening(self) -> bool:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


from tux3fuse.mounts import is_mounted  # noqa: E402,F401  (the tests import it from here)


def one_line(r: subprocess.CompletedProcess) -> str:
    """The one line a failing command printed on stderr (no traceback, no "internal error")."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def mkfs(image: Path, size: str = "256M", blocksize: int = 4096) -> None:
    subprocess.run([tool("mkfs.tux3"), "-q", "-f", "-b", str(blocksize), "-s", size, str(image)], check=True)


def opened(path: str, **options):
    """An embedded Volume on ``path``, mounted as a mount would (orphans reclaimed, a commit)."""
    from tux3fuse.fs import Options, Volume

    vol = Volume(path, Options(**options))
    vol.mount()
    return vol


def drive(steps) -> tuple[int, object]:
    """Run a step generator to its end: (how many times it yielded, the value it returned)."""
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return yields, done.value
        yields += 1


def read_all(vol, name: bytes, parent: int = 1) -> bytes:
    """The content of ``name`` in directory ``parent`` through the embedded API."""
    attr = vol.lookup(parent, name)
    return vol.read(attr.ino, 0, attr.size)


@pytest.fixture
def make_vol(tmp_path):
    """make_vol(stable="fork", **options) -> an embedded volume on a fresh 32 MiB image with 4 KiB blocks, mounted;
    unmounted at the end if still open."""
    from mkfs import mkfs as make_volume
    from tux3fuse.fs import Options, Volume

    vols = []

    def make(stable: str = "fork", **options):
        path = str(tmp_path / f"{stable}{len(vols)}.img")
        make_volume(path, 4096, 32 << 20)
        v = Volume(path, Options(stable=stable, **options))
        v.mount()
        vols.append(v)
        return v

    yield make
    for v in vols:
        if v.lock_fd >= 0:
            v.unmount()


@pytest.fixture
def image(tmp_path) -> str:
    """A fresh 64 MiB image with 4 KiB blocks, for the embedded API."""
    from mkfs import mkfs as make_volume

    path = str(tmp_path / "a.img")
    make_volume(path, 4096, 64 << 20)
    return path


def fsck(image: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("fsck.tux3"), *args, str(image)], capture_output=True, text=True)


def address_space(limit: int):
    """A ``preexec_fn`` that limits a child's address space to ``limit`` bytes (RLIMIT_AS): a command that would
    exhaust the machine fails instead."""
    import resource

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return set_limit


class Mount:
    """tux3fuse on ``image`` (a path, or an NBD URI as a str; then ``log`` names the daemon's output file); with
    ``memory``, the daemon's address space is limited to that many bytes."""

    def __init__(self, image: Path | str, mnt: Path, options: str = "", log: Path | None = None,
                 memory: int | None = None) -> None:
        self.image, self.mnt, self.options = image, mnt, options
        self.proc: subprocess.Popen | None = None
        self.log = log or Path(image).with_suffix(".log")
        self.memory = memory

    def start(self, options: str | None = None) -> Mount:
        if options is not None:
            self.options = options
        self.mnt.mkdir(exist_ok=True)
        args = [tool("tux3fuse"), "-f", str(self.image), str(self.mnt)]
        if self.options:
            args[1:1] = ["-o", self.options]
        self.logfile = open(self.log, "ab")
        self.proc = subprocess.Popen(args, stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=address_space(self.memory) if self.memory else None)
        deadline = time.monotonic() + 20
        while not is_mounted(str(self.mnt)):
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("mount did not appear within 20 s")
            time.sleep(0.02)
        return self

    def umount(self, expect_ok: bool = True) -> int:
        r = subprocess.run([tool("tux3"), "umount", str(self.mnt)], capture_output=True, text=True, timeout=120)
        self.umount_stderr = r.stderr
        assert self.proc is not None
        self.proc.wait(timeout=60)
        self.logfile.close()
        if expect_ok:
            assert r.returncode == 0, f"umount: {r.stderr}\n{self.log.read_text()}"
            assert self.proc.returncode == 0, self.log.read_text()
        assert not is_mounted(str(self.mnt))
        self.proc = None
        return r.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self.logfile.close()
        if is_mounted(str(self.mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        self.proc = None

    def cleanup(self) -> None:
        if self.proc is not None:
            if is_mounted(str(self.mnt)):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.logfile.close()
            self.proc = None

    def path(self, *parts: str) -> str:
        return os.path.join(str(self.mnt), *parts)

    def stat_json(self) -> dict:
        import json
        r = subprocess.run([tool("tux3"), "stat", "--json", str(self.mnt)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr  # 1: the volume has failed
        return json.loads(r.stdout)


class NullMount:
    """scripts/nullfs.py (a FUSE filesystem that is not tux3fuse) mounted at ``mnt``, its output in ``log``.

    The constructor returns once the mount is in the mount table; ``cleanup`` unmounts it if it still is."""

    def __init__(self, mnt: Path, log: Path, extra: list[str]) -> None:
        self.mnt, self.log = mnt, log
        mnt.mkdir()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "nullfs.py"), *extra, str(mnt)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not is_mounted(str(mnt)):
            assert self.proc.poll() is None, f"nullfs exited with {self.proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, "mount did not appear within 20 s"
            time.sleep(0.02)

    def umount(self) -> int:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True, timeout=60)
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if is_mounted(str(self.mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, timeout=60)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def make_mount(tmp_path):
    """Factory: make_mount(size=..., blocksize=..., options=...) -> started Mount; checked at teardown."""
    require_fuse()
    mounts: list[Mount] = []

    def factory(size: str = "256M", blocksize: int = 4096, options: str = "", name: str = "fs") -> Mount:
        image = tmp_path / f"{name}.img"
        mkfs(image, size, blocksize)
        m = Mount(image, tmp_path / f"{name}.mnt", options)
        mounts.append(m)
        return m.start()

    yield factory
    for m in mounts:
        m.cleanup()
    for m in mounts:
        r = fsck(m.image)
        assert r.returncode == 0, f"fsck after the test: {r.stdout}{r.stderr}"


@pytest.fixture
def mount(make_mount) -> Mount:
    return make_mount()
