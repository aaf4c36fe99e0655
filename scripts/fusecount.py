#!/usr/bin/env python3
"""fusecount: count the FUSE requests a pyfuse3 filesystem answers, by operation.

    python scripts/fusecount.py --stats FILE SCRIPT [ARG...]

runs SCRIPT (a pyfuse3 filesystem, e.g. pyfuse3's examples/passthroughfs.py) as ``__main__`` with ARGs as its
argv, after patching ``pyfuse3.init`` so that every request handler of the Operations instance handed to it
counts its calls. On SIGUSR1 the counts are written to FILE as one JSON object, {"lookup": 12, "write": 300, ...}
(cumulative since the mount; written to FILE.tmp and renamed, so a reader sees a whole object or none).

What it guarantees:
- A handler's call is counted when the request reaches it, whatever its reply (an error, ENOSYS included): the
  counts are the requests pyfuse3 passed to the filesystem, one per FUSE request (a batch of forgets is one).
- The wrapped handlers are the coroutine methods of ``pyfuse3.Operations`` (lookup ... create), looked up on the
  instance, so a filesystem's own methods and the base class's ENOSYS replies are counted alike; nothing else
  of the filesystem changes.
- The counters and the dump run in the thread that serves requests (the signal handler runs in the main thread,
  as trio's request tasks do), so a dump never sees half an increment.

scripts/nullfs.py uses ``count_requests`` and ``dump_on_signal`` for its own --stats FILE.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import runpy
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyfuse3

# The request handlers: the coroutine methods of pyfuse3's Operations base class.
HANDLERS: tuple[str, ...] = tuple(name for name, fn in inspect.getmembers(pyfuse3.Operations)
                                  if inspect.iscoroutinefunction(fn))


def _counted(fn: Callable[..., Any], name: str, counts: Counter[str]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def handler(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return await fn(*args, **kwargs)
    return handler


def count_requests(ops: pyfuse3.Operations, counts: Counter[str] | None = None) -> Counter[str]:
    """Make every request handler of OPS count its calls in COUNTS (a new Counter if None), which is returned."""
    counts = Counter() if counts is None else counts
    for name in HANDLERS:
        setattr(ops, name, _counted(getattr(ops, name), name, counts))
    return counts


def dump(counts: Counter[str], path: Path) -> None:
    """Write COUNTS to PATH as a JSON object, atomically (PATH.tmp, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(counts.items()))))
    os.replace(tmp, path)


def dump_on_signal(counts: Counter[str], path: Path, signum: int = signal.SIGUSR1) -> None:
    """On SIGNUM, write COUNTS to PATH (see ``dump``)."""
    signal.signal(signum, lambda _sig, _frame: dump(counts, path))


def read_counts(path: Path) -> dict[str, int]:
    """The counts ``dump`` wrote to PATH."""
    data = json.loads(path.read_text())
    return {str(k): int(v) for k, v in data.items()}


def run(script: Path, argv: Sequence[str], stats: Path) -> Counter[str]:
    """Run SCRIPT as __main__ with ARGV, counting the requests of the filesystem it mounts; the counts."""
    counts: Counter[str] = Counter()
    init = pyfuse3.init

    def counting_init(ops: pyfuse3.Operations, *args: Any, **kwargs: Any) -> None:
        count_requests(ops, counts)
        init(ops, *args, **kwargs)

    pyfuse3.init = counting_init
    dump_on_signal(counts, stats)
    old_argv = sys.argv
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old_argv
        pyfuse3.init = init
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stats", type=Path, required=True, metavar="FILE",
                    help="where SIGUSR1 writes the counts (JSON)")
    ap.add_argument("script", type=Path, help="the pyfuse3 filesystem to run")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = ap.parse_args(argv)
    try:
        run(args.script, args.args, args.stats)
    except SystemExit as e:  # the script's own exit status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
