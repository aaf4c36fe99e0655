"""What a value read from the disk may be, checked where it is read (as ext4's ``ext4_valid_extent`` and
``__ext4_check_dir_entry``) before anything uses it; docs/FORMAT.md §13 lists every check.

Guarantees:
- A tree node (``node_check``, which ``BTree`` runs on every node it loads): an interior node's children lie in the
  allocatable area; an extent-tree leaf's records are well formed (1 to ``max_extent_blocks`` blocks, a checksum
  for each), map blocks of the allocatable area, lie below the largest file and do not overlap.
- An inode record (``read_inode``): its bytes decode and fit a leaf; its file type is known; its size is one its
  type can have (a directory: a multiple of the block size, no larger than the volume; a symlink: at most
  ``SYMLINK_MAX``; anything else: at most ``MAX_FILE_SIZE``); its link count is at most ``LINK_MAX``
  (``DIR_LINK_MAX`` for a directory), so that no link made later overflows it; it maps at most the volume's
  blocks; its extent tree's root, if any, lies in the allocatable area; and its number is one the superblock has
  handed out.
- A log record applied to the trees (``log_problem``): the same for the inode it names and the record it carries,
  and a map's blocks in the allocatable area below the largest file.
A failed check raises ``CorruptBlock`` (``ValueError`` for ``read_inode`` and ``log_problem``, whose callers name
the block) saying what is wrong; in a mounted volume the failure policy (``failure.guarded``) turns it into EIO and
a read-only volume with one log line. So what the trees hold in memory has passed these checks: no read serves,
and no rewrite frees, a reserved or bitmap block or one past the volume, and no size read from disk makes a walk
longer than the volume.
"""

from __future__ import annotations

import stat

from . import format as fmt
from . import logrecord as logrec
from .backend.btree import Check

TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


def _area(sb: fmt.Super) -> str:
    return f"outside the allocatable area [{sb.alloc_start}, {sb.volblocks})"


def extent_problem(key: int, value: bytes, sb: fmt.Super) -> str | None:
    """What is wrong with the extent record ``value`` at logical block ``key``, or None."""
    try:
        physical, count = fmt.extent_head(value)
    except ValueError as e:
        return f"extent at block {key}: {e}"
    if count > fmt.max_extent_blocks(sb.blocksize):
        return f"extent at block {key} of {count} blocks, more than {fmt.max_extent_blocks(sb.blocksize)}"
    if sb.outside(physical, count):
        return f"extent at block {key} maps blocks {physical}+{count}, {_area(sb)}"
    if key + count > fmt.MAX_FILE_SIZE // sb.blocksize:
        return f"extent at block {key} (+{count}) past the largest file"
    return None


def node_check(sb: fmt.Super, leaf_kind: bytes, owner: str = "") -> Check:
    """The check ``BTree`` runs on each node of a tree of ``leaf_kind`` that it reads from the volume of ``sb``; a
    problem it finds starts with ``owner`` ("inode 12"), when given."""
    def check(level: int, keys: list[int], vals: list) -> str | None:
        problem = _node_problem(level, keys, vals)
        return f"{owner}: {problem}" if owner and problem else problem

    def _node_problem(level: int, keys: list[int], vals: list) -> str | None:
        if level:
            for i, child in enumerate(vals):
                if sb.outside(child):
                    return f"child {i} is block {child}, {_area(sb)}"
            return None
        if leaf_kind == fmt.KIND_DLEAF:
            end = 0
            for key, value in zip(keys, vals, strict=True):
                problem = extent_problem(key, value, sb)
                if problem is not None:
                    return problem
                if key < end:
                    return f"extent at block {key} overlaps the one before"
                end = key + fmt.extent_head(value)[1]
        return None
    return check


def read_inode(ino: int, raw: bytes, sb: fmt.Super, next_inum: int | None = None) -> fmt.InodeRecord:
    """The inode record ``raw`` of inode ``ino`` decoded and checked; ValueError saying what is wrong. ``next_inum``:
    the number the volume hands out next (default the superblock's)."""
    next_inum = sb.next_inum if next_inum is None else next_inum
    if not fmt.ROOT_INO <= ino < next_inum:
        raise ValueError(f"inode number outside [{fmt.ROOT_INO}, {next_inum}), the numbers handed out")
    if len(raw) > fmt.max_inode_record(sb.blocksize):
        raise ValueError(f"record of {len(raw)} bytes, more than a leaf holds")
    rec = fmt.InodeRecord.unpack(raw)
    kind, bs = stat.S_IFMT(rec.mode), sb.blocksize
    if kind not in TYPES:
        raise ValueError(f"unknown file type in mode {rec.mode:o}")
    if kind == stat.S_IFDIR and (rec.size % bs or rec.size > sb.volblocks * bs):
        raise ValueError(f"directory size {rec.size}: not a multiple of {bs} bytes within the volume")
    if kind == stat.S_IFLNK and rec.size > fmt.SYMLINK_MAX:
        raise ValueError(f"symlink of {rec.size} bytes, longer than {fmt.SYMLINK_MAX}")
    if rec.size > fmt.MAX_FILE_SIZE:
        raise ValueError(f"size {rec.size} above {fmt.MAX_FILE_SIZE}")
    if rec.nlink > (fmt.DIR_LINK_MAX if kind == stat.S_IFDIR else fmt.LINK_MAX):
        raise ValueError(f"link count {rec.nlink}, more than a {'directory' if kind == stat.S_IFDIR else 'file'} "
                         "may have")
    if rec.blocks > sb.volblocks:
        raise ValueError(f"{rec.blocks} blocks in a volume of {sb.volblocks}")
    if rec.dtree_root and sb.outside(rec.dtree_root):
        raise ValueError(f"extent tree root {rec.dtree_root} {_area(sb)}")
    return rec


def log_problem(rec: tuple, sb: fmt.Super) -> str | None:
    """What makes the tree record ``rec`` of a log block impossible to apply, or None (allocation records are
    checked by the bitmap's replay)."""
    code = rec[0]
    if code in (logrec.LOG_ALLOC, logrec.LOG_FREE):
        return None
    ino = rec[1]
    if code == logrec.LOG_INODE:
        try:
            read_inode(ino, rec[2], sb)
        except ValueError as e:
            return f"inode {ino}: {e}"
    elif not fmt.ROOT_INO <= ino < sb.next_inum:
        return f"inode {ino} outside [{fmt.ROOT_INO}, {sb.next_inum}), the numbers handed out"
    elif code == logrec.LOG_MAP:
        _, _, logical, physical, csums = rec
        if sb.outside(physical, len(csums)):
            return f"map of blocks {physical}+{len(csums)}, {_area(sb)}"
        if logical + len(csums) > fmt.MAX_FILE_SIZE // sb.blocksize:
            return f"map at block {logical} (+{len(csums)}) past the largest file"
    return None
