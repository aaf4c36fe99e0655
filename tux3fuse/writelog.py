"""The write log: every write the device issues and every flush barrier, in order (for crash testing).

Guarantee: replaying a prefix of the log onto a copy of the image the volume was opened on reproduces exactly
what the image held after those writes, and the flush records mark which writes a disk must have made durable
(everything before a flush). Like dm-log-writes, it lets a test build the image as it would be after a crash at
any point, including reorderings and tears of the writes not yet flushed.

File format: the 8 bytes ``T3WLOG01``, then records: kind (1 byte: ``W`` write, ``F`` flush), then for a write
the byte offset (8, little-endian), the length (4) and the data.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

MAGIC = b"T3WLOG01"
_WRITE = struct.Struct("<QI")


class WriteLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - lives as long as the device
        self.file.write(MAGIC)
        self.lock = threading.Lock()
        self.writes = 0
        self.flushes = 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            self.file.write(b"W" + _WRITE.pack(offset, len(data)))
            self.file.write(data)
            self.writes += 1

    def flush(self) -> None:
        with self.lock:
            self.file.write(b"F")
            self.file.flush()
            self.flushes += 1

    def close(self) -> None:
        with self.lock:
            if not self.file.closed:
                self.file.close()


def read_log(path: str) -> Iterator[tuple[str, int, bytes]]:
    """(kind, offset, data) of every record: ("W", offset, data) or ("F", 0, b"")."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not a tux3fuse write log")
        while kind := f.read(1):
            if kind == b"F":
                yield "F", 0, b""
            elif kind == b"W":
                offset, length = _WRITE.unpack(f.read(_WRITE.size))
                data = f.read(length)
                if len(data) != length:
                    return  # a log cut short by a crash of the logger itself
                yield "W", offset, data
            else:
                raise ValueError(f"{path}: bad record kind {kind!r}")
