#!/usr/bin/env python3
"""formatdump.py - annotated hex dumps of a fresh superblock and of one log block, for docs/FORMAT.md.

Usage: ``python scripts/formatdump.py [--update [FORMAT_MD]]``

It makes a small volume in a temporary directory with ``mkfs.tux3 -q -b 512 -s 1M -L tux3``, dumps the
superblock copy a mount loads, then commits one delta through the embedded API (create ``/hello.txt``, write
one line into it, set the times of the file and of the root to a fixed instant) and dumps the log block that
delta wrote. Every field is one line: its offset in the structure (decimal), its bytes in hex, its name and its
value; a run of zeros is shown as ``00 × N``.

Guarantees:
- The output depends on the code alone, not on the run: mkfs takes no uuid or time, so the bytes that differ on
  every run (the superblock's ``uuid`` and ``created_ns``, and its checksum, which covers them) are printed as
  ``..``. Nothing else is masked: the log block is byte for byte what every run writes.
- The field layout here is checked against ``tux3fuse/format.py`` on every run: each field's decoded value must
  equal what the format module unpacks, each record must have the size the format module gives it, the bytes past
  the last field must be zero and the checksums must verify. A layout that no longer matches fails the run
  (exit 1, one line) instead of printing a wrong dump.
- Without ``--update`` it only prints (the part of docs/FORMAT.md between the ``formatdump`` markers; the tests
  compare the two). ``--update`` rewrites that part of the file in place and nothing else.

Exit status: 0 done, 1 the dump could not be made or does not match the format, 2 usage error.
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from tux3fuse import format as fmt
from tux3fuse import logrecord as logrec
from tux3fuse.fs import Options, Volume

BLOCKSIZE = 512
SIZE = "1M"
LABEL = "tux3"
NAME = b"hello.txt"
DATA = b"Hello from tux3fuse\n"
TIME_NS = 1_795_564_800_000_000_000  # 2026-11-25 00:00:00 UTC, the date in the magic
MASKED = ("uuid", "created_ns", "checksum")  # superblock fields that differ on every mkfs
BEGIN = "<!-- formatdump: begin (scripts/formatdump.py --update writes what follows, up to the end marker) -->"
END = "<!-- formatdump: end -->"
FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"

# (name, struct code) in the order they lie on disk; "(zero)" fields must hold zeros
SUPER_FIELDS = [
    ("magic", "8s"), ("version", "I"), ("blockbits", "H"), ("state", "H"), ("seq", "Q"), ("volblocks", "Q"),
    ("itree_root", "Q"), ("otree_root", "Q"), ("log_head", "Q"), ("log_count", "I"), ("bitmap_blocks", "I"),
    ("unify_seq", "Q"), ("bitmap_start[0]", "Q"), ("bitmap_start[1]", "Q"), ("bitmap_cur", "I"), ("(zero)", "4s"),
    ("free_blocks", "Q"), ("used_inodes", "Q"), ("next_inum", "Q"), ("label", "32s"), ("uuid", "16s"),
    ("created_ns", "Q"), ("delta_csum", "Q"), ("(zero)", "320s"), ("checksum", "Q"),
]
HEADER_FIELDS = [("kind", "4s"), ("level", "H"), ("count", "H"), ("blocknr", "Q"), ("checksum", "Q"),
                 ("delta", "Q")]
LOG_HEAD_FIELDS = [("previous log block", "Q"), ("bytes of records", "I")]
INODE_FIELDS = [("mode", "I"), ("uid", "I"), ("gid", "I"), ("nlink", "I"), ("size", "Q"), ("rdev", "Q"),
                ("atime_ns", "q"), ("mtime_ns", "q"), ("ctime_ns", "q"), ("dtree_root", "Q"), ("blocks", "Q"),
                ("parent", "Q"), ("flags", "I"), ("xattrs", "H")]
RECORD_NAMES = {logrec.LOG_ALLOC: "allocate", logrec.LOG_FREE: "free", logrec.LOG_INODE: "inode", logrec.LOG_MAP: "map",
                logrec.LOG_UNMAP: "unmap", logrec.LOG_DESTROY: "destroy", logrec.LOG_ORPHAN: "orphan"}
RECORD_FIELDS = {
    logrec.LOG_ALLOC: [("first block", "Q"), ("blocks", "I")],
    logrec.LOG_FREE: [("first block", "Q"), ("blocks", "I")],
    logrec.LOG_INODE: [("inode", "Q"), ("length", "H")],
    logrec.LOG_MAP: [("inode", "Q"), ("logical block", "Q"), ("physical block", "Q"), ("n", "H")],
    logrec.LOG_UNMAP: [("inode", "Q"), ("first logical block", "Q")],
    logrec.LOG_DESTROY: [("inode", "Q")],
    logrec.LOG_ORPHAN: [("inode", "Q")],
}


class DumpError(Exception):
    """The dump cannot be made, or the bytes do not match the layout written here."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise DumpError(what)


class Dump:
    """Lines of one annotated structure: offset, bytes, field name, value."""

    def __init__(self, buf: bytes, masked: tuple[str, ...] = ()) -> None:
        self.buf = buf
        self.at = 0
        self.masked = masked
        self.lines: list[str] = []

    def field(self, name: str, code: str, show=None, prefix: str = "") -> object:
        """Read field ``name`` (a struct code) at the current offset, add its line(s), return its value."""
        size = struct.calcsize("<" + code)
        _require(self.at + size <= len(self.buf), f"field {name} at {self.at} runs past the end")
        raw = self.buf[self.at: self.at + size]
        (value,) = struct.unpack("<" + code, raw)
        if name == "(zero)":
            _require(not any(raw), f"bytes {self.at}-{self.at + size - 1} should be zero")
        masked = name in self.masked
        if masked:
            text = "(differs on every mkfs)"
        elif show is not None:
            text = show(value)
        elif isinstance(value, bytes):
            text = repr(value.rstrip(b"\0")) if any(value) else ""
        else:
            text = str(value)
        self.line(self.at, raw, prefix + name, text, masked)
        self.at += size
        return value

    def line(self, offset: int, raw: bytes, name: str, text: str, masked: bool = False) -> None:
        if masked:
            chunks = [" ".join([".."] * min(16, len(raw) - i)) for i in range(0, len(raw), 16)]
        elif len(raw) > 8 and not any(raw):
            chunks = [f"00 × {len(raw)}"]
        else:
            chunks = [raw[i: i + 16].hex(" ") for i in range(0, len(raw), 16)]
        for k, chunk in enumerate(chunks):
            label = f"{name:<22} {text}".rstrip() if k == 0 else ""
            self.lines.append(f"{offset + 16 * k:>4}  {chunk:<47}  {label}".rstrip())

    def note(self, text: str) -> None:
        self.lines.append(f"      -- {text}")

    def rest_is_zero(self) -> None:
        rest = self.buf[self.at:]
        if rest:
            _require(not any(rest), f"bytes from {self.at} should be unused (zero)")
            self.line(self.at, rest, "(unused)", "")
            self.at = len(self.buf)


def _hex(value: int) -> str:
    return f"{value:#018x}"


def _mode(value: int) -> str:
    return f"{value:#o}"


def dump_super(raw: bytes, copy: int) -> list[str]:
    sb = fmt.Super.unpack(raw, copy)
    d = Dump(raw, MASKED)
    _require(sum(struct.calcsize("<" + c) for _, c in SUPER_FIELDS) == fmt.SUPER_SIZE, "superblock size")
    for name, code in SUPER_FIELDS:
        show = _hex if name in ("delta_csum", "checksum") else None
        value = d.field(name, code, show)
        if name.startswith("bitmap_start["):
            _require(value == sb.bitmap_start[int(name[-2])], f"superblock {name}")
        elif name == "label":
            _require(value.rstrip(b"\0") == sb.label, "superblock label")
        elif name == "checksum":
            _require(value == fmt.checksum(raw[: fmt.SUPER_SIZE - 8]), "superblock checksum")
        elif name in ("magic", "version"):
            _require(value == {"magic": fmt.MAGIC, "version": fmt.VERSION}[name], f"superblock {name}")
        elif name != "(zero)":
            _require(value == getattr(sb, name), f"superblock field {name} is not where format.py puts it")
    return d.lines


def dump_log(raw: bytes, blocknr: int) -> list[str]:
    kind, level, count, delta = fmt.unseal(raw, blocknr, (fmt.KIND_LOG,))
    prev, records = logrec.unpack_log(raw, count)
    d = Dump(raw)
    header = {}
    for name, code in HEADER_FIELDS:
        header[name] = d.field(name, code, _hex if name == "checksum" else None)
    _require((header["kind"], header["level"], header["count"], header["blocknr"], header["delta"])
             == (kind, level, count, blocknr, delta), "log block header")
    _require(d.at == fmt.HEADER_SIZE, "header size")
    _require(d.field(*LOG_HEAD_FIELDS[0]) == prev, "previous log block")
    d.field(*LOG_HEAD_FIELDS[1])
    for i, rec in enumerate(records, 1):
        start = d.at
        code = rec[0]
        d.note(f"record {i}: {RECORD_NAMES[code]} ({logrec.log_record_size(rec)} bytes)")
        d.field("code", "B", lambda v: f"{v} ({RECORD_NAMES[v]})", "  ")
        values = [d.field(name, c, prefix="  ") for name, c in RECORD_FIELDS[code]]
        if code == logrec.LOG_INODE:
            inode = fmt.InodeRecord.unpack(rec[2])
            _require(sum(struct.calcsize("<" + c) for _, c in INODE_FIELDS) == fmt.INODE_FIXED, "inode record")
            for name, c in INODE_FIELDS:
                value = d.field(name, c, _mode if name == "mode" else None, "    ")
                want = len(inode.xattrs) if name == "xattrs" else getattr(inode, name)
                _require(value == want, f"inode record field {name}")
            _require(not inode.xattrs, "the dump shows no extended attributes")
        elif code == logrec.LOG_MAP:
            for j, csum in enumerate(rec[4]):
                _require(d.field(f"xxh3 of block {j}", "Q", _hex, "  ") == csum, "map record checksum")
        _require(tuple(values) == tuple(rec[1:1 + len(values)]) or code in (logrec.LOG_INODE, logrec.LOG_MAP),
                 f"record {i} fields")
        _require(d.at - start == logrec.log_record_size(rec), f"record {i} size")
    d.rest_is_zero()
    return d.lines


def _mkfs_command() -> str:
    """mkfs.tux3 of the Python running this script (its venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "mkfs.tux3"
    if beside.exists():
        return str(beside)
    found = shutil.which("mkfs.tux3")
    if found is None:
        raise DumpError("mkfs.tux3 not found (install the package: make install)")
    return found


def _loaded_copy(image: Path) -> tuple[int, bytes]:
    """The superblock copy a mount loads: the higher seq; on equal seq copy 0 (docs/FORMAT.md §2)."""
    with open(image, "rb") as f:
        raws = []
        for offset in fmt.SUPER_OFFSETS:
            f.seek(offset)
            raws.append(f.read(fmt.SUPER_SIZE))
    seqs = [fmt.Super.unpack(raw, copy).seq for copy, raw in enumerate(raws)]
    copy = 0 if seqs[0] >= seqs[1] else 1
    return copy, raws[copy]


def make_dumps() -> str:
    """The markdown text that goes between the markers of docs/FORMAT.md."""
    with tempfile.TemporaryDirectory(prefix="formatdump-") as tmp:
        image = Path(tmp) / "dump.img"
        cmd = [_mkfs_command(), "-q", "-b", str(BLOCKSIZE), "-s", SIZE, "-L", LABEL, str(image)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DumpError(f"mkfs.tux3 failed: {(r.stderr or r.stdout).strip()}")
        copy, raw = _loaded_copy(image)
        super_lines = dump_super(raw, copy)
        super_seq = fmt.Super.unpack(raw, copy).seq

        vol = Volume(str(image), Options(verify_log=True))  # the delta must replay as it is
        try:
            a = vol.create(fmt.ROOT_INO, NAME, 0o644)
            vol.write(a.ino, 0, DATA)
            vol.release(a.ino)
            vol.setattr(a.ino, atime_ns=TIME_NS, mtime_ns=TIME_NS, ctime_ns=TIME_NS)
            vol.setattr(fmt.ROOT_INO, uid=0, gid=0, atime_ns=TIME_NS, mtime_ns=TIME_NS, ctime_ns=TIME_NS)
            vol.commit()
        finally:
            vol.close_files()
        _, raw = _loaded_copy(image)
        sb = fmt.Super.unpack(raw, 0)
        _require(sb.log_count == 1 and sb.log_head != 0, f"the delta wrote {sb.log_count} log blocks, not one")
        with open(image, "rb") as f:
            f.seek(sb.log_head * BLOCKSIZE)
            block = f.read(BLOCKSIZE)
        log_lines = dump_log(block, sb.log_head)

    lead_super = (
        f"Superblock copy {copy} (image bytes {fmt.SUPER_OFFSETS[copy]}–{fmt.SUPER_OFFSETS[copy] + fmt.SUPER_SIZE - 1}"
        f") as `mkfs.tux3 -b {BLOCKSIZE} -s {SIZE} -L {LABEL}` leaves it: the copy a mount loads, delta "
        f"{super_seq}.")
    lead_log = (
        f"The log block of delta {sb.seq}, block {sb.log_head} (image bytes {sb.log_head * BLOCKSIZE}–"
        f"{(sb.log_head + 1) * BLOCKSIZE - 1}), after `/{NAME.decode()}` was created with "
        f"{len(DATA)} bytes in it and the times of the file and the root were set to {TIME_NS} "
        "(2026-11-25 00:00 UTC):")
    out = [*textwrap.wrap(lead_super, 116), "", "```", *super_lines, "```", "",
           *textwrap.wrap(lead_log, 116), "", "```", *log_lines, "```"]
    return "\n".join(out) + "\n"


def replace_between_markers(text: str, dump: str) -> str:
    """``text`` with the part between the formatdump markers replaced by ``dump``."""
    try:
        head, rest = text.split(BEGIN + "\n", 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise DumpError("the formatdump markers are missing") from None
    return head + BEGIN + "\n" + dump + END + tail


def between_markers(text: str) -> str:
    """The part of ``text`` between the formatdump markers."""
    try:
        return text.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    except IndexError:
        raise DumpError("the formatdump markers are missing") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Annotated hex dumps of a fresh superblock and one log block.")
    p.add_argument("--update", nargs="?", const=str(FORMAT_MD), metavar="FORMAT_MD",
                   help="rewrite the part between the formatdump markers of this file (default docs/FORMAT.md)")
    args = p.parse_args(argv)
    try:
        dump = make_dumps()
        if args.update:
            path = Path(args.update)
            text = path.read_text()
            new = replace_between_markers(text, dump)
            if new != text:
                path.write_text(new)
        else:
            sys.stdout.write(dump)
    except (DumpError, fmt.FormatError, fmt.CorruptBlock, ValueError, OSError) as e:
        print(f"formatdump: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
