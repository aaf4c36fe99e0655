"""Where a volume's bytes live: an image file or block device, or an NBD export.

``open_backing(target, readonly)`` chooses by the target's form: a URI ``nbd://host[:port]/export`` or
``nbd+unix:///export?socket=PATH`` (any ``nbd...://``) is an NBD export reached through libnbd; anything else is a
path. Every caller that touches a volume's bytes (the device, the load, fsck and the repairs, mkfs) does it through
the interface of ``Backing``: ``size``, ``pread``, ``pwrite``, ``pwritev``, ``write_runs``, ``flush``, ``lock``,
``close`` and ``name`` for messages.

Guarantees:
- A read returns the bytes stored at that offset; past the end it is short (as a file's ``pread``).
- ``write_runs`` writes every run and returns only when every one has been acknowledged; runs that overlap land in
  the order given (the later wins). An NBD backing keeps up to ``WINDOW`` writes in flight, so that a device with
  a high latency still gets its bandwidth.
- ``flush`` returns only when every write acknowledged before it is durable (fdatasync, or the NBD flush). A write
  with ``fua=True`` is durable when it returns (NBD FUA, or a write and a flush when the export cannot do FUA).
- Any failure of an NBD export, a server's error or a dropped connection, is ``OSError(EIO, "<uri>: <what
  happened>")``, which the volume's failure policy turns into a read-only volume with that message (runner.py,
  failure.py); nothing acknowledged as durable before it is lost.
- ``lock``: a file is locked with ``flock`` (shared for a read-only user, exclusive for a writer), as a mount holds
  it from the mount until its last commit is written. NBD has no lock: what is checked instead is a lock file of
  this machine named after the URI (``$TMPDIR/tux3fuse-nbd-<hash>.lock``), so that a mount, fsck or mkfs of the
  same URI spelt the same way on this machine refuse each other. Clients on other machines are not seen: serve an
  export to one client only (nbdkit ``--filter=limit``, qemu-nbd's default).

This module imports nothing of tux3fuse, so that mkfs may use it; libnbd's Python module (``nbd``) is imported
only when an NBD export is opened.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview

WINDOW = 16  # NBD writes kept in flight by write_runs
POLL_MS = 1000  # the longest write_runs waits for a reply at once, holding the handle
NBD_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")


class InUse(BlockingIOError):
    """The volume is in use: mounted, being checked or being made."""


def is_uri(target: str) -> bool:
    """Is ``target`` an NBD URI (rather than a path)?"""
    return target.startswith(NBD_SCHEMES)


class Backing:
    """The bytes of a volume. ``name`` is how messages name it (the path or the URI)."""

    name: str
    readonly: bool
    regular = False  # a regular file: it may be sparse (Device fills its holes)
    can_fua = False  # a write can be made durable on its own (NBD FUA)
    fd = -1  # the file descriptor of a file backing; -1 otherwise

    def size(self) -> int:
        raise NotImplementedError

    def pread(self, count: int, offset: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, data: Buffer, offset: int, *, fua: bool = False) -> int:
        raise NotImplementedError

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> int:
        """Write ``bufs`` one after the other from ``offset``, all of them; returns the bytes written."""
        raise NotImplementedError

    def write_runs(self, runs: Sequence[tuple[int, Sequence[Buffer]]]) -> None:
        """Write each (offset, buffers) run; return when all are written."""
        for offset, bufs in runs:
            self.pwritev(bufs, offset)

    def flush(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Everything written durable, metadata too (a file's fsync; an NBD flush)."""
        self.flush()

    def lock(self, exclusive: bool) -> None:
        """Take the "in use" lock without waiting (exclusive for a writer); ``InUse`` when another holds it."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileBacking(Backing):
    """An image file or a block device, through its file descriptor."""

    def __init__(self, path: str, readonly: bool = False, *, fd: int | None = None) -> None:
        self.name = path
        self.readonly = readonly
        self.owned = fd is None
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR) if fd is None else fd
        mode = os.fstat(self.fd).st_mode
        self.regular = stat.S_ISREG(mode)
        self.block_device = stat.S_ISBLK(mode)

    def size(self) -> int:
        if self.block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def pread(self, count: int, offset: int) -> bytes:
        return os.pread(self.fd, count, offset)

    def pwrite(self, data: Buffer, offset: int, *, fua: bool = False) -> int:
        done = os.pwrite(self.fd, data, offset)
        if fua:
            os.fdatasync(self.fd)
        return done

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> int:
        total = sum(len(b) for b in bufs)
        done = os.pwritev(self.fd, bufs, offset)
        while done < total:  # short writes are legal; finish the rest
            rest = b"".join(bytes(b) for b in bufs)[done:]
            done += os.pwrite(self.fd, rest, offset + done)
        return total

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def sync(self) -> None:
        """Data and metadata durable (fsync): the offline repairs end with it."""
        os.fsync(self.fd)

    def lock(self, exclusive: bool) -> None:
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            raise InUse(errno.EWOULDBLOCK, f"{self.name} is in use") from None

    def close(self) -> None:
        if self.fd >= 0 and self.owned:
            os.close(self.fd)
        self.fd = -1


def lock_file(uri: str) -> str:
    """The lock file of this machine that stands for the NBD export ``uri``."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"tux3fuse-nbd-{digest}.lock")


class NbdBacking(Backing):
    """An NBD export through libnbd. One handle, used by one thread at a time (``self.mutex``): a reader waits at
    most for the reply the writer is waiting for, never for a whole batch."""

    def __init__(self, uri: str, readonly: bool = False) -> None:
        try:
            import nbd
        except ImportError:
            raise OSError(errno.ENOSYS, f"{uri}: NBD volumes need libnbd's Python module (Debian: apt-get install "
                          "python3-libnbd; make install links it into the venv)") from None
        self.nbd = nbd
        self.name = uri
        self.readonly = readonly
        self.mutex = threading.Lock()
        self.lock_fd = -1
        self.h = nbd.NBD()
        try:
            self.h.set_handle_name("tux3fuse")
            self.h.connect_uri(uri)
            self._size = self.h.get_size()
            if not readonly and self.h.is_read_only():
                raise OSError(errno.EROFS, f"{uri}: the server exports it read-only")
            self.can_flush = self.h.can_flush()
            self.can_fua = self.h.can_fua()
        except nbd.Error as e:
            self._close_handle()
            raise OSError(errno.EIO, f"{uri}: {self._said(e)}") from None
        except BaseException:
            self._close_handle()
            raise

    @staticmethod
    def _said(e: Exception) -> str:
        text = getattr(e, "string", None) or str(e)
        return text.strip().rstrip(".")

    def _error(self, e: Exception, what: str) -> OSError:
        return OSError(errno.EIO, f"{self.name}: {what}: {self._said(e)}")

    def size(self) -> int:
        return self._size

    def pread(self, count: int, offset: int) -> bytes:
        count = max(0, min(count, self._size - offset))  # past the end: short, as a file
        if count == 0:
            return b""
        with self.mutex:
            try:
                return bytes(self.h.pread(count, offset))
            except self.nbd.Error as e:
                raise self._error(e, f"read of {count} bytes at {offset}") from None

    def pwrite(self, data: Buffer, offset: int, *, fua: bool = False) -> int:
        with self.mutex:
            try:
                self.h.pwrite(bytes(data), offset, self.nbd.CMD_FLAG_FUA if fua and self.can_fua else 0)
                if fua and not self.can_fua:
                    self._flush_locked()
            except self.nbd.Error as e:
                raise self._error(e, f"write of {len(data)} bytes at {offset}") from None
        return len(data)

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> int:
        data = b"".join(bufs)
        self.pwrite(data, offset)
        return len(data)

    def write_runs(self, runs: Sequence[tuple[int, Sequence[Buffer]]]) -> None:
        """Up to ``WINDOW`` writes in flight; a run that overlaps one in flight waits until all in flight are
        done, so that the later write lands last. Every command is retired before this returns, failed or not."""
        h, nbd = self.h, self.nbd
        flight: dict[int, tuple[int, int]] = {}  # cookie -> (offset, end)
        failure: OSError | None = None

        def retire() -> int:
            nonlocal failure
            retired = 0
            for cookie in list(flight):
                try:
                    done = h.aio_command_completed(cookie)
                except nbd.Error as e:
                    offset, end = flight.pop(cookie)
                    failure = failure or self._error(e, f"write of {end - offset} bytes at {offset}")
                    retired += 1
                    continue
                if done:
                    del flight[cookie]
                    retired += 1
            return retired

        def reap(block: bool) -> None:
            with self.mutex:
                # a reader's call may have taken replies meanwhile: wait only when nothing has completed, and
                # never longer than POLL_MS at once
                if not retire() and block and flight:
                    h.poll(POLL_MS)
                    retire()

        try:
            for offset, bufs in runs:
                data = b"".join(bufs)
                end = offset + len(data)
                while flight and (len(flight) >= WINDOW or any(o < end and offset < e for o, e in flight.values())):
                    reap(True)
                if failure is not None:
                    break
                with self.mutex:
                    cookie = h.aio_pwrite(nbd.Buffer.from_buffer(data), offset)
                flight[cookie] = (offset, end)
            while flight:
                reap(True)
        except nbd.Error as e:  # the connection went: what is in flight is lost with it
            raise self._error(e, "write") from None
        if failure is not None:
            raise failure

    def _flush_locked(self) -> None:
        if self.can_flush:
            self.h.flush()

    def flush(self) -> None:
        with self.mutex:
            try:
                self._flush_locked()
            except self.nbd.Error as e:
                raise self._error(e, "flush") from None

    def lock(self, exclusive: bool) -> None:
        if self.lock_fd < 0:
            self.lock_fd = os.open(lock_file(self.name), os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.lock_fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            raise InUse(errno.EWOULDBLOCK, f"{self.name} is in use") from None

    def _close_handle(self) -> None:
        h, self.h = getattr(self, "h", None), None
        if h is None:
            return
        try:
            if not (h.aio_is_dead() or h.aio_is_closed() or h.aio_is_created()):
                h.shutdown()
        except Exception:  # a server that is gone: nothing to tell it
            pass
        del h  # libnbd closes the handle and its connection when the object goes

    def close(self) -> None:
        self._close_handle()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def open_backing(target: str, readonly: bool = False) -> Backing:
    """The backing ``target`` names: an NBD export for a URI, else an image file or block device. ``OSError`` when
    it cannot be opened (for an NBD export: EIO with what the server or libnbd said)."""
    if is_uri(target):
        return NbdBacking(target, readonly)
    return FileBacking(target, readonly)


def as_backing(target: Backing | int, name: str = "image") -> Backing:
    """``target`` itself, or a backing on an open file descriptor that the caller keeps (scripts and tests that
    hold one)."""
    if isinstance(target, Backing):
        return target
    return FileBacking(name, fd=target)
