"""fsck.tux3 settles a volume damaged after it was written, and one bad block costs only what it holds.

A delta a read-write mount refuses as written-then-damaged (docs/FORMAT.md §11) is reported by ``fsck.tux3 -n``
(exit 4, naming the delta); ``fsck.tux3`` restores the flipped bit when each damaged block's checksum names it
exactly (nothing is lost, every synced file reads back byte for byte), and otherwise rolls the volume back to the
delta before, saying what it dropped; either way it exits 1, after which the volume checks clean and mounts
read-write.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fsck, opened, read_all
from volumes import BS, FILES, NO_UNIFY, SIZE, data_block, flip_bit, write_files

from mkfs import mkfs
from tux3fuse import format as fmt
from tux3fuse.fs import Options, Volume, VolumeError


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "a.img"
    mkfs(str(path), BS, 32 << 20)
    return path


def content(i: int) -> bytes:
    return bytes([65 + i]) * (SIZE - 7 * i) + bytes(range(i))





def written(image: Path, clean: bool) -> dict[str, int]:
    """The ten files synced (one commit), then a clean unmount or a stop without one. Returns the last delta, the
    superblock copy naming it, its log head, and block 3 of f4."""
    vol = opened(str(image), **NO_UNIFY)
    write_files(vol, content)
    vol.commit()
    out = {"block": data_block(vol, b"f4"), "log": vol.backend.sb.log_head}
    if clean:
        vol.unmount()
    else:
        vol.close_files()
    vol = Volume(str(image), Options(readonly=True))
    out.update(seq=vol.backend.sb.seq, copy=vol.backend.sb.copy)
    vol.close_files()
    return out


def assert_all_files_intact(image: Path) -> None:
    vol = opened(str(image))  # read-write
    try:
        for i in range(FILES):
            assert read_all(vol, f"f{i}".encode()) == content(i), f"f{i}"
    finally:
        vol.unmount()
    r = fsck(image, "-n")
    assert r.returncode == 0, r.stdout + r.stderr


def repaired(image: Path, seq: int, *, refused: bool) -> str:
    """The damage refuses a writable mount (or not), fsck -n exits 4 naming it, fsck exits 1, then fsck -n is
    clean and a writable mount goes on. Returns fsck's output."""
    if refused:
        with pytest.raises(VolumeError, match="fsck.tux3"):
            Volume(str(image))
    r = fsck(image, "-n")
    assert r.returncode == 4 and (f"delta {seq}" in r.stdout or not refused), r.stdout + r.stderr
    r = fsck(image)
    assert r.returncode == 1, r.stdout + r.stderr
    again = fsck(image, "-n")
    assert again.returncode == 0 and again.stdout.rstrip().endswith("clean"), again.stdout + again.stderr
    Volume(str(image)).close_files()
    return r.stdout


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean-unmount"])
def test_fsck_restores_a_flipped_bit_in_a_data_block_and_loses_nothing(image, clean) -> None:
    w = written(image, clean)
    flip_bit(image, w["block"] * BS + 1234, 5)
    out = repaired(image, w["seq"], refused=not clean)
    assert f"restored bit {1234 * 8 + 5} of block {w['block']} (data block 3 of inode " in out, out
    assert "rolled back" not in out
    assert_all_files_intact(image)


def test_fsck_restores_a_flipped_bit_in_a_log_block_of_the_last_delta_after_a_crash(image) -> None:
    w = written(image, clean=False)
    flip_bit(image, w["log"] * BS + 100, 3)
    out = repaired(image, w["seq"], refused=True)
    assert f"restored bit {100 * 8 + 3} of block {w['log']} (log block of delta {w['seq']})" in out, out
    assert f"delta {w['seq']} is whole again" in out
    assert_all_files_intact(image)


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean-unmount"])
def test_fsck_restores_a_flipped_bit_in_the_newest_superblock_copy(image, clean) -> None:
    w = written(image, clean)
    flip_bit(image, fmt.SUPER_OFFSETS[w["copy"]] + 300, 6)
    out = repaired(image, w["seq"], refused=True)
    assert f"restored bit {300 * 8 + 6} of superblock copy {w['copy']} (delta {w['seq']})" in out, out
    assert_all_files_intact(image)


def test_damage_no_single_bit_explains_is_rolled_back_to_the_delta_before_and_says_so(image) -> None:
    vol = opened(str(image), **NO_UNIFY)
    write_files(vol, content)
    vol.commit()
    before = vol.backend.sb.seq
    extra = vol.create(1, b"late", 0o644)
    vol.write(extra.ino, 0, b"x" * 5000)
    vol.commit()
    copy = vol.backend.sb.copy
    vol.close_files()  # a stop without unmount
    flip_bit(image, fmt.SUPER_OFFSETS[copy] + 300, 6)
    flip_bit(image, fmt.SUPER_OFFSETS[copy] + 310, 1)  # two bits: what the copy held is not known
    r = fsck(image, "-n")
    assert r.returncode == 4 and f"rolls the volume back to delta {before}" in r.stdout, r.stdout
    r = fsck(image)
    assert r.returncode == 1 and f"rolled back to delta {before}" in r.stdout, r.stdout + r.stderr
    assert fsck(image, "-n").returncode == 0
    vol = opened(str(image))
    try:
        with pytest.raises(OSError):
            vol.lookup(1, b"late")
        assert vol.backend.sb.seq > before + 2  # numbered above every delta seen
    finally:
        vol.unmount()
    assert_all_files_intact(image)


def test_fsck_n_on_a_refused_volume_says_what_repair_would_do_and_changes_nothing(image) -> None:
    w = written(image, clean=False)
    flip_bit(image, w["block"] * BS + 9, 0)
    before = image.read_bytes()
    r = fsck(image, "-n")
    assert r.returncode == 4 and "fsck.tux3 repair restores bit " in r.stdout and "nothing is lost" in r.stdout
    assert image.read_bytes() == before


def test_a_mount_that_drops_an_unfinished_delta_never_reuses_its_number(image) -> None:
    from test_proof import rebuild_without

    from tux3fuse.backend.log import walk_log

    def keep(block: int, data: bytes) -> bytes | None:  # the log reached the disk, the data did not
        return data if data[:4] == fmt.KIND_LOG else None

    dropped, before = rebuild_without(image, keep)
    vol = Volume(str(image))
    assert vol.recovery.dropped == dropped and vol.recovery.cause == "unfinished" and vol.backend.sb.seq == before
    vol.mount()  # the mount's commit: numbered above the dropped delta
    assert vol.backend.sb.seq == dropped + 1
    a = vol.create(1, b"new", 0o644)
    vol.write(a.ino, 0, b"n" * 9000)
    vol.commit()
    last = vol.backend.sb.seq
    vol.close_files()  # stop again without unmount
    vol = Volume(str(image), Options(readonly=True))
    try:
        assert vol.backend.sb.seq == last and not vol.recovery.dropped
        entries, broken = walk_log(vol.backend.dev.read_block, vol.backend.sb)
        assert broken is None and dropped not in {e.delta for e in entries}
        assert read_all(vol, b"new") == b"n" * 9000
    finally:
        vol.close_files()
    r = fsck(image, "-n")
    assert r.returncode == 0, r.stdout + r.stderr


def current_bitmap_block(image: Path) -> int:
    vol = Volume(str(image), Options(readonly=True))
    try:
        return vol.backend.sb.bitmap_start[vol.backend.sb.bitmap_cur]
    finally:
        vol.close_files()


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean-unmount"])
def test_a_corrupt_bitmap_block_is_served_read_only_and_rebuilt_from_the_trees_by_fsck(image, clean) -> None:
    written(image, clean)
    block = current_bitmap_block(image)
    with open(image, "r+b") as f:
        f.seek(block * BS + 100)
        f.write(b"\x55" * 64)  # many bits: only the trees can say what it held
    with pytest.raises(VolumeError, match=f"corrupt bitmap block {block}.*run fsck.tux3"):
        Volume(str(image))
    vol = Volume(str(image), Options(readonly=True))  # a read-only mount needs no bitmap
    try:
        assert vol.backend.bitmap_damage and all(read_all(vol, f"f{i}".encode()) == content(i) for i in range(FILES))
    finally:
        vol.close_files()
    r = fsck(image, "-n")
    assert r.returncode == 4 and f"bitmap block {block} (the bits of blocks 0-" in r.stdout, r.stdout + r.stderr
    r = fsck(image)
    assert r.returncode == 1 and f"rebuilt bitmap block {block}" in r.stdout, r.stdout + r.stderr
    r = fsck(image, "-n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_all_files_intact(image)


def tree_of_files(image: Path) -> dict[str, int]:
    """Files a, b in the root, d/x and e/y in two subdirectories, cleanly unmounted. Returns the blocks to damage:
    the extent leaf of a, the directory block of d, the inode table leaf holding the root."""
    vol = opened(str(image))

    def make(parent: int, name: bytes, data: bytes) -> int:
        f = vol.create(parent, name, 0o644)
        vol.write(f.ino, 0, data)
        vol.release(f.ino)
        return f.ino

    a = make(1, b"a", b"A" * 50000)
    make(1, b"b", b"B" * 30000)
    d = vol.mkdir(1, b"d", 0o755).ino
    make(d, b"x", b"X" * 5000)
    e = vol.mkdir(1, b"e", 0o755).ino
    make(e, b"y", b"Y" * 5000)
    vol.unmount()
    vol = Volume(str(image), Options(readonly=True))
    try:
        (_, value), = vol.backend.dtree(vol.iget(d)).items()
        sb = vol.backend.sb
        return {"leaf_a": vol.iget(a).rec.dtree_root, "dir_d": fmt.unpack_extent(value)[0],
                "root_leaf": sb.itree_root, "bitmap": sb.bitmap_start[sb.bitmap_cur]}
    finally:
        vol.close_files()


def smash(image: Path, block: int) -> None:
    with open(image, "r+b") as f:
        f.seek(block * BS + 200)
        f.write(b"\x55" * 16)


def readable(path: Path) -> bytes | int:
    """The content of a file, or the errno reading it gives."""
    try:
        return path.read_bytes()
    except OSError as e:
        return e.errno


@pytest.mark.mounted
@pytest.mark.parametrize("bad", ["leaf_a", "dir_d", "bitmap"])
def test_a_read_only_mount_serves_everything_but_what_the_bad_block_holds(tmp_path, bad) -> None:
    import errno

    from conftest import Mount, require_fuse

    require_fuse()
    image = tmp_path / "fs.img"
    mkfs(str(image), BS, 32 << 20)
    smash(image, tree_of_files(image)[bad])
    m = Mount(image, tmp_path / "mnt", "ro")
    try:
        m.start()
        mnt = m.mnt
        assert sorted(p.name for p in mnt.iterdir()) == ["a", "b", "d", "e"]
        assert readable(mnt / "a") == (errno.EIO if bad == "leaf_a" else b"A" * 50000)
        assert readable(mnt / "b") == b"B" * 30000
        assert readable(mnt / "e" / "y") == b"Y" * 5000
        if bad == "dir_d":
            with pytest.raises(OSError) as e:
                list((mnt / "d").iterdir())
            assert e.value.errno == errno.EIO
        else:
            assert readable(mnt / "d" / "x") == b"X" * 5000
        assert (mnt / "a").stat().st_size == 50000
    finally:
        try:
            if m.proc is not None:
                m.umount(expect_ok=False)  # the daemon may exit 1: it reports the errors it answered
        finally:
            m.cleanup()
    assert fsck(image, "-n").returncode == 4


def test_a_corrupt_inode_table_leaf_holding_the_root_refuses_every_mount_naming_fsck(image) -> None:
    smash(image, tree_of_files(image)["root_leaf"])
    for options in (Options(), Options(readonly=True)):
        with pytest.raises(VolumeError, match="corrupt ileaf block .*fsck.tux3 cannot rebuild it"):
            Volume(str(image), options)
    r = fsck(image, "-n")
    assert r.returncode == 4 and "corrupt ileaf block" in r.stdout and r.stdout.count("\n") == 1, r.stdout
    assert fsck(image).returncode == 4


def test_one_flipped_bit_in_the_inode_table_leaf_holding_the_root_is_restored_by_fsck(image) -> None:
    block = tree_of_files(image)["root_leaf"]
    flip_bit(image, block * BS + 300, 2)
    with pytest.raises(VolumeError, match="one flipped bit.*run fsck.tux3 .* to restore it"):
        Volume(str(image), Options(readonly=True))
    assert fsck(image, "-n").returncode == 4
    r = fsck(image)
    assert r.returncode == 1 and f"restored bit {300 * 8 + 2} of block {block} (ileaf block)" in r.stdout, r.stdout
    assert fsck(image, "-n").returncode == 0
    vol = opened(str(image))
    try:
        assert read_all(vol, b"a") == b"A" * 50000 and read_all(vol, b"x", vol.lookup(1, b"d").ino) == b"X" * 5000
    finally:
        vol.unmount()


def test_one_flipped_bit_in_an_extent_leaf_is_restored_by_fsck_before_anything_is_freed(image) -> None:
    block = tree_of_files(image)["leaf_a"]
    flip_bit(image, block * BS + 40, 7)
    r = fsck(image, "-n")
    assert r.returncode == 4 and "marked used that nothing references" in r.stdout  # a's blocks look leaked
    r = fsck(image)
    assert r.returncode == 1 and f"restored bit {40 * 8 + 7} of block {block} (dleaf block)" in r.stdout, r.stdout
    assert fsck(image, "-n").returncode == 0
    vol = opened(str(image))
    try:
        assert read_all(vol, b"a") == b"A" * 50000
    finally:
        vol.unmount()
