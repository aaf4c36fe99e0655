"""Making a volume: lay out the superblocks and bitmap regions, then create the root directory.

Guarantees:
- Every argument and the target are checked before a byte is written: the block size, the label, the size (from
  ``min_blocks`` to ``MAX_BLOCKS`` blocks, within the process's file size limit), and the target (a regular file
  or block device, not in use by a mount or fsck, holding no known filesystem signature unless forced). A
  refused mkfs leaves the target as it was: an existing file keeps its size and content, a new name is not
  created, a block device is never resized.
- A mkfs that fails once it has started (the host file system cannot hold a file that large, is full, an I/O
  error) removes the file it created; an existing file changes only when all its checks passed.
- The volume it leaves passes fsck with both superblock copies valid.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import stat
import time
import uuid
from fractions import Fraction

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
MIN_BYTES = 64 << 10  # and at least this many bytes
# the allocator keeps one bit per block in memory (512 MiB at this size) and fsck walks every block
MAX_BLOCKS = 1 << 32
LABEL_BYTES = 32
UNITS = "KMGTPE"
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGTPE])(?:I?B)?|B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '2G', '1T', '4096', '64k', '1GiB', '1.5K' -> bytes. Raises ValueError on anything else: a sign,
    nan, inf, an exponent, or a fraction of a byte."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    value = Fraction(m[1]) * (1 << 10 * (UNITS.index(m[2].upper()) + 1) if m[2] else 1)
    if value.denominator != 1:
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def human(n: int) -> str:
    """Bytes as a person reads them: '256 KiB', '16 TiB', '1.5 GiB', '15.99 TiB' (rounded down when not exact:
    never more than ``n``), '512 bytes'."""
    for i in reversed(range(len(UNITS))):
        unit = 1 << 10 * (i + 1)
        if n >= unit:
            hundredths = n * 100 // unit
            text = f"{hundredths // 100}.{hundredths % 100:02d}".rstrip("0").rstrip(".")
            return f"{text} {UNITS[i]}iB"
    return f"{n} bytes"


def blocksize_problem(blocksize: int) -> str | None:
    if blocksize & (blocksize - 1) or not 1 << fmt.MIN_BLOCKBITS <= blocksize <= 1 << fmt.MAX_BLOCKBITS:
        return (f"block size {blocksize} is not a power of two from {1 << fmt.MIN_BLOCKBITS} "
                f"to {1 << fmt.MAX_BLOCKBITS}")
    return None


def min_blocks(blocksize: int) -> int:
    """The fewest blocks a volume of ``blocksize`` can have: MIN_BLOCKS, MIN_BYTES, and room for the reserved
    blocks, both bitmap regions and a little more."""
    reserved, bpb = fmt.reserved_blocks(blocksize), fmt.bitmap_bits_per_block(blocksize)
    n = max(MIN_BLOCKS, -(-MIN_BYTES // blocksize))
    while reserved + 2 * -(-n // bpb) + 16 > n:
        n += 1
    return n


def size_range(blocksize: int) -> str:
    """The sizes a volume of ``blocksize`` can have, in words."""
    lo = min_blocks(blocksize)
    return f"{human(lo * blocksize)} ({lo} blocks) to {human(MAX_BLOCKS * blocksize)} ({MAX_BLOCKS} blocks)"


def size_problem(size: int, blocksize: int) -> str | None:
    """Why a volume of ``size`` bytes in blocks of ``blocksize`` cannot be made, or None."""
    blocks, lo = size // blocksize, min_blocks(blocksize)
    if blocks < lo:
        return (f"{human(size)} is too small: a volume of {blocksize}-byte blocks needs at least {lo} blocks "
                f"({human(lo * blocksize)})")
    if blocks > MAX_BLOCKS:
        return (f"{human(size)} is too large: a volume of {blocksize}-byte blocks holds at most {MAX_BLOCKS} "
                f"blocks ({human(MAX_BLOCKS * blocksize)})")
    return None


def host_file_limit(directory: str) -> int | None:
    """The largest file the file system holding ``directory`` allows, found on an unnamed temporary file (sized,
    never written); None when that cannot be told."""
    try:
        fd = os.open(directory or ".", os.O_TMPFILE | os.O_RDWR, 0o600)
    except (OSError, AttributeError):
        return None
    try:
        lo, hi = 0, (1 << 63) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                os.ftruncate(fd, mid)
                lo = mid
            except OSError:
                hi = mid - 1
        return lo
    finally:
        os.close(fd)


def signature(fd: int) -> str | None:
    """The name of a filesystem found on the image, if any."""
    for offset, magic, name in SIGNATURES:
        if os.pread(fd, len(magic), offset) == magic:
            return name
    return None


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _check_target(path: str, size: int | None, force: bool) -> tuple[int, os.stat_result, int]:
    """Open an existing target without writing and check it: (read-only fd holding the image lock, its stat, the
    bytes the volume will have). Raises VolumeError, leaving the target as it was."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # a fifo must not block the check
    except OSError as e:
        raise VolumeError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise VolumeError(f"{path} is neither a regular file nor a block device")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise VolumeError(f"{path} is in use (mounted, or being checked)") from None
        if not force:
            found = signature(fd)
            if found:
                raise VolumeError(f"{path} holds a {found} filesystem; use -f to overwrite it")
        have = image_size(fd)
        if stat.S_ISBLK(st.st_mode) and size is not None and size > have:
            raise VolumeError(f"{path} holds {human(have)} ({have} bytes), less than the {human(size)} asked for")
        return fd, st, have if size is None else size
    except BaseException:
        os.close(fd)
        raise


def _check_file_limit(path: str, size: int) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size > soft:
        raise VolumeError(f"{path}: {human(size)} is more than this process may write to a file "
                          f"(ulimit -f: {human(soft)}, {soft} bytes)")


def _resize(fd: int, path: str, size: int) -> None:
    """Give the image file ``size`` bytes; on failure it keeps the size it had."""
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno != errno.EFBIG:
            raise VolumeError(f"cannot make {path} {human(size)}: {e.strerror}") from None
        limit = host_file_limit(os.path.dirname(os.path.abspath(path)))
        if limit is None:
            raise VolumeError(f"{path}: the file system it is on cannot hold a file of {human(size)}") from None
        raise VolumeError(f"{path}: the file system it is on holds files of at most {human(limit)} ({limit} "
                          f"bytes), less than {human(size)}") from None


def mkfs(path: str, blocksize: int = 4096, size: int | None = None, label: str = "", force: bool = False,
         uid: int | None = None, gid: int | None = None) -> fmt.Super:
    """Create a volume on ``path`` (created sparse when ``size`` is given). Raises VolumeError on bad input,
    before anything is written."""
    problem = blocksize_problem(blocksize)
    if problem:
        raise VolumeError(problem)
    label_bytes = os.fsencode(label)
    if len(label_bytes) > LABEL_BYTES:
        raise VolumeError(f"label is longer than {LABEL_BYTES} bytes")
    if size is not None:
        problem = size_problem(size, blocksize)
        if problem:
            raise VolumeError(f"{path}: {problem}")
    check_fd = -1
    created: list[os.stat_result] = []  # the file this call made, removed if it fails
    try:
        if os.path.lexists(path):
            check_fd, st, total = _check_target(path, size, force)
            problem = size_problem(total, blocksize)
            if problem:
                raise VolumeError(f"{path}: {problem}")
            if stat.S_ISREG(st.st_mode) and total > st.st_size:
                _check_file_limit(path, total)
        elif size is None:
            raise VolumeError(f"{path} does not exist; give its size")
        else:
            st, total = None, size
            _check_file_limit(path, total)
        # every check passed: from here on the target changes
        fd = _open_for_writing(path, st, created)
        try:
            if size is not None and (st is None or stat.S_ISREG(st.st_mode)):
                _resize(fd, path, size)
            _write_volume(fd, path, blocksize, total, label_bytes)
        finally:
            os.close(fd)
        if check_fd >= 0:
            os.close(check_fd)  # the image lock: the volume below takes its own
            check_fd = -1
        vol = Volume(path, Options())
        try:
            vol.make_root(os.getuid() if uid is None else uid, os.getgid() if gid is None else gid)
        finally:
            vol.close_files()
        return vol.sb
    except BaseException:
        if created and _same_file(path, created[0]):
            os.unlink(path)
        raise
    finally:
        if check_fd >= 0:
            os.close(check_fd)


def _open_for_writing(path: str, checked: os.stat_result | None, created: list[os.stat_result]) -> int:
    """The checked target opened for writing (the same file, not one put in its place), or a new file made
    exclusively when there was none (appended to ``created``)."""
    try:
        if checked is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created.append(os.fstat(fd))
            return fd
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        raise VolumeError(f"cannot {'create' if checked is None else 'open'} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise VolumeError(f"{path} was replaced while it was being checked")
    return fd


def _write_volume(fd: int, path: str, blocksize: int, total: int, label: bytes) -> None:
    """Lay out the reserved blocks, both bitmap regions and both superblock copies on the open image."""
    volblocks = total // blocksize
    try:
        bpb = fmt.bitmap_bits_per_block(blocksize)
        nbitmap = -(-volblocks // bpb)
        reserved = fmt.reserved_blocks(blocksize)
        alloc = Allocator(volblocks, bpb)
        alloc.mark_used(0, reserved + 2 * nbitmap)
        alloc.recount()
        sb = fmt.Super(blockbits=blocksize.bit_length() - 1, volblocks=volblocks,
                       bitmap_start=(reserved, reserved + nbitmap),
                       bitmap_blocks=nbitmap, free_blocks=alloc.free, used_inodes=0, label=label,
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
    except OSError as e:
        raise VolumeError(f"cannot write {path}: {e.strerror}") from None



