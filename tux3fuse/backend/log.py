"""The forward log: per delta, the changes that the bitmap and the btrees on disk do not hold yet.

Between two unifies neither the bitmap nor any btree node on disk is rewritten. A delta writes its data blocks
and log blocks only; the log records say what changed: allocations and frees (for the bitmap), and, for the
trees, each changed inode's record, the extents mapped and unmapped, inodes destroyed and orphans added. The
changed tree nodes stay dirty in memory until the next unify writes them (Tux3's deferred btree updates).

Guarantees:
- The log blocks chained from the superblock (newest first) hold every change since the last unify, in order.
- ``replay`` applies the allocation records oldest first on top of the bitmap region named by the superblock and
  marks the log blocks themselves used; ``replay_trees`` applies the tree records on top of the trees as the last
  unify wrote them. Together they reproduce the state of the last committed delta exactly.
- A tree node that a change removes stays allocated until the next unify (``Volume.unify_frees``): the trees on
  disk still point at it, and replay reads it.
- A log that does not replay is never half applied: ``find_damage`` names the first delta that does not replay
  (or whose log block is unreadable) and the newest one before it that does, whose state it rebuilds from the
  last unify; ``roll_back`` makes that delta the volume's (docs/FORMAT.md §9.1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .. import format as fmt
from ..alloc import Allocator
from ..device import OutOfRange, exclusive
from ..steps import run_steps
from . import extents
from .btree import BTree

if TYPE_CHECKING:
    from ..fs import Volume


LOG_STEP = 32  # records split or packed between two yields of a commit's prepare stage


def split_log(records: list[fmt.LogRecord], blocksize: int) -> list[list[fmt.LogRecord]]:
    """Records grouped into log blocks, in order."""
    return run_steps(split_log_steps(records, blocksize))


def split_log_steps(records: list[fmt.LogRecord], blocksize: int
                    ) -> Generator[None, None, list[list[fmt.LogRecord]]]:
    """``split_log`` yielding every ``LOG_STEP`` records."""
    room = fmt.log_room(blocksize)
    size_of = fmt.log_record_size
    blocks: list[list[fmt.LogRecord]] = []
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


def write_log(groups: list[list[fmt.LogRecord]], blocksize: int, head: int, delta: int,
              alloc_block: Callable[[], int], write: Callable[[int, bytearray], None]
              ) -> Generator[None, None, tuple[int, list[int]]]:
    """Write record groups (from ``split_log``) into new log blocks chained after ``head``, yielding every
    ``LOG_STEP`` records packed and after each block; return (new head, blocks written)."""
    written = []
    for group in groups:
        parts = []
        for at in range(0, len(group), LOG_STEP):
            parts.append(fmt.pack_log_records(group[at: at + LOG_STEP]))
            yield
        block = alloc_block()
        write(block, fmt.seal_log(blocksize, head, b"".join(parts), len(group), block, delta))
        written.append(block)
        head = block
        yield
    return head, written


def read_chain(read_block: Callable[[int], bytes], head: int, count: int) -> list[tuple[int, list]]:
    """The log blocks from ``head`` back ``count`` blocks, oldest first: (block, records)."""
    chain = []
    block = head
    for _ in range(count):
        if not block:
            raise fmt.CorruptBlock(0, "log", f"log chain ends after {len(chain)} of {count} blocks")
        buf = read_block(block)
        _, _, n, _ = fmt.unseal(buf, block, (fmt.KIND_LOG,))
        try:
            prev, records = fmt.unpack_log(buf, n)
        except (ValueError, IndexError) as e:
            raise fmt.CorruptBlock(block, "log", str(e)) from None
        chain.append((block, records))
        block = prev
    chain.reverse()
    return chain


def replay(alloc: Allocator, chain: list[tuple[int, list]]) -> None:
    for block, records in chain:
        alloc.mark_used(block, 1)
        for rec in records:
            code = rec[0]
            if code not in (fmt.LOG_ALLOC, fmt.LOG_FREE):
                continue
            _, start, count = rec
            if start + count > alloc.volblocks or start <= 0:
                raise fmt.CorruptBlock(block, "log", f"record for blocks {start}+{count} outside the volume")
            if code == fmt.LOG_ALLOC:
                alloc.mark_used(start, count)
            else:
                alloc.mark_free(start, count)
    alloc.recount()


def _ignore(start: int, count: int) -> None:
    """Replayed tree changes free nothing: the allocation records did that already."""


def replay_trees(vol: Volume, chain: list[tuple[int, list]]) -> None:
    """Apply the tree records of the log, oldest first, to the trees as the last unify left them. The changed
    nodes stay dirty in memory for the next unify, exactly as they were before the crash or unmount."""
    bs = vol.blocksize
    for block, records in chain:
        for rec in records:
            code = rec[0]
            if code in (fmt.LOG_ALLOC, fmt.LOG_FREE):
                continue
            ino = rec[1]
            try:
                if code == fmt.LOG_INODE:
                    vol.itable.insert(ino, rec[2])
                    inode = vol.inodes.get(ino)
                    if inode is not None:
                        inode.rec = fmt.InodeRecord.unpack(rec[2])
                elif code == fmt.LOG_ORPHAN:
                    vol.otree.insert(ino, b"")
                elif code == fmt.LOG_DESTROY:
                    inode = vol.iget(ino)
                    tree = vol.dtree(inode)
                    extents.unmap(tree, 0, None, _ignore)
                    tree.free_all()
                    vol.itable.delete(ino)
                    vol.otree.delete(ino)
                    vol.unflushed.pop(ino, None)
                    vol.forget_inode(inode)
                else:
                    inode = vol.iget(ino)
                    tree = vol.dtree(inode)
                    before = tree.dirty_nodes
                    if code == fmt.LOG_MAP:
                        _, _, logical, physical, csums = rec
                        if physical <= 0 or physical + len(csums) > vol.sb.volblocks:
                            raise ValueError(f"blocks {physical}+{len(csums)} outside the volume")
                        extents.map_run(tree, logical, physical, csums, _ignore, bs)
                    else:
                        extents.unmap(tree, rec[2], None, _ignore)
                    vol.unflushed[ino] = inode
                    vol.unify_nodes += tree.dirty_nodes - before
            except (ValueError, IndexError, OSError) as e:
                raise fmt.CorruptBlock(block, "log", f"record {code} for inode {ino} does not apply: {e}") from None


def load_bitmap(read_block: Callable[[int], bytes], sb: fmt.Super,
                damaged: list[tuple[int, int, str]] | None = None) -> Allocator:
    """The allocation bitmap as the last unify wrote it. A bitmap block that fails its checks raises CorruptBlock,
    or, with ``damaged`` (a read-only load, which allocates nothing), reads as all used and is added to it as
    (index in the region, block, reason)."""
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


def _entry(read_block: Callable[[int], bytes], block: int) -> LogEntry:
    """The log block ``block``; CorruptBlock if it is not a valid one."""
    try:
        buf = read_block(block)
    except Exception as e:  # outside the volume, or unreadable
        raise fmt.CorruptBlock(block, "log", str(e)) from None
    _, _, n, delta = fmt.unseal(buf, block, (fmt.KIND_LOG,))
    try:
        prev, records = fmt.unpack_log(buf, n)
    except (ValueError, IndexError) as e:
        raise fmt.CorruptBlock(block, "log", str(e)) from None
    return LogEntry(block, delta, prev, records)


def walk_log(read_block: Callable[[int], bytes], head: int, count: int
             ) -> tuple[list[LogEntry], fmt.CorruptBlock | None]:
    """The log blocks from ``head`` back ``count`` blocks (or to prev 0), newest first, up to the first block that
    is not a valid log block: (the valid blocks, the error of the bad one or None)."""
    out: list[LogEntry] = []
    block, seen = head, set()
    while block and len(out) < count:
        if block in seen:
            return out, fmt.CorruptBlock(block, "log", "the log chain loops")
        seen.add(block)
        try:
            entry = _entry(read_block, block)
        except fmt.CorruptBlock as e:
            return out, e
        out.append(entry)
        block = entry.prev
    return out, None


def _header_hint(read_block: Callable[[int], bytes], block: int) -> tuple[int | None, int | None]:
    """(delta, prev) from the header of a log block that fails its checks, when the header still says it is that
    log block; (None, None) otherwise."""
    try:
        buf = read_block(block)
        kind, _, _, own, _, delta = fmt.HEADER.unpack_from(buf, 0)
        prev, _ = fmt._LOG_HEAD.unpack_from(buf, fmt.HEADER_SIZE)
    except Exception:  # unreadable: no hint
        return None, None
    if kind != fmt.KIND_LOG or own != block:
        return None, None
    return delta, prev


def _back_to_start(valid: dict[int, LogEntry], head: int, limit: int) -> list[LogEntry] | None:
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


def _scan_log_blocks(vol: Volume, lo: int, hi: int) -> dict[int, LogEntry]:
    """Every valid log block of the volume whose delta lies in (lo, hi]."""
    found: dict[int, LogEntry] = {}
    bs, volblocks = vol.blocksize, vol.sb.volblocks
    for start in range(1, volblocks, SCAN_CHUNK):
        n = min(SCAN_CHUNK, volblocks - start)
        data = vol.dev.read_blocks(start, n)
        for i in range(n):
            if data[i * bs: i * bs + 4] != fmt.KIND_LOG:
                continue
            block = start + i
            buf = data[i * bs: (i + 1) * bs]
            try:
                entry = _entry(lambda _b, buf=buf: buf, block)
            except fmt.CorruptBlock:
                continue
            if lo < entry.delta <= hi:
                found[block] = entry
    return found


def newest_logged(vol: Volume, above: int) -> int:
    """The highest delta number of a valid log block anywhere on the volume, or ``above`` when none is higher:
    a superblock written over dropped deltas is numbered above it, so that none of their log blocks can be taken
    for a later delta."""
    return max([above, *(e.delta for e in _scan_log_blocks(vol, above, 1 << 62).values())])


def _other_super(vol: Volume) -> fmt.Super | None:
    """The superblock copy that the volume was not loaded from, if it is valid."""
    copy = 1 - vol.sb.copy
    try:
        return fmt.Super.unpack(os.pread(vol.dev.fd, fmt.SUPER_SIZE, fmt.SUPER_OFFSETS[copy]), copy)
    except (fmt.FormatError, OSError):
        return None


def _older_part(vol: Volume, bad_block: int, upper: int, limit: int) -> tuple[list[LogEntry], bool]:
    """The part of the log older than the unreadable block ``bad_block``, oldest first, its deltas at most
    ``upper``; and whether its newest delta is known to be whole (it may otherwise end right before the bad block,
    which may belong to it). Tried in order: the other superblock copy's log (same log, an older delta); the chain
    from the prev pointer the bad block's header still holds; a scan of the volume for valid log blocks of this
    log, taking the newest chain back to the start of the log, cut before the first delta on which two such chains
    disagree."""
    sb, read = vol.sb, vol.dev.read_block
    other = _other_super(vol)
    if other is not None and other.unify_seq == sb.unify_seq and other.seq < sb.seq and other.log_count:
        entries, broken = walk_log(read, other.log_head, other.log_count)
        if broken is None and entries and entries[-1].prev == 0 and bad_block not in {e.block for e in entries}:
            if all(sb.unify_seq < e.delta <= upper for e in entries):
                return entries[::-1], True  # a superblock committed that delta whole
    valid = _scan_log_blocks(vol, sb.unify_seq, upper)
    _, hint_prev = _header_hint(read, bad_block)
    if hint_prev and hint_prev in valid:
        chain = _back_to_start(valid, hint_prev, limit)
        if chain is not None:
            return chain, False
    continued = {(e.prev, e.delta) for e in valid.values()}
    heads = [b for b, e in valid.items() if (b, e.delta) not in continued]  # the last block of its delta
    chains = [c for c in (_back_to_start(valid, head, limit) for head in heads) if c]
    if not chains:
        return [], False
    chains.sort(key=lambda c: (c[-1].delta, len(c)), reverse=True)
    best = chains[0]
    blocks_of: dict[int, set[tuple[int, ...]]] = {}
    for c in chains:
        for delta in {e.delta for e in c}:
            blocks_of.setdefault(delta, set()).add(tuple(e.block for e in c if e.delta == delta))
    for i, entry in enumerate(best):
        if len(blocks_of[entry.delta]) > 1:  # two histories of this delta on the disk: trust neither
            return best[:i], True  # the chain goes on past its newest delta here
    return best, False


def _reset(vol: Volume) -> None:
    """The in-memory trees and bitmap as the last unify wrote them, before any log record."""
    vol.alloc = load_bitmap(vol.dev.read_block, vol.sb, [] if vol.readonly else None)
    vol.itable = BTree(vol, fmt.KIND_ILEAF, vol.sb.itree_root)
    vol.otree = BTree(vol, fmt.KIND_OLEAF, vol.sb.otree_root)
    vol.inodes = {}
    vol.unflushed = {}
    vol.unify_frees = []
    vol.unify_nodes = 0


def _try_replay(vol: Volume, entries: list[LogEntry]) -> tuple[int, str] | None:
    """Replay ``entries`` onto fresh trees: None if it applies, else (the log block that does not, the reason)."""
    chain = [(e.block, e.records) for e in entries]
    try:
        _reset(vol)
        replay(vol.alloc, chain)
        replay_trees(vol, chain)
        vol.iget(fmt.ROOT_INO)
    except fmt.CorruptBlock as e:
        return e.block, e.reason
    except (OSError, OutOfRange) as e:
        return 0, str(e)
    return None


def find_damage(vol: Volume) -> LogDamage | None:
    """Why the log of ``vol.sb`` does not replay and the newest delta that does, replaying onto the trees as
    ``vol.sb`` names them; None when the log replays (or when the trees themselves do not load: no rollback
    helps then). Leaves ``vol``'s trees and bitmap as of the last consistent delta."""
    sb, read = vol.sb, vol.dev.read_block
    newer, broken = walk_log(read, sb.log_head, sb.log_count)
    newest = max([sb.seq, *(e.delta for e in newer)])
    dropped_entries: list[LogEntry] = []
    unreadable: list[int] = []
    unknown: range = range(0)
    bad = sb.seq + 1
    where = ""
    if broken is None:
        chain = newer[::-1]
    else:
        unreadable.append(broken.block)
        where = f"log block {broken.block}: {broken.reason}"
        upper = newer[-1].delta if newer else sb.seq
        chain, whole = _older_part(vol, broken.block, upper, sb.log_count)
        hint_delta, _ = _header_hint(read, broken.block)
        head_delta = chain[-1].delta if chain else sb.unify_seq
        if hint_delta is not None and head_delta <= hint_delta <= upper:
            bad = hint_delta  # the header still names the delta of the bad block
        elif whole or not chain:
            bad = head_delta + 1
            unknown = range(bad, upper)  # the bad block belongs to one of these
        else:
            bad = max(head_delta, sb.unify_seq + 1)  # unknown: the newest older delta may miss that block
            unknown = range(bad, upper)  # the bad block belongs to one of these
        dropped_entries = list(newer)
    while True:
        kept = [e for e in chain if e.delta < bad]
        dropped_entries += [e for e in chain if e.delta >= bad]
        chain = kept
        failed = _try_replay(vol, chain)
        if failed is None:
            break
        block, reason = failed
        delta = next((e.delta for e in chain if e.block == block), None)
        if delta is None:  # not a log record: the trees of the last unify do not load
            return None
        bad = delta
        where = f"log block {block}: {reason}"
    if broken is None and bad > sb.seq:
        return None
    good = chain[-1].delta if chain else sb.unify_seq
    dropped = sorted({e.delta for e in dropped_entries} | {bad, sb.seq} | set(unknown))
    inodes = {rec[1] for e in dropped_entries for rec in e.records if rec[0] not in (fmt.LOG_ALLOC, fmt.LOG_FREE)}
    return LogDamage(good=good, bad=bad, where=where, chain=chain, dropped=dropped, inodes=inodes,
                     unreadable=unreadable, newest=newest, sb=replace(sb), free_blocks=vol.alloc.free,
                     used_inodes=sum(1 for _ in vol.itable.items()))


def roll_back(path: str, damage: LogDamage) -> int:
    """Write both superblock copies naming the log of ``damage.good``: the volume then loads as of that delta.
    The new superblock's delta number is above every delta seen, so that no log block of a dropped delta can be
    taken for one of the deltas committed after it. Returns that delta number."""
    with exclusive(path) as fd:
        found = []
        for copy, offset in enumerate(fmt.SUPER_OFFSETS):
            try:
                found.append(fmt.Super.unpack(os.pread(fd, fmt.SUPER_SIZE, offset), copy))
            except fmt.FormatError:  # a damaged copy: the numbers of the other one and of the log count
                pass
        new = replace(damage.sb, seq=max(damage.newest, *(s.seq for s in found)) + 1,
                      log_head=damage.chain[-1].block if damage.chain else 0, log_count=len(damage.chain),
                      free_blocks=damage.free_blocks, used_inodes=damage.used_inodes,
                      next_inum=max(damage.sb.next_inum, *(s.next_inum for s in found)), delta_csum=0,
                      state=fmt.STATE_CLEAN)
        raw = new.pack()
        for offset in fmt.SUPER_OFFSETS:  # both: the damaged newer copy must not win at the next mount
            os.pwrite(fd, raw, offset)
            os.fsync(fd)
        return new.seq


def replay_error(vol: Volume, error: Exception) -> Exception:
    """The VolumeError for a volume whose log or trees do not load (``error``): when rolling the log back to an
    older delta would load it, the message says to which and how (fsck.tux3), and the error's ``damage`` holds the
    ``LogDamage``; otherwise it says that the root directory cannot be loaded."""
    from ..fs import VolumeError

    try:
        damage = find_damage(vol)
    except (fmt.CorruptBlock, OutOfRange, OSError, ValueError, IndexError):
        damage = None
    fix = None
    if damage is None and isinstance(error, fmt.CorruptBlock) and error.reason == "checksum mismatch":
        from ..recovery import meta_fix

        try:
            fix = meta_fix(vol.dev.read_block(error.block), error.block)
        except (OSError, OutOfRange):
            fix = None
    if damage is not None:
        out = VolumeError(damage.message(vol.path))
    elif fix is not None:
        out = VolumeError(f"{vol.path}: cannot load the root directory: {error} (one flipped bit, at bit "
                          f"{fix.offset % vol.blocksize * 8 + fix.bit}); run fsck.tux3 {vol.path} to restore it")
    else:
        out = VolumeError(f"{vol.path}: cannot load the root directory: {error}; fsck.tux3 cannot rebuild it: "
                          "restore the volume from a backup")
    out.damage = damage  # type: ignore[attr-defined]
    out.fix = fix  # type: ignore[attr-defined]
    return out
