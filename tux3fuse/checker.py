"""The check of a volume: every structure, every reference, every count.

Guarantee: ``check`` reads the volume as a mount would (newest valid superblock, bitmap, log replay in memory) and
changes nothing; it reports, naming the block or inode, every one of: a bad superblock copy, a metadata block with a
bad checksum or block number, btree keys out of order or outside their parent's range, extents overlapping, past
the end of the file or outside the volume, a block referenced twice, a data block whose checksum differs, bitmap
bits that differ from the set of reachable blocks, wrong free block and inode counts, directory entries naming
missing inodes or with the wrong type, link counts that differ from the names, and orphans left behind; and every
value a mount refuses to read (docs/FORMAT.md §13: impossible inode records, pointers outside the allocatable area,
a tree that reaches a block twice, holes in a directory, which it names in one line per directory). It takes time
and memory in proportion to the volume's blocks, whatever the image holds.

A report names damage by path as well as by inode: the directory walk records every name of every inode
(``Names``), and each line about an inode ends with every path that reaches it (a file's hard links all).
With a verbose ``Talk`` each check is listed as it starts and, on a volume that takes more than a second, how far
it is. ``fsck.py`` runs the check, the repairs (``repair.py``) and the check again.
"""

from __future__ import annotations

import re
import stat
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

from . import format as fmt
from .backend.btree import BTree, Node
from .dir import CorruptDir, parse_block
from .format import CorruptBlock, InodeRecord, unpack_extent
from .fs import Options, Volume
from .recovery import Fix, bit_diff, meta_fix, one_bit_off
from .repair import (
    Names,
)
from .validity import read_inode

# the exit status of fsck.tux3 (as e2fsck)
FSCK_OK, FSCK_CORRECTED, FSCK_UNCORRECTED, FSCK_ERROR = 0, 1, 4, 8
MAX_BIT_SEARCH = 64  # failing data blocks searched for a single flipped bit (each costs 8 checksums a byte)
PROGRESS_BLOCKS = 1 << 16  # the bitmap check says how far it is after each this many blocks
DT_FOR = {stat.S_IFREG: fmt.DT_REG, stat.S_IFDIR: fmt.DT_DIR, stat.S_IFCHR: fmt.DT_CHR, stat.S_IFBLK: fmt.DT_BLK,
          stat.S_IFIFO: fmt.DT_FIFO, stat.S_IFSOCK: fmt.DT_SOCK, stat.S_IFLNK: fmt.DT_LNK}


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
    unmarked: list[int] = field(default_factory=list)  # blocks in use that the bitmap has free
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
        first = fmt.reserved_blocks(self.bs) + 2 * vol.backend.sb.bitmap_blocks
        if block < first or block + count > vol.backend.sb.volblocks:
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
            fix = meta_fix(self.vol.backend.dev.read_block(e.block), e.block)
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
        sb = vol.backend.sb
        talk.step("checking the inode table")
        inodes = self.tree(vol.backend.itable, "inode table")
        if inodes is None:
            r.error("inode table unreadable: cannot check further")
            return r
        recs: dict[int, InodeRecord] = {}
        for ino, raw in inodes:
            try:  # what a mount refuses to use (validity.py); the next inode number is the counts' check
                recs[ino] = read_inode(ino, raw, sb, fmt.MAX_INUM + 2)
            except ValueError as e:
                r.error(f"inode {ino}: impossible record ({e})", ino)
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
        orphans = self.tree(vol.backend.otree, "orphan tree") or []
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
        for block in vol.backend.log_blocks:
            self.claim(block, 1, "log")
        for block in vol.backend.unify_frees:
            self.claim(block, 1, "tree node left until the next unify")
        talk.step("checking the bitmap against the blocks in use")
        self.bitmap()
        talk.step("checking the free block and inode counts")
        if sb.used_inodes != len(recs) or vol.backend.used_inodes != len(recs):
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
        loaded = self.vol.icache.inodes.get(ino)  # replaying the log loaded it: its tree holds the logged changes
        be = self.vol.backend
        tree = be.dtree(loaded) if loaded is not None else be.tree(fmt.KIND_DLEAF, rec.dtree_root, f"inode {ino}")
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
            holes = nblocks - sum(1 for index in blocks if index < nblocks)  # a directory has none: each is lost
            if holes:
                lost = [index for index in range(nblocks) if index not in blocks]
                r.error(f"corrupt directory {ino}, block {lost[0]}: {holes} of its {nblocks} blocks are holes "
                        f"(blocks {', '.join(map(str, lost[:10]))}{' …' if holes > 10 else ''})", ino)
                r.lost_dir_blocks += [(ino, index) for index in lost]
            skip = {index for d, index in r.lost_dir_blocks if d == ino}
            for index in sorted(i for i in blocks if i < nblocks):
                if index in skip:
                    continue  # its entries cannot be trusted: the names in it are lost
                data = self.vol.backend.dev.read_block(blocks[index][0])
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
        data = self.vol.backend.dev.read_blocks(physical, len(csums))
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
        alloc = vol.backend.alloc
        first = fmt.reserved_blocks(self.bs) + 2 * vol.backend.sb.bitmap_blocks
        unknown: set[int] = set()  # blocks whose bits a corrupt bitmap block held
        for index, block, reason in vol.backend.bitmap_damage:
            lo, hi = index * alloc.bpb, min((index + 1) * alloc.bpb, vol.backend.sb.volblocks)
            r.error(f"bitmap block {block} (the bits of blocks {lo}-{hi - 1}) is corrupt: {reason}")
            r.bitmap_rebuild.append((index, block))
            unknown.update(range(lo, hi))
        if unknown:
            r.owned = set(self.owner)
        for b in alloc.fixed_free:  # used in memory whatever the bitmap says; the repair's unify writes them so
            r.error(f"bitmap: fixed block {b} marked free")
        missing = 0
        total = vol.backend.sb.volblocks
        for chunk in range(first, total, PROGRESS_BLOCKS):
            for b in range(chunk, min(chunk + PROGRESS_BLOCKS, total)):
                if b in unknown:
                    continue
                used = alloc.is_used(b)
                if used and b not in self.owner:
                    r.leaked.append(b)
                elif not used and b in self.owner:
                    r.unmarked.append(b)
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
        if vol.backend.sb.free_blocks != alloc.free and not unknown:
            r.error(f"free block count {vol.backend.sb.free_blocks}, but the bitmap has {alloc.free} free blocks")
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
    """What loading ``vol`` checked (for ``fsck.tux3 -v``): the superblock copies, and the label and UUID of the one
    loaded, the bitmap, the log replay."""
    sb = vol.backend.sb
    copies = []
    backing = vol.backend.dev.backing  # the image file, block device or NBD export the volume was loaded from
    for copy, offset in enumerate(fmt.SUPER_OFFSETS):
        try:
            copies.append(f"copy {copy} names delta "
                          f"{fmt.Super.unpack(backing.pread(fmt.SUPER_SIZE, offset), copy).seq}")
        except fmt.FormatError as e:
            copies.append(f"copy {copy} is unusable ({e})")
    damaged = len(vol.backend.bitmap_damage)
    return [f"checked the superblock copies: {', '.join(copies)}; delta {sb.seq} is loaded",
            f"label: {sb.label_text or '<none>'}", f"uuid: {sb.uuid_text}",
            f"checked the bitmap: {sb.bitmap_blocks} block(s) of region {sb.bitmap_cur}"
            + (f", {damaged} corrupt" if damaged else ", every checksum right"),
            f"replayed the log: {len(vol.backend.log_blocks)} log block(s) of deltas {sb.unify_seq + 1}-{sb.seq}"
            if sb.seq > sb.unify_seq else f"replayed the log: empty (the trees hold delta {sb.seq})"]
