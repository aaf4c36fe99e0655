"""mkfs.tux3: making a tux3fuse volume from the on-disk format alone.

This package writes a volume with ``tux3fuse.format`` (and ``tux3fuse.units`` for the sizes in its messages, and
``tux3fuse.backing`` to reach an NBD export, the one way to the bytes of a volume that is not a file) and nothing
else of tux3fuse: the format does not depend on the mount daemon, and the daemon never imports this package.
``mkfs`` is the library call; ``mkfs.command`` is the ``mkfs.tux3`` command.

Guarantees:
- Every argument and the target are checked before a byte is written: the block size, the label, the size (from
  ``min_blocks`` to ``MAX_BLOCKS`` blocks, within the process's file size limit), and the target (a regular file
  or block device or an NBD export, not in use by a mount or fsck, holding no known filesystem signature unless
  forced). A refused mkfs leaves the target as it was: an existing file keeps its size and content, a new name is
  not created, a block device or an NBD export is never resized (a volume on an export takes the export's size,
  or the size asked for when the export holds at least that much).
- A mkfs that fails once it has started (the host file system cannot hold a file that large, is full, an I/O
  error) removes the file it created; an existing file changes only when all its checks passed.
- The volume it leaves is the one two unifies leave after the root directory was created, and passes fsck with
  both superblock copies valid: delta 1 wrote the inode-table leaf holding the root directory (block
  ``reserved_blocks + 2 * bitmap_blocks``, the first block past the bitmap regions), bitmap region 1 and
  superblock copy 1; delta 2 wrote bitmap region 0 and superblock copy 0, which a mount loads. Both regions mark
  the reserved blocks, both regions and the leaf used; the volume is clean, with one inode and ``next_inum`` 2.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import time
import uuid

from tux3fuse import format as fmt
from tux3fuse.backing import Backing, InUse, as_backing, is_uri, open_backing
from tux3fuse.units import human

# (byte offset, signature, name) of filesystems mkfs refuses to overwrite without -f
SIGNATURES = [
    (fmt.SUPER_OFFSETS[0], fmt.MAGIC, "tux3fuse"), (fmt.SUPER_OFFSETS[1], fmt.MAGIC, "tux3fuse"),
    (1080, b"\x53\xef", "ext2/3/4"), (0, b"XFSB", "xfs"), (65600, b"_BHRfS_M", "btrfs"),
    (4086, b"SWAPSPACE2", "swap"), (0, b"LUKS\xba\xbe", "LUKS"), (32769, b"CD001", "iso9660"),
    (82, b"FAT32", "vfat"), (54, b"FAT1", "vfat"), (0, b"\x85\x19\x01\x20", "tux3"), (3, b"NTFS    ", "ntfs"),
]
MIN_BLOCKS, MIN_BYTES = fmt.MIN_VOLBLOCKS, fmt.MIN_VOLBYTES  # the smallest volume the format allows
MAX_BLOCKS = fmt.MAX_VOLBLOCKS  # the largest (the allocator keeps one bit per block in memory: 512 MiB here)
LABEL_BYTES = 32
ROOT_MODE = stat.S_IFDIR | 0o755


class MkfsError(Exception):
    """mkfs refused its arguments or its target, or could not write the volume; the message is one line for a
    user."""


def image_size(fd: int) -> int:
    """Size in bytes of an open image file or block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def blocksize_problem(blocksize: int) -> str | None:
    if blocksize & (blocksize - 1) or not 1 << fmt.MIN_BLOCKBITS <= blocksize <= 1 << fmt.MAX_BLOCKBITS:
        return (f"block size {blocksize} is not a power of two from {1 << fmt.MIN_BLOCKBITS} "
                f"to {1 << fmt.MAX_BLOCKBITS}")
    return None


def min_blocks(blocksize: int) -> int:
    """The fewest blocks a volume of ``blocksize`` can have (``format.min_volblocks``: MIN_BLOCKS, MIN_BYTES, and
    room for the reserved blocks, both bitmap regions and a little more)."""
    return fmt.min_volblocks(blocksize)


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


def signature(target: int | Backing) -> str | None:
    """The name of a filesystem found on the image (an open file descriptor, or a backing), if any."""
    backing = as_backing(target)
    for offset, magic, name in SIGNATURES:
        if backing.pread(len(magic), offset) == magic:
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
    bytes the volume will have). Raises MkfsError, leaving the target as it was."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # a fifo must not block the check
    except OSError as e:
        raise MkfsError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise MkfsError(f"{path} is neither a regular file nor a block device")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MkfsError(f"{path} is in use (mounted, or being checked)") from None
        if not force:
            found = signature(fd)
            if found:
                raise MkfsError(f"{path} holds a {found} filesystem; use -f to overwrite it")
        have = image_size(fd)
        if stat.S_ISBLK(st.st_mode) and size is not None and size > have:
            raise MkfsError(f"{path} holds {human(have)} ({have} bytes), less than the {human(size)} asked for")
        return fd, st, have if size is None else size
    except BaseException:
        os.close(fd)
        raise


def _check_file_limit(path: str, size: int) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and size > soft:
        raise MkfsError(f"{path}: {human(size)} is more than this process may write to a file "
                          f"(ulimit -f: {human(soft)}, {soft} bytes)")


def _resize(fd: int, path: str, size: int) -> None:
    """Give the image file ``size`` bytes; on failure it keeps the size it had."""
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno != errno.EFBIG:
            raise MkfsError(f"cannot make {path} {human(size)}: {e.strerror}") from None
        limit = host_file_limit(os.path.dirname(os.path.abspath(path)))
        if limit is None:
            raise MkfsError(f"{path}: the file system it is on cannot hold a file of {human(size)}") from None
        raise MkfsError(f"{path}: the file system it is on holds files of at most {human(limit)} ({limit} "
                          f"bytes), less than {human(size)}") from None


def mkfs(path: str, blocksize: int = 4096, size: int | None = None, label: str = "", force: bool = False,
         uid: int | None = None, gid: int | None = None) -> fmt.Super:
    """Create a volume on ``path`` (created sparse when ``size`` is given) whose root directory belongs to
    ``uid``:``gid`` (default: this process's). Returns superblock copy 0, the copy a mount loads. Raises MkfsError
    on bad input before anything is written, and on a failed write after removing the file it created. The image
    lock that mounts and fsck take is held from the checks to the end."""
    problem = blocksize_problem(blocksize)
    if problem:
        raise MkfsError(problem)
    label_bytes = os.fsencode(label)
    if len(label_bytes) > LABEL_BYTES:
        raise MkfsError(f"label is longer than {LABEL_BYTES} bytes")
    if size is not None:
        problem = size_problem(size, blocksize)
        if problem:
            raise MkfsError(f"{path}: {problem}")
    if is_uri(path):
        return _mkfs_export(path, blocksize, size, label_bytes, force, uid, gid)
    check_fd = -1
    created: list[os.stat_result] = []  # the file this call made, removed if it fails
    try:
        if os.path.lexists(path):
            check_fd, st, total = _check_target(path, size, force)
            problem = size_problem(total, blocksize)
            if problem:
                raise MkfsError(f"{path}: {problem}")
            if stat.S_ISREG(st.st_mode) and total > st.st_size:
                _check_file_limit(path, total)
        elif size is None:
            raise MkfsError(f"{path} does not exist; give its size")
        else:
            st, total = None, size
            _check_file_limit(path, total)
        # every check passed: from here on the target changes
        fd = _open_for_writing(path, st, created)
        try:
            if size is not None and (st is None or stat.S_ISREG(st.st_mode)):
                _resize(fd, path, size)
            return _write_volume(fd, path, blocksize, total, label_bytes, os.getuid() if uid is None else uid,
                                 os.getgid() if gid is None else gid)
        finally:
            os.close(fd)
    except BaseException:
        if created and _same_file(path, created[0]):
            os.unlink(path)
        raise
    finally:
        if check_fd >= 0:
            os.close(check_fd)


def _mkfs_export(uri: str, blocksize: int, size: int | None, label: bytes, force: bool, uid: int | None,
                 gid: int | None) -> fmt.Super:
    """mkfs on the NBD export ``uri``: the same checks as for a block device, under the lock that stands for the
    export on this machine (``tux3fuse/backing.py``)."""
    try:
        backing = open_backing(uri)
    except OSError as e:
        raise MkfsError(e.strerror) from None
    try:
        try:
            backing.lock(exclusive=True)
        except InUse:
            raise MkfsError(f"{uri} is in use (mounted, or being checked)") from None
        try:
            have = backing.size()
            if not force:
                found = signature(backing)
                if found:
                    raise MkfsError(f"{uri} holds a {found} filesystem; use -f to overwrite it")
        except OSError as e:
            raise MkfsError(e.strerror) from None
        if size is not None and size > have:
            raise MkfsError(f"{uri} holds {human(have)} ({have} bytes), less than the {human(size)} asked for")
        total = have if size is None else size
        problem = size_problem(total, blocksize)
        if problem:
            raise MkfsError(f"{uri}: {problem}")
        return _write_volume(backing, uri, blocksize, total, label, os.getuid() if uid is None else uid,
                             os.getgid() if gid is None else gid)
    finally:
        backing.close()


def _open_for_writing(path: str, checked: os.stat_result | None, created: list[os.stat_result]) -> int:
    """The checked target opened for writing (the same file, not one put in its place), or a new file made
    exclusively when there was none (appended to ``created``)."""
    try:
        if checked is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created.append(os.fstat(fd))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise MkfsError(f"{path} is in use (mounted, or being checked)") from None
            return fd
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        raise MkfsError(f"cannot {'create' if checked is None else 'open'} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        os.close(fd)
        raise MkfsError(f"{path} was replaced while it was being checked")
    return fd


def root_record(uid: int, gid: int, now_ns: int) -> fmt.InodeRecord:
    """The root directory of a new volume: mode 0755, owned by ``uid``:``gid``, empty with two links as every
    empty directory has, its own parent, every time ``now_ns``."""
    return fmt.InodeRecord(mode=ROOT_MODE, uid=uid, gid=gid, nlink=2, atime_ns=now_ns, mtime_ns=now_ns,
                           ctime_ns=now_ns, parent=fmt.ROOT_INO)


def bitmap_images(volblocks: int, used: int, bits_per_block: int, nbitmap: int) -> list[bytes]:
    """The bits of each bitmap block of a volume whose first ``used`` blocks are used and the rest free: bit b of
    byte n is block 8n + b; the bits of the last byte past the end of the volume read as used, the bytes past it
    are zero."""
    nbytes = -(-volblocks // 8)
    bits = bytearray(b"\xff" * (used >> 3))
    if used & 7:
        bits.append((1 << (used & 7)) - 1)
    bits.extend(bytes(nbytes - len(bits)))
    if volblocks & 7:
        bits[-1] |= 0xFF & ~((1 << (volblocks & 7)) - 1)
    per_block = bits_per_block // 8
    return [bytes(bits[i * per_block: (i + 1) * per_block]).ljust(per_block, b"\0") for i in range(nbitmap)]


def layout(blocksize: int, volblocks: int, label: bytes, uid: int, gid: int, now_ns: int,
           volume_uuid: bytes) -> tuple[dict[int, bytes], list[fmt.Super]]:
    """The blocks of a new volume ({block number: bytes}) and its two superblock copies (copy 0, copy 1), as
    described in the module docstring. Pure: no I/O."""
    bpb = fmt.bitmap_bits_per_block(blocksize)
    nbitmap = fmt.bitmap_blocks_for(blocksize, volblocks)
    reserved = fmt.reserved_blocks(blocksize)
    regions = (reserved, reserved + nbitmap)
    leaf = reserved + 2 * nbitmap
    used = leaf + 1
    blocks: dict[int, bytes] = {
        leaf: bytes(fmt.pack_leaf(blocksize, fmt.KIND_ILEAF, [fmt.ROOT_INO], [root_record(uid, gid, now_ns).pack()],
                                  leaf, 1)),
    }
    for i, image in enumerate(bitmap_images(volblocks, used, bpb, nbitmap)):
        for region, delta in ((0, 2), (1, 1)):
            block = regions[region] + i
            buf = bytearray(blocksize)
            buf[fmt.HEADER_SIZE:] = image
            blocks[block] = bytes(fmt.seal(buf, fmt.KIND_BITMAP, 0, 0, block, delta))
    supers = []
    for copy, seq in ((0, 2), (1, 1)):
        supers.append(fmt.Super(
            blockbits=blocksize.bit_length() - 1, volblocks=volblocks, seq=seq, itree_root=leaf, unify_seq=seq,
            bitmap_start=regions, bitmap_blocks=nbitmap, bitmap_cur=copy, state=fmt.STATE_CLEAN,
            free_blocks=volblocks - used, used_inodes=1, next_inum=fmt.ROOT_INO + 1, label=label,
            uuid=volume_uuid, created_ns=now_ns, copy=copy))
    return blocks, supers


def _write_volume(target: int | Backing, path: str, blocksize: int, total: int, label: bytes, uid: int, gid: int
                  ) -> fmt.Super:
    """Write the new volume on the open image (a file descriptor or a backing): wipe the reserved blocks (and a
    btrfs signature further in), then the leaf and both bitmap regions, then both superblock copies, then fsync
    (an NBD flush). Returns copy 0."""
    now = time.time_ns()
    blocks, supers = layout(blocksize, total // blocksize, label, uid, gid, now, uuid.uuid4().bytes)
    out = as_backing(target, path)
    try:
        out.pwrite(bytes(fmt.reserved_blocks(blocksize) * blocksize), 0)  # old signatures and superblocks
        if total > 65600 + 8:
            out.pwrite(bytes(8), 65600)
        for block in sorted(blocks):
            out.pwrite(blocks[block], block * blocksize)
        for sb in supers:
            out.pwrite(sb.pack(), fmt.SUPER_OFFSETS[sb.copy])
        out.sync()
    except OSError as e:
        message = e.strerror if is_uri(path) else f"cannot write {path}: {e.strerror}"
        raise MkfsError(message) from None
    return supers[0]
