"""Writing a volume full: how far past what the volume stores the writers' ``write()`` calls get, and what is left.

``python scripts/enospc.py [--size 64M] [--options OPTS] [--writers N] [--block 1M] [--runs N]`` makes a fresh
image of SIZE, mounts it with OPTS (default: none, so the writeback cache is on), and runs N writers at once, each
writing a file of its own in ``write()`` calls of BLOCK bytes of a pattern (every 8-byte word holds its own index
in the file) until a ``write()`` fails; then it closes the file. For each writer it reports:

- accepted: the bytes its ``write()`` calls took; stored: the file's size after the close;
- overshoot = accepted - stored: what the writer was told was written and the volume does not hold (with the
  writeback cache the kernel takes a ``write()`` into its page cache before the daemon sees it);
- the errors of ``write()`` and ``close()``.

It then checks that every stored byte is the pattern's, unmounts, runs fsck, mounts again and checks that each
file still has the size it showed after the close. The last line gives the largest overshoot and PASS, or FAIL
with the reason: a writer that ended otherwise than with ENOSPC (a writer stops after 4 times the volume's size
of accepted data: the mark of writes that never fail), a size or a byte that differs, fsck not clean.

The writer is importable (``pattern``, ``fill``, ``fill_together``, ``first_wrong_byte``): the mounted tests use it.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
MiB = 1 << 20


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def pattern(offset: int, n: int) -> bytes:
    """The bytes ``[offset, offset + n)`` of the pattern: 8-byte words, each holding its own index in the file
    (both multiples of 8)."""
    first = offset // 8
    return array("Q", range(first, first + n // 8)).tobytes()


@dataclass
class Filled:
    path: str
    accepted: int = 0  # bytes the write() calls took
    error: int | None = None  # errno of the open() or write() that failed; None: the writer stopped at its limit
    close_error: int | None = None
    created: bool = False  # the open() that creates the file succeeded (on a full volume it may fail: ENOSPC)
    seconds: float = 0.0


def fill(path: str, block: int = MiB, limit: int = 1 << 40) -> Filled:
    """Write the pattern to a new file at ``path`` in ``write()`` calls of ``block`` bytes until one fails (or
    ``limit`` bytes were taken), then close it."""
    out = Filled(path)
    started = time.monotonic()
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    except OSError as e:
        out.error = e.errno
        return out
    out.created = True
    try:
        while out.accepted < limit:
            data = pattern(out.accepted, block)
            try:
                out.accepted += os.write(fd, data)
            except OSError as e:
                out.error = e.errno
                break
    finally:
        try:
            os.close(fd)
        except OSError as e:
            out.close_error = e.errno
    out.seconds = time.monotonic() - started
    return out


def fill_together(paths: list[str], block: int = MiB, limit: int = 1 << 40) -> list[Filled]:
    """``fill`` every path at once, each in a thread of its own."""
    results: list[Filled | BaseException | None] = [None] * len(paths)

    def one(i: int) -> None:
        try:
            results[i] = fill(paths[i], block, limit)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def first_wrong_byte(path: str, size: int) -> int | None:
    """The first offset below ``size`` where the file at ``path`` is not the pattern (or ends), or None."""
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            n = min(MiB, size - offset)
            got = f.read(n)
            want = pattern(offset, (n + 7) // 8 * 8)[:n]
            if got != want:
                return offset + next((i for i in range(len(got)) if got[i] != want[i]), len(got))
            offset += n
    return None


class Mounted:
    """tux3fuse on ``image`` at ``mnt``, started detached and stopped with ``tux3 umount``."""

    def __init__(self, image: Path, mnt: Path, options: str) -> None:
        self.image, self.mnt, self.options = image, mnt, options

    def __enter__(self) -> Mounted:
        self.mnt.mkdir(exist_ok=True)
        args = [tool("tux3fuse"), *(["-o", self.options] if self.options else []), str(self.image), str(self.mnt)]
        subprocess.run(args, check=True, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([tool("tux3"), "umount", str(self.mnt)], check=True, timeout=300)


@dataclass
class Run:
    filled: list[Filled]
    stored: list[int]  # sizes after the close
    remounted: list[int]  # sizes after a remount
    wrong: list[int | None]  # first byte that is not the pattern
    capacity: int  # bytes free on the fresh volume (statfs)
    fsck: int

    def problems(self) -> list[str]:
        out = []
        for f, stored, again, wrong in zip(self.filled, self.stored, self.remounted, self.wrong, strict=True):
            name = os.path.basename(f.path)
            if f.error != errno.ENOSPC and f.close_error != errno.ENOSPC:
                why = "no error" if f.error is None else errno.errorcode.get(f.error, f.error)
                out.append(f"{name}: ended with {why} after {f.accepted} bytes, not ENOSPC")
            if stored > f.accepted:
                out.append(f"{name}: {stored} bytes after the close, more than the {f.accepted} written")
            if again != stored:
                out.append(f"{name}: {again} bytes after a remount, {stored} after the close")
            if wrong is not None:
                out.append(f"{name}: byte {wrong} is not what was written")
        if self.fsck != 0:
            out.append(f"fsck exit status {self.fsck}")
        return out


def run_once(workdir: Path, size: str, options: str, writers: int, block: int) -> Run:
    image, mnt = workdir / "fs.img", workdir / "mnt"
    subprocess.run([tool("mkfs.tux3"), "-q", "-f", "-s", size, str(image)], check=True, timeout=60)
    with Mounted(image, mnt, options):
        st = os.statvfs(mnt)
        capacity = st.f_bavail * st.f_frsize
        paths = [str(mnt / f"fill{i}") for i in range(writers)]
        filled = fill_together(paths, block, limit=4 * st.f_blocks * st.f_frsize)
        stored = [os.stat(p).st_size if os.path.exists(p) else 0 for p in paths]
        wrong = [first_wrong_byte(p, n) for p, n in zip(paths, stored, strict=True)]
    fsck = subprocess.run([tool("fsck.tux3"), "-n", str(image)], capture_output=True, timeout=300).returncode
    with Mounted(image, mnt, options):
        remounted = [os.stat(p).st_size if os.path.exists(p) else 0 for p in paths]
    return Run(filled, stored, remounted, wrong, capacity, fsck)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="64M", help="the volume's size (default 64M)")
    p.add_argument("--options", default="", help="mount options (-o), e.g. nowriteback")
    p.add_argument("--writers", type=int, default=1, help="writers at once, a file each (default 1)")
    p.add_argument("--block", default="1M", help="bytes per write() call (default 1M; K or M suffix)")
    p.add_argument("--runs", type=int, default=3, help="runs, each on a fresh volume (default 3)")
    a = p.parse_args(argv)
    unit = {"K": 1 << 10, "M": MiB}.get(a.block[-1:].upper(), 1)
    block = int(a.block.rstrip("kKmM")) * unit
    worst, failed = 0, []
    print(f"volume {a.size}, options {a.options or '(none)'}, {a.writers} writer(s), write() of {block} bytes")
    print(f"{'run':>3} {'file':>5} {'accepted':>11} {'stored':>11} {'overshoot':>10} {'error':>8} {'close()':>8} "
          f"{'seconds':>7}")
    for n in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="tux3-enospc-") as tmp:
            r = run_once(Path(tmp), a.size, a.options, a.writers, block)
        for i, (f, stored) in enumerate(zip(r.filled, r.stored, strict=True)):
            over = f.accepted - stored
            worst = max(worst, over)
            name = {None: "-"}
            print(f"{n + 1:>3} {i:>5} {f.accepted:>11} {stored:>11} {over / MiB:>8.1f}Mi "
                  f"{name.get(f.error) or errno.errorcode.get(f.error, '?'):>8} "
                  f"{name.get(f.close_error) or errno.errorcode.get(f.close_error, '?'):>8} {f.seconds:>7.2f}")
        print(f"    stored in all {sum(r.stored)} of {r.capacity} bytes free on the fresh volume; fsck {r.fsck}")
        failed += [f"run {n + 1}: {problem}" for problem in r.problems()]
    verdict = "PASS" if not failed else "FAIL: " + "; ".join(failed)
    print(f"largest overshoot {worst} bytes ({worst / MiB:.1f} MiB): {verdict}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
