#!/usr/bin/env python3
"""fsx.py - a seeded fsx-style file exerciser (after xfstests ltp/fsx.c).

Usage: ``python3 scripts/fsx.py [options] PATH``

PATH is created (or truncated) and then hammered with a random sequence of
operations: pread, pwrite, ftruncate, mmap reads, mmap writes (with optional
msync), fsync, fdatasync, close/reopen and occasional whole-file checks.
Every operation is checked against an in-memory shadow copy of what the file
must contain.

Guarantees:

* Determinism: the operation sequence is a pure function of the seed and the
  options (``random.Random(seed)``); the seed is always printed on the first
  output line as ``fsx: seed S``.  Write data is derived from a per-op seed
  (``dseed``) stored in the op log, so an op log alone (``--log`` or the
  failure dump ``PATH.fsxlog``) reproduces the exact same file contents with
  ``--replay``.
* Every byte read back (pread, mmap read, final/periodic whole-file read) is
  compared with the shadow copy, including short/empty reads at or past EOF;
  the file size reported by fstat is checked after every size-changing op,
  before every mmap, and in every whole-file check.
* No Python traceback for expected failures.  A data mismatch, a wrong size or
  an unexpected OSError prints a report to stderr (seed, op number, the op,
  the first differing offset with expected/actual bytes in hex, the last 20
  ops), writes the op log to ``PATH.fsxlog`` (replayable with ``--replay``)
  and the expected contents to ``PATH.fsxgood``, and exits 1.
* Exit status: 0 all ops passed (last line ``fsx: N ops passed, seed S``),
  1 failure, 2 usage error or unreadable replay log, 130 interrupted.
"""

import argparse
import json
import mmap
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

Op = dict[str, Any]

LOG_VERSION = 1
PAGE = mmap.ALLOCATIONGRANULARITY
CHECK_CHUNK = 1 << 20
HISTORY_SHOWN = 20

_FIELDS: dict[str, tuple[str, ...]] = {
    "read": ("off", "len"),
    "mapread": ("off", "len"),
    "write": ("off", "len", "dseed"),
    "mapwrite": ("off", "len", "dseed"),
    "truncate": ("size",),
    "fsync": (),
    "fdatasync": (),
    "reopen": (),
    "check": (),
}

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def write_data(dseed: int, length: int) -> bytes:
    """Return the deterministic payload of a write op with data seed ``dseed``."""
    return random.Random(dseed).randbytes(length)


def encode_op(op: Op) -> str:
    """Serialise one op as a compact JSON log line (without newline)."""
    return json.dumps(op, separators=(",", ":"))


class _Failure(Exception):
    """A detected failure; carries an optional data mismatch for the report."""

    def __init__(self, message: str, mismatch: tuple[int, bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.mismatch = mismatch


class _LogError(Exception):
    pass


class OpGenerator:
    """Seeded generator of fsx ops; the next op depends only on the RNG and the current file size."""

    def __init__(
        self,
        seed: int,
        *,
        maxlen: int,
        oplen: int,
        readbdy: int = 1,
        writebdy: int = 1,
        truncbdy: int = 1,
        mapread: bool = True,
        mapwrite: bool = True,
        closeprob: int = 50,
        fsyncprob: int = 30,
        checkprob: int = 100,
    ) -> None:
        self.rng = random.Random(seed)
        self.maxlen = maxlen
        self.oplen = oplen
        self.readbdy = readbdy
        self.writebdy = writebdy
        self.truncbdy = truncbdy
        self.closeprob = closeprob
        self.fsyncprob = fsyncprob
        self.checkprob = checkprob
        kinds = ["read"] * 3 + ["write"] * 3 + ["truncate"]
        if mapread:
            kinds += ["mapread"] * 2
        if mapwrite:
            kinds += ["mapwrite"] * 2
        self.kinds = kinds

    def next(self, size: int) -> Op:
        """Generate the next op for a file that currently holds ``size`` bytes."""
        rng = self.rng
        if self.closeprob and rng.randrange(self.closeprob) == 0:
            return {"op": "reopen"}
        if self.fsyncprob and rng.randrange(self.fsyncprob) == 0:
            return {"op": rng.choice(("fsync", "fdatasync"))}
        if self.checkprob and rng.randrange(self.checkprob) == 0:
            return {"op": "check"}
        kind = rng.choice(self.kinds)
        if kind == "mapread" and size == 0:
            kind = "read"
        if kind == "read":
            if size == 0 or rng.randrange(10) == 0:
                off = rng.randrange(self.maxlen + 1)  # anywhere, often at/after EOF
            else:
                off = rng.randrange(size)
            off -= off % self.readbdy
            length = max(self.readbdy, _align(rng.randint(1, self.oplen), self.readbdy))
            return {"op": "read", "off": off, "len": length}
        if kind == "mapread":
            off = rng.randrange(size)
            off -= off % self.readbdy
            length = max(self.readbdy, _align(rng.randint(1, self.oplen), self.readbdy))
            return {"op": "mapread", "off": off, "len": min(length, size - off)}
        if kind in ("write", "mapwrite"):
            off = rng.randrange(self.maxlen)
            off -= off % self.writebdy
            length = max(self.writebdy, _align(rng.randint(1, self.oplen), self.writebdy))
            length = min(length, self.maxlen - off)
            op: Op = {"op": kind, "off": off, "len": length, "dseed": rng.getrandbits(32)}
            if kind == "mapwrite":
                op["msync"] = rng.randrange(2) == 0
            return op
        return {"op": "truncate", "size": _align(rng.randrange(self.maxlen + 1), self.truncbdy)}


def _align(value: int, bdy: int) -> int:
    return value - value % bdy


class _Exerciser:
    """Applies ops to the real file and to the shadow copy, checking results."""

    def __init__(self, path: str, corrupt_read_at: int | None = None) -> None:
        self.path = path
        self.fd = -1
        self.shadow = bytearray()
        self.opnum = 0
        self.corrupt_read_at = corrupt_read_at

    # -- helpers -------------------------------------------------------------

    def _got(self, data: bytes) -> bytes:
        """Test hook: flip one byte of the first non-empty read at/after op ``corrupt_read_at``."""
        if self.corrupt_read_at is not None and self.opnum >= self.corrupt_read_at and data:
            self.corrupt_read_at = None
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0xFF
            return bytes(buf)
        return data

    def _check_size(self, what: str) -> None:
        actual = os.fstat(self.fd).st_size
        if actual != len(self.shadow):
            raise _Failure(f"{what}: file size is {actual} (0x{actual:x}), expected {len(self.shadow)} "
                           f"(0x{len(self.shadow):x})")

    @staticmethod
    def _compare(what: str, base: int, expected: bytes, actual: bytes) -> None:
        if expected != actual:
            raise _Failure(f"{what}: data mismatch", (base, expected, actual))

    def _extend(self, end: int) -> None:
        if end > len(self.shadow):
            self.shadow.extend(bytes(end - len(self.shadow)))

    # -- operations ----------------------------------------------------------

    def open(self, create: bool = False) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.fd = os.open(self.path, flags, 0o666)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def full_check(self, what: str) -> None:
        self._check_size(what)
        chunks = []
        total = 0
        limit = len(self.shadow) + CHECK_CHUNK
        while total <= limit:
            chunk = os.pread(self.fd, CHECK_CHUNK, total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        self._compare(what, 0, bytes(self.shadow), self._got(b"".join(chunks)))

    def do(self, op: Op) -> None:
        kind = op["op"]
        shadow = self.shadow
        if kind == "read":
            off, length = op["off"], op["len"]
            data = self._got(os.pread(self.fd, length, off))
            self._compare("read", off, bytes(shadow[off:off + length]), data)
        elif kind == "write":
            off, length = op["off"], op["len"]
            data = write_data(op["dseed"], length)
            n = os.pwrite(self.fd, data, off)
            if n != length:
                raise _Failure(f"write: short write, {n} of {length} bytes")
            if length:
                self._extend(off + length)
                shadow[off:off + length] = data
            self._check_size("size after write")
        elif kind == "truncate":
            size = op["size"]
            os.ftruncate(self.fd, size)
            if size < len(shadow):
                del shadow[size:]
            else:
                self._extend(size)
            self._check_size("size after truncate")
        elif kind == "mapread":
            off = op["off"]
            end = min(off + op["len"], len(shadow))
            if end <= off:
                return
            self._check_size("size before mapread")
            base = off - off % PAGE
            mm = mmap.mmap(self.fd, end - base, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base)
            try:
                data = mm[off - base:end - base]
            finally:
                mm.close()
            self._compare("mapread", off, bytes(shadow[off:end]), self._got(data))
        elif kind == "mapwrite":
            off, length = op["off"], op["len"]
            if length == 0:
                return
            end = off + length
            data = write_data(op["dseed"], length)
            if end > len(shadow):
                os.ftruncate(self.fd, end)  # mmap cannot extend a file; fsx extends it first
                self._extend(end)
            self._check_size("size before mapwrite")
            base = off - off % PAGE
            mm = mmap.mmap(self.fd, end - base, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
            try:
                mm[off - base:end - base] = data
                if op.get("msync"):
                    mm.flush()
            finally:
                mm.close()
            shadow[off:end] = data
        elif kind == "fsync":
            os.fsync(self.fd)
        elif kind == "fdatasync":
            _fdatasync(self.fd)
        elif kind == "reopen":
            self.close()
            self.open()
        elif kind == "check":
            self.full_check("full-file check")
        else:  # pragma: no cover - logs are validated before replay
            raise _Failure(f"unknown op {kind!r}")


def _load_log(path: str) -> tuple[int | None, list[Op]]:
    """Read and validate an op log; return (seed from the header or None, ops)."""
    seed: int | None = None
    ops: list[Op] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _LogError(f"cannot read op log {path}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            op = json.loads(line)
        except json.JSONDecodeError as e:
            raise _LogError(f"{path}:{lineno}: not JSON: {e}") from None
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise _LogError(f"{path}:{lineno}: not an op object")
        kind = op["op"]
        if kind == "header":
            s = op.get("seed")
            if isinstance(s, int) and not isinstance(s, bool):
                seed = s
            continue
        if kind not in _FIELDS:
            raise _LogError(f"{path}:{lineno}: unknown op {kind!r}")
        for field in _FIELDS[kind]:
            v = op.get(field)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise _LogError(f"{path}:{lineno}: op {kind!r} needs a non-negative integer {field!r}")
        ops.append(op)
    return seed, ops


def _hexrow(data: bytes, lo: int, hi: int, marks: set[int]) -> str:
    cells = []
    for i in range(lo, hi):
        cell = f"{data[i]:02x}" if i < len(data) else "--"
        cells.append(f"[{cell}]" if i in marks else cell)
    return " ".join(cells)


def _mismatch_lines(base: int, expected: bytes, actual: bytes) -> list[str]:
    n = min(len(expected), len(actual))
    first = next((i for i in range(n) if expected[i] != actual[i]), n)
    lines = []
    if len(expected) != len(actual):
        lines.append(f"length mismatch: expected {len(expected)} bytes, got {len(actual)} bytes "
                     f"(from file offset 0x{base:x})")
    if first < n:
        bad = sum(1 for a, b in zip(expected, actual, strict=False) if a != b)
        lines.append(f"first bad byte at file offset 0x{base + first:x} ({base + first}): "
                     f"expected 0x{expected[first]:02x}, got 0x{actual[first]:02x}; "
                     f"{bad} of {n} compared bytes differ")
    else:
        what = "missing (short read)" if len(actual) < len(expected) else "extra"
        lines.append(f"bytes match up to file offset 0x{base + n:x}, then data is {what}")
    lo = max(0, first - 8)
    hi = min(max(len(expected), len(actual)), first + 8)
    hi = max(hi, min(lo + 1, max(len(expected), len(actual))))
    marks = {i for i in range(lo, hi)
             if i >= n or expected[i] != actual[i]} if hi > lo else set()
    lines.append(f"  expected @0x{base + lo:08x}: {_hexrow(expected, lo, hi, marks)}")
    lines.append(f"  actual   @0x{base + lo:08x}: {_hexrow(actual, lo, hi, marks)}")
    return lines


def _default_seed() -> int:
    return (time.time_ns() ^ (os.getpid() << 16)) % (1 << 31)


def run(
    path: str,
    ops: int = 10000,
    seed: int | None = None,
    *,
    maxlen: int = 262144,
    oplen: int = 65536,
    readbdy: int = 1,
    writebdy: int = 1,
    truncbdy: int = 1,
    mapread: bool = True,
    mapwrite: bool = True,
    closeprob: int = 50,
    fsyncprob: int = 30,
    checkprob: int = 100,
    quiet: bool = False,
    verbose: bool = False,
    log: str | None = None,
    replay: str | None = None,
    corrupt_read_at: int | None = None,
) -> int:
    """Exercise ``path`` and return the exit code (0 pass, 1 failure, 2 bad arguments/log, 130 interrupted).

    ``ops``/``seed`` and the generator options are ignored for op generation when ``replay``
    names an op log; the log's ops are run instead.  ``corrupt_read_at`` is a test hook: the
    first non-empty read result at or after that op number gets one byte flipped.
    """
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    replay_ops: list[Op] | None = None
    if replay is not None:
        try:
            log_seed, replay_ops = _load_log(replay)
        except _LogError as e:
            print(f"fsx: seed {seed if seed is not None else 0}", file=out, flush=True)
            print(f"fsx: {e}", file=err)
            return 2
        if log_seed is not None:
            seed = log_seed
    if seed is None:
        seed = _default_seed()
    print(f"fsx: seed {seed}", file=out, flush=True)

    problems = [f"{name} must be >= 1" for name, v in
                (("maxlen", maxlen), ("oplen", oplen), ("readbdy", readbdy), ("writebdy", writebdy),
                 ("truncbdy", truncbdy)) if v < 1]
    problems += [f"{name} must be >= 0" for name, v in
                 (("ops", ops), ("closeprob", closeprob), ("fsyncprob", fsyncprob), ("checkprob", checkprob))
                 if v < 0]
    if problems:
        print(f"fsx: {'; '.join(problems)}", file=err)
        return 2

    total = len(replay_ops) if replay_ops is not None else ops
    gen = OpGenerator(seed, maxlen=maxlen, oplen=oplen, readbdy=readbdy, writebdy=writebdy, truncbdy=truncbdy,
                      mapread=mapread, mapwrite=mapwrite, closeprob=closeprob, fsyncprob=fsyncprob,
                      checkprob=checkprob)
    header: Op = {"op": "header", "version": LOG_VERSION, "seed": seed}
    history: list[Op] = []
    logf: TextIO | None = None
    if log is not None:
        try:
            logf = open(log, "w", encoding="utf-8", buffering=1)
            logf.write(encode_op(header) + "\n")
        except OSError as e:
            print(f"fsx: cannot write op log {log}: {e}", file=err)
            return 2
    if replay_ops is not None and not quiet:
        print(f"fsx: replaying {total} ops from {replay}", file=out)

    ex = _Exerciser(path, corrupt_read_at)
    progress = 1000
    current: Op = {"op": "open"}
    try:
        try:
            ex.open(create=True)
            for n in range(1, total + 1):
                current = replay_ops[n - 1] if replay_ops is not None else gen.next(len(ex.shadow))
                ex.opnum = n
                history.append(current)
                if logf is not None:
                    logf.write(encode_op(current) + "\n")
                if verbose:
                    print(f"{n:7d} {encode_op(current)}", file=out)
                ex.do(current)
                if not quiet and not verbose and n % progress == 0:
                    print(f"fsx: {n} ops done, file size {len(ex.shadow)}", file=out, flush=True)
            ex.opnum = total + 1
            current = {"op": "check", "final": True}
            ex.full_check("final check")
            current = {"op": "close"}
            ex.close()
        except (OSError, ValueError) as e:
            hint = "  (is mmap supported here? try -R -W)" if current["op"].startswith("map") else ""
            raise _Failure(f"{current['op']}: unexpected error: {e}{hint}") from None
    except _Failure as f:
        _report(f, path, seed, ex.opnum, total, current, header, history, ex.shadow, err)
        return 1
    except KeyboardInterrupt:
        print(f"fsx: interrupted at op #{ex.opnum} {encode_op(current)}, seed {seed}", file=err)
        _dump(path, header, history, ex.shadow, err)
        return 130
    finally:
        if logf is not None:
            logf.close()
        try:
            ex.close()
        except OSError:
            pass
    print(f"fsx: {total} ops passed, seed {seed}", file=out, flush=True)
    return 0


def _dump(path: str, header: Op, history: list[Op], shadow: bytearray, err: TextIO) -> None:
    try:
        with open(path + ".fsxlog", "w", encoding="utf-8") as f:
            f.write(encode_op(header) + "\n")
            for op in history:
                f.write(encode_op(op) + "\n")
        print(f"fsx: op log written to {path}.fsxlog (replay: fsx.py --replay {path}.fsxlog PATH)", file=err)
    except OSError as e:
        print(f"fsx: could not write {path}.fsxlog: {e}", file=err)
    try:
        with open(path + ".fsxgood", "wb") as f:
            f.write(shadow)
        print(f"fsx: expected file contents ({len(shadow)} bytes) written to {path}.fsxgood", file=err)
    except OSError as e:
        print(f"fsx: could not write {path}.fsxgood: {e}", file=err)


def _report(f: _Failure, path: str, seed: int, opnum: int, total: int, op: Op, header: Op,
            history: list[Op], shadow: bytearray, err: TextIO) -> None:
    lines = [f"fsx: FAILURE at op #{opnum} of {total}, seed {seed}, file {path}",
             f"fsx: op #{opnum}: {encode_op(op)}",
             f"fsx: {f.message}"]
    if f.mismatch is not None:
        lines += [f"fsx: {line}" for line in _mismatch_lines(*f.mismatch)]
    lines.append(f"fsx: expected file size {len(shadow)} (0x{len(shadow):x})")
    first = max(0, len(history) - HISTORY_SHOWN)
    lines.append(f"fsx: last {len(history) - first} ops:")
    lines += [f"fsx: {i + 1:7d} {encode_op(history[i])}" for i in range(first, len(history))]
    print("\n".join(lines), file=err)
    _dump(path, header, history, shadow, err)


def _positive(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return v


def _integer(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) or "fsx.py",
        usage="%(prog)s [options] PATH",
        description="Seeded fsx-style file exerciser: random reads/writes/truncates/mmap ops checked "
                    "against an in-memory shadow copy.",
        epilog="On failure: report on stderr, op log in PATH.fsxlog (use --replay), expected data in "
               "PATH.fsxgood, exit 1.",
    )
    p.add_argument("path", metavar="PATH", help="file to create and exercise")
    p.add_argument("-N", dest="ops", type=_nonneg, default=10000, metavar="n", help="number of ops (default 10000)")
    p.add_argument("-S", dest="seed", type=_integer, default=None, metavar="seed",
                   help="random seed (default: from the clock; always printed)")
    p.add_argument("-l", dest="maxlen", type=_positive, default=262144, metavar="flen",
                   help="maximum file length (default 262144)")
    p.add_argument("-o", dest="oplen", type=_positive, default=65536, metavar="oplen",
                   help="maximum size of one op (default 65536)")
    p.add_argument("-R", dest="mapread", action="store_false", help="no mmap reads")
    p.add_argument("-W", dest="mapwrite", action="store_false", help="no mmap writes")
    p.add_argument("-c", dest="closeprob", type=_nonneg, default=50, metavar="P",
                   help="close/reopen the file 1 in P ops (default 50, 0 disables)")
    p.add_argument("-f", dest="fsyncprob", type=_nonneg, default=30, metavar="P",
                   help="fsync/fdatasync 1 in P ops (default 30, 0 disables)")
    p.add_argument("-C", "--check", dest="checkprob", type=_nonneg, default=100, metavar="P",
                   help="full-file check 1 in P ops (default 100, 0 disables; a final check is always done)")
    p.add_argument("-r", dest="readbdy", type=_positive, default=1, metavar="bdy",
                   help="align read offsets/lengths to bdy")
    p.add_argument("-w", dest="writebdy", type=_positive, default=1, metavar="bdy",
                   help="align write offsets/lengths to bdy")
    p.add_argument("-t", dest="truncbdy", type=_positive, default=1, metavar="bdy", help="align truncate sizes to bdy")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: only failures and the final summary")
    p.add_argument("-v", dest="verbose", action="store_true", help="print every op")
    p.add_argument("--log", metavar="FILE", help="write the op log (JSON lines) to FILE")
    p.add_argument("--replay", metavar="FILE", help="replay the ops of an op log instead of generating ops")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    opts = vars(args)
    path = opts.pop("path")
    try:
        return run(path, **opts)
    except KeyboardInterrupt:
        print("fsx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
