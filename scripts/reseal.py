"""reseal.py - a patched tux3fuse image made to pass its checksums again, so that crafted values reach the parsers.

A test or the fuzzer (``scripts/fuzz.py``) patches bytes of an image: a field of a superblock copy, a log record,
a tree entry, a directory entry. Every checksum would then refuse the block before any of its values is read, and
only the checksum code would be tested. ``reseal`` recomputes what a writer would have written, in this order:

1. metadata seals: every block whose first four bytes are one of the kinds of docs/FORMAT.md §3 gets the
   checksum of its header recomputed (its own-number field stays as patched: a block sealed for another number is
   a case worth testing);
2. data checksums (``data=True``): the xxh3-64 of every block an extent record of an extent-tree leaf or a map
   record of a log block names is written into that record, and the leaf or log block is sealed again, so that
   damaged directory blocks and symlink targets are read as what they hold;
3. the proof of each superblock copy (``delta_csum``, §10), when it is not 0: recomputed over the blocks of the
   delta the copy names, found as a mount finds them;
4. the checksum of each superblock copy that has the signature.

Guarantee: nothing read from the image is trusted. Every count is bounded by the bytes present, every walk by the
number of blocks, each block is visited at most once, and no exception escapes ``reseal`` whatever the bytes.
Helpers for tests: ``super_fields`` and ``set_super`` (superblock fields by name), ``reseal_file``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tux3fuse import format as fmt
from tux3fuse import logrecord as logrec
from tux3fuse.proof import DeltaDigest

# the fields of a superblock copy in the order of ``format._SUPER`` (docs/FORMAT.md §2)
SUPER_NAMES = ("magic", "version", "blockbits", "state", "seq", "volblocks", "itree_root", "otree_root", "log_head",
               "log_count", "bitmap_blocks", "unify_seq", "bitmap_start0", "bitmap_start1", "bitmap_cur", "zero",
               "free_blocks", "used_inodes", "next_inum", "label", "uuid", "created_ns", "delta_csum")
KINDS = tuple(fmt.KIND_NAMES)
_LOG_AT = fmt.HEADER_SIZE + 12  # first record of a log block: after the header, the previous block and the length
_MAP = struct.Struct("<BQQQH")


def super_fields(image: bytes | bytearray, copy: int) -> dict[str, int | bytes]:
    """The fields of superblock copy ``copy`` by name, read without checking anything."""
    at = fmt.SUPER_OFFSETS[copy]
    return dict(zip(SUPER_NAMES, fmt._SUPER.unpack_from(image, at), strict=True))


def set_super(image: bytearray, copies: tuple[int, ...] = (0, 1), **fields: int | bytes) -> None:
    """Overwrite fields of the superblock ``copies`` (names of ``SUPER_NAMES``); ``reseal`` makes them valid."""
    for copy in copies:
        values = super_fields(image, copy)
        unknown = set(fields) - set(values)
        if unknown:
            raise KeyError(f"no superblock field {sorted(unknown)}")
        values.update(fields)
        fmt._SUPER.pack_into(image, fmt.SUPER_OFFSETS[copy], *values.values())


def blocksize_of(image: bytes | bytearray) -> int:
    """The block size the first superblock copy with the signature names (4096 when none does, or it is absurd)."""
    for at in fmt.SUPER_OFFSETS:
        if image[at: at + 8] == fmt.MAGIC:
            bits = struct.unpack_from("<H", image, at + 12)[0]
            if fmt.MIN_BLOCKBITS <= bits <= fmt.MAX_BLOCKBITS:
                return 1 << bits
    return 4096


def _seal(image: bytearray, block: int, bs: int) -> None:
    buf = memoryview(image)[block * bs: (block + 1) * bs]
    struct.pack_into("<Q", buf, fmt.CSUM_AT, fmt._meta_csum(buf))


def _data_csums(image: bytearray, block: int, bs: int, nblocks: int) -> bool:
    """Write the checksums of the data blocks named by the extent records (a DLEF leaf) or map records (a log
    block) of ``block``; True when any changed."""
    base = block * bs
    kind, _, count, _, _, _ = fmt.HEADER.unpack_from(image, base)
    changed = False

    def fill(at: int, physical: int, n: int) -> None:
        nonlocal changed
        for j in range(n):
            b = physical + j
            if not 0 <= b < nblocks or at + 8 * (j + 1) > base + bs:
                return
            want = struct.pack("<Q", fmt.checksum(image[b * bs: (b + 1) * bs]))
            if image[at + 8 * j: at + 8 * (j + 1)] != want:
                image[at + 8 * j: at + 8 * (j + 1)] = want
                changed = True

    if kind == fmt.KIND_DLEAF:
        for i in range(min(count, (bs - fmt.HEADER_SIZE) // 12)):
            _, off, length = struct.unpack_from("<QHH", image, base + fmt.HEADER_SIZE + 12 * i)
            if length < 12 or off < fmt.HEADER_SIZE or off + length > bs:
                continue
            physical, n = struct.unpack_from("<QI", image, base + off)
            fill(base + off + 12, physical, min(n, (length - 12) // 8))
    elif kind == fmt.KIND_LOG:
        at, end = base + _LOG_AT, base + bs
        for _ in range(count):
            if at >= end:
                break
            code = image[at]
            if code in (logrec.LOG_ALLOC, logrec.LOG_FREE):
                at += 13
            elif code == logrec.LOG_INODE and at + 11 <= end:
                at += 11 + struct.unpack_from("<H", image, at + 9)[0]
            elif code == logrec.LOG_MAP and at + _MAP.size <= end:
                _, _, _, physical, n = _MAP.unpack_from(image, at)
                fill(at + _MAP.size, physical, n)
                at += _MAP.size + 8 * n
            elif code == logrec.LOG_UNMAP:
                at += 17
            elif code in (logrec.LOG_DESTROY, logrec.LOG_ORPHAN):
                at += 9
            else:
                break
    return changed


def _proof(image: bytearray, copy: int, bs: int, nblocks: int) -> int | None:
    """The ``delta_csum`` superblock copy ``copy`` should carry (None: leave it as it is), found as a mount finds
    the blocks of its delta (replay.py, ``delta_landed``), each block read once."""
    f = super_fields(image, copy)
    seq, block, left = f["seq"], f["log_head"], f["log_count"]
    used = bytearray(nblocks)  # 1: the delta holds the block
    logs: list[int] = []
    records: list[list] = []
    while block and left and 0 < block < nblocks and block not in logs:
        buf = bytes(image[block * bs: (block + 1) * bs])
        if buf[:4] != fmt.KIND_LOG or fmt.HEADER.unpack_from(buf, 0)[5] != seq:
            break
        try:
            prev, recs = logrec.unpack_log(buf, fmt.HEADER.unpack_from(buf, 0)[2])
        except Exception:  # any garbage: the proof cannot be made, leave it
            return None
        logs.append(block)
        records.append(recs)
        block, left = prev, left - 1
    if not logs:
        return None
    for recs in reversed(records):
        for rec in recs:
            if rec[0] in (logrec.LOG_ALLOC, logrec.LOG_FREE):
                lo, hi = max(rec[1], 0), min(rec[1] + rec[2], nblocks)
                if lo < hi:
                    used[lo:hi] = (b"\1" if rec[0] == logrec.LOG_ALLOC else b"\0") * (hi - lo)
    for b in logs:
        used[b] = 1
    digest = DeltaDigest()
    for b in range(nblocks):
        if used[b]:
            digest.add(b, image[b * bs: (b + 1) * bs])
    return digest.value()


def reseal(image: bytearray, blocksize: int | None = None, data: bool = True, proof: bool = True) -> bytearray:
    """Make every checksum of ``image`` (changed in place, and returned) hold again: see the module docstring."""
    bs = blocksize or blocksize_of(image)
    nblocks = len(image) // bs
    meta = [b for b in range(nblocks) if bytes(image[b * bs: b * bs + 4]) in KINDS]
    for b in meta:
        _seal(image, b, bs)
    if data:
        for b in meta:
            if _data_csums(image, b, bs, nblocks):
                _seal(image, b, bs)
    for copy, at in enumerate(fmt.SUPER_OFFSETS):
        if image[at: at + 8] != fmt.MAGIC or at + fmt.SUPER_SIZE > len(image):
            continue
        if proof and super_fields(image, copy)["delta_csum"]:
            value = _proof(image, copy, bs, nblocks)
            if value is not None:
                struct.pack_into("<Q", image, at + 176, value)
        struct.pack_into("<Q", image, at + fmt.SUPER_SIZE - 8,
                         fmt.checksum(bytes(image[at: at + fmt.SUPER_SIZE - 8])))
    return image


def reseal_file(path: str | Path, blocksize: int | None = None, data: bool = True, proof: bool = True) -> None:
    """``reseal`` of the image file ``path``, in place."""
    p = Path(path)
    p.write_bytes(reseal(bytearray(p.read_bytes()), blocksize, data, proof))
