"""The replay invariant, checked after a commit: what a mount would rebuild from the disk is what memory holds.

Guarantee (the log's, see backend/log.py): replaying the log chained from the newest superblock onto the trees and the
bitmap as the last unify wrote them gives exactly the in-memory trees and bitmap of the last committed delta.
``check_replay`` tests that guarantee by doing what a mount does (newest superblock, bitmap, log replay, with the
same code) beside the live volume, and comparing: the inode table, the orphan tree, every inode's extents, the
allocation bitmap and the superblock's counts. It returns the differences in words (empty: none).

It runs only where asked for (``Options.verify_log``, mount option ``verify_log``; the tests turn it on): it reads
the whole log and every tree, so a commit costs a mount. The live volume must be between two commits: no job in
flight, so that its trees and bitmap hold exactly the last committed delta (the frontend never changes them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import format as fmt
from .backend.store import Backend
from .backing import open_backing
from .inodes import InodeCache
from .options import Options
from .replay import load

if TYPE_CHECKING:
    from .fs import Volume

SHOWN = 5  # differences named per structure


def _diff(name: str, live: dict[int, bytes], disk: dict[int, bytes], out: list[str]) -> None:
    keys = sorted(k for k in live.keys() | disk.keys() if live.get(k) != disk.get(k))
    for key in keys[:SHOWN]:
        if key not in disk:
            out.append(f"{name}: key {key} is in memory but not in the replayed state")
        elif key not in live:
            out.append(f"{name}: key {key} is in the replayed state but not in memory")
        else:
            out.append(f"{name}: key {key} differs")
    if len(keys) > SHOWN:
        out.append(f"{name}: {len(keys)} keys differ in all")


def _extents(be: Backend, icache: InodeCache, ino: int, rec: fmt.InodeRecord) -> dict[int, bytes]:
    inode = icache.inodes.get(ino)
    tree = be.dtree(inode) if inode is not None else be.tree(fmt.KIND_DLEAF, rec.dtree_root, f"inode {ino}")
    return dict(tree.items())


def check_replay(vol: Volume) -> list[str]:
    """Rebuild the last committed state from the image as a mount would (``replay.load``, read-only) and compare
    it with ``vol``."""
    if vol.runner.job is not None:
        raise AssertionError("replay check while a commit is in flight")
    try:  # a connection of its own to an NBD export: it reads what a mount would
        backing = open_backing(vol.path, readonly=True)
    except OSError as e:
        return [f"the image cannot be opened: {e.strerror}"]
    try:
        rep, disk_icache, _, _ = load(vol.path, Options(readonly=True, lock=False), backing)
    except Exception as e:  # the point of the check: whatever stops a mount is a finding
        backing.close()
        return [f"the image does not load: {e}"]
    out: list[str] = []
    mem = vol.backend
    try:
        if rep.sb.seq != mem.sb.seq:
            out.append(f"the newest superblock names delta {rep.sb.seq}, memory's names {mem.sb.seq}")
        live_inodes = dict(mem.itable.items())
        disk_inodes = dict(rep.itable.items())
        _diff("inode table", live_inodes, disk_inodes, out)
        _diff("orphan tree", dict(mem.otree.items()), dict(rep.otree.items()), out)
        # the extent trees the log changed since the last unify, and those memory holds: every other tree is the
        # one on disk on both sides
        changed = set(mem.unflushed) | set(rep.unflushed)
        changed |= {ino for ino, inode in vol.icache.inodes.items() if inode.dtree is not None}
        for ino in sorted(changed & live_inodes.keys() & disk_inodes.keys()):
            try:
                live = _extents(mem, vol.icache, ino, fmt.InodeRecord.unpack(live_inodes[ino]))
            except (fmt.CorruptBlock, ValueError):  # damage on disk that memory never read: not the log's doing
                continue
            try:
                on_disk = _extents(rep, disk_icache, ino, fmt.InodeRecord.unpack(disk_inodes[ino]))
            except (fmt.CorruptBlock, ValueError) as e:
                out.append(f"extents of inode {ino}: the replayed tree does not read: {e}")
                continue
            _diff(f"extents of inode {ino}", live, on_disk, out)
            if len(out) > 4 * SHOWN:
                break
        if bytes(mem.alloc.bits) != bytes(rep.alloc.bits):
            first = next(b for b in range(mem.sb.volblocks) if mem.alloc.is_used(b) != rep.alloc.is_used(b))
            out.append(f"bitmap: block {first} is {'used' if mem.alloc.is_used(first) else 'free'} in memory, "
                       f"{'used' if rep.alloc.is_used(first) else 'free'} in the replayed state")
        if rep.sb.used_inodes != len(disk_inodes):
            out.append(f"superblock: used inode count {rep.sb.used_inodes}, but {len(disk_inodes)} inodes")
        if disk_inodes and rep.sb.next_inum <= max(disk_inodes):
            out.append(f"superblock: next inode number {rep.sb.next_inum} is not above inode {max(disk_inodes)}")
    finally:
        rep.dev.close()
        backing.close()
    return out
