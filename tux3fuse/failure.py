"""The failure policy of a volume, and the exceptions an operation raises instead of waiting.

Guarantees:
- An operation of the embedded API raises ``OSError`` (the errno a POSIX filesystem would return),
  ``VolumeError`` for a volume that has failed, or one of the control-flow exceptions ``WaitFor`` and
  ``Throttled``, which are raised before anything is changed and tell the caller what to await before it tries
  again (``Volume.call`` does both).
- Anything else (a corrupt block, or a bug) turns the volume read-only (``Health.fail``: the image keeps its last
  commit) and reaches the caller as EIO (``guarded``), for every caller: the FUSE adapter, tests, scripts. A
  corrupt block or directory (``CorruptBlock``, ``CorruptDir``: what a check at reading found, ``validity.py``) is
  logged as one line naming the block or inode and the reason; anything else, a bug, with its stack.
- An operation that fails after it began to change its delta (any exception, an I/O error included, leaving a
  ``Deltas.change`` block) turns the volume read-only before that delta can be committed (``Health.abort``), and
  the log names the operation and its arguments (its inodes and names): what is on disk stays the last commit,
  as ext4's ``errors=remount-ro`` keeps the journal's. The caller gets the error itself.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
from typing import TYPE_CHECKING

from .dir import CorruptDir
from .format import CorruptBlock

if TYPE_CHECKING:
    from .backend.commit import CommitJob

log = logging.getLogger("tux3fuse")


class VolumeError(Exception):
    """The volume cannot be used (bad image, or it failed while mounted)."""


class NotAVolume(VolumeError):
    """The image holds no tux3fuse volume at all: too short, or no superblock copy has the signature (fsck.tux3
    exits 8 for it, as e2fsck does for what is not a filesystem it can check)."""


class Throttled(Exception):
    """The writer must wait for a commit before it goes on; nothing was changed. Dirty data is over
    ``Options.dirty_limit`` (the balance_dirty_pages analogue), or (``NeedSpace``) the space the write needs is
    held by deltas not yet committed. The flusher commits; the caller waits for it and tries again."""

    unify = False  # the commit waited for must be a unify (it frees tree nodes only a unify releases)


class NeedSpace(Throttled):
    """The write needs blocks that earlier deltas free once committed (``Space.reserve``): wait for a commit
    (a unify when ``unify``), then try once more, when ENOSPC is final."""

    def __init__(self, unify: bool) -> None:
        super().__init__("waiting for a commit to free space" + (" (a unify)" if unify else ""))
        self.unify = unify


class WaitFor(Exception):
    """The operation must wait for a commit in flight: until its blocks are written (``written``: stable=wait,
    a page the commit is writing), or until it completes (space held by that commit); nothing was changed. Await
    ``Runner.wait_job(job, written)`` and try again (``Volume.call`` does both)."""

    def __init__(self, job: CommitJob, written: bool = False) -> None:
        what = "the blocks of" if written else "the commit of"
        super().__init__(f"waiting for {what} delta {job.delta}")
        self.job = job
        self.written = written


def err(code: int, what: str = "") -> OSError:
    """An OSError with the errno's text, and ``what`` after it."""
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


class Health:
    """Whether the volume may change: not when mounted read-only, nor once it has failed (then for good)."""

    def __init__(self, path: str, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self.failed: str | None = None
        self.operation: tuple[str, tuple] | None = None  # the embedded-API operation under way (``guarded``)

    def fail(self, reason: str, exc: BaseException | None = None, stack: bool = True) -> None:
        """Turn the volume read-only after an error it cannot recover from; the image keeps its last commit. The
        log line carries the stack of ``exc`` (or of the exception being handled) unless ``stack`` is false
        (damage on disk, whose line says everything)."""
        if self.failed is None:
            self.failed = reason
            log.error("volume %s is now read-only: %s", self.path, reason, exc_info=(exc or True) if stack else False)

    def abort(self, delta: int, exc: BaseException) -> None:
        """A change of ``delta`` was left by ``exc``, perhaps half made: the volume turns read-only, so that no
        commit takes the delta (``Deltas.on_abort``)."""
        what = describe(self.operation) if self.operation is not None else "a change"
        self.fail(f"{what} failed after it began changing delta {delta} ({type(exc).__name__}: {exc}); "
                  f"delta {delta} will not be committed", exc, stack=not isinstance(exc, (CorruptBlock, CorruptDir)))

    def check_writable(self) -> None:
        if self.failed is not None or self.readonly:
            raise err(errno.EROFS)

    @property
    def writable(self) -> bool:
        return self.failed is None and not self.readonly


def describe(operation: tuple[str, tuple]) -> str:
    """``rename(3, b'a', 5, b'b')``: an operation and its arguments (inode numbers, names), for a log line."""
    name, args = operation
    shown = [f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 64
             else repr(a) if isinstance(a, (int, bytes, str)) else type(a).__name__ for a in args]
    text = ", ".join(shown)
    return f"{name}({text if len(text) <= 400 else text[:400] + '...'})"


PASS = (OSError, WaitFor, Throttled, VolumeError)  # the caller's answers: they go through ``guarded`` unchanged


def guarded(fn):
    """Decorate a method of an object with ``health`` (a ``Health``): every exception but those of ``PASS``
    is logged with its stack, fails the volume and is raised as EIO. A ``Throttled`` raised by a caller that no
    event loop serves is handled by the object's ``commit_for(e)`` when it has one (a synchronous commit, then one
    more try; ``Volume``'s embedded mode)."""
    def fail(self, e: Exception) -> OSError:
        damage = isinstance(e, (CorruptBlock, CorruptDir))
        reason = str(e) if damage else f"unexpected {type(e).__name__} in {fn.__name__}: {e}"
        health = self.health
        if health.failed is None:
            health.fail(reason, stack=not damage)  # one line for damage, the stack for a bug
        else:
            log.error("%s (volume already read-only)", reason, exc_info=not damage)
        return OSError(errno.EIO, f"{os.strerror(errno.EIO)}: {reason}")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(self, *args, **kwargs):
            try:
                yield from fn(self, *args, **kwargs)
            except PASS:
                raise
            except Exception as e:
                raise fail(self, e) from e
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        health = self.health
        outer = health.operation is None
        if outer:
            health.operation = (fn.__name__, args)
        try:
            try:
                return fn(self, *args, **kwargs)
            except Throttled as t:
                retry = getattr(self, "commit_for", None)
                if retry is None or not retry(t):
                    raise
                with self.space.last_try():
                    return fn(self, *args, **kwargs)
        except PASS:
            raise
        except Exception as e:
            raise fail(self, e) from e
        finally:
            if outer:
                health.operation = None
    return wrapper
