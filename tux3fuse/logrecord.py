"""Log records: what the deltas since the last unify changed, as records replayed at mount (docs/FORMAT.md §9).

Guarantees: a log block that leaves this module is sealed as every metadata block is (``format.seal``: its own
number, an xxh3-64 checksum); unpacking never trusts a count or a length: one that does not fit the bytes given
raises ``ValueError`` (never ``struct.error`` or ``IndexError``), and nothing is allocated in proportion to a number
before it is checked against the bytes that hold it. Nothing here does I/O.
"""

from __future__ import annotations

import struct

from .format import HEADER_SIZE, KIND_LOG, seal

_LOG_HEAD = struct.Struct("<QI")  # previous log block, bytes of records
LOG_UNIT = 4096  # the log limit (Options.unify_log_blocks) counts 4 KiB: the replay time follows the bytes
LOG_ALLOC, LOG_FREE = 1, 2  # code, first block (u64), blocks (u32)
LOG_INODE = 3  # code, inode (u64), length (u16), inode record
LOG_MAP = 4  # code, inode (u64), logical block (u64), physical block (u64), blocks (u16), xxh3 per block
LOG_UNMAP = 5  # code, inode (u64), first logical block (u64): unmap from there to the end of the file
LOG_DESTROY = 6  # code, inode (u64): the inode, its extents and its orphan entry are gone
LOG_ORPHAN = 7  # code, inode (u64): the inode has no name left and is open or referenced
_LOG_RANGE = struct.Struct("<BQI")
_LOG_INODE = struct.Struct("<BQH")
_LOG_MAP = struct.Struct("<BQQQH")
_LOG_UNMAP = struct.Struct("<BQQ")
_LOG_INO = struct.Struct("<BQ")
LOG_CODES = (LOG_ALLOC, LOG_FREE, LOG_INODE, LOG_MAP, LOG_UNMAP, LOG_DESTROY, LOG_ORPHAN)

LogRecord = tuple  # (code, ...fields) as listed beside each code


def log_room(blocksize: int) -> int:
    """Bytes of records one log block holds."""
    return blocksize - HEADER_SIZE - _LOG_HEAD.size


def log_capacity(blocksize: int) -> int:
    """Allocation records one log block holds."""
    return log_room(blocksize) // _LOG_RANGE.size


def log_map_blocks(blocksize: int) -> int:
    """Most blocks one LOG_MAP record may carry (it must fit a log block)."""
    return min(0xFFFF, (log_room(blocksize) - _LOG_MAP.size) // 8)


def log_record_size(rec: LogRecord) -> int:
    code = rec[0]
    if code in (LOG_ALLOC, LOG_FREE):
        return _LOG_RANGE.size
    if code == LOG_INODE:
        return _LOG_INODE.size + len(rec[2])
    if code == LOG_MAP:
        return _LOG_MAP.size + 8 * len(rec[4])
    if code == LOG_UNMAP:
        return _LOG_UNMAP.size
    return _LOG_INO.size


def pack_log_records(records: list[LogRecord]) -> bytes:
    """The bytes of log records, in order (the body of a log block, or part of it)."""
    parts = []
    for rec in records:
        code = rec[0]
        if code in (LOG_ALLOC, LOG_FREE):
            parts.append(_LOG_RANGE.pack(*rec))
        elif code == LOG_INODE:
            parts.append(_LOG_INODE.pack(code, rec[1], len(rec[2])))
            parts.append(rec[2])
        elif code == LOG_MAP:
            csums = rec[4]
            parts.append(_LOG_MAP.pack(code, rec[1], rec[2], rec[3], len(csums)))
            parts.append(struct.pack(f"<{len(csums)}Q", *csums))
        elif code == LOG_UNMAP:
            parts.append(_LOG_UNMAP.pack(*rec))
        else:
            parts.append(_LOG_INO.pack(*rec))
    return b"".join(parts)


def seal_log(blocksize: int, prev: int, body: bytes, count: int, blocknr: int, delta: int) -> bytearray:
    """A log block holding ``count`` records packed as ``body`` (``pack_log_records``), chained after ``prev``."""
    at = HEADER_SIZE + _LOG_HEAD.size
    if at + len(body) > blocksize:
        raise ValueError(f"{len(body)} bytes of log records do not fit a block of {blocksize}")
    buf = bytearray(blocksize)
    buf[at: at + len(body)] = body
    _LOG_HEAD.pack_into(buf, HEADER_SIZE, prev, len(body))
    return seal(buf, KIND_LOG, 0, count, blocknr, delta)


def pack_log(blocksize: int, prev: int, records: list[LogRecord], blocknr: int, delta: int) -> bytearray:
    return seal_log(blocksize, prev, pack_log_records(records), len(records), blocknr, delta)


def unpack_log(buf: bytes | bytearray, count: int) -> tuple[int, list[LogRecord]]:
    prev, nbytes = _LOG_HEAD.unpack_from(buf, HEADER_SIZE)
    at = HEADER_SIZE + _LOG_HEAD.size
    end = at + nbytes
    if end > len(buf):
        raise ValueError(f"log records run {nbytes} bytes, past the end of the block")
    try:
        records = _unpack_records(buf, at, end, count)
    except struct.error as e:
        raise ValueError(f"log record cut short: {e}") from None
    return prev, records


def _unpack_records(buf: bytes | bytearray, at: int, end: int, count: int) -> list[LogRecord]:
    records: list[LogRecord] = []
    for _ in range(count):
        if at >= end:
            raise ValueError("log record count and length disagree")
        code = buf[at]
        if code in (LOG_ALLOC, LOG_FREE):
            rec: LogRecord = _LOG_RANGE.unpack_from(buf, at)
        elif code == LOG_INODE:
            _, ino, n = _LOG_INODE.unpack_from(buf, at)
            if at + _LOG_INODE.size + n > end:
                raise ValueError(f"log inode record of {n} bytes runs past the records")
            rec = (code, ino, bytes(buf[at + _LOG_INODE.size: at + _LOG_INODE.size + n]))
        elif code == LOG_MAP:
            _, ino, logical, physical, n = _LOG_MAP.unpack_from(buf, at)
            if n == 0:
                raise ValueError(f"log map record of inode {ino} maps no block")
            rec = (code, ino, logical, physical, list(struct.unpack_from(f"<{n}Q", buf, at + _LOG_MAP.size)))
        elif code == LOG_UNMAP:
            rec = _LOG_UNMAP.unpack_from(buf, at)
        elif code in (LOG_DESTROY, LOG_ORPHAN):
            rec = _LOG_INO.unpack_from(buf, at)
        else:
            raise ValueError(f"unknown log record code {code}")
        at += log_record_size(rec)
        if at > end:
            raise ValueError("log record runs past the records")
        records.append(rec)
    if at != end:
        raise ValueError("log record count and length disagree")
    return records
