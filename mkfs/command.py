"""The mkfs.tux3 command (also ``tux3 mkfs``): arguments in, one volume out.

Exit status: 0 the volume was made, 1 mkfs refused the target or could not write it, 2 wrong usage. Every failure
is one line on stderr, never a traceback; a refused mkfs changes nothing (see the ``mkfs`` package).
"""

from __future__ import annotations

import argparse
import os
import sys

from tux3fuse.backing import is_uri
from tux3fuse.units import human, parse_size

from . import LABEL_BYTES, MkfsError, blocksize_problem, mkfs, size_range


class UsageError(Exception):
    """Wrong usage: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def command(argv: list[str], prog: str = "mkfs.tux3") -> int:
    """Parse ``argv`` and make the volume; print what was made unless -q. Raises UsageError on wrong usage and
    MkfsError when the target is refused or cannot be written."""
    p = _Parser(prog=prog, description="Make a tux3fuse filesystem on an image file, a block device or an NBD "
                "export (a URI: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH). Everything is checked "
                "before the target is written: a refused mkfs changes nothing.")
    p.add_argument("-b", "--blocksize", default="4096", help="block size, a power of two from 512 to 65536")
    p.add_argument("-L", "--label", default="", help=f"volume label (up to {LABEL_BYTES} bytes)")
    p.add_argument("-s", "--size", help="size of the image (e.g. 512M, 2G; at least 64 blocks and 64 KiB); "
                   "the file is created sparse; a block device or an NBD export must hold at least that much "
                   "(default: all of it)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing filesystem")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("image")
    a = p.parse_args(argv)
    try:
        bs = parse_size(a.blocksize)
    except ValueError:
        bs = None
    if bs is None or blocksize_problem(bs):
        raise UsageError(f"-b takes a power of two from 512 to 65536, not {a.blocksize!r}")
    size = None
    if a.size is not None:
        try:
            size = parse_size(a.size)
        except ValueError:
            raise UsageError(f"-s takes a size such as 512M or 2G, from {size_range(bs)} with {bs}-byte "
                             f"blocks, not {a.size!r}") from None
    if size is None and not is_uri(a.image) and not os.path.lexists(a.image):
        raise UsageError(f"{a.image} does not exist; give its size with -s")
    sb = mkfs(a.image, bs, size, a.label, a.force)
    if not a.quiet:
        print(f"{a.image}: tux3fuse volume, {sb.volblocks} blocks of {sb.blocksize} bytes "
              f"({human(sb.volblocks * sb.blocksize)}), {sb.free_blocks} free"
              + (f", label {a.label!r}" if a.label else ""))
    return 0


def run(argv: list[str], prog: str = "mkfs.tux3") -> int:
    """``command`` with every failure reported as one line on stderr, prefixed with ``prog``; returns the exit
    status (0, 1 refused or failed, 2 wrong usage, 130 interrupted)."""
    try:
        return command(argv, prog)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output cut short by a pager or `head`: not an error worth a message
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter quiet at exit
        return 0
    except (UsageError, MkfsError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:
        print(f"{prog}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except Exception as e:  # a bug too is said in one line, never a traceback
        print(f"{prog}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> None:
    """The mkfs.tux3 console script."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))
