"""Making a volume: lay out the superblocks and bitmap regions, then create the root directory.

Guarantee: mkfs never overwrites an image that holds a known filesystem signature unless forced, and the volume
it leaves passes fsck with both superblock copies valid.
"""

from __future__ import annotations

import os
import stat
import time
import uuid

from . import format as fmt
from .alloc import Allocator
from .backend.log import bitmap_block
from .device import image_size
from .fs import Options, Volume, VolumeError

# (byte offset, signature, name) of filesystems mkfs refuses to overwrite without -f
SIGNATURES = [
    (fmt.SUPER_OFFSETS[0], fmt.MAGIC, "tux3fuse"), (fmt.SUPER_OFFSETS[1], fmt.MAGIC, "tux3fuse"),
    (1080, b"\x53\xef", "ext2/3/4"), (0, b"XFSB", "xfs"), (65600, b"_BHRfS_M", "btrfs"),
    (4086, b"SWAPSPACE2", "swap"), (0, b"LUKS\xba\xbe", "LUKS"), (32769, b"CD001", "iso9660"),
    (82, b"FAT32", "vfat"), (54, b"FAT1", "vfat"), (0, b"\x85\x19\x01\x20", "tux3"), (3, b"NTFS    ", "ntfs"),
]
MIN_BLOCKS = 64


def parse_size(text: str) -> int:
    """'512M', '2G', '1T', '4096', '64k', '1GiB' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGTPE":
        mult = 1 << (10 * ("KMGTPE".index(t[-1]) + 1))
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M, G or T)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * mult)


def signature(fd: int) -> str | None:
    """The name of a filesystem found on the image, if any."""
    for offset, magic, name in SIGNATURES:
        if os.pread(fd, len(magic), offset) == magic:
            return name
    return None


def mkfs(path: str, blocksize: int = 4096, size: int | None = None, label: str = "", force: bool = False,
         uid: int | None = None, gid: int | None = None) -> fmt.Super:
    """Create a volume on ``path`` (created sparse when ``size`` is given). Raises VolumeError on bad input."""
    if blocksize & (blocksize - 1) or not 1 << fmt.MIN_BLOCKBITS <= blocksize <= 1 << fmt.MAX_BLOCKBITS:
        raise VolumeError(f"block size {blocksize} is not a power of two from 512 to 65536")
    if len(label.encode()) > 32:
        raise VolumeError("label is longer than 32 bytes")
    exists = os.path.exists(path)
    try:
        fd = os.open(path, os.O_RDWR | (0 if exists else os.O_CREAT), 0o644)
    except OSError as e:
        raise VolumeError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise VolumeError(f"{path} is neither a regular file nor a block device")
        if not force:
            found = signature(fd)
            if found:
                raise VolumeError(f"{path} holds a {found} filesystem; use -f to overwrite it")
        if size is not None:
            if stat.S_ISREG(st.st_mode):
                os.ftruncate(fd, size)
            elif size > image_size(fd):
                raise VolumeError(f"{path} is smaller than {size} bytes")
        total = image_size(fd) if size is None else size
        volblocks = total // blocksize
        if volblocks < MIN_BLOCKS or total < 64 * 1024:
            raise VolumeError(f"{path} is too small: {total} bytes (need at least 64 KiB and {MIN_BLOCKS} blocks)")
        bpb = fmt.bitmap_bits_per_block(blocksize)
        nbitmap = -(-volblocks // bpb)
        reserved = fmt.reserved_blocks(blocksize)
        if reserved + 2 * nbitmap + 16 > volblocks:
            raise VolumeError(f"{path} is too small for its own allocation bitmap")
        alloc = Allocator(volblocks, bpb)
        alloc.mark_used(0, reserved + 2 * nbitmap)
        alloc.recount()
        sb = fmt.Super(blockbits=blocksize.bit_length() - 1, volblocks=volblocks,
                       bitmap_start=(reserved, reserved + nbitmap),
                       bitmap_blocks=nbitmap, free_blocks=alloc.free, used_inodes=0, label=label.encode(),
                       uuid=uuid.uuid4().bytes, created_ns=time.time_ns(), next_inum=fmt.ROOT_INO)
        os.pwrite(fd, bytes(reserved * blocksize), 0)  # wipe old signatures and superblocks
        if volblocks * blocksize > 65600 + 8:  # and a btrfs signature further in
            os.pwrite(fd, bytes(8), 65600)
        for region in (0, 1):
            for i in range(nbitmap):
                block = sb.bitmap_start[region] + i
                os.pwrite(fd, bitmap_block(alloc, i, block, blocksize, 0), block * blocksize)
        for copy, offset in enumerate(fmt.SUPER_OFFSETS):
            sb.copy = copy
            os.pwrite(fd, sb.pack(), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    vol = Volume(path, Options())
    try:
        vol.make_root(os.getuid() if uid is None else uid, os.getgid() if gid is None else gid)
    finally:
        vol.close_files()
    return vol.sb



