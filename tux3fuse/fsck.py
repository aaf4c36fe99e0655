"""Checking a volume: every structure, every reference, every count.

Guarantee: ``check`` reads the volume as a mount would (newest valid superblock, bitmap, log replay in memory) and
changes nothing; it reports, naming the block or inode, every one of: a bad superblock copy, a metadata block with a
bad checksum or block number, btree keys out of order or outside their parent's range, extents overlapping, past
the end of the file or outside the volume, a block referenced twice, a data block whose checksum differs, bitmap
bits that differ from the set of reachable blocks, wrong free block and inode counts, directory entries naming
missing inodes or with the wrong type, link counts that differ from the names, and orphans left behind.
``fsck(repair=True)`` fixes what a mount can fix safely (orphans, leaked blocks, counts) and checks again.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from . import format as fmt
from .backend.btree import BTree, Node
from .dir import CorruptDir, parse_block
from .format import CorruptBlock, InodeRecord, unpack_extent
from .fs import Options, Volume, VolumeError

FSCK_OK, FSCK_CORRECTED, FSCK_UNCORRECTED, FSCK_ERROR = 0, 1, 4, 8
DT_FOR = {stat.S_IFREG: fmt.DT_REG, stat.S_IFDIR: fmt.DT_DIR, stat.S_IFCHR: fmt.DT_CHR, stat.S_IFBLK: fmt.DT_BLK,
          stat.S_IFIFO: fmt.DT_FIFO, stat.S_IFSOCK: fmt.DT_SOCK, stat.S_IFLNK: fmt.DT_LNK}


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leaked: list[int] = field(default_factory=list)  # blocks marked used that nothing references
    orphans: list[int] = field(default_factory=list)
    counts_wrong: bool = False
    status: int = FSCK_OK
    lines: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors.append(msg)


class Checker:
    def __init__(self, vol: Volume, data: bool = True) -> None:
        self.vol = vol
        self.bs = vol.blocksize
        self.data = data
        self.owner: dict[int, str] = {}
        self.r = Report()

    def claim(self, block: int, count: int, owner: str) -> bool:
        vol = self.vol
        first = fmt.reserved_blocks(self.bs) + 2 * vol.sb.bitmap_blocks
        if block < first or block + count > vol.sb.volblocks:
            self.r.error(f"{owner}: blocks {block}+{count} outside the allocatable area")
            return False
        ok = True
        for b in range(block, block + count):
            prev = self.owner.get(b)
            if prev is not None:
                self.r.error(f"block {b} referenced twice: by {prev} and by {owner}")
                ok = False
            else:
                self.owner[b] = owner
        return ok

    def tree(self, tree: BTree, name: str) -> list[tuple[int, bytes]] | None:
        """Walk every node: checksums, levels, key order and ranges; return the entries in order."""
        try:
            root = tree.root
        except CorruptBlock as e:
            self.r.error(f"{name}: {e}")
            return None
        if root is None:
            return []
        out: list[tuple[int, bytes]] = []
        ok = self._node(tree, root, name, 0, None, out)
        return out if ok else None

    def _node(self, tree: BTree, node: Node, name: str, lo: int, hi: int | None, out: list) -> bool:
        self.claim(node.blocknr, 1, f"{name} node") if node.blocknr else None
        keys = node.keys
        if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
            self.r.error(f"{name}: keys out of order in block {node.blocknr}")
            return False
        if keys and (keys[0] < lo or (hi is not None and keys[-1] >= hi)):
            self.r.error(f"{name}: keys of block {node.blocknr} outside the range [{lo}, {hi})")
            return False
        if node.level == 0:
            out.extend(zip(keys, node.vals, strict=True))
            return True
        ok = True
        for i in range(len(keys)):
            try:
                child = tree._child(node, i)
            except CorruptBlock as e:
                self.r.error(f"{name}: {e}")
                ok = False
                continue
            child_lo = keys[i] if i else lo
            child_hi = keys[i + 1] if i + 1 < len(keys) else hi
            if child.keys and i and child.keys[0] < keys[i]:
                self.r.error(f"{name}: block {child.blocknr} starts below its key in block {node.blocknr}")
                ok = False
            ok &= self._node(tree, child, name, child_lo, child_hi, out)
        return ok

    def run(self) -> Report:
        vol, r = self.vol, self.r
        sb = vol.sb
        inodes = self.tree(vol.itable, "inode table")
        if inodes is None:
            r.error("inode table unreadable: cannot check further")
            return r
        recs: dict[int, InodeRecord] = {}
        for ino, raw in inodes:
            try:
                recs[ino] = InodeRecord.unpack(raw)
            except (ValueError, IndexError) as e:
                r.error(f"inode {ino}: undecodable record ({e})")
        if fmt.ROOT_INO not in recs or not stat.S_ISDIR(recs[fmt.ROOT_INO].mode):
            r.error("the root directory is missing")
        names: dict[int, int] = {}
        subdirs: dict[int, int] = {}
        parents: dict[int, int] = {}
        for ino, rec in recs.items():
            self.inode(ino, rec, recs, names, subdirs, parents)
        orphans = self.tree(vol.otree, "orphan tree") or []
        orphan_set = {ino for ino, _ in orphans}
        for ino, rec in recs.items():
            kind = stat.S_IFMT(rec.mode)
            if kind == stat.S_IFDIR:
                expect_links = 2 + subdirs.get(ino, 0) if rec.nlink else 0
                linked = names.get(ino, 0) + (ino == fmt.ROOT_INO)
                if rec.nlink and linked != 1:
                    r.error(f"directory {ino} has {linked} names")
                if rec.nlink != expect_links:
                    r.error(f"directory {ino}: link count {rec.nlink}, expected {expect_links}")
                if ino != fmt.ROOT_INO and rec.nlink and parents.get(ino) != rec.parent:
                    r.error(f"directory {ino}: parent recorded as {rec.parent}, found in {parents.get(ino)}")
            elif rec.nlink != names.get(ino, 0):
                r.error(f"inode {ino}: link count {rec.nlink}, but {names.get(ino, 0)} names")
            if rec.nlink == 0:
                if ino in orphan_set:
                    r.orphans.append(ino)
                else:
                    r.error(f"inode {ino} has no name and is not an orphan (leaked)")
        for ino in orphan_set - set(recs):
            r.error(f"orphan {ino} has no inode")
        for ino in orphan_set:
            if ino in recs and recs[ino].nlink:
                r.error(f"orphan {ino} still has {recs[ino].nlink} links")
        if r.orphans:
            r.notes.append(f"{len(r.orphans)} orphan inode(s) to reclaim at the next mount: "
                           + ", ".join(map(str, sorted(r.orphans)[:10])))
        for block in vol.log_blocks:
            self.claim(block, 1, "log")
        for block in vol.unify_frees:
            self.claim(block, 1, "tree node left until the next unify")
        self.bitmap()
        if sb.used_inodes != len(recs) or vol.used_inodes != len(recs):
            r.error(f"used inode count {sb.used_inodes}, but {len(recs)} inodes")
            r.counts_wrong = True
        if recs and sb.next_inum <= max(recs):
            r.error(f"next inode number {sb.next_inum} is not above the highest inode {max(recs)}")
            r.counts_wrong = True
        return r

    def inode(self, ino: int, rec: InodeRecord, recs: dict, names: dict, subdirs: dict, parents: dict) -> None:
        r, bs = self.r, self.bs
        kind = stat.S_IFMT(rec.mode)
        if kind not in DT_FOR:
            r.error(f"inode {ino}: bad file type in mode {rec.mode:o}")
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
                r.error(f"inode {ino}: bad extent at {key}: {e}")
                continue
            if key < end:
                r.error(f"inode {ino}: extent at block {key} overlaps the one before")
            if key + len(csums) > nblocks:
                r.error(f"inode {ino}: extent at block {key} (+{len(csums)}) lies past the end of the file "
                        f"({rec.size} bytes)")
            end = key + len(csums)
            mapped += len(csums)
            if self.claim(physical, len(csums), f"inode {ino}"):
                if self.data or kind in (stat.S_IFDIR, stat.S_IFLNK):
                    self.verify_data(ino, key, physical, csums)
                if kind == stat.S_IFDIR:
                    for i in range(len(csums)):
                        blocks[key + i] = (physical + i, 0)
        if mapped != rec.blocks:
            r.error(f"inode {ino}: records {rec.blocks} blocks, maps {mapped}")
        if kind == stat.S_IFDIR:
            if rec.size % bs:
                r.error(f"directory {ino}: size {rec.size} is not a multiple of the block size")
            for index in range(nblocks):
                phys = blocks.get(index, (0, 0))[0]
                data = self.vol.dev.read_block(phys) if phys else bytes(bs)
                try:
                    for _, _, child, dtype, name in parse_block(ino, index, data):
                        if not child:
                            continue
                        target = recs.get(child)
                        if target is None:
                            r.error(f"directory {ino}: entry {name!r} names missing inode {child}")
                            continue
                        names[child] = names.get(child, 0) + 1
                        if dtype != DT_FOR.get(stat.S_IFMT(target.mode)):
                            r.error(f"directory {ino}: entry {name!r} has type {dtype}, inode {child} is "
                                    f"{stat.filemode(target.mode)[0]}")
                        if stat.S_ISDIR(target.mode):
                            subdirs[ino] = subdirs.get(ino, 0) + 1
                            parents[child] = ino
                except CorruptDir as e:
                    r.error(str(e))

    def verify_data(self, ino: int, key: int, physical: int, csums: list[int]) -> None:
        bs = self.bs
        data = self.vol.dev.read_blocks(physical, len(csums))
        for i, csum in enumerate(csums):
            if fmt.checksum(data[i * bs: (i + 1) * bs]) != csum:
                self.r.error(f"inode {ino}: data block {key + i} (block {physical + i}) fails its checksum")

    def bitmap(self) -> None:
        vol, r = self.vol, self.r
        alloc = vol.alloc
        first = fmt.reserved_blocks(self.bs) + 2 * vol.sb.bitmap_blocks
        for b in range(first):
            if not alloc.is_used(b):
                r.error(f"bitmap: fixed block {b} marked free")
        missing = 0
        for b in range(first, vol.sb.volblocks):
            used = alloc.is_used(b)
            if used and b not in self.owner:
                r.leaked.append(b)
            elif not used and b in self.owner:
                missing += 1
                if missing <= 10:
                    r.error(f"bitmap: block {b} is used by {self.owner[b]} but marked free")
        if missing > 10:
            r.error(f"bitmap: {missing} used blocks marked free in all")
        if r.leaked:
            r.error(f"bitmap: {len(r.leaked)} block(s) marked used that nothing references (first: {r.leaked[0]})")
        if vol.sb.free_blocks != alloc.free:
            r.error(f"free block count {vol.sb.free_blocks}, but the bitmap has {alloc.free} free blocks")
            r.counts_wrong = True


def check(path: str, data: bool = True) -> tuple[Report, Volume]:
    vol = Volume(path, Options(readonly=True))
    return Checker(vol, data).run(), vol


def fsck(path: str, repair: bool = False, verbose: bool = False, data: bool = True) -> Report:
    """Check (and with ``repair``, fix what can be fixed) a volume that is not mounted."""
    try:
        report, vol = check(path, data)
    except VolumeError as e:
        report = Report(status=FSCK_UNCORRECTED, lines=[f"{path}: {e}"])
        return report
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
    fixable = not [e for e in report.errors if not _fixable(e)]
    if report.errors and repair and fixable and os.access(path, os.W_OK):
        try:
            _repair(path, report)
        except VolumeError as e:
            report.lines = [head, *report.errors, f"repair failed: {e}"]
            report.status = FSCK_UNCORRECTED
            return report
        again, vol2 = check(path, data)
        vol2.close_files()
        if not again.errors:
            report.lines = [head, *(f"fixed: {e}" for e in report.errors), *again.notes]
            report.status = FSCK_CORRECTED
            return report
        report = again
    report.lines = [head, *report.notes, *report.errors]
    if report.errors:
        report.status = FSCK_UNCORRECTED
        report.lines.append(f"{len(report.errors)} error(s) left uncorrected")
    else:
        report.lines.append("clean")
    return report


def _fixable(error: str) -> bool:
    return error.startswith(("bitmap: ", "free block count", "used inode count"))


def _repair(path: str, report: Report) -> None:
    vol = Volume(path, Options())
    try:
        for block in report.leaked:
            vol.alloc.free_later(block, 1)
        vol.used_inodes = len(list(vol.itable.items()))
        vol.mount()
    finally:
        vol.unmount()
