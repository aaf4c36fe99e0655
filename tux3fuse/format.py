"""On-disk structures of a tux3fuse volume: packing, unpacking, checksums, and the layout a superblock may name.

Guarantees:
- Every metadata block that leaves this module carries its own block number and an xxh3-64 checksum of its whole
  content, and every block that enters it is checked for both; a mismatch raises ``CorruptBlock`` naming the
  block, its kind and the reason.
- Unpacking never trusts a count: a count or length that does not fit the bytes given raises ``ValueError``
  (never ``struct.error`` or ``IndexError``), and nothing is allocated in proportion to a number read before it
  is checked against the bytes that hold it.
- A superblock copy is valid only with the layout mkfs gives a volume of its size (``Super.impossible``,
  docs/FORMAT.md §2): ``pack`` refuses anything else before it is written, ``unpack`` before it is used.
Nothing here does I/O. docs/FORMAT.md describes every byte written here. All integers are little-endian.
"""

from __future__ import annotations

import functools
import struct
import uuid
from dataclasses import dataclass, field

import xxhash

MAGIC = b"TUX3\x20\x26\x11\x25"  # "tux3", then the date of this format: 2026-11-25
VERSION = 1
SUPER_SIZE = 512  # one sector: a superblock copy is never split across sectors
SUPER_OFFSETS = (4096, 8192)  # byte offsets of superblock copies 0 and 1
RESERVED_BYTES = 8192 + SUPER_SIZE  # bytes at the start of the volume that are never allocated
MIN_BLOCKBITS, MAX_BLOCKBITS = 9, 16
NAME_MAX = 255
ROOT_INO = 1
MAX_INUM = (1 << 48) - 1  # inode numbers are 48-bit, as Tux3's: next_inum above this means none is left
MIN_VOLBLOCKS, MIN_VOLBYTES = 64, 64 << 10  # the smallest volume: at least this many blocks and bytes
MAX_VOLBLOCKS = 1 << 32  # the largest: the allocator keeps a bit per block in memory, and fsck walks every block
MAX_LEVEL = 32  # deepest btree accepted: a level takes at least 15 times the insertions of the level below it
MAX_SEQ = 1 << 62  # the highest delta number a volume may hold: room for every commit after it
MAX_FILE_SIZE = 1 << 50  # logical blocks must fit the 48-bit range of the format at any block size
SYMLINK_MAX = 4095  # the longest symlink target
LINK_MAX, DIR_LINK_MAX = 65000, 1 << 31  # the most links of a file, and of a directory (EMLINK beyond)

# Kinds of metadata block (the first four bytes of the block).
KIND_ILEAF = b"ILEF"  # inode table leaf
KIND_DLEAF = b"DLEF"  # extent tree leaf
KIND_OLEAF = b"OLEF"  # orphan tree leaf
KIND_BNODE = b"BNOD"  # interior btree node (any tree)
KIND_LOG = b"LOGB"  # log block
KIND_BITMAP = b"BMAP"  # allocation bitmap block
KIND_NAMES = {
    KIND_ILEAF: "ileaf", KIND_DLEAF: "dleaf", KIND_OLEAF: "oleaf", KIND_BNODE: "bnode", KIND_LOG: "log",
    KIND_BITMAP: "bitmap",
}

# Common metadata block header: kind, level, count, blocknr, checksum, delta (32 bytes).
HEADER = struct.Struct("<4sHHQQQ")
HEADER_SIZE = HEADER.size
CSUM_AT = 16  # byte offset of the checksum field inside the header


class FormatError(Exception):
    """The image is not a tux3fuse volume this code can use."""


class CorruptBlock(Exception):
    """A metadata block failed its checks."""

    def __init__(self, block: int, kind: str, reason: str) -> None:
        super().__init__(f"corrupt {kind} block {block}: {reason}")
        self.block, self.kind, self.reason = block, kind, reason


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a data block (as stored in extent records)."""
    return xxhash.xxh3_64_intdigest(data)


def _meta_csum(buf: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh3_64()
    mv = memoryview(buf)
    h.update(mv[:CSUM_AT])
    h.update(mv[CSUM_AT + 8:])
    return h.intdigest()


def seal(buf: bytearray, kind: bytes, level: int, count: int, blocknr: int, delta: int) -> bytearray:
    """Write the header of a metadata block and its checksum; return buf."""
    HEADER.pack_into(buf, 0, kind, level, count, blocknr, 0, delta)
    struct.pack_into("<Q", buf, CSUM_AT, _meta_csum(buf))
    return buf


def unseal(buf: bytes | bytearray, blocknr: int, kinds: tuple[bytes, ...]) -> tuple[bytes, int, int, int]:
    """Check a metadata block read from ``blocknr``; return (kind, level, count, delta)."""
    kind, level, count, own, csum, delta = HEADER.unpack_from(buf, 0)
    name = KIND_NAMES.get(kind, "metadata")
    if kind not in kinds:
        expected = "/".join(KIND_NAMES[k] for k in kinds)
        raise CorruptBlock(blocknr, name, f"expected a {expected} block, found kind {kind!r}")
    if csum != _meta_csum(buf):
        raise CorruptBlock(blocknr, name, "checksum mismatch")
    if own != blocknr:
        raise CorruptBlock(blocknr, name, f"block claims to be block {own}")
    return kind, level, count, delta


# ---------------------------------------------------------------------------------------------------------------
# Superblock

_SUPER = struct.Struct("<8sIHHQQQQQIIQQQIIQQQ32s16sQQ")  # see docs/FORMAT.md
STATE_CLEAN, STATE_MOUNTED = 0, 1


@dataclass
class Super:
    blockbits: int
    volblocks: int
    seq: int = 0  # number of the last committed delta
    itree_root: int = 0
    otree_root: int = 0
    log_head: int = 0  # newest log block since the last unify (0: none)
    log_count: int = 0
    unify_seq: int = 0  # delta number of the last unify
    bitmap_start: tuple[int, int] = (0, 0)  # first block of bitmap region 0 and 1
    bitmap_blocks: int = 0  # blocks in each region
    bitmap_cur: int = 0  # region written by the last unify
    state: int = STATE_CLEAN
    free_blocks: int = 0
    used_inodes: int = 0
    next_inum: int = ROOT_INO + 1
    label: bytes = b""
    uuid: bytes = b"\0" * 16
    created_ns: int = 0
    delta_csum: int = 0  # digest of the blocks this delta wrote (0: they were flushed before the superblock)
    copy: int = field(default=0, compare=False)  # which copy this was read from or is written to

    @property
    def blocksize(self) -> int:
        return 1 << self.blockbits

    @property
    def label_text(self) -> str:
        """The label as a person reads it: UTF-8, any other byte as a backslash escape ("" for none)."""
        return self.label.decode("utf-8", "backslashreplace")

    @property
    def uuid_text(self) -> str:
        """The volume's UUID in its usual form (8-4-4-4-12 hexadecimal digits)."""
        return str(uuid.UUID(bytes=bytes(self.uuid)))

    @property
    def alloc_start(self) -> int:
        """The first block that may be allocated: past the reserved blocks and both bitmap regions."""
        return reserved_blocks(self.blocksize) + 2 * self.bitmap_blocks

    def outside(self, start: int, count: int = 1) -> bool:
        """Do blocks [start, start + count) leave the allocatable area (or is the range empty)? A pointer read from
        disk (tree node, log block, extent, allocation record) must name blocks inside it."""
        return count < 1 or start < self.alloc_start or start + count > self.volblocks

    def impossible(self) -> str | None:
        """What no committed state can hold (a layout other than mkfs's, a negative or overflowing count, a block
        outside the allocatable area), or None. ``pack`` refuses such a superblock before anything is written,
        ``unpack`` such a copy; docs/FORMAT.md §2 lists every value refused."""
        if not MIN_BLOCKBITS <= self.blockbits <= MAX_BLOCKBITS:
            return f"block size 2^{self.blockbits} out of range"
        lo, bs = min_volblocks(self.blocksize), self.blocksize
        if not lo <= self.volblocks <= MAX_VOLBLOCKS:
            return f"{self.volblocks} blocks: a volume of {bs}-byte blocks has {lo} to {MAX_VOLBLOCKS}"
        want = bitmap_blocks_for(bs, self.volblocks)
        regions = (reserved_blocks(bs), reserved_blocks(bs) + want)
        if self.bitmap_blocks != want or tuple(self.bitmap_start) != regions:
            return (f"bitmap regions of {self.bitmap_blocks} blocks at {tuple(self.bitmap_start)}: a volume of "
                    f"{self.volblocks} blocks has two of {want} at {regions}")
        if self.bitmap_cur not in (0, 1) or self.state not in (STATE_CLEAN, STATE_MOUNTED):
            return f"bitmap region {self.bitmap_cur} or state {self.state} is neither 0 nor 1"
        if not ROOT_INO < self.next_inum <= MAX_INUM + 1:
            return f"next inode number {self.next_inum} outside [{ROOT_INO + 1}, {MAX_INUM + 1}]"
        if not 0 <= self.used_inodes < self.next_inum:
            return f"used inode count {self.used_inodes} outside [0, {self.next_inum})"
        first = self.alloc_start
        if not 0 <= self.free_blocks <= self.volblocks - first:
            return f"free block count {self.free_blocks} outside [0, {self.volblocks - first}]"
        for name in ("itree_root", "otree_root", "log_head"):
            block = getattr(self, name)
            if (block or name == "itree_root") and self.outside(block):
                return f"{name} {block} outside the allocatable blocks [{first}, {self.volblocks})"
        if not 0 <= self.log_count <= self.volblocks - first or (self.log_count == 0) != (self.log_head == 0):
            return f"log of {self.log_count} blocks with head {self.log_head}"
        if self.seq > MAX_SEQ:
            return f"delta {self.seq} above {MAX_SEQ}"
        if not 0 <= self.unify_seq <= self.seq:
            return f"last unify at delta {self.unify_seq}, after delta {self.seq}"
        return None

    def pack(self) -> bytes:
        problem = self.impossible()
        if problem is not None:
            raise FormatError(f"superblock of delta {self.seq} refused: {problem}")
        buf = bytearray(SUPER_SIZE)
        _SUPER.pack_into(
            buf, 0, MAGIC, VERSION, self.blockbits, self.state, self.seq, self.volblocks, self.itree_root,
            self.otree_root, self.log_head, self.log_count, self.bitmap_blocks, self.unify_seq,
            self.bitmap_start[0], self.bitmap_start[1], self.bitmap_cur, 0, self.free_blocks, self.used_inodes,
            self.next_inum, self.label.ljust(32, b"\0"), self.uuid, self.created_ns, self.delta_csum,
        )
        struct.pack_into("<Q", buf, SUPER_SIZE - 8, xxhash.xxh3_64_intdigest(bytes(buf[: SUPER_SIZE - 8])))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes, copy: int) -> Super:
        """Decode one superblock copy; raise FormatError saying what is wrong with it."""
        if len(buf) < SUPER_SIZE:
            raise FormatError("image too short to hold a superblock")
        if buf[:8] != MAGIC:
            raise FormatError("no tux3fuse signature (wrong magic)")
        (stored,) = struct.unpack_from("<Q", buf, SUPER_SIZE - 8)
        if stored != xxhash.xxh3_64_intdigest(buf[: SUPER_SIZE - 8]):
            raise FormatError(f"superblock copy {copy}: checksum mismatch")
        f = _SUPER.unpack_from(buf, 0)
        if f[1] != VERSION:
            raise FormatError(f"unsupported format version {f[1]} (this tux3fuse reads version {VERSION})")
        sb = cls(
            blockbits=f[2], state=f[3], seq=f[4], volblocks=f[5], itree_root=f[6], otree_root=f[7], log_head=f[8],
            log_count=f[9], bitmap_blocks=f[10], unify_seq=f[11], bitmap_start=(f[12], f[13]), bitmap_cur=f[14],
            free_blocks=f[16], used_inodes=f[17], next_inum=f[18], label=f[19].rstrip(b"\0"), uuid=f[20],
            created_ns=f[21], delta_csum=f[22], copy=copy,
        )
        problem = sb.impossible()
        if problem is not None:
            raise FormatError(f"superblock copy {copy}: {problem}")
        return sb


def reserved_blocks(blocksize: int) -> int:
    """Blocks at the start of the volume covering the superblock copies: never allocated."""
    return -(-RESERVED_BYTES // blocksize)


def bitmap_bits_per_block(blocksize: int) -> int:
    return (blocksize - HEADER_SIZE) * 8


def bitmap_blocks_for(blocksize: int, volblocks: int) -> int:
    """Blocks in each bitmap region of a volume of ``volblocks`` blocks: one bit per block."""
    return -(-volblocks // bitmap_bits_per_block(blocksize))


def min_volblocks(blocksize: int) -> int:
    """The fewest blocks a volume of ``blocksize`` has: MIN_VOLBLOCKS, MIN_VOLBYTES, and room for the reserved
    blocks, both bitmap regions and a little more."""
    n = max(MIN_VOLBLOCKS, -(-MIN_VOLBYTES // blocksize))
    while reserved_blocks(blocksize) + 2 * bitmap_blocks_for(blocksize, n) + 16 > n:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# Btree nodes. Leaves map u64 keys to byte strings; interior nodes map u64 keys to child block numbers.

_LEAF_ENTRY = struct.Struct("<QHH")  # key, value offset, value length
_BNODE_ENTRY = struct.Struct("<QQ")  # key, child block


def leaf_capacity(blocksize: int) -> int:
    """Bytes available in a leaf for entries and values."""
    return blocksize - HEADER_SIZE


def leaf_entry_cost(value_len: int) -> int:
    return _LEAF_ENTRY.size + value_len


def bnode_capacity(blocksize: int) -> int:
    return (blocksize - HEADER_SIZE) // _BNODE_ENTRY.size


@functools.lru_cache(maxsize=512)
def _table(count: int, entry: str) -> struct.Struct:
    return struct.Struct("<" + entry * count)


def pack_leaf(blocksize: int, kind: bytes, keys: list[int], values: list[bytes], blocknr: int, delta: int) -> bytearray:
    n = len(keys)
    heap = b"".join(reversed(values))  # values grow down from the end of the block
    if HEADER_SIZE + n * _LEAF_ENTRY.size + len(heap) > blocksize:
        raise ValueError("leaf overflow")
    buf = bytearray(blocksize)
    buf[blocksize - len(heap):] = heap
    flat = []
    top = blocksize
    for key, value in zip(keys, values, strict=True):
        top -= len(value)
        flat += (key, top & 0xFFFF, len(value))
    _table(n, "QHH").pack_into(buf, HEADER_SIZE, *flat)
    return seal(buf, kind, 0, n, blocknr, delta)


def unpack_leaf(buf: bytes | bytearray, count: int) -> tuple[list[int], list[bytes]]:
    keys, values = [], []
    size = len(buf)
    if HEADER_SIZE + count * _LEAF_ENTRY.size > size:
        raise ValueError(f"{count} entries do not fit a block of {size} bytes")
    at = HEADER_SIZE
    for _ in range(count):
        key, off, length = _LEAF_ENTRY.unpack_from(buf, at)
        if length == 0:
            keys.append(key)
            values.append(b"")
            at += _LEAF_ENTRY.size
            continue
        if off < HEADER_SIZE or off + length > size:
            raise ValueError(f"value at {off}+{length} outside the block")
        keys.append(key)
        values.append(bytes(buf[off: off + length]))
        at += _LEAF_ENTRY.size
    return keys, values


def pack_bnode(blocksize: int, level: int, keys: list[int], children: list[int], blocknr: int,
               delta: int) -> bytearray:
    buf = bytearray(blocksize)
    at = HEADER_SIZE
    for key, child in zip(keys, children, strict=True):
        _BNODE_ENTRY.pack_into(buf, at, key, child)
        at += _BNODE_ENTRY.size
    return seal(buf, KIND_BNODE, level, len(keys), blocknr, delta)


def unpack_bnode(buf: bytes | bytearray, count: int) -> tuple[list[int], list[int]]:
    keys, children = [], []
    if count > bnode_capacity(len(buf)):
        raise ValueError(f"{count} entries do not fit a block of {len(buf)} bytes")
    for i in range(count):
        key, child = _BNODE_ENTRY.unpack_from(buf, HEADER_SIZE + i * _BNODE_ENTRY.size)
        keys.append(key)
        children.append(child)
    return keys, children


# ---------------------------------------------------------------------------------------------------------------
# Inode records (values in the inode table)

# Inode times are signed nanoseconds in 64 bits. As the kernel clamps a time to its superblock's s_time_min and
# s_time_max (timestamp_truncate), a time outside the whole seconds this holds is stored as the nearest one of them,
# with no fraction: 1677-09-21 00:12:44 UTC to 2262-04-11 23:47:16 UTC.
TIME_MIN_SEC = -((1 << 63) // 1_000_000_000)  # -9223372036
TIME_MAX_SEC = ((1 << 63) - 1) // 1_000_000_000  # 9223372036
ID_MAX = (1 << 32) - 1  # uid and gid are 32 bits


def clamp_time(ns: int) -> int:
    """A time in nanoseconds as an inode keeps it: clamped to [TIME_MIN_SEC, TIME_MAX_SEC] seconds, the fraction
    dropped at either end (the kernel's timestamp_truncate)."""
    sec = ns // 1_000_000_000
    if sec >= TIME_MAX_SEC:
        return TIME_MAX_SEC * 1_000_000_000
    if sec <= TIME_MIN_SEC:
        return TIME_MIN_SEC * 1_000_000_000
    return ns


_INODE = struct.Struct("<IIIIQQqqqQQQIH")
INODE_FIXED = _INODE.size
_XATTR = struct.Struct("<BH")


@dataclass
class InodeRecord:
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    dtree_root: int = 0  # root block of the extent tree, 0 when the file has no blocks
    blocks: int = 0  # data blocks mapped by the extent tree
    parent: int = 0  # directories: the directory holding this one
    flags: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    def pack(self) -> bytes:
        parts = [_INODE.pack(self.mode, self.uid, self.gid, self.nlink, self.size, self.rdev, self.atime_ns,
                             self.mtime_ns, self.ctime_ns, self.dtree_root, self.blocks, self.parent, self.flags,
                             len(self.xattrs))]
        for name in sorted(self.xattrs):
            value = self.xattrs[name]
            parts.append(_XATTR.pack(len(name), len(value)))
            parts.append(name)
            parts.append(value)
        return b"".join(parts)

    @classmethod
    def unpack(cls, buf: bytes) -> InodeRecord:
        """Decode a record; ValueError when its lengths do not fit its bytes."""
        if len(buf) < INODE_FIXED:
            raise ValueError(f"inode record of {len(buf)} bytes")
        (mode, uid, gid, nlink, size, rdev, atime, mtime, ctime, root, blocks, parent, flags,
         nx) = _INODE.unpack_from(buf, 0)
        at = INODE_FIXED
        xattrs = {}
        for _ in range(nx):
            if at + _XATTR.size > len(buf):
                raise ValueError(f"inode record of {len(buf)} bytes cut short in its extended attributes")
            nlen, vlen = _XATTR.unpack_from(buf, at)
            at += _XATTR.size
            name = bytes(buf[at: at + nlen])
            at += nlen
            xattrs[name] = bytes(buf[at: at + vlen])
            at += vlen
        if at != len(buf):
            raise ValueError(f"inode record has {len(buf) - at} trailing bytes")
        return cls(mode, uid, gid, nlink, size, rdev, atime, mtime, ctime, root, blocks, parent, flags, xattrs)


def xattr_cost(name: bytes, value: bytes) -> int:
    return _XATTR.size + len(name) + len(value)


# ---------------------------------------------------------------------------------------------------------------
# Extent records (values in an extent tree; key = first logical block)

_EXTENT = struct.Struct("<QI")


def pack_extent(physical: int, csums: list[int]) -> bytes:
    return _EXTENT.pack(physical, len(csums)) + struct.pack(f"<{len(csums)}Q", *csums)


def unpack_extent(buf: bytes) -> tuple[int, list[int]]:
    physical, count = extent_head(buf)
    return physical, list(struct.unpack_from(f"<{count}Q", buf, _EXTENT.size))


def extent_head(buf: bytes) -> tuple[int, int]:
    """(physical, blocks) of an extent record, without unpacking its checksums."""
    if len(buf) < _EXTENT.size:
        raise ValueError(f"extent record of {len(buf)} bytes")
    physical, count = _EXTENT.unpack_from(buf, 0)
    if len(buf) != _EXTENT.size + 8 * count or count == 0:
        raise ValueError(f"extent record of {len(buf)} bytes for {count} blocks")
    return physical, count


def slice_extent(buf: bytes, start: int, count: int) -> bytes:
    """The record of blocks [start, start + count) of the extent record ``buf`` (its checksums are not unpacked)."""
    physical, _ = extent_head(buf)
    at = _EXTENT.size + 8 * start
    return _EXTENT.pack(physical + start, count) + buf[at: at + 8 * count]


def extend_extent(buf: bytes, csums: list[int]) -> bytes:
    """The extent record ``buf`` grown by blocks with ``csums`` (contiguous on disk after its last block)."""
    physical, count = extent_head(buf)
    return (_EXTENT.pack(physical, count + len(csums)) + buf[_EXTENT.size:]
            + struct.pack(f"<{len(csums)}Q", *csums))


def max_extent_blocks(blocksize: int) -> int:
    """Longest extent: at least two extents must fit in one leaf."""
    room = leaf_capacity(blocksize) // 2 - _LEAF_ENTRY.size - _EXTENT.size
    return max(1, min(1024, room // 8))


def max_inode_record(blocksize: int) -> int:
    """Largest inode record (with its xattrs): at least two must fit in one leaf."""
    return leaf_capacity(blocksize) // 2 - _LEAF_ENTRY.size


# ---------------------------------------------------------------------------------------------------------------
# Directory entries (in the data blocks of a directory; ext2 style)

DIRENT = struct.Struct("<QHBB")  # inum, rec_len, name_len, type
DIRENT_HEADER = DIRENT.size
DT_UNKNOWN, DT_REG, DT_DIR, DT_CHR, DT_BLK, DT_FIFO, DT_SOCK, DT_LNK = 0, 1, 2, 3, 4, 5, 6, 7


def rec_len(name_len: int) -> int:
    return (DIRENT_HEADER + name_len + 7) & ~7


def encode_rec_len(length: int) -> int:
    return 0xFFFF if length == 65536 else length


def decode_rec_len(raw: int) -> int:
    return 65536 if raw == 0xFFFF else raw
