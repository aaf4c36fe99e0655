"""Which delta a mount loads when a superblock copy or the newest delta's proof fails, and the report of why.

Guarantees:
- No delta is left out unreported: a superblock copy whose checksum fails, and a newest delta whose proof
  (docs/FORMAT.md §10) fails, are described in a ``Recovery`` (the delta, the cause, the blocks, the inodes) that
  the mount logs, ``tux3 stat`` shows and ``fsck.tux3 -n`` turns into an error.
- A delta that was written whole and damaged later is never dropped by a read-write mount: ``Recovery.refuse``
  then says why, and only a read-only mount goes on (at the delta before). Only a delta whose blocks look like a
  commit that did not finish is dropped: the rule is docs/FORMAT.md §11.
- Damage that single flipped bits explain is described exactly (``Recovery.fixes``, ``Recovery.exact``): the
  byte and bit of each, found through the block's own checksum, so that ``fsck.tux3`` can restore them and lose
  nothing. A bit is only ever named when flipping it makes the checksum hold.
- Nothing here writes to the image (``Fix.apply`` is called by fsck.tux3 only).
- Examining a delta trusts nothing it reads: its log walk stops at a loop and at a block outside the allocatable
  area, and a record naming blocks outside it is damage (``proof.named_blocks``), never a set sized by its count.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from . import format as fmt
from . import logrecord as logrec
from .backing import Backing, as_backing
from .proof import named_blocks

UNFINISHED, DAMAGED = "unfinished", "damaged"
_BITS = tuple(1 << i for i in range(8))


@dataclass
class Fix:
    """One flipped bit found exactly: the byte of the image that holds it, the bit in that byte, and what the
    block is."""

    offset: int
    bit: int
    block: int  # the block (superblock: its copy number)
    what: str  # "data block K of inode I", "log block of delta N", "superblock copy C"
    blocksize: int = 0  # 0: a superblock copy

    def line(self) -> str:
        if not self.blocksize:
            return f"restored bit {(self.offset - fmt.SUPER_OFFSETS[self.block]) * 8 + self.bit} of {self.what}"
        return f"restored bit {self.offset % self.blocksize * 8 + self.bit} of block {self.block} ({self.what})"

    def apply(self, backing: Backing | int) -> None:
        """Flip the bit back in the volume (``backing``, or an open file descriptor of its image)."""
        backing = as_backing(backing)
        b = backing.pread(1, self.offset)
        backing.pwrite(bytes([b[0] ^ (1 << self.bit)]), self.offset)


def bit_diff(a: bytes | bytearray, b: bytes | bytearray) -> tuple[int, int]:
    """(byte index, bit) of the one bit by which ``a`` and ``b`` differ."""
    i = next(i for i in range(len(a)) if a[i] != b[i])
    return i, (a[i] ^ b[i]).bit_length() - 1


@dataclass
class Recovery:
    """What the choice of superblock found, for the mount's log, ``tux3 stat`` and ``fsck.tux3``."""

    path: str
    seq: int = 0  # the delta loaded
    dropped: int = 0  # the newer delta not loaded (0: none)
    cause: str = ""  # why it was not loaded: UNFINISHED or DAMAGED
    blocks: list[str] = field(default_factory=list)  # the blocks of the dropped delta that fail, and how
    inodes: list[int] = field(default_factory=list)  # inodes the dropped delta changed (as far as its log reads)
    notes: list[str] = field(default_factory=list)  # damage that cost no delta (a bad copy of an older delta)
    refuse: str = ""  # non-empty: a read-write mount must not go on, and why (one line naming fsck.tux3)
    fixes: list[Fix] = field(default_factory=list)  # the single flipped bits found, one per damaged block
    exact: bool = False  # the fixes explain all the damage: restoring them loses nothing

    def warnings(self) -> list[str]:
        """One line per thing to report at mount."""
        out = list(self.notes)
        if self.dropped:
            what = ("its blocks did not all reach the disk (a commit that did not finish)" if self.cause == UNFINISHED
                    else "it was written and then damaged")
            out.append(f"{self.path}: delta {self.dropped} not loaded, {what}; loaded delta {self.seq}"
                       + (f"; inodes it changed: {_few(self.inodes)}" if self.inodes else "")
                       + (f"; {'; '.join(self.blocks[:4])}" if self.blocks else ""))
        if self.refuse:
            out.append(self.refuse)
        return out

    def errors(self) -> list[str]:
        """What ``fsck.tux3 -n`` must report as errors: every delta not loaded, and damage that refuses a mount."""
        out = []
        if self.dropped:
            out.append(f"delta {self.dropped} was dropped ({self.cause}): the volume loads at delta {self.seq}"
                       + (f"; inodes it changed: {_few(self.inodes)}" if self.inodes else "")
                       + (f"; {'; '.join(self.blocks[:4])}" if self.blocks else ""))
        if self.refuse and not self.dropped:
            out.append(self.refuse)
        return out


def _few(items: list[int], n: int = 20) -> str:
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# one bit away: the signature of damage, which no crash leaves


def one_bit_off(buf: bytes | bytearray, ok: Callable[[bytearray], bool], at: range | None = None) -> bytearray | None:
    """``buf`` with the one bit flipped (in the bytes ``at``, default all) that makes ``ok`` true, or None when no
    single flip does."""
    b = bytearray(buf)
    for i in at if at is not None else range(len(b)):
        v = b[i]
        for bit in _BITS:
            b[i] = v ^ bit
            if ok(b):
                return b
        b[i] = v
    return None


def _one_bit(x: int) -> bool:
    return x != 0 and x & (x - 1) == 0


def _super_one_bit_off(raw: bytes) -> bytes | None:
    """The superblock copy ``raw`` with the one bit flipped that restores its checksum, or None."""
    if len(raw) < fmt.SUPER_SIZE:
        return None
    body, (stored,) = raw[: fmt.SUPER_SIZE - 8], struct.unpack_from("<Q", raw, fmt.SUPER_SIZE - 8)
    if _one_bit(xxhash.xxh3_64_intdigest(body) ^ stored):  # the flip is in the checksum itself
        return bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    flipped = one_bit_off(body, lambda b: xxhash.xxh3_64_intdigest(b) == stored)
    return None if flipped is None else bytes(flipped) + raw[fmt.SUPER_SIZE - 8: fmt.SUPER_SIZE]


def repair_super(raw: bytes, copy: int) -> fmt.Super | None:
    """The superblock a damaged copy held, when one flipped bit explains the damage."""
    fixed = _super_one_bit_off(raw)
    if fixed is None:
        return None
    try:
        return fmt.Super.unpack(fixed, copy)
    except fmt.FormatError:
        return None


def super_fix(raw: bytes, copy: int) -> Fix | None:
    """The flipped bit of a damaged superblock copy, when one flipped bit explains the damage."""
    repaired = repair_super(raw, copy)
    if repaired is None:
        return None
    i, bit = bit_diff(raw, _super_one_bit_off(raw) or raw)
    return Fix(fmt.SUPER_OFFSETS[copy] + i, bit, copy, f"superblock copy {copy} (delta {repaired.seq})")


def meta_fix(buf: bytes, block: int) -> Fix | None:
    """The flipped bit of metadata block ``block`` (a tree node, a bitmap or log block) that fails its checksum,
    when one flipped bit explains it: the bit found restores both the checksum and the block's own number."""
    if len(buf) < fmt.HEADER_SIZE:
        return None

    def ok(b: bytearray) -> bool:
        return fmt.HEADER.unpack_from(b, 0)[3] == block and fmt._meta_csum(b) == fmt.HEADER.unpack_from(b, 0)[4]

    stored = fmt.HEADER.unpack_from(buf, 0)[4]
    if _one_bit(stored ^ fmt._meta_csum(buf)) and fmt.HEADER.unpack_from(buf, 0)[3] == block:
        fixed = bytearray(buf)
        struct.pack_into("<Q", fixed, fmt.CSUM_AT, fmt._meta_csum(buf))
    else:
        fixed = one_bit_off(buf, ok)
    if fixed is None:
        return None
    i, bit = bit_diff(buf, fixed)
    name = fmt.KIND_NAMES.get(bytes(fixed[:4]), "metadata")
    return Fix(block * len(buf) + i, bit, block, f"{name} block", len(buf))


def _raw_fields(raw: bytes) -> dict[str, int] | None:
    """The fields of a superblock copy read without trusting its checksum (None: not even the signature)."""
    if len(raw) < fmt.SUPER_SIZE or raw[:8] != fmt.MAGIC:
        return None
    f = fmt._SUPER.unpack_from(raw, 0)
    return {"seq": f[4], "log_count": f[9], "unify_seq": f[11], "next_inum": f[18], "uuid": f[20], "state": f[3]}


def _same_state(a: fmt.Super, b: fmt.Super) -> bool:
    """Do two superblocks name the same trees, log and counts (so that loading either loses nothing)?"""
    keys = ("itree_root", "otree_root", "log_head", "log_count", "unify_seq", "bitmap_cur", "used_inodes",
            "next_inum", "volblocks")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def judge_bad_copy(raw: bytes, copy: int, good: fmt.Super, reason: str, path: str) -> tuple[str, str]:
    """(note, refusal) for a superblock copy whose checksum fails, beside the valid copy ``good``. The refusal is
    empty when the bad copy cannot have named a state newer than ``good``'s."""
    repaired = repair_super(raw, copy)
    if repaired is not None:
        if repaired.seq <= good.seq:
            return (f"{path}: superblock copy {copy} is damaged (one flipped bit; it named delta {repaired.seq}, "
                    f"older than delta {good.seq} in use): nothing is lost, the next commit rewrites it"), ""
        if _same_state(repaired, good):
            return (f"{path}: superblock copy {copy} is damaged (one flipped bit; it named delta {repaired.seq}, "
                    f"which changed nothing but the volume's state): nothing is lost"), ""
        return "", (f"{path}: superblock copy {copy} is damaged (one flipped bit) and named delta {repaired.seq}, "
                    f"newer than delta {good.seq} of the other copy; run fsck.tux3 (mount -o ro serves delta "
                    f"{good.seq})")
    raw_f = _raw_fields(raw)
    older = (raw_f is not None and raw_f["uuid"] == good.uuid and raw_f["seq"] < good.seq
             and raw_f["unify_seq"] <= raw_f["seq"] and raw_f["unify_seq"] <= good.unify_seq
             and (raw_f["unify_seq"] != good.unify_seq or raw_f["log_count"] <= good.log_count)
             and raw_f["next_inum"] <= good.next_inum)
    if older:
        return (f"{path}: superblock copy {copy} is damaged ({reason}); what is left of it names delta "
                f"{raw_f['seq']}, older than delta {good.seq} in use"), ""
    if good.state == fmt.STATE_CLEAN:  # a mount's first commit is the only one a clean copy can be older than
        return (f"{path}: superblock copy {copy} is damaged ({reason}); the other copy is of a clean unmount "
                f"(delta {good.seq}), so at most a mount's first commit, which changes nothing else, is lost"), ""
    return "", (f"{path}: superblock copy {copy} is damaged ({reason}) and may have named a newer delta than "
                f"delta {good.seq} of the other copy; run fsck.tux3 (mount -o ro serves delta {good.seq})")


# ---------------------------------------------------------------------------------------------------------------
# a delta whose proof fails: unfinished, or damaged?


@dataclass
class DeltaBlocks:
    """The blocks of one delta as found on disk."""

    damaged: list[str] = field(default_factory=list)  # blocks no crash leaves as they are
    fixes: list[Fix] = field(default_factory=list)  # the damaged blocks whose one flipped bit was found
    missing: list[str] = field(default_factory=list)  # blocks a crash may have left unwritten or torn
    inodes: set[int] = field(default_factory=set)


def _log_header(buf: bytes) -> tuple[bytes, int, int, int]:
    kind, _, _, own, csum, delta = fmt.HEADER.unpack_from(buf, 0)
    return kind, own, csum, delta


def _near_header(buf: bytes, block: int, seq: int) -> int:
    """Bits by which the header's kind, own block number and delta differ from a log block of ``seq`` at ``block``."""
    kind, own, _, delta = _log_header(buf)
    return (bin(int.from_bytes(kind, "little") ^ int.from_bytes(fmt.KIND_LOG, "little")).count("1")
            + bin(own ^ block).count("1") + bin(delta ^ seq).count("1"))


def _sealed(block: int, seq: int) -> Callable[[bytearray], bool]:
    def ok(b: bytearray) -> bool:
        try:
            _, _, _, delta = fmt.unseal(b, block, (fmt.KIND_LOG,))
        except fmt.CorruptBlock:
            return False
        return delta == seq
    return ok


def _log_one_bit_off(buf: bytes, ok: Callable[[bytearray], bool]) -> bytearray | None:
    """``one_bit_off`` for a log block, searching only where one flip can be: a log block is its header, its
    records, then zeros, so a single flip past the records shows as the only set bit there."""
    at = fmt.HEADER_SIZE + logrec._LOG_HEAD.size
    _, nbytes = logrec._LOG_HEAD.unpack_from(buf, fmt.HEADER_SIZE)
    end = min(len(buf), at + nbytes)
    tail = int.from_bytes(buf[end:], "little")
    if tail == 0:
        return one_bit_off(buf, ok, range(end))
    if _one_bit(tail):
        i = end + (tail.bit_length() - 1) // 8
        return one_bit_off(buf, ok, range(i, i + 1))
    return one_bit_off(buf, ok, range(fmt.HEADER_SIZE, at))  # the flip changed the length of the records


def examine_delta(backing: Backing | int, sb: fmt.Super, before: fmt.Super | None) -> DeltaBlocks:
    """Sort the blocks of delta ``sb.seq`` (whose proof failed) into damaged and missing. ``before`` is the other
    copy, the delta before, when valid: it tells where this delta's log ends."""
    bs, seq, out = sb.blocksize, sb.seq, DeltaBlocks()
    backing = as_backing(backing)

    def read(block: int) -> bytes | None:
        if sb.outside(block):
            return None
        return backing.pread(bs, block * bs)

    count = sb.log_count
    if before is not None and before.seq < seq and before.unify_seq == sb.unify_seq:
        count -= before.log_count  # this delta's log blocks come first in the chain
    blocks_records: list[list] = []  # the records of each log block, newest block first
    block, seen = sb.log_head, set()
    for i in range(max(count, 0)):
        buf = read(block)
        if buf is None:
            out.damaged.append(f"log block {i} of the delta is named as block {block}, outside the allocatable "
                               "area")
            break
        if block in seen:
            out.damaged.append(f"log block {block} is reached twice: the chain loops")
            break
        seen.add(block)
        ok = _sealed(block, seq)
        if not ok(bytearray(buf)):
            try:
                fmt.unseal(buf, block, (fmt.KIND_LOG,))
                sealed_other = True  # a valid block of another delta: what was there before
            except fmt.CorruptBlock:
                sealed_other = False
            fixed = None
            if not sealed_other and _near_header(buf, block, seq) <= 1:
                kind, own, csum, _ = _log_header(buf)
                if _one_bit(csum ^ fmt._meta_csum(buf)) and _near_header(buf, block, seq) == 0:
                    fixed = bytearray(buf)
                    struct.pack_into("<Q", fixed, fmt.CSUM_AT, fmt._meta_csum(buf))
                else:
                    fixed = _log_one_bit_off(buf, ok)
                if fixed is not None:
                    out.damaged.append(f"log block {block}: one flipped bit")
                    i, bit = bit_diff(buf, fixed)
                    out.fixes.append(Fix(block * bs + i, bit, block, f"log block of delta {seq}", bs))
                elif _near_header(buf, block, seq) == 0 and bs == fmt.SUPER_SIZE:
                    out.damaged.append(f"log block {block}: checksum mismatch in a one-sector block")
                elif _near_header(buf, block, seq) == 0:
                    out.missing.append(f"log block {block}: checksum mismatch (torn, or damaged)")
                else:
                    out.missing.append(f"log block {block}: not written")
            else:
                out.missing.append(f"log block {block}: not written")
            if fixed is None:
                break
            buf = bytes(fixed)
        _, _, n, _ = fmt.unseal(buf, block, (fmt.KIND_LOG,))
        try:
            prev, recs = logrec.unpack_log(buf, n)
        except ValueError as e:  # sealed whole, yet unreadable: no crash writes that
            out.damaged.append(f"log block {block}: {e}")
            break
        blocks_records.append(recs)
        block = prev
    records = [rec for recs in reversed(blocks_records) for rec in recs]
    csums: dict[int, tuple[int, int, int]] = {}  # physical block -> (checksum, inode, logical block)
    for rec in records:
        if rec[0] not in (logrec.LOG_ALLOC, logrec.LOG_FREE):
            out.inodes.add(rec[1])
        if rec[0] == logrec.LOG_MAP:
            for j, c in enumerate(rec[4]):
                csums[rec[3] + j] = (c, rec[1], rec[2] + j)
    failing: list[tuple[int, bytes, int, int, int]] = []
    try:
        held = named_blocks(records, (), sb)
    except ValueError as e:  # sealed whole, yet naming blocks it cannot: no crash writes that
        out.damaged.append(str(e))
        return out
    for b in sorted(b for b in csums if b in held):
        want, ino, logical = csums[b]
        data = read(b)
        if data is None:
            out.damaged.append(f"block {b} of inode {ino} is outside the volume")
        elif fmt.checksum(data) != want:
            failing.append((b, data, want, ino, logical))
    for b, data, want, ino, logical in failing:
        where = f"data block {logical} of inode {ino} (block {b})"
        if not any(data):
            out.missing.append(f"{where}: not written (zeros)")
        elif len(failing) == 1 and not out.missing and (fixed := one_bit_off(
                data, lambda buf, want=want: fmt.checksum(buf) == want)) is not None:
            out.damaged.append(f"{where}: one flipped bit")  # everything else of the delta is there
            i, bit = bit_diff(data, fixed)
            out.fixes.append(Fix(b * bs + i, bit, b, f"data block {logical} of inode {ino}", bs))
        else:
            out.missing.append(f"{where}: fails its checksum (not written, or torn)")
    return out


def judge_delta(backing: Backing | int, sb: fmt.Super, before: fmt.Super, path: str) -> Recovery:
    """The report on newest delta ``sb`` whose proof failed, with the delta before, ``before``, to load."""
    found = examine_delta(backing, sb, before)
    rec = Recovery(path, seq=before.seq, dropped=sb.seq, inodes=sorted(found.inodes),
                   blocks=found.damaged + found.missing, fixes=found.fixes,
                   exact=bool(found.fixes) and not found.missing and len(found.fixes) == len(found.damaged))
    if found.damaged or sb.state == fmt.STATE_CLEAN:
        rec.cause = DAMAGED
        why = (f"{len(found.damaged)} of its blocks damaged after they were written, first {found.damaged[0]}"
               if found.damaged
               else "its proof fails on a cleanly unmounted volume")
        rec.refuse = (f"{path}: delta {sb.seq} was written and then damaged ({why}); run fsck.tux3 "
                      f"(mount -o ro serves delta {before.seq})")
    else:
        rec.cause = UNFINISHED
        if not found.missing:
            rec.blocks.append("every block matches its own checksum but not the proof (an older copy of a log "
                              "block of the same delta number)")
    return rec
