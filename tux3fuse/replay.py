"""Replay: loading a volume as of its newest committed delta.

Guarantees:
- Superblock choice (``find_super``): of the two copies, the one naming the newest delta whose proof holds is
  loaded (the proof: every block its log names has the digest the superblock records, ``delta_landed``); every
  copy that fails its checksum and every newest delta whose proof fails is reported, and a read-write load is
  refused when a durable delta would be dropped (recovery.py, docs/FORMAT.md §11).
- The log chain (``load``): the bitmap of the last unify plus the log's allocation records give the bitmap;
  the trees of the last unify plus the log's tree records (``replay_trees``) give the trees, oldest record first,
  exactly as they were in memory after the commit of that delta (the replay invariant, ``replaycheck.py``).
- A log that does not replay loads nothing: ``find_damage`` names the last delta that replays and why the next
  does not, and the load's error says how to roll back to it (``replay_error``).
- Orphans (``reclaim_orphans``): inodes a crash left with no name are dirtied at mount, so that the first commit
  destroys them.
- Nothing read is trusted (docs/FORMAT.md §13): the superblock's layout is the one its size allows (``Super``), the
  log's blocks and records lie in the allocatable area and its tree records pass ``validity.log_problem``, and the
  proof reads each block it names once (``delta_landed``). A load takes time and memory in proportion to the volume,
  whatever the image holds; an image with no tux3fuse signature is ``NotAVolume``.
"""

from __future__ import annotations

from dataclasses import replace

from . import format as fmt
from . import logrecord as logrec
from . import recovery
from .backend import extents
from .backend.log import (
    LogDamage,
    LogEntry,
    back_to_start,
    header_hint,
    load_bitmap,
    log_entry,
    read_chain,
    replay,
    walk_log,
)
from .backend.store import Backend
from .backing import Backing, as_backing
from .device import Device, DeviceModel, OutOfRange, image_size
from .dirty import DirtyLists
from .failure import NotAVolume, VolumeError
from .format import CorruptBlock, FormatError, Super
from .inodes import InodeCache
from .options import Options
from .proof import DeltaDigest, named_blocks
from .recovery import Recovery, meta_fix
from .validity import log_problem

SCAN_CHUNK = 256  # blocks read at once when the volume is scanned for log blocks


def load(path: str, options: Options, backing: Backing | int) -> tuple[Backend, InodeCache, Recovery, int]:
    """The backend and the inode cache of the volume in ``path`` (``backing``: its bytes, opened and locked by the
    caller, who closes it; the device reads and writes through it) as of its newest committed delta, the report of
    what the load left out, and the number above which new deltas are numbered (above every delta seen, dropped
    ones included). VolumeError with one line when it cannot be loaded."""
    readonly = options.readonly
    backing = as_backing(backing, path)
    sb, report = find_super(backing, path)  # what was left out of the load, and why: reported
    if report.refuse and not readonly:
        raise VolumeError(report.refuse)
    model = (DeviceModel(options.device_latency, options.device_bandwidth)
             if options.device_latency or options.device_bandwidth else None)
    dev = Device(backing, sb.blocksize, sb.volblocks, readonly, options.writelog, write_piece=options.write_piece,
                 fill_chunk=options.fill_chunk, model=model)
    try:
        return _load(path, dev, sb, report, readonly, options.cache_bytes)
    except BaseException:
        dev.close()
        raise


def _load(path: str, dev: Device, sb: Super, report: Recovery, readonly: bool, cache_bytes: int
          ) -> tuple[Backend, InodeCache, Recovery, int]:
    damage: list[tuple[int, int, str]] = []  # a read-only mount allocates nothing: a bad bitmap block reads as all
    try:  # used, and is reported
        alloc = load_bitmap(dev.read_block, sb, damage if readonly else None)
    except CorruptBlock as e:
        raise VolumeError(f"{path}: {e}; run fsck.tux3 {path} to rebuild the bitmap from the trees "
                          "(mount -o ro serves the files)") from None
    except OutOfRange as e:
        raise VolumeError(f"{path}: {e}") from None
    backend = Backend(path, dev, sb, alloc, readonly)
    backend.bitmap_damage = damage
    icache = InodeCache(backend, cache_bytes)
    broken: Exception | None = None  # a log that does not replay: diagnosed below, once the trees are set up
    try:
        chain = read_chain(dev.read_block, sb)
        replay(alloc, chain, sb)
    except (CorruptBlock, OutOfRange) as e:
        chain, broken = [], e
    backend.log_blocks = [block for block, _ in chain]
    committed = sb.seq
    if report.dropped and not readonly:  # never reuse the number of a delta left out, nor of any log block it
        committed = newest_logged(backend, max(sb.seq, report.dropped))  # left behind
    try:
        if broken is not None:
            raise broken
        replay_trees(backend, icache, chain)
        icache.iget(fmt.ROOT_INO)
    except (CorruptBlock, OutOfRange, OSError) as e:
        raise replay_error(backend, icache, e) from None  # names the last delta that replays, and fsck.tux3
    return backend, icache, report, committed


def reclaim_orphans(backend: Backend, icache: InodeCache, dirty: DirtyLists, delta: int) -> None:
    """Dirty every orphan (an inode with no name that a crash left behind) in ``delta``: its commit destroys it. An
    orphan entry whose inode is not in the table is left alone (fsck.tux3 reports it): nothing is there to reclaim."""
    for ino, _ in list(backend.otree.items()):
        if backend.lookup_inode(ino) is None:
            continue
        inode = icache.iget(ino)
        if inode.rec.nlink == 0:
            dirty.mark(inode, delta)


def _ignore(start: int, count: int) -> None:
    """Replayed tree changes free nothing: the allocation records did that already."""


def replay_trees(backend: Backend, icache: InodeCache, chain: list[tuple[int, list]]) -> None:
    """Apply the tree records of the log, oldest first, to the trees as the last unify left them. The changed
    nodes stay dirty in memory for the next unify, exactly as they were before the crash or unmount."""
    bs, sb = backend.blocksize, backend.sb
    for block, records in chain:
        for rec in records:
            code = rec[0]
            if code in (logrec.LOG_ALLOC, logrec.LOG_FREE):
                continue
            ino = rec[1]
            try:
                problem = log_problem(rec, sb)
                if problem is not None:
                    raise ValueError(problem)
                if code == logrec.LOG_INODE:
                    backend.itable.insert(ino, rec[2])
                    inode = icache.inodes.get(ino)
                    if inode is not None:
                        inode.rec = fmt.InodeRecord.unpack(rec[2])
                elif code == logrec.LOG_ORPHAN:
                    backend.otree.insert(ino, b"")
                elif code == logrec.LOG_DESTROY:
                    inode = icache.iget(ino)
                    tree = backend.dtree(inode)
                    extents.unmap(tree, 0, None, _ignore)
                    tree.free_all()
                    backend.itable.delete(ino)
                    backend.otree.delete(ino)
                    backend.unflushed.pop(ino, None)
                    icache.forget_inode(inode)
                else:
                    inode = icache.iget(ino)
                    tree = backend.dtree(inode)
                    before = tree.dirty_nodes
                    if code == logrec.LOG_MAP:
                        _, _, logical, physical, csums = rec
                        extents.map_run(tree, logical, physical, csums, _ignore, bs)
                    else:
                        extents.unmap(tree, rec[2], None, _ignore)
                    backend.unflushed[ino] = inode
                    backend.unify_nodes += tree.dirty_nodes - before
            except (ValueError, IndexError, OSError) as e:
                raise fmt.CorruptBlock(block, "log", f"record {code} for inode {ino} does not apply: {e}") from None


def _scan_log_blocks(backend: Backend, lo: int, hi: int) -> dict[int, LogEntry]:
    """Every valid log block of the volume whose delta lies in (lo, hi]."""
    found: dict[int, LogEntry] = {}
    bs, volblocks = backend.blocksize, backend.sb.volblocks
    for start in range(backend.sb.alloc_start, volblocks, SCAN_CHUNK):
        n = min(SCAN_CHUNK, volblocks - start)
        data = backend.dev.read_blocks(start, n)
        for i in range(n):
            if data[i * bs: i * bs + 4] != fmt.KIND_LOG:
                continue
            block = start + i
            buf = data[i * bs: (i + 1) * bs]
            try:
                entry = log_entry(lambda _b, buf=buf: buf, block)
            except fmt.CorruptBlock:
                continue
            if lo < entry.delta <= hi:
                found[block] = entry
    return found


def newest_logged(backend: Backend, above: int) -> int:
    """The highest delta number of a valid log block anywhere on the volume, or ``above`` when none is higher:
    a superblock written over dropped deltas is numbered above it, so that none of their log blocks can be taken
    for a later delta."""
    return max([above, *(e.delta for e in _scan_log_blocks(backend, above, fmt.MAX_SEQ).values())])


def _other_super(backend: Backend) -> fmt.Super | None:
    """The superblock copy that the volume was not loaded from, if it is valid."""
    copy = 1 - backend.sb.copy
    try:
        return fmt.Super.unpack(backend.dev.backing.pread(fmt.SUPER_SIZE, fmt.SUPER_OFFSETS[copy]), copy)
    except (fmt.FormatError, OSError):
        return None


def _older_part(backend: Backend, bad_block: int, upper: int, limit: int) -> tuple[list[LogEntry], bool]:
    """The part of the log older than the unreadable block ``bad_block``, oldest first, its deltas at most
    ``upper``; and whether its newest delta is known to be whole (it may otherwise end right before the bad block,
    which may belong to it). Tried in order: the other superblock copy's log (same log, an older delta); the chain
    from the prev pointer the bad block's header still holds; a scan of the volume for valid log blocks of this
    log, taking the newest chain back to the start of the log, cut before the first delta on which two such chains
    disagree."""
    sb, read = backend.sb, backend.dev.read_block
    other = _other_super(backend)
    if other is not None and other.unify_seq == sb.unify_seq and other.seq < sb.seq and other.log_count:
        entries, broken = walk_log(read, other)
        if broken is None and entries and entries[-1].prev == 0 and bad_block not in {e.block for e in entries}:
            if all(sb.unify_seq < e.delta <= upper for e in entries):
                return entries[::-1], True  # a superblock committed that delta whole
    valid = _scan_log_blocks(backend, sb.unify_seq, upper)
    _, hint_prev = header_hint(read, bad_block)
    if hint_prev and hint_prev in valid:
        chain = back_to_start(valid, hint_prev, limit)
        if chain is not None:
            return chain, False
    continued = {(e.prev, e.delta) for e in valid.values()}
    heads = [b for b, e in valid.items() if (b, e.delta) not in continued]  # the last block of its delta
    chains = [c for c in (back_to_start(valid, head, limit) for head in heads) if c]
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


def _reset(backend: Backend, icache: InodeCache) -> None:
    """The in-memory trees and bitmap as the last unify wrote them, before any log record."""
    backend.reset(load_bitmap(backend.dev.read_block, backend.sb, [] if backend.readonly else None))
    icache.clear()


def _try_replay(backend: Backend, icache: InodeCache, entries: list[LogEntry]) -> tuple[int, str] | None:
    """Replay ``entries`` onto fresh trees: None if it applies, else (the log block that does not, the reason)."""
    chain = [(e.block, e.records) for e in entries]
    try:
        _reset(backend, icache)
        replay(backend.alloc, chain, backend.sb)
        replay_trees(backend, icache, chain)
        icache.iget(fmt.ROOT_INO)
    except fmt.CorruptBlock as e:
        return e.block, e.reason
    except (OSError, OutOfRange) as e:
        return 0, str(e)
    return None


def find_damage(backend: Backend, icache: InodeCache) -> LogDamage | None:
    """Why the log of ``backend.sb`` does not replay and the newest delta that does, replaying onto the trees as
    ``backend.sb`` names them; None when the log replays (or when the trees themselves do not load: no rollback
    helps then). Leaves ``backend``'s trees and bitmap as of the last consistent delta."""
    sb, read = backend.sb, backend.dev.read_block
    newer, broken = walk_log(read, sb)
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
        chain, whole = _older_part(backend, broken.block, upper, sb.log_count)
        hint_delta, _ = header_hint(read, broken.block)
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
        failed = _try_replay(backend, icache, chain)
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
    inodes = {rec[1] for e in dropped_entries for rec in e.records if rec[0] not in (logrec.LOG_ALLOC, logrec.LOG_FREE)}
    return LogDamage(good=good, bad=bad, where=where, chain=chain, dropped=dropped, inodes=inodes,
                     unreadable=unreadable, newest=newest, sb=replace(sb), free_blocks=backend.alloc.free,
                     used_inodes=sum(1 for _ in backend.itable.items()))


def replay_error(backend: Backend, icache: InodeCache, error: Exception) -> Exception:
    """The VolumeError for a volume whose log or trees do not load (``error``): when rolling the log back to an
    older delta would load it, the message says to which and how (fsck.tux3), and the error's ``damage`` holds the
    ``LogDamage``; otherwise it says that the root directory cannot be loaded."""
    try:
        damage = find_damage(backend, icache)
    except (fmt.CorruptBlock, OutOfRange, OSError, ValueError, IndexError):
        damage = None
    fix = None
    if damage is None and isinstance(error, fmt.CorruptBlock) and error.reason == "checksum mismatch":
        try:
            fix = meta_fix(backend.dev.read_block(error.block), error.block)
        except (OSError, OutOfRange):
            fix = None
    if damage is not None:
        out = VolumeError(damage.message(backend.path))
    elif fix is not None:
        path = backend.path
        out = VolumeError(f"{path}: cannot load the root directory: {error} (one flipped bit, at bit "
                          f"{fix.offset % backend.blocksize * 8 + fix.bit}); run fsck.tux3 {path} to restore it")
    else:
        out = VolumeError(f"{backend.path}: cannot load the root directory: {error}; fsck.tux3 cannot rebuild it: "
                          "restore the volume from a backup")
    out.damage = damage  # type: ignore[attr-defined]
    out.fix = fix  # type: ignore[attr-defined]
    return out


def delta_landed(backing: Backing | int, sb: Super) -> bool:
    """Did every block of the delta this superblock commits reach the disk? (Only for one-flush commits.)
    ``backing``: the volume's bytes (or an open file descriptor of its image). Bounded by the volume whatever the
    log says: each log block is read at most once, and each block its records name once."""
    bs = sb.blocksize
    backing = as_backing(backing)
    records: list[list] = []
    logs: list[int] = []
    block, left = sb.log_head, sb.log_count
    try:
        while block and left and block not in logs:
            if sb.outside(block):
                return False
            buf = backing.pread(bs, block * bs)
            _, _, count, delta = fmt.unseal(buf, block, (fmt.KIND_LOG,))
            if delta != sb.seq:
                break
            prev, recs = logrec.unpack_log(buf, count)
            records.append(recs)
            logs.append(block)
            block, left = prev, left - 1
        if not logs:
            return False
        named = named_blocks((rec for recs in reversed(records) for rec in recs), logs, sb)
    except (CorruptBlock, ValueError):
        return False
    digest = DeltaDigest()
    for b in named:
        digest.add(b, backing.pread(bs, b * bs))
    return digest.value() == sb.delta_csum


def read_super(backing: Backing | int, path: str = "image") -> Super:
    """The superblock a mount loads (``find_super``, without the report)."""
    return find_super(backing, path)[0]


def find_super(backing: Backing | int, path: str = "image") -> tuple[Super, Recovery]:
    """The superblock copy to load, and the report of what was left out and why (recovery.py). Every copy whose
    checksum fails is reported; when the newest delta's proof fails, the delta before is loaded and the report says
    whether the newest was a commit that did not finish or was damaged after it was written (docs/FORMAT.md §11);
    ``Recovery.refuse`` is set when a read-write mount must not go on. VolumeError when no delta can be loaded.
    ``backing``: the volume's bytes, or an open file descriptor of its image."""
    backing = as_backing(backing, path)
    size = image_size(backing)
    if size < fmt.SUPER_OFFSETS[1] + fmt.SUPER_SIZE:
        raise NotAVolume(f"{path}: not a tux3fuse volume (the image is too short: {size} bytes)")
    found, problems, bad = [], [], []
    for copy, offset in enumerate(fmt.SUPER_OFFSETS):
        raw = backing.pread(fmt.SUPER_SIZE, offset)
        try:
            found.append(Super.unpack(raw, copy))
        except FormatError as e:
            problems.append(str(e))
            bad.append((copy, raw, str(e)))
    if not found:
        if all("wrong magic" in p for p in problems):
            raise NotAVolume(f"{path}: not a tux3fuse volume (no signature found)")
        raise VolumeError(f"{path}: no usable superblock ({'; '.join(problems)})")
    found.sort(key=lambda s: s.seq, reverse=True)
    for sb in found:  # every block a copy names must be on the image
        if size < sb.volblocks * sb.blocksize:
            raise VolumeError(f"{path}: image is {size} bytes but the filesystem needs "
                              f"{sb.volblocks * sb.blocksize} (truncated image?)")
    sb = found[0]
    report = Recovery(path)
    for copy, raw, reason in bad:
        note, refuse = recovery.judge_bad_copy(raw, copy, sb, reason.removeprefix(f"superblock copy {copy}: "), path)
        if note:
            report.notes.append(note)
        report.refuse = report.refuse or refuse
        fix = recovery.super_fix(raw, copy) if refuse else None
        if fix is not None:  # a newer copy whose content is known exactly: fsck.tux3 restores it
            report.fixes.append(fix)
        if refuse:
            report.exact = fix is not None
    if sb.delta_csum and not delta_landed(backing, sb):
        if len(found) < 2:
            raise VolumeError(f"{path}: the last delta ({sb.seq}) did not reach the disk whole and the other "
                              f"superblock copy is unusable ({'; '.join(problems)}); run fsck.tux3")
        copies = report  # what the bad copies cost: kept beside the report on the newest delta
        report = recovery.judge_delta(backing, sb, found[1], path)
        report.notes[:0] = copies.notes + ([copies.refuse] if copies.refuse and report.refuse else [])
        report.refuse = report.refuse or copies.refuse
        report.fixes[:0] = copies.fixes
        report.exact = report.exact and (copies.exact or not copies.refuse)
        sb = found[1]
        if sb.delta_csum and not delta_landed(backing, sb):  # durable before the newest was written: damage
            report.cause = recovery.DAMAGED
            report.refuse = (f"{path}: delta {sb.seq}, durable before delta {report.dropped}, fails its proof "
                             "too; run fsck.tux3")
    report.seq = sb.seq
    return sb, report
