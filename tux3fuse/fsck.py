"""Checking a volume: every structure, every reference, every count.

Guarantee: ``check`` reads the volume as a mount would (newest valid superblock, bitmap, log replay in memory) and
changes nothing; it reports, naming the block or inode, every one of: a bad superblock copy, a metadata block with a
bad checksum or block number, btree keys out of order or outside their parent's range, extents overlapping, past
the end of the file or outside the volume, a block referenced twice, a data block whose checksum differs, bitmap
bits that differ from the set of reachable blocks, wrong free block and inode counts, directory entries naming
missing inodes or with the wrong type, link counts that differ from the names, and orphans left behind.
``fsck(repair=True)`` fixes what a mount can fix safely (orphans, leaked blocks, counts) and checks again.

A log that does not replay past some delta is reported with its last consistent delta, the deltas a rollback drops
and the inodes they touch; repair rolls the volume back to that delta (docs/FORMAT.md §9.1) and says what it
dropped. A directory block that is unreadable (bad checksum, malformed entries) is, on repair, emptied (the
directory keeps its other blocks), and every inode no name reaches any more is linked into /lost+found as
``#<inode>`` with its data, link counts set to the names.

A block that one flipped bit explains exactly (its own checksum names the bit: a data block, a tree node, a log
block or superblock copy of a delta a mount refuses as damaged) is restored by repair before anything else, and
nothing is lost; a refused delta no single bit explains is rolled back to the delta before (docs/FORMAT.md §11).
A corrupt bitmap block is rewritten from the blocks the check finds in use (docs/FORMAT.md §8).

A report names damage by path as well as by inode: the directory walk records every name of every inode
(``Names``), and each line about an inode ends with every path that reaches it (a file's hard links all).
``fsck(verbose=True)`` lists each check as it starts and, on a volume that takes more than a second, shows how far
it is (``Talk``). An image that cannot be opened or is in use (its lock held by a mount's daemon, up to its last
commit, or by another fsck) is refused with status 8 before anything is read.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from . import format as fmt
from .alloc import Allocator
from .backend.btree import BTree, Node
from .backend.log import LogDamage, bitmap_block, newest_logged, roll_back, walk_log
from .device import exclusive
from .dir import CorruptDir, parse_block
from .format import CorruptBlock, InodeRecord, unpack_extent
from .fs import Options, Volume, VolumeError, read_super
from .recovery import Fix, Recovery, bit_diff, meta_fix, one_bit_off

FSCK_OK, FSCK_CORRECTED, FSCK_UNCORRECTED, FSCK_ERROR = 0, 1, 4, 8
MAX_BIT_SEARCH = 64  # failing data blocks searched for a single flipped bit (each costs 8 checksums a byte)
PROGRESS_BLOCKS = 1 << 16  # the bitmap check says how far it is after each this many blocks
DT_FOR = {stat.S_IFREG: fmt.DT_REG, stat.S_IFDIR: fmt.DT_DIR, stat.S_IFCHR: fmt.DT_CHR, stat.S_IFBLK: fmt.DT_BLK,
          stat.S_IFIFO: fmt.DT_FIFO, stat.S_IFSOCK: fmt.DT_SOCK, stat.S_IFLNK: fmt.DT_LNK}


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


INODE_IN = re.compile(r"\binode (\d+)\b")


def _inodes_in(*owners: str) -> list[int]:
    """The inodes that block owners name ("inode 12", "extent tree of inode 12 node")."""
    return [int(m.group(1)) for owner in owners for m in INODE_IN.finditer(owner)]


class Talk:
    """What a check says while it runs. With ``verbose``: each check as it starts, one line on ``out``; and once the
    run has taken ``after`` seconds, a progress line on ``err``: rewritten in place when ``err`` is a terminal
    (at most ten times a second), otherwise a new line every ``every`` seconds. Without ``verbose``: nothing."""

    def __init__(self, verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                 after: float = 1.0, every: float = 5.0) -> None:
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.after, self.every = after, every
        self.started = time.monotonic()
        self.last = float("-inf")
        self.shown = 0  # width of the progress line on the terminal, 0 when none is shown
        try:
            self.tty = verbose and self.err.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.passes = 0

    def step(self, text: str) -> None:
        if self.verbose:
            self.clear()
            print(text, file=self.out, flush=True)

    def progress(self, what: str, done: int, total: int, unit: str) -> None:
        if not self.verbose:
            return
        now = time.monotonic()
        if now - self.started < self.after or now - self.last < (0.1 if self.tty else self.every):
            return
        self.last = now
        line = f"{what}: {done} of {total} {unit} ({100 * done // max(total, 1)}%)"
        if self.tty:
            self.err.write("\r" + line.ljust(self.shown))
            self.shown = len(line)
        else:
            self.err.write(line + "\n")
        self.err.flush()

    def clear(self) -> None:
        """Take the progress line off the terminal (before other output, and at the end)."""
        if self.shown:
            self.err.write("\r" + " " * self.shown + "\r")
            self.err.flush()
            self.shown = 0


QUIET = Talk()


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leaked: list[int] = field(default_factory=list)  # blocks marked used that nothing references
    orphans: list[int] = field(default_factory=list)
    counts_wrong: bool = False
    lost_dir_blocks: list[tuple[int, int]] = field(default_factory=list)  # (directory, block index) unreadable
    repairs: list[str] = field(default_factory=list)  # what a repair did beyond the errors it fixed
    fixes: list[Fix] = field(default_factory=list)  # single flipped bits found exactly, which a repair restores
    fixed_by_bit: set[str] = field(default_factory=set)  # the errors those fixes correct
    bitmap_rebuild: list[tuple[int, int]] = field(default_factory=list)  # corrupt bitmap blocks (index, block)
    owned: set[int] = field(default_factory=set)  # with bitmap_rebuild: every block the volume uses
    status: int = FSCK_OK
    lines: list[str] = field(default_factory=list)
    names: Names = field(default_factory=Names)  # every name of every inode the check found
    about: dict[str, tuple[int, ...]] = field(default_factory=dict)  # an error or repair line -> the inodes it names

    def error(self, msg: str, *inodes: int) -> None:
        """Record an error; ``inodes``: those it is about, whose paths ``show`` appends."""
        self.errors.append(msg)
        if inodes:
            self.about[msg] = inodes

    def show(self, line: str) -> str:
        """``line`` with the paths of the inodes it is about (every name that reaches each one)."""
        inodes = self.about.get(line)
        return line + self.names.describe(inodes) if inodes else line


class Checker:
    """One check of a loaded volume (``run``). Every error about an inode is recorded with that inode, and the
    directory walk records every name (``Report.names``), so that a report names the damaged files by path."""

    def __init__(self, vol: Volume, data: bool = True, talk: Talk = QUIET) -> None:
        self.vol = vol
        self.bs = vol.blocksize
        self.data = data
        self.talk = talk
        self.owner: dict[int, str] = {}
        self.r = Report()
        self.names = self.r.names
        self.file_data: list[tuple[int, int, int, list[int]]] = []  # extents whose checksums the data check reads
        self.subdirs_found: list[int] = []  # directories the last directory walked names

    def claim(self, block: int, count: int, owner: str) -> bool:
        vol = self.vol
        first = fmt.reserved_blocks(self.bs) + 2 * vol.sb.bitmap_blocks
        if block < first or block + count > vol.sb.volblocks:
            self.r.error(f"{owner}: blocks {block}+{count} outside the allocatable area", *_inodes_in(owner))
            return False
        ok = True
        for b in range(block, block + count):
            prev = self.owner.get(b)
            if prev is not None:
                self.r.error(f"block {b} referenced twice: by {prev} and by {owner}", *_inodes_in(prev, owner))
                ok = False
            else:
                self.owner[b] = owner
        return ok

    def tree(self, tree: BTree, name: str) -> list[tuple[int, bytes]] | None:
        """Walk every node: checksums, levels, key order and ranges; return the entries in order."""
        try:
            root = tree.root
        except CorruptBlock as e:
            self.corrupt(name, e)
            return None
        if root is None:
            return []
        out: list[tuple[int, bytes]] = []
        ok = self._node(tree, root, name, 0, None, out)
        return out if ok else None

    def corrupt(self, name: str, e: CorruptBlock) -> None:
        """Report a tree block that fails its checks; when one flipped bit explains it, the repair restores it."""
        msg = f"{name}: {e}"
        self.r.error(msg, *_inodes_in(name))
        if e.reason == "checksum mismatch" and len(self.r.fixes) < MAX_BIT_SEARCH:
            fix = meta_fix(self.vol.dev.read_block(e.block), e.block)
            if fix is not None:
                self.r.fixes.append(fix)
                self.r.fixed_by_bit.add(msg)
                if _inodes_in(name):
                    self.r.about[fix.line()] = tuple(_inodes_in(name))

    def _node(self, tree: BTree, node: Node, name: str, lo: int, hi: int | None, out: list) -> bool:
        self.claim(node.blocknr, 1, f"{name} node") if node.blocknr else None
        keys = node.keys
        if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
            self.r.error(f"{name}: keys out of order in block {node.blocknr}", *_inodes_in(name))
            return False
        if keys and (keys[0] < lo or (hi is not None and keys[-1] >= hi)):
            self.r.error(f"{name}: keys of block {node.blocknr} outside the range [{lo}, {hi})", *_inodes_in(name))
            return False
        if node.level == 0:
            out.extend(zip(keys, node.vals, strict=True))
            return True
        ok = True
        for i in range(len(keys)):
            try:
                child = tree._child(node, i)
            except CorruptBlock as e:
                self.corrupt(name, e)
                ok = False
                continue
            child_lo = keys[i] if i else lo
            child_hi = keys[i + 1] if i + 1 < len(keys) else hi
            if child.keys and i and child.keys[0] < keys[i]:
                self.r.error(f"{name}: block {child.blocknr} starts below its key in block {node.blocknr}",
                             *_inodes_in(name))
                ok = False
            ok &= self._node(tree, child, name, child_lo, child_hi, out)
        return ok

    def run(self) -> Report:
        """Check everything; the report's errors name what is wrong, ``Report.about`` the inodes of each error and
        ``Report.names`` every name of every inode the walk found. Directories are walked from the root down (a
        directory's path is known when it is checked), then those no walk reached, then the other inodes; the data
        checksums of files are read last, as a check of their own."""
        vol, r, talk = self.vol, self.r, self.talk
        sb = vol.sb
        talk.step("checking the inode table")
        inodes = self.tree(vol.itable, "inode table")
        if inodes is None:
            r.error("inode table unreadable: cannot check further")
            return r
        recs: dict[int, InodeRecord] = {}
        for ino, raw in inodes:
            try:
                recs[ino] = InodeRecord.unpack(raw)
            except (ValueError, IndexError) as e:
                r.error(f"inode {ino}: undecodable record ({e})", ino)
        if fmt.ROOT_INO not in recs or not stat.S_ISDIR(recs[fmt.ROOT_INO].mode):
            r.error("the root directory is missing")
        names: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        parents: dict[int, int] = {}
        talk.step(f"checking {len(recs)} inodes: extent trees, and the entries of each directory")
        walked: set[int] = set()

        def visit(ino: int) -> None:
            walked.add(ino)
            if stat.S_ISDIR(recs[ino].mode):
                paths = self.names.paths(ino)
                talk.step(f"checking directory {paths[0] if paths else '(no path from the root)'} (inode {ino})")
            self.inode(ino, recs[ino], recs, names, subdirs, parents)
            talk.progress(f"{vol.path}: checking inodes", len(walked), len(recs), "inodes")

        queue: deque[int] = deque()
        for start in [fmt.ROOT_INO, *recs]:  # the root's tree first, then directories no walk from it reached
            if start not in recs or start in walked or not stat.S_ISDIR(recs[start].mode):
                continue
            queue.append(start)
            while queue:
                ino = queue.popleft()
                if ino not in walked:
                    visit(ino)
                    queue.extend(self.subdirs_found)
        for ino in recs:
            if ino not in walked:
                visit(ino)
        self.check_file_data()
        talk.step("checking link counts and orphans")
        orphans = self.tree(vol.otree, "orphan tree") or []
        orphan_set = {ino for ino, _ in orphans}
        for ino, rec in recs.items():
            kind = stat.S_IFMT(rec.mode)
            if kind == stat.S_IFDIR:
                expect_links = 2 + subdirs.get(ino, 0) if rec.nlink else 0
                linked = names.get(ino, 0) + (ino == fmt.ROOT_INO)
                if rec.nlink and linked != 1:
                    r.error(f"directory {ino} has {linked} names", ino)
                if rec.nlink != expect_links:
                    r.error(f"directory {ino}: link count {rec.nlink}, expected {expect_links}", ino)
                if ino != fmt.ROOT_INO and rec.nlink and parents.get(ino) != rec.parent:
                    r.error(f"directory {ino}: parent recorded as {rec.parent}, found in {parents.get(ino)}", ino)
            elif rec.nlink != names.get(ino, 0):
                r.error(f"inode {ino}: link count {rec.nlink}, but {names.get(ino, 0)} names", ino)
            if rec.nlink == 0:
                if ino in orphan_set:
                    r.orphans.append(ino)
                else:
                    r.error(f"inode {ino} has no name and is not an orphan (leaked)", ino)
        for ino in orphan_set - set(recs):
            r.error(f"orphan {ino} has no inode")
        for ino in orphan_set:
            if ino in recs and recs[ino].nlink:
                r.error(f"orphan {ino} still has {recs[ino].nlink} links", ino)
        if r.orphans:
            r.notes.append(f"{len(r.orphans)} orphan inode(s) to reclaim at the next mount: "
                           + ", ".join(map(str, sorted(r.orphans)[:10])))
        for block in vol.log_blocks:
            self.claim(block, 1, "log")
        for block in vol.unify_frees:
            self.claim(block, 1, "tree node left until the next unify")
        talk.step("checking the bitmap against the blocks in use")
        self.bitmap()
        talk.step("checking the free block and inode counts")
        if sb.used_inodes != len(recs) or vol.used_inodes != len(recs):
            r.error(f"used inode count {sb.used_inodes}, but {len(recs)} inodes")
            r.counts_wrong = True
        if recs and sb.next_inum <= max(recs):
            r.error(f"next inode number {sb.next_inum} is not above the highest inode {max(recs)}")
            r.counts_wrong = True
        return r

    def inode(self, ino: int, rec: InodeRecord, recs: dict, names: dict, subdirs: dict, parents: dict) -> None:
        """Check inode ``ino``: its extent tree, and for a directory or symlink its data checksums (the data of other
        files is queued for ``check_file_data``); a directory's entries are counted into ``names``, ``subdirs`` and
        ``parents``, recorded in ``self.names``, and the directories they name listed in ``self.subdirs_found``."""
        r, bs = self.r, self.bs
        self.subdirs_found = []
        kind = stat.S_IFMT(rec.mode)
        if kind not in DT_FOR:
            r.error(f"inode {ino}: bad file type in mode {rec.mode:o}", ino)
            return
        loaded = self.vol.inodes.get(ino)  # replaying the log loaded it: its tree holds the logged changes
        tree = self.vol.dtree(loaded) if loaded is not None else BTree(self.vol, fmt.KIND_DLEAF, rec.dtree_root)
        entries = self.tree(tree, f"extent tree of inode {ino}")
        if entries is None:
            return
        mapped = 0
        end = 0
        nblocks = -(-rec.size // bs)
        blocks: dict[int, tuple[int, int]] = {}
        for key, value in entries:
            try:
                physical, csums = unpack_extent(value)
            except ValueError as e:
                r.error(f"inode {ino}: bad extent at {key}: {e}", ino)
                continue
            if key < end:
                r.error(f"inode {ino}: extent at block {key} overlaps the one before", ino)
            if key + len(csums) > nblocks:
                r.error(f"inode {ino}: extent at block {key} (+{len(csums)}) lies past the end of the file "
                        f"({rec.size} bytes)", ino)
            end = key + len(csums)
            mapped += len(csums)
            if self.claim(physical, len(csums), f"inode {ino}"):
                if kind in (stat.S_IFDIR, stat.S_IFLNK):
                    bad = self.verify_data(ino, key, physical, csums)
                    if kind == stat.S_IFDIR:
                        r.lost_dir_blocks += [(ino, index) for index in bad]
                elif self.data:
                    self.file_data.append((ino, key, physical, csums))
                if kind == stat.S_IFDIR:
                    for i in range(len(csums)):
                        blocks[key + i] = (physical + i, 0)
        if mapped != rec.blocks:
            r.error(f"inode {ino}: records {rec.blocks} blocks, maps {mapped}", ino)
        if kind == stat.S_IFDIR:
            if rec.size % bs:
                r.error(f"directory {ino}: size {rec.size} is not a multiple of the block size", ino)
            for index in range(nblocks):
                if (ino, index) in r.lost_dir_blocks:
                    continue  # its entries cannot be trusted: the names in it are lost
                phys = blocks.get(index, (0, 0))[0]
                data = self.vol.dev.read_block(phys) if phys else bytes(bs)
                try:
                    for _, _, child, dtype, name in parse_block(ino, index, data):
                        if not child:
                            continue
                        target = recs.get(child)
                        if target is None:
                            r.error(f"directory {ino}: entry {name!r} names missing inode {child}", ino)
                            continue
                        names[child] = names.get(child, 0) + 1
                        self.names.add(ino, name, child)
                        if dtype != DT_FOR.get(stat.S_IFMT(target.mode)):
                            r.error(f"directory {ino}: entry {name!r} has type {dtype}, inode {child} is "
                                    f"{stat.filemode(target.mode)[0]}", ino, child)
                        if stat.S_ISDIR(target.mode):
                            subdirs[ino] = subdirs.get(ino, 0) + 1
                            parents[child] = ino
                            self.subdirs_found.append(child)
                except CorruptDir as e:
                    r.error(str(e), ino)
                    r.lost_dir_blocks.append((ino, index))

    def check_file_data(self) -> None:
        """Read every data block of every file the walk found and compare it with the checksum its extent
        records."""
        if not self.file_data:
            return
        total = sum(len(csums) for _, _, _, csums in self.file_data)
        files = len({ino for ino, _, _, _ in self.file_data})
        self.talk.step(f"checking data checksums: {total} block(s) of {files} file(s)")
        done = 0
        for ino, key, physical, csums in self.file_data:
            self.verify_data(ino, key, physical, csums)
            done += len(csums)
            self.talk.progress(f"{self.vol.path}: checking data checksums", done, total, "blocks")
        self.file_data = []

    def verify_data(self, ino: int, key: int, physical: int, csums: list[int]) -> list[int]:
        """Check the checksums of an extent's blocks; return the logical blocks that fail."""
        bs = self.bs
        data = self.vol.dev.read_blocks(physical, len(csums))
        bad = []
        for i, csum in enumerate(csums):
            block = data[i * bs: (i + 1) * bs]
            if fmt.checksum(block) != csum:
                msg = f"inode {ino}: data block {key + i} (block {physical + i}) fails its checksum"
                self.r.error(msg, ino)
                bad.append(key + i)
                if len(self.r.fixes) < MAX_BIT_SEARCH:  # one flipped bit: known exactly, restored by repair
                    fixed = one_bit_off(block, lambda b, csum=csum: fmt.checksum(b) == csum)
                    if fixed is not None:
                        at, bit = bit_diff(block, fixed)
                        fix = Fix((physical + i) * bs + at, bit, physical + i, f"data block {key + i} of inode {ino}",
                                  bs)
                        self.r.fixes.append(fix)
                        self.r.fixed_by_bit.add(msg)
                        self.r.about[fix.line()] = (ino,)
        return bad

    def bitmap(self) -> None:
        vol, r = self.vol, self.r
        alloc = vol.alloc
        first = fmt.reserved_blocks(self.bs) + 2 * vol.sb.bitmap_blocks
        unknown: set[int] = set()  # blocks whose bits a corrupt bitmap block held
        for index, block, reason in getattr(vol, "bitmap_damage", []):
            lo, hi = index * alloc.bpb, min((index + 1) * alloc.bpb, vol.sb.volblocks)
            r.error(f"bitmap block {block} (the bits of blocks {lo}-{hi - 1}) is corrupt: {reason}")
            r.bitmap_rebuild.append((index, block))
            unknown.update(range(lo, hi))
        if unknown:
            r.owned = set(self.owner)
        for b in range(first):
            if not alloc.is_used(b) and b not in unknown:
                r.error(f"bitmap: fixed block {b} marked free")
        missing = 0
        total = vol.sb.volblocks
        for chunk in range(first, total, PROGRESS_BLOCKS):
            for b in range(chunk, min(chunk + PROGRESS_BLOCKS, total)):
                if b in unknown:
                    continue
                used = alloc.is_used(b)
                if used and b not in self.owner:
                    r.leaked.append(b)
                elif not used and b in self.owner:
                    missing += 1
                    if missing <= 10:
                        r.error(f"bitmap: block {b} is used by {self.owner[b]} but marked free",
                                *_inodes_in(self.owner[b]))
            self.talk.progress(f"{vol.path}: checking the bitmap", min(chunk + PROGRESS_BLOCKS, total), total,
                               "blocks")
        if missing > 10:
            r.error(f"bitmap: {missing} used blocks marked free in all")
        if r.leaked:
            r.error(f"bitmap: {len(r.leaked)} block(s) marked used that nothing references (first: {r.leaked[0]})")
        if vol.sb.free_blocks != alloc.free and not unknown:
            r.error(f"free block count {vol.sb.free_blocks}, but the bitmap has {alloc.free} free blocks")
            r.counts_wrong = True


def check(path: str, data: bool = True, talk: Talk = QUIET) -> tuple[Report, Volume]:
    """Load ``path`` read-only (as a mount would) and check it; the caller closes the volume returned."""
    if talk.verbose:
        talk.passes += 1
        talk.step("reading the superblock copies, the bitmap and the log" if talk.passes == 1
                  else "checking again after the repair: reading the superblock copies, the bitmap and the log")
    vol = Volume(path, Options(readonly=True))
    if talk.verbose:
        for line in load_lines(path, vol):
            talk.step(line)
    report = Checker(vol, data, talk).run()
    report.errors.extend(vol.recovery.errors())  # a delta left out at load (recovery.py) is never a clean volume
    return report, vol


def load_lines(path: str, vol: Volume) -> list[str]:
    """What loading ``vol`` checked (for ``fsck.tux3 -v``): the superblock copies, the bitmap, the log replay."""
    sb = vol.sb
    copies = []
    with open(path, "rb") as f:
        for copy, offset in enumerate(fmt.SUPER_OFFSETS):
            f.seek(offset)
            try:
                copies.append(f"copy {copy} names delta {fmt.Super.unpack(f.read(fmt.SUPER_SIZE), copy).seq}")
            except fmt.FormatError as e:
                copies.append(f"copy {copy} is unusable ({e})")
    damaged = len(getattr(vol, "bitmap_damage", []))
    return [f"checked the superblock copies: {', '.join(copies)}; delta {sb.seq} is loaded",
            f"checked the bitmap: {sb.bitmap_blocks} block(s) of region {sb.bitmap_cur}"
            + (f", {damaged} corrupt" if damaged else ", every checksum right"),
            f"replayed the log: {len(vol.log_blocks)} log block(s) of deltas {sb.unify_seq + 1}-{sb.seq}"
            if sb.seq > sb.unify_seq else f"replayed the log: empty (the trees hold delta {sb.seq})"]


def unusable(path: str, repair: bool) -> str | None:
    """Why ``path`` cannot be checked at all, or None: it cannot be opened, is neither a file nor a block device, or
    is in use: another process holds its lock as a mount's daemon does from the mount until its last commit is
    written, and as fsck.tux3 does (a repair needs the lock alone; a check shares it with other checks)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return f"{path}: cannot open: {e.strerror}"
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return f"{path}: not an image file or block device"
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if repair else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            return f"{path} is in use (mounted, or being checked)"
    finally:
        os.close(fd)
    return None


def fsck(path: str, repair: bool = False, verbose: bool = False, data: bool = True, talk: Talk | None = None
         ) -> Report:
    """Check (and with ``repair``, fix what can be fixed) a volume that is not mounted. A log that does not replay
    past some delta is reported with that delta; ``repair`` rolls the volume back to it (``roll_back_volume``).

    Guarantees: status FSCK_ERROR with one line and nothing read or written when the image cannot be opened, is not
    a file or block device, or is in use (``unusable``). Every line about an inode names, after what is wrong,
    every path that reaches it (``Names``), as the directory walk of the check that found it saw them; the inodes of
    dropped deltas are named by the paths they have in the volume as it is left. No line names the image twice
    at its start. ``verbose``: each check is listed on stdout as it starts, with progress on stderr (``Talk``)."""
    talk = talk or Talk(verbose)
    problem = unusable(path, repair and os.access(path, os.W_OK))
    if problem:
        return Report(status=FSCK_ERROR, lines=[problem])
    try:
        report = _fsck(path, repair, data, talk)
    finally:
        talk.clear()
    report.lines = [_once(path, line) for line in report.lines]
    return report


def _once(path: str, line: str) -> str:
    """``line`` with the image path at its start once."""
    twice = f"{path}: {path}"
    while line.startswith(twice):
        line = line[len(path) + 2:]
    return line


def _about(path: str, e: BaseException | str) -> str:
    """The text of an error as a line about the image: starting with its path, once."""
    text = str(e)
    return text if text.startswith(path) else f"{path}: {text}"


def _bare(path: str, e: BaseException | str) -> str:
    """The text of an error without the image path it may start with (for a line that names the image already)."""
    return str(e).removeprefix(f"{path}: ")


def dropped_names(report: Report, inodes: Iterable[int]) -> list[str]:
    """A line naming, by the paths they have now, the inodes that dropped deltas touched (none when no inode has a
    name in ``report.names``)."""
    shown = sorted(set(inodes))
    parts = [f"{_few_paths(report.names.paths(ino))} (inode {ino})" for ino in shown[:50] if report.names.paths(ino)]
    if not parts:
        return []
    nameless = [str(ino) for ino in shown[:50] if not report.names.paths(ino)]
    more = len(shown) - 50
    return ["names of the inodes the dropped delta(s) touched, as the volume has them now: " + "; ".join(parts)
            + (f"; no name: inode(s) {', '.join(nameless)}" if nameless else "")
            + (f"; and {more} more inode(s)" if more > 0 else "")]


def _fsck(path: str, repair: bool, data: bool, talk: Talk) -> Report:
    rolled: list[str] = []
    dropped: set[int] = set()  # inodes that dropped deltas touched, named once the volume is checked again
    try:
        report, vol = check(path, data, talk)
    except VolumeError as e:
        damage: LogDamage | None = getattr(e, "damage", None)
        fix: Fix | None = getattr(e, "fix", None)  # a tree block the load needs, one flipped bit off
        if damage is None and fix is None and (problem := unusable(path, False)):
            return Report(status=FSCK_ERROR, lines=[problem])  # taken since the first look: in use after all
        if damage is None and (fix is None or not repair or not os.access(path, os.W_OK)):
            return Report(status=FSCK_UNCORRECTED, lines=[_about(path, e)])
        if damage is None:
            try:
                talk.step("repairing: restoring one flipped bit")
                rolled = restore_bits(path, [fix])
                report, vol = check(path, data, talk)
            except (VolumeError, OSError, fmt.FormatError) as e2:
                return Report(status=FSCK_UNCORRECTED, lines=[_about(path, e), f"repair failed: {_bare(path, e2)}"])
    else:
        damage = None
    if damage is not None:
        fixes = log_fixes(path, damage)  # log blocks one flipped bit off: restored, nothing is rolled back
        if not repair or not os.access(path, os.W_OK):
            lines = damage_lines(path, damage)
            if fixes:
                lines[-1] = ("fsck.tux3 repair restores " + "; ".join(f.line().removeprefix("restored ") for f in fixes)
                             + ": nothing is lost")
            return Report(status=FSCK_UNCORRECTED, lines=lines)
        try:
            if fixes:
                talk.step(f"repairing: restoring {len(fixes)} flipped bit(s) of the log")
                rolled = restore_bits(path, fixes)
                try:
                    report, vol = check(path, data, talk)
                    damage = None
                except VolumeError as e:  # more damage than those bits: roll back past what still fails
                    damage = getattr(e, "damage", None)
                    if damage is None:
                        raise
            if damage is not None:
                talk.step(f"repairing: rolling back to delta {damage.good}")
                rolled += damage_lines(path, damage, roll_back_volume(path, damage))
                dropped |= damage.inodes
                report, vol = check(path, data, talk)
        except (VolumeError, OSError, fmt.FormatError) as e:
            return Report(status=FSCK_UNCORRECTED, lines=[*rolled, f"{path}: repair failed: {_bare(path, e)}"])
    if vol.recovery.refuse:  # a delta written and then damaged (recovery.py): restore it, or roll back past it
        if not repair or not os.access(path, os.W_OK):
            report.notes.append(repair_plan(vol.recovery, vol.sb.seq))
            dropped |= set(vol.recovery.inodes)
        else:
            try:
                talk.step("repairing: the newest delta is damaged")
                rolled += settle_damage(path, vol)
                dropped |= set(vol.recovery.inodes)
                report, vol = check(path, data, talk)
            except (VolumeError, OSError, fmt.FormatError) as e:
                vol.close_files()
                return Report(status=FSCK_UNCORRECTED, lines=[*map(report.show, report.errors),
                                                              f"repair failed: {_bare(path, e)}"])
    elif vol.recovery.dropped:
        dropped |= set(vol.recovery.inodes)
    if report.fixes and repair and os.access(path, os.W_OK):  # restored first: the blocks they hid are checked
        vol.close_files()
        try:
            talk.step(f"repairing: restoring {len(report.fixes)} flipped bit(s)")
            rolled += map(report.show, restore_bits(path, report.fixes))
            report, vol = check(path, data, talk)
        except (VolumeError, OSError, fmt.FormatError) as e:
            return Report(status=FSCK_UNCORRECTED, lines=[*map(report.show, report.errors),
                                                          f"repair failed: {_bare(path, e)}"])
    sb = vol.sb
    vol.close_files()
    head = (f"{path}: delta {sb.seq}, {sb.volblocks} blocks of {sb.blocksize} bytes, {sb.free_blocks} free, "
            f"{sb.used_inodes} inodes" + ("" if sb.state == fmt.STATE_CLEAN else ", not cleanly unmounted"))
    for copy, offset in enumerate(fmt.SUPER_OFFSETS):
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(fmt.SUPER_SIZE)
        try:
            fmt.Super.unpack(raw, copy)
        except fmt.FormatError as e:
            report.notes.append(f"superblock copy {copy} unusable ({e}); the other copy is in use")
    fixable = not [e for e in report.errors if not _fixable(e, report)]
    if report.errors and repair and fixable and os.access(path, os.W_OK):
        talk.step("repairing: " + ", ".join(what for what, needed in (
            ("rebuilding the bitmap", report.bitmap_rebuild), ("freeing leaked blocks", report.leaked),
            ("emptying unreadable directory blocks and reconnecting to /lost+found", report.lost_dir_blocks),
            ("setting the counts", True)) if needed))
        try:
            _repair(path, report)
        except VolumeError as e:
            report.lines = [head, *map(report.show, report.errors), f"repair failed: {_bare(path, e)}"]
            report.status = FSCK_UNCORRECTED
            return report
        again, vol2 = check(path, data, talk)
        vol2.close_files()
        if not again.errors:
            report.lines = [head, *rolled, *dropped_names(again, dropped),
                            *(f"fixed: {report.show(e)}" for e in report.errors), *report.repairs, *again.notes]
            report.status = FSCK_CORRECTED
            return report
        report = again
    report.lines = [head, *rolled, *(dropped_names(report, dropped) if rolled else []), *report.notes,
                    *map(report.show, report.errors)]
    if report.errors:
        report.status = FSCK_UNCORRECTED
        if not rolled:
            report.lines += dropped_names(report, dropped)
        reused = sum("fails its checksum" in e for e in report.errors)
        if rolled and reused:
            report.lines.append(f"{reused} data block(s) fail their checksums: a dropped delta freed them and a "
                                "later dropped delta wrote them again, so those files hold other data there now")
        report.lines.append(f"{len(report.errors)} error(s) left uncorrected")
    else:
        report.status = FSCK_CORRECTED if rolled else FSCK_OK
        report.lines.append("clean")
    return report


def _fixable(error: str, report: Report) -> bool:
    if error in report.fixed_by_bit:
        return True
    if error.startswith(("bitmap: ", "bitmap block ", "free block count", "used inode count")):
        return True
    if not report.lost_dir_blocks:
        return False
    # what a lost directory block causes: names gone, so link counts and parents that no longer match
    dirs = {ino for ino, _ in report.lost_dir_blocks}
    if any(error.startswith((f"inode {ino}: data block ", f"corrupt directory {ino}, block ")) for ino in dirs):
        return True
    if not error.startswith(("inode ", "directory ")):
        return False
    return error.endswith(" names") or ": link count " in error or ": parent recorded as " in error


def _repair(path: str, report: Report) -> None:
    if report.bitmap_rebuild:
        report.repairs += rebuild_bitmap(path, report.bitmap_rebuild, report.owned)
    vol = Volume(path, Options())
    try:
        for block in report.leaked:
            vol.alloc.free_later(block, 1)
        vol.used_inodes = len(list(vol.itable.items()))
        vol.mount()
        if report.lost_dir_blocks:
            report.repairs += reconnect(vol, report.lost_dir_blocks, report.names)
    finally:
        vol.unmount()


LOST_FOUND = b"lost+found"


def _names(vol: Volume) -> tuple[dict[int, InodeRecord], Counter[int], Counter[int], dict[int, int]]:
    """Every inode's record; how many names each has, the subdirectories of each directory, each directory's
    parent (by the directory entries)."""
    recs = {ino: InodeRecord.unpack(raw) for ino, raw in vol.itable.items()}
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    parents: dict[int, int] = {}
    for ino, rec in recs.items():
        if not stat.S_ISDIR(rec.mode) or not rec.nlink:
            continue
        for child, _, _, _ in vol._dir(vol.iget(ino)).names.values():
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
            vol._dirty_inode(inode, delta)
            inode.dir = None
            page = vol._write_page(inode, index, delta, fill=False)
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
                vol._add_entry(lf, b"#%d" % ino, inode, delta)
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
                new = vol._dirty_inode(vol.iget(ino), delta)
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
    fd = os.open(path, os.O_RDONLY)
    try:
        for block in damage.unreadable:
            fix = meta_fix(os.pread(fd, bs, block * bs), block)
            if fix is None:
                return []
            fixes.append(fix)
    finally:
        os.close(fd)
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
    with exclusive(path) as fd:
        for fix in fixes:
            fix.apply(fd)
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
    found, loaded = vol.recovery, vol.sb
    try:
        newest = newest_logged(vol, max(loaded.seq, found.dropped))
        chain, broken = walk_log(vol.dev.read_block, loaded.log_head, loaded.log_count)
    finally:
        vol.close_files()
    lines: list[str] = []
    if found.exact:
        lines = restore_bits(path, found.fixes)
        again = Volume(path, Options(readonly=True))
        again.close_files()
        if not again.recovery.refuse:
            return [*lines, f"delta {again.sb.seq} is whole again: nothing is lost"]
        lines.append(f"delta {found.dropped or again.sb.seq} is still damaged: {_bare(path, again.recovery.refuse)}")
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
    with exclusive(path) as fd:
        sb = read_super(fd, path)
        bs = sb.blocksize
        alloc = Allocator(sb.volblocks, fmt.bitmap_bits_per_block(bs))
        alloc.mark_used(0, fmt.reserved_blocks(bs) + 2 * sb.bitmap_blocks)
        for b in owned:
            alloc.mark_used(b, 1)
        out = []
        for index, block in damaged:
            os.pwrite(fd, bitmap_block(alloc, index, block, bs, sb.unify_seq), block * bs)
            lo, hi = index * alloc.bpb, min((index + 1) * alloc.bpb, sb.volblocks)
            used = sum(alloc.is_used(b) for b in range(lo, hi))
            out.append(f"rebuilt bitmap block {block} from the trees, the log and the fixed areas: {used} of "
                       f"blocks {lo}-{hi - 1} in use")
    return out
