"""Repairing an unmounted volume, offline, after a check found what to repair (``fsck.py`` runs these).

Guarantees: these run on an image no mount uses (``fsck.tux3`` holds its lock alone before it repairs); each
repair returns the lines that say what it did, naming inodes by path as well as by number (``Names``: every name of
every inode, as the check's directory walk found them).

- What a mount can fix safely (``repair_found``): orphans, leaked blocks, counts, and blocks in use that the bitmap
  has free (marked used before the mount can allocate anything); ``fsck`` then checks again.
- A log that does not replay past some delta (``roll_back_volume``, ``damage_lines``): the volume is rolled back to
  its last consistent delta (docs/FORMAT.md §9.1), and the lines say what it dropped: the deltas and the inodes
  they touch.
- A directory block that is unreadable (bad checksum, malformed entries) is emptied (the directory keeps its other
  blocks), and every inode no name reaches any more is linked into /lost+found as ``#<inode>`` with its data, link
  counts set to the names (``reconnect``).
- A block that one flipped bit explains exactly (its own checksum names the bit: a data block, a tree node, a log
  block or superblock copy of a delta a mount refuses as damaged) is restored before anything else, and nothing is
  lost (``restore_bits``, ``log_fixes``); a refused delta no single bit explains is rolled back to the delta
  before (``settle_damage``, docs/FORMAT.md §11).
- A corrupt bitmap block is rewritten from the blocks the check finds in use (``rebuild_bitmap``, docs/FORMAT.md
  §8).
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Iterable

from . import format as fmt
from .alloc import Allocator
from .backend.log import LogDamage, bitmap_block, roll_back, walk_log
from .backing import open_backing
from .device import exclusive
from .format import InodeRecord
from .fs import Options, Volume, VolumeError
from .recovery import Fix, Recovery, meta_fix
from .replay import newest_logged, read_super

SHOWN_PATHS = 5  # names shown for one inode; the rest are counted


class Names:
    """Every name of every inode, from the directory entries the check reads: inode -> paths from the root.

    Guarantee: ``paths(ino)`` lists one path per directory entry that names ``ino`` and lies in a directory the root
    reaches (a directory's own path follows its first name upwards; a cycle or an unreachable directory gives no
    path), so a file's hard links all appear; the root is ``/``. Names are shown as UTF-8, other bytes escaped."""

    def __init__(self) -> None:
        self.links: dict[int, list[tuple[int, bytes]]] = {}  # inode -> (directory, name) of every entry naming it
        self._dir_path: dict[int, str | None] = {fmt.ROOT_INO: ""}

    def add(self, parent: int, name: bytes, child: int) -> None:
        self.links.setdefault(child, []).append((parent, name))

    def _dir(self, ino: int) -> str | None:
        """The path of directory ``ino`` without the trailing slash (the root: empty), or None."""
        if ino in self._dir_path:
            return self._dir_path[ino]
        chain: list[int] = []
        cur: int | None = ino
        found: str | None = None
        while cur is not None and cur not in self._dir_path:
            if cur in chain:  # a cycle: no path from the root
                cur = None
                break
            chain.append(cur)
            up = self.links.get(cur)
            cur = up[0][0] if up else None
        found = self._dir_path[cur] if cur is not None else None
        for d in reversed(chain):
            if found is not None:
                found = f"{found}/{_shown(self.links[d][0][1])}"
            self._dir_path[d] = found
        return self._dir_path[ino]

    def paths(self, ino: int) -> list[str]:
        if ino == fmt.ROOT_INO:
            return ["/"]
        out = []
        for parent, name in self.links.get(ino, []):
            where = self._dir(parent)
            if where is not None:
                out.append(f"{where}/{_shown(name)}")
        return out

    def describe(self, inos: Iterable[int]) -> str:
        """What to append to a line about ``inos``: their paths ("; path /d/f", "; paths /d/f, /d/g"), or with more
        than one inode each one's ("; inode 12: /a; inode 13: no name"); empty when no inode has a path."""
        inos = list(dict.fromkeys(inos))
        found = {ino: self.paths(ino) for ino in inos}
        if not any(found.values()):
            return ""
        if len(inos) == 1:
            paths = found[inos[0]]
            return f"; {'path' if len(paths) == 1 else 'paths'} {_few_paths(paths)}"
        return "".join(f"; inode {ino}: {_few_paths(found[ino]) if found[ino] else 'no name'}" for ino in inos)


def _shown(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def _few_paths(paths: list[str]) -> str:
    more = len(paths) - SHOWN_PATHS
    return ", ".join(paths[:SHOWN_PATHS]) + (f" and {more} more" if more > 0 else "")



def bare(path: str, e: BaseException | str) -> str:
    """The text of an error without the image path it may start with (for a line that names the image already)."""
    return str(e).removeprefix(f"{path}: ")


def dropped_names(names: Names, inodes: Iterable[int]) -> list[str]:
    """A line naming, by the paths they have now, the inodes that dropped deltas touched (none when no inode has a
    name in ``names``, a check's ``Report.names``)."""
    shown = sorted(set(inodes))
    parts = [f"{_few_paths(names.paths(ino))} (inode {ino})" for ino in shown[:50] if names.paths(ino)]
    if not parts:
        return []
    nameless = [str(ino) for ino in shown[:50] if not names.paths(ino)]
    more = len(shown) - 50
    return ["names of the inodes the dropped delta(s) touched, as the volume has them now: " + "; ".join(parts)
            + (f"; no name: inode(s) {', '.join(nameless)}" if nameless else "")
            + (f"; and {more} more inode(s)" if more > 0 else "")]



def fixable(error: str, fixed_by_bit: set[str], lost_dir_blocks: list[tuple[int, int]]) -> bool:
    """Whether the repairs here fix the check's ``error``: a bit ``fixed_by_bit`` restores, the bitmap and the counts,
    and what an unreadable directory block of ``lost_dir_blocks`` causes (its emptying and ``reconnect`` fix)."""
    if error in fixed_by_bit:
        return True
    if error.startswith(("bitmap: ", "bitmap block ", "free block count", "used inode count")):
        return True
    if not lost_dir_blocks:
        return False
    # what a lost directory block causes: names gone, so link counts and parents that no longer match
    dirs = {ino for ino, _ in lost_dir_blocks}
    if any(error.startswith((f"inode {ino}: data block ", f"corrupt directory {ino}, block ")) for ino in dirs):
        return True
    if not error.startswith(("inode ", "directory ")):
        return False
    return error.endswith(" names") or ": link count " in error or ": parent recorded as " in error


def repair_found(path: str, leaked: list[int], lost_dir_blocks: list[tuple[int, int]], names: Names,
                 bitmap_rebuild: list[tuple[int, int]], owned: set[int], unmarked: list[int] = ()) -> list[str]:
    """Repair what a check found (its ``Report`` fields of these names): rebuild the corrupt bitmap blocks, mark used
    the blocks in use that the bitmap has free (before anything can allocate them), free the leaked blocks, set the
    used inode count, reclaim the orphans (a mount), empty the unreadable directory blocks and reconnect what they
    cut off (``reconnect``), and commit. Returns what it did beyond the errors it fixed."""
    done: list[str] = []
    if bitmap_rebuild:
        done += rebuild_bitmap(path, bitmap_rebuild, owned)
    vol = Volume(path, Options())
    try:
        for block in unmarked:
            vol.backend.alloc.claim(block, 1)
        for block in leaked:
            vol.backend.alloc.free_later(block, 1)
        vol.backend.used_inodes = len(list(vol.backend.itable.items()))
        vol.mount()
        if lost_dir_blocks:
            done += reconnect(vol, lost_dir_blocks, names)
    finally:
        vol.unmount()
    return done


LOST_FOUND = b"lost+found"


def _names(vol: Volume) -> tuple[dict[int, InodeRecord], Counter[int], Counter[int], dict[int, int]]:
    """Every inode's record; how many names each has, the subdirectories of each directory, each directory's
    parent (by the directory entries)."""
    recs = {ino: InodeRecord.unpack(raw) for ino, raw in vol.backend.itable.items()}
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    parents: dict[int, int] = {}
    for ino, rec in recs.items():
        if not stat.S_ISDIR(rec.mode) or not rec.nlink:
            continue
        for child, _, _, _ in vol.names.dir(vol.iget(ino)).names.values():
            if child not in recs:
                continue
            names[child] += 1
            if stat.S_ISDIR(recs[child].mode):
                subdirs[ino] += 1
                parents[child] = ino
    return recs, names, subdirs, parents


def reconnect(vol: Volume, lost: list[tuple[int, int]], known: Names | None = None) -> list[str]:
    """Drop the unreadable blocks ``lost`` (directory, block index) from their directories (each becomes an empty
    block; the directory keeps its other blocks), link every inode that no name reaches any more into
    /lost+found as ``#<inode>`` (as e2fsck does), and set link counts and parents to what the names say. Commits;
    returns what it did, by inode, with the paths ``known`` (the names the check found) gives: each emptied
    directory's, the directory a reconnected inode's name was in, and the paths of an inode whose count changed."""
    done = []
    known = known or Names()
    bs = vol.blocksize
    lost_dirs = sorted({ino for ino, _ in lost})
    with vol.deltas.change() as delta:
        for ino, index in sorted(set(lost)):
            inode = vol.iget(ino)
            vol.dirty.mark(inode, delta)
            inode.dir = None
            page = vol.files.write_page(inode, index, delta, fill=False)
            page.data[:] = bytes(bs)
            fmt.DIRENT.pack_into(page.data, 0, 0, fmt.encode_rec_len(bs), 0, 0)
            done.append(f"directory {ino}: block {index} was unreadable and is now empty; the names in it are lost"
                        + known.describe([ino]))
    vol.commit()
    recs, names, _, _ = _names(vol)
    cut_off = sorted(ino for ino, rec in recs.items() if rec.nlink and not names[ino] and ino != fmt.ROOT_INO)
    if cut_off:
        try:
            lf = vol.iget(vol.lookup(fmt.ROOT_INO, LOST_FOUND).ino)
        except FileNotFoundError:
            lf = vol.iget(vol.mkdir(fmt.ROOT_INO, LOST_FOUND, 0o700).ino)
            done.append(f"created /{LOST_FOUND.decode()} (inode {lf.ino})")
        for ino in cut_off:
            inode = vol.iget(ino)
            with vol.deltas.change() as delta:
                vol.names.add_entry(lf, b"#%d" % ino, inode, delta)
            kind = "directory" if stat.S_ISDIR(inode.rec.mode) else f"{inode.rec.size}-byte file"
            was = [inode.rec.parent] if stat.S_ISDIR(inode.rec.mode) and inode.rec.parent in lost_dirs else lost_dirs
            where = [p for d in was for p in known.paths(d)]
            done.append(f"reconnected inode {ino} ({kind}) as /{LOST_FOUND.decode()}/#{ino}"
                        + (f"; its name was in {'one of ' if len(where) > 1 else ''}{_few_paths(where)}"
                           if where else ""))
        vol.commit()  # _names reads the inode table, which a commit brings up to date
    recs, names, subdirs, parents = _names(vol)
    with vol.deltas.change() as delta:
        for ino, rec in recs.items():
            if not rec.nlink:
                continue
            is_dir = stat.S_ISDIR(rec.mode)
            want = 2 + subdirs[ino] if is_dir else names[ino]
            parent = parents.get(ino, rec.parent) if is_dir and ino != fmt.ROOT_INO else rec.parent
            if rec.nlink != want or rec.parent != parent:
                new = vol.dirty.mark(vol.iget(ino), delta)
                if new.nlink != want:
                    done.append(f"inode {ino}: link count {new.nlink} set to {want}" + known.describe([ino]))
                new.nlink, new.parent = want, parent
    vol.commit()
    return done


def _deltas(numbers: list[int]) -> str:
    """Delta numbers as ranges: 3, 5-9."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and int(out[-1].rpartition("-")[2]) == n - 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def damage_lines(path: str, damage: LogDamage, now: int | None = None) -> list[str]:
    """What a log that does not replay costs: the last consistent delta, the deltas and inodes dropped (``now``:
    the delta number the volume was rolled back under; None: not rolled back yet)."""
    n = len(damage.dropped)
    lines = [f"{path}: the log cannot be replayed past delta {damage.good}: {damage.where}"]
    if now is None:
        lines.append(f"last consistent delta: {damage.good}; rolling back to it drops {n} delta(s) "
                     f"({_deltas(damage.dropped)})")
    else:
        lines.append(f"rolled back to delta {damage.good} (the volume goes on from delta {now}): dropped {n} "
                     f"delta(s) ({_deltas(damage.dropped)})")
    shown = sorted(damage.inodes)
    what = "touched" if now is not None else "touch"
    lines.append(f"inodes the dropped deltas {what}: " + (", ".join(map(str, shown[:50])) if shown else "none known")
                 + (f" and {len(shown) - 50} more" if len(shown) > 50 else ""))
    if damage.unreadable:
        lines.append("unreadable log block(s) " + ", ".join(map(str, damage.unreadable))
                     + ": the inodes they touched are not known")
    if now is None:
        lines.append(f"run fsck.tux3 {path} to roll back to delta {damage.good}")
    return lines


def log_fixes(path: str, damage: LogDamage) -> list[Fix]:
    """The flipped bit of each unreadable log block of ``damage``, when one flipped bit explains every one of them
    (empty otherwise: then only a rollback helps)."""
    bs = damage.sb.blocksize
    fixes = []
    with open_backing(path, readonly=True) as backing:
        for block in damage.unreadable:
            if damage.sb.outside(block):  # a pointer gone wrong, not a block with a flipped bit
                return []
            fix = meta_fix(backing.pread(bs, block * bs), block)
            if fix is None:
                return []
            fixes.append(fix)
    return fixes


def roll_back_volume(path: str, damage: LogDamage) -> int:
    """Roll the volume back to ``damage.good``: both superblock copies name that delta's log (under a delta number
    above every one seen), then a mount and unmount fold that log into the trees (a unify), so that no log block of
    a dropped delta lies within the volume's log any more. Returns the delta number the rollback was written as."""
    seq = roll_back(path, damage)
    vol = Volume(path, Options())
    try:
        vol.mount()
    finally:
        vol.unmount()
    return seq


def restore_bits(path: str, fixes: list[Fix]) -> list[str]:
    """Flip back the single bits found flipped (each block's own checksum names the bit); returns what it did."""
    with exclusive(path) as backing:
        for fix in fixes:
            fix.apply(backing)
    return [fix.line() for fix in fixes]


def repair_plan(found: Recovery, loaded: int) -> str:
    """What ``settle_damage`` would do, for ``fsck.tux3 -n``."""
    if found.exact:
        return ("fsck.tux3 repair restores " + "; ".join(f.line().removeprefix("restored ") for f in found.fixes)
                + ": nothing is lost")
    lost = f"delta {found.dropped}" if found.dropped else "the delta the damaged superblock copy named"
    return f"fsck.tux3 repair rolls the volume back to delta {loaded}, dropping {lost}"


def settle_damage(path: str, vol: Volume) -> list[str]:
    """Settle a volume whose newest delta a read-write mount refuses as damaged (``Recovery.refuse``, loaded
    read-only as ``vol``, which this closes). When single flipped bits found exactly explain all the damage, they
    are restored and nothing is lost; otherwise the volume is rolled back to the delta ``vol`` loaded, under a delta
    number above every one seen. Returns what it did."""
    found, loaded = vol.recovery, vol.backend.sb
    try:
        newest = newest_logged(vol.backend, max(loaded.seq, found.dropped))
        chain, broken = walk_log(vol.backend.dev.read_block, loaded)
    finally:
        vol.close_files()
    lines: list[str] = []
    if found.exact:
        lines = restore_bits(path, found.fixes)
        again = Volume(path, Options(readonly=True))
        again.close_files()
        if not again.recovery.refuse:
            return [*lines, f"delta {again.backend.sb.seq} is whole again: nothing is lost"]
        still = found.dropped or again.backend.sb.seq
        lines.append(f"delta {still} is still damaged: {bare(path, again.recovery.refuse)}")
    if broken is not None:
        raise VolumeError(f"the log of delta {loaded.seq} does not read either: {broken}")
    dropped = [found.dropped] if found.dropped else []
    damage = LogDamage(good=loaded.seq, bad=found.dropped or loaded.seq + 1, where=found.refuse, chain=chain[::-1],
                       dropped=dropped, inodes=set(found.inodes), unreadable=[], newest=newest, sb=loaded,
                       free_blocks=loaded.free_blocks, used_inodes=loaded.used_inodes)
    now = roll_back_volume(path, damage)
    what = (f"dropped delta {found.dropped}" if found.dropped
            else "dropped whatever delta the damaged superblock copy named")
    shown = found.inodes
    lines.append(f"rolled back to delta {loaded.seq} (the volume goes on from delta {now}): {what}; inodes it "
                 "changed: " + (", ".join(map(str, shown[:50])) if shown else "none known")
                 + (f" and {len(shown) - 50} more" if len(shown) > 50 else ""))
    return lines


def rebuild_bitmap(path: str, damaged: list[tuple[int, int]], owned: set[int]) -> list[str]:
    """Write the corrupt bitmap blocks ``damaged`` (index in the current region, block) anew: a block is used when
    it lies in the fixed areas or the check found an owner for it (``owned``: tree nodes, data, log blocks, nodes
    kept until the next unify). That is the state after the log; replaying the log over it gives it again, since
    each allocation record sets the bits it names, as the newest record for a block left them."""
    with exclusive(path) as backing:
        sb = read_super(backing, path)
        bs = sb.blocksize
        alloc = Allocator(sb.volblocks, fmt.bitmap_bits_per_block(bs))
        alloc.mark_used(0, fmt.reserved_blocks(bs) + 2 * sb.bitmap_blocks)
        for b in owned:
            alloc.mark_used(b, 1)
        out = []
        for index, block in damaged:
            backing.pwrite(bitmap_block(alloc, index, block, bs, sb.unify_seq), block * bs)
            lo, hi = index * alloc.bpb, min((index + 1) * alloc.bpb, sb.volblocks)
            used = sum(alloc.is_used(b) for b in range(lo, hi))
            out.append(f"rebuilt bitmap block {block} from the trees, the log and the fixed areas: {used} of "
                       f"blocks {lo}-{hi - 1} in use")
    return out
