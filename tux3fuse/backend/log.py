"""The forward log: per delta, the changes that the bitmap and the btrees on disk do not hold yet.

Between two unifies neither the bitmap nor any btree node on disk is rewritten. A delta writes its data blocks
and log blocks only; the log records say what changed: allocations and frees (for the bitmap), and, for the
trees, each changed inode's record, the extents mapped and unmapped, inodes destroyed and orphans added. The
changed tree nodes stay dirty in memory until the next unify writes them (Tux3's deferred btree updates).

Guarantees:
- The log blocks chained from the superblock (newest first) hold every change since the last unify, in order.
- ``replay`` applies the allocation records oldest first on top of the bitmap region named by the superblock and
  marks the log blocks themselves used; ``replay.py:replay_trees`` applies the tree records on top of the trees as
  the last unify wrote them. Together they reproduce the state of the last committed delta exactly.
- A tree node that a change removes stays allocated until the next unify (``Backend.unify_frees``): the trees on
  disk still point at it, and replay reads it.
- A log that does not replay is never half applied: ``replay.py:find_damage`` names the first delta that does not
  replay (or whose log block is unreadable) and the newest one before it that does, whose state it rebuilds from
  the last unify; ``roll_back`` makes that delta the volume's (docs/FORMAT.md §9.1).
- Walking the chain (``walk_log``, ``read_chain``) trusts nothing it reads: it reads at most ``log_count`` blocks,
  each at most once, only from the allocatable area, and stops at a loop or at a delta out of order; ``replay``
  refuses an allocation record outside the allocatable area (docs/FORMAT.md §13).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace

from .. import format as fmt
from .. import logrecord as logrec
from ..alloc import Allocator
from ..device import exclusive
from ..steps import run_steps

LOG_STEP = 32  # records split or packed between two yields of a commit's prepare stage


def split_log(records: list[logrec.LogRecord], blocksize: int) -> list[list[logrec.LogRecord]]:
    """Records grouped into log blocks, in order."""
    return run_steps(split_log_steps(records, blocksize))


def split_log_steps(records: list[logrec.LogRecord], blocksize: int
                    ) -> Generator[None, None, list[list[logrec.LogRecord]]]:
    """``split_log`` yielding every ``LOG_STEP`` records."""
    room = logrec.log_room(blocksize)
    size_of = logrec.log_record_size
    blocks: list[list[logrec.LogRecord]] = []
    used = room
    for i, rec in enumerate(records):
        size = size_of(rec)
        if used + size > room:
            blocks.append([])
            used = 0
        blocks[-1].append(rec)
        used += size
        if i % LOG_STEP == LOG_STEP - 1:
            yield
    return blocks


def write_log(groups: list[list[logrec.LogRecord]], blocksize: int, head: int, delta: int,
              alloc_block: Callable[[], int], write: Callable[[int, bytearray], None]
              ) -> Generator[None, None, tuple[int, list[int]]]:
    """Write record groups (from ``split_log``) into new log blocks chained after ``head``, yielding every
    ``LOG_STEP`` records packed and after each block; return (new head, blocks written)."""
    written = []
    for group in groups:
        parts = []
        for at in range(0, len(group), LOG_STEP):
            parts.append(logrec.pack_log_records(group[at: at + LOG_STEP]))
            yield
        block = alloc_block()
        write(block, logrec.seal_log(blocksize, head, b"".join(parts), len(group), block, delta))
        written.append(block)
        head = block
        yield
    return head, written


def read_chain(read_block: Callable[[int], bytes], sb: fmt.Super) -> list[tuple[int, list]]:
    """The log blocks of ``sb`` (``log_count`` blocks back from ``log_head``), oldest first: (block, records).
    CorruptBlock for the first that ``walk_log`` does not accept, or when the chain ends early."""
    entries, broken = walk_log(read_block, sb)
    if broken is not None:
        raise broken
    if len(entries) < sb.log_count:
        raise fmt.CorruptBlock(entries[-1].block if entries else 0, "log",
                               f"log chain ends after {len(entries)} of {sb.log_count} blocks")
    return [(e.block, e.records) for e in reversed(entries)]


def replay(alloc: Allocator, chain: list[tuple[int, list]], sb: fmt.Super) -> None:
    """Apply the allocation records of ``chain`` (oldest first) to ``alloc``, the log blocks marked used. A record
    naming blocks outside the allocatable area of ``sb`` is a CorruptBlock of its log block."""
    for block, records in chain:
        alloc.mark_used(block, 1)
        for rec in records:
            code = rec[0]
            if code not in (logrec.LOG_ALLOC, logrec.LOG_FREE):
                continue
            _, start, count = rec
            if sb.outside(start, count):
                raise fmt.CorruptBlock(block, "log", f"record for blocks {start}+{count} outside the allocatable "
                                       f"area [{sb.alloc_start}, {sb.volblocks})")
            if code == logrec.LOG_ALLOC:
                alloc.mark_used(start, count)
            else:
                alloc.mark_free(start, count)
    alloc.recount()


def load_bitmap(read_block: Callable[[int], bytes], sb: fmt.Super,
                damaged: list[tuple[int, int, str]] | None = None) -> Allocator:
    """The allocation bitmap as the last unify wrote it. A bitmap block that fails its checks raises CorruptBlock,
    or, with ``damaged`` (a read-only load, which allocates nothing), reads as all used and is added to it as
    (index in the region, block, reason). The fixed blocks (reserved, both bitmap regions) are used whatever the
    bitmap says; those it had free are listed in ``Allocator.fixed_free`` (fsck reports them)."""
    bpb = fmt.bitmap_bits_per_block(sb.blocksize)
    start = sb.bitmap_start[sb.bitmap_cur]
    bits = bytearray()
    for i in range(sb.bitmap_blocks):
        buf = read_block(start + i)
        try:
            fmt.unseal(buf, start + i, (fmt.KIND_BITMAP,))
        except fmt.CorruptBlock as e:
            if damaged is None:
                raise
            damaged.append((i, start + i, e.reason))
            buf = bytes(fmt.HEADER_SIZE) + b"\xff" * (len(buf) - fmt.HEADER_SIZE)
        bits += buf[fmt.HEADER_SIZE:]
    alloc = Allocator(sb.volblocks, bpb, bits[: -(-sb.volblocks // 8)])
    alloc.stale[1 - sb.bitmap_cur].update(range(sb.bitmap_blocks))  # the other region is of unknown age
    alloc.fixed_free = [b for b in range(sb.alloc_start) if not alloc.is_used(b)]
    if alloc.fixed_free:  # never handed out, whatever the bitmap says: used in memory, rewritten by the next unify
        alloc.mark_used(0, sb.alloc_start)
        alloc.recount()
    return alloc


def bitmap_block(alloc: Allocator, index: int, blocknr: int, blocksize: int, delta: int) -> bytearray:
    buf = bytearray(blocksize)
    buf[fmt.HEADER_SIZE:] = alloc.image(index)
    return fmt.seal(buf, fmt.KIND_BITMAP, 0, 0, blocknr, delta)


# ---------------------------------------------------------------------------------------------------------------
# A log that does not replay: finding the last consistent delta (docs/FORMAT.md, "Rolling back a damaged log")

SCAN_CHUNK = 256  # blocks read at once when the volume is scanned for log blocks


@dataclass
class LogEntry:
    block: int
    delta: int
    prev: int
    records: list


@dataclass
class LogDamage:
    """Why the log of the newest superblock does not replay, and the newest delta that does."""

    good: int  # the last consistent delta
    bad: int  # the first delta that cannot be replayed
    where: str  # "log block N: what is wrong with it"
    chain: list[LogEntry]  # the log of delta ``good``, oldest first
    dropped: list[int]  # the deltas dropped (those known: by the newest superblock and by readable log blocks)
    inodes: set[int]  # inodes the readable log blocks of the dropped deltas touch
    unreadable: list[int]  # log blocks of the dropped deltas that cannot be read (their inodes are unknown)
    newest: int  # the highest delta number seen on the volume
    sb: fmt.Super  # the superblock whose log this is (roots, bitmap region, last unify)
    free_blocks: int = 0  # counts of the state at delta ``good``
    used_inodes: int = 0

    def message(self, path: str) -> str:
        return (f"{path}: the log cannot be replayed past delta {self.good} ({self.where}); "
                f"run fsck.tux3 {path} to roll back to delta {self.good}")


def log_entry(read_block: Callable[[int], bytes], block: int) -> LogEntry:
    """The log block ``block``; CorruptBlock if it is not a valid one."""
    try:
        buf = read_block(block)
    except Exception as e:  # outside the volume, or unreadable
        raise fmt.CorruptBlock(block, "log", str(e)) from None
    _, _, n, delta = fmt.unseal(buf, block, (fmt.KIND_LOG,))
    try:
        prev, records = logrec.unpack_log(buf, n)
    except (ValueError, IndexError) as e:
        raise fmt.CorruptBlock(block, "log", str(e)) from None
    return LogEntry(block, delta, prev, records)


def walk_log(read_block: Callable[[int], bytes], sb: fmt.Super) -> tuple[list[LogEntry], fmt.CorruptBlock | None]:
    """The log blocks of ``sb`` from ``log_head`` back ``log_count`` blocks (or to prev 0), newest first, up to the
    first block that is not a valid log block of this log: (the valid blocks, the error of the bad one or None).
    Not valid: a block outside the allocatable area, one the walk reached already (a loop), one that fails its
    checks, or one whose delta is not in (``unify_seq``, the delta of the block after it] (``seq`` for the head).
    Each block is read at most once: at most ``log_count`` reads, whatever the chain says."""
    out: list[LogEntry] = []
    block, seen = sb.log_head, set()
    while block and len(out) < sb.log_count:
        if block in seen:
            return out, fmt.CorruptBlock(block, "log", "the log chain loops")
        if sb.outside(block):
            return out, fmt.CorruptBlock(block, "log", f"outside the allocatable area [{sb.alloc_start}, "
                                         f"{sb.volblocks})")
        seen.add(block)
        try:
            entry = log_entry(read_block, block)
        except fmt.CorruptBlock as e:
            return out, e
        upper = out[-1].delta if out else sb.seq
        if not sb.unify_seq < entry.delta <= upper:
            return out, fmt.CorruptBlock(block, "log", f"delta {entry.delta} outside ({sb.unify_seq}, {upper}]")
        out.append(entry)
        block = entry.prev
    return out, None


def header_hint(read_block: Callable[[int], bytes], block: int) -> tuple[int | None, int | None]:
    """(delta, prev) from the header of a log block that fails its checks, when the header still says it is that
    log block; (None, None) otherwise."""
    try:
        buf = read_block(block)
        kind, _, _, own, _, delta = fmt.HEADER.unpack_from(buf, 0)
        prev, _ = logrec._LOG_HEAD.unpack_from(buf, fmt.HEADER_SIZE)
    except Exception:  # unreadable: no hint
        return None, None
    if kind != fmt.KIND_LOG or own != block:
        return None, None
    return delta, prev


def back_to_start(valid: dict[int, LogEntry], head: int, limit: int) -> list[LogEntry] | None:
    """The chain from ``head`` back to prev 0 through ``valid`` blocks only, oldest first (None if it leaves them,
    loops, or its deltas do not fall going back)."""
    out: list[LogEntry] = []
    block = head
    while block:
        entry = valid.get(block)
        if entry is None or len(out) >= limit or (out and entry.delta > out[-1].delta):
            return None
        out.append(entry)
        block = entry.prev
    out.reverse()
    return out


def roll_back(path: str, damage: LogDamage) -> int:
    """Write both superblock copies naming the log of ``damage.good``: the volume then loads as of that delta.
    The new superblock's delta number is above every delta seen, so that no log block of a dropped delta can be
    taken for one of the deltas committed after it. Returns that delta number."""
    with exclusive(path) as backing:
        found = []
        for copy, offset in enumerate(fmt.SUPER_OFFSETS):
            try:
                found.append(fmt.Super.unpack(backing.pread(fmt.SUPER_SIZE, offset), copy))
            except fmt.FormatError:  # a damaged copy: the numbers of the other one and of the log count
                pass
        new = replace(damage.sb, seq=max(damage.newest, *(s.seq for s in found)) + 1,
                      log_head=damage.chain[-1].block if damage.chain else 0, log_count=len(damage.chain),
                      free_blocks=damage.free_blocks, used_inodes=damage.used_inodes,
                      next_inum=max(damage.sb.next_inum, *(s.next_inum for s in found)), delta_csum=0,
                      state=fmt.STATE_CLEAN)
        raw = new.pack()
        for offset in fmt.SUPER_OFFSETS:  # both: the damaged newer copy must not win at the next mount
            backing.pwrite(raw, offset)
            backing.sync()
        return new.seq
