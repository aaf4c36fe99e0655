"""Checks at reading (tux3fuse/validity.py, docs/FORMAT.md §13): a value read from disk that the format refuses is
a CorruptBlock naming its block, its inode and why, before anything uses it. Through the embedded API that is EIO
and a read-only volume; the rest of the volume is still served.

Each case patches one field of a volume's blocks and reseals the checksums (scripts/reseal.py), so the value
reaches the check instead of stopping at a checksum."""

from __future__ import annotations

import errno
import struct

import pytest
from conftest import load_script, opened, read_all

from mkfs import mkfs
from tux3fuse.fs import Options, Volume

reseal = load_script("reseal")
BS = 4096
INODE_FIELDS = {"mode": (0, "<I"), "nlink": (12, "<I"), "size": (16, "<Q"), "dtree_root": (56, "<Q"),
                "blocks": (64, "<Q"), "xattrs": (84, "<H")}


def volume(tmp_path) -> tuple[str, dict[bytes, int]]:
    """A clean 1 MiB volume: a directory, a file, a symlink, and a bystander file; their inode numbers."""
    path = str(tmp_path / "v.img")
    mkfs(path, BS, 1 << 20)
    vol = opened(path)
    inos = {b"d": vol.mkdir(1, b"d", 0o755).ino, b"f": vol.create(1, b"f", 0o644).ino,
            b"s": vol.symlink(1, b"s", b"f").ino, b"ok": vol.create(1, b"ok", 0o644).ino}
    vol.write(inos[b"f"], 0, b"f" * 5000)
    vol.write(inos[b"ok"], 0, b"fine")
    vol.unmount()
    return path, inos


def patch_inode(path: str, ino: int, field: str, value: int) -> int:
    """Set ``field`` of inode ``ino``'s record in the inode-table leaf that holds it and reseal; returns the leaf."""
    vol = Volume(path, Options(readonly=True))
    try:
        leaf = vol.backend.itable.leaf_block(ino)
    finally:
        vol.close_files()
    image = bytearray(open(path, "rb").read())
    base = leaf * BS
    _, _, count = struct.unpack_from("<4sHH", image, base)
    for i in range(count):
        key, off, _ = struct.unpack_from("<QHH", image, base + 32 + 12 * i)
        if key == ino:
            at, form = INODE_FIELDS[field]
            struct.pack_into(form, image, base + off + at, value)
    with open(path, "wb") as f:
        f.write(reseal.reseal(image, BS))
    return leaf


@pytest.mark.parametrize("name, field, value, said", [
    (b"d", "size", 1 << 62, f"directory size {1 << 62}: not a multiple of {BS} bytes within the volume"),
    (b"d", "size", 100, "directory size 100"),
    (b"s", "size", 5000, "symlink of 5000 bytes, longer than 4095"),
    (b"f", "size", 1 << 51, f"size {1 << 51} above {1 << 50}"),
    (b"f", "blocks", 1 << 40, f"{1 << 40} blocks in a volume of 256"),
    (b"f", "nlink", 70000, "link count 70000, more than a file may have"),
    (b"d", "nlink", (1 << 32) - 1, f"link count {(1 << 32) - 1}, more than a directory may have"),
    (b"f", "mode", 0o170644, "unknown file type in mode 170644"),
    (b"f", "dtree_root", 2, "extent tree root 2 outside the allocatable area [5, 256)"),
    (b"f", "xattrs", 9, "cut short in its extended attributes"),
])
def test_an_inode_record_the_format_refuses_is_eio_naming_its_leaf_and_inode(tmp_path, name, field, value,
                                                                              said) -> None:
    path, inos = volume(tmp_path)
    ino = inos[name]
    leaf = patch_inode(path, ino, field, value)
    vol = opened(path)
    try:
        with pytest.raises(OSError) as e:
            vol.lookup(1, name)
        assert e.value.errno == errno.EIO
        assert vol.failed.startswith(f"corrupt ileaf block {leaf}: inode {ino}: ") and said in vol.failed, vol.failed
        assert read_all(vol, b"ok") == b"fine"  # the rest is served, read-only
        with pytest.raises(OSError) as e:
            vol.create(1, b"new", 0o644)
        assert e.value.errno == errno.EROFS
    finally:
        vol.close_files()


def test_a_name_that_reaches_an_inode_without_links_is_eio_before_an_unlink_takes_its_count_below_zero(
        tmp_path) -> None:
    path, inos = volume(tmp_path)
    vol = Volume(path, Options(readonly=True))
    try:
        leaf = vol.backend.itable.leaf_block(inos[b"f"])
    finally:
        vol.close_files()
    image = bytearray(open(path, "rb").read())
    _, _, count = struct.unpack_from("<4sHH", image, leaf * BS)
    for i in range(count):
        key, off, _ = struct.unpack_from("<QHH", image, leaf * BS + 32 + 12 * i)
        if key == inos[b"f"]:
            struct.pack_into("<I", image, leaf * BS + off + 12, 0)  # nlink 0: an orphan that a name still reaches
    with open(path, "wb") as f:
        f.write(reseal.reseal(image, BS))
    vol = opened(path)
    try:
        with pytest.raises(OSError) as e:
            vol.unlink(1, b"f")
        assert e.value.errno == errno.EIO and f"names inode {inos[b'f']}, whose link count is 0" in vol.failed
    finally:
        vol.close_files()
