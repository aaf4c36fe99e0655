"""Rolling a damaged log back to its last consistent delta, and reconnecting what a lost directory block hid.

A log block that does not replay (a record for an inode that does not exist, a block that fails its checksum)
must not cost the whole volume: a mount refuses it with a message naming ``fsck.tux3`` and the delta it would roll
back to, ``fsck.tux3 -n`` reports that delta and exits 4, and ``fsck.tux3`` rolls back to it (exit 1), after which
the volume holds exactly what it held at that delta and checks clean.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest
from conftest import Mount, opened, read_all, require_fuse, tool
from volumes import LOGGED, History, flip

from tux3fuse import format as fmt
from tux3fuse import logrecord as logrec
from tux3fuse.fs import Options, Volume, VolumeError
from tux3fuse.fsck import fsck

BS = 4096


def contents(image: str) -> dict[bytes, bytes]:
    vol = Volume(image, Options(readonly=True))
    try:
        return {name: read_all(vol, name) for name, _, _ in vol.readdir(1, 0) if name not in (b".", b"..")}
    finally:
        vol.close_files()


def add_record(image: str, block: int, rec: tuple) -> None:
    """Rewrite log block ``block`` with one more record, sealed so that its checksum holds."""
    with open(image, "r+b") as f:
        f.seek(block * BS)
        old = f.read(BS)
        _, _, count, delta = fmt.unseal(old, block, (fmt.KIND_LOG,))
        prev, records = logrec.unpack_log(old, count)
        records.append(rec)
        f.seek(block * BS)
        f.write(logrec.seal_log(BS, prev, logrec.pack_log_records(records), len(records), block, delta))


def assert_rolls_back(h: History, good: int, inodes: set[int]) -> None:
    image = h.image
    dropped = [s for s in h.seqs if s > good]
    with pytest.raises(VolumeError) as refused:
        Volume(image, Options(readonly=True))
    msg = str(refused.value)
    assert f"the log cannot be replayed past delta {good} (" in msg, msg
    assert msg.endswith(f"run fsck.tux3 {image} to roll back to delta {good}"), msg
    assert "\n" not in msg

    check = fsck(image)
    text = "\n".join(check.lines)
    assert check.status == 4, text
    assert f"last consistent delta: {good}; rolling back to it drops {len(dropped)} delta(s)" in text, text
    touch = text.split("inodes the dropped deltas touch: ")[1].split("\n")[0]
    assert {int(x) for x in touch.split(", ") if x.isdigit()} >= inodes, text

    repair = fsck(image, repair=True)
    text = "\n".join(repair.lines)
    assert repair.status == 1, text
    assert f"rolled back to delta {good}" in text and f"dropped {len(dropped)} delta(s)" in text, text
    touched = text.split("inodes the dropped deltas touched: ")[1].split("\n")[0]
    assert {int(x) for x in touched.split(", ") if x.isdigit()} >= inodes, text

    assert contents(image) == h.states[good]
    again = fsck(image)
    assert again.status == 0, again.lines
    vol = opened(image)  # the volume goes on: a new delta commits and survives a remount
    f = vol.create(1, b"after", 0o644)
    vol.write(f.ino, 0, b"written after the roll back")
    vol.commit()
    vol.close_files()
    assert contents(image) == {**h.states[good], b"after": b"written after the roll back"}
    assert fsck(image).status == 0


def test_a_record_for_a_missing_inode_in_the_newest_log_block_rolls_back_one_delta(image) -> None:
    h = History(image)
    newest = h.seqs[-1]
    add_record(image, h.logs[newest][-1], (logrec.LOG_DESTROY, 9999))
    assert_rolls_back(h, h.seqs[-2], h.inodes[newest])


@pytest.mark.parametrize("one_flush", [False, True])
def test_a_record_that_does_not_apply_in_the_middle_drops_that_delta_and_every_later_one(image, one_flush) -> None:
    h = History(image, one_flush=one_flush)  # with one flush, the newest delta's proof holds: the damage is older
    middle = h.seqs[2]
    add_record(image, h.logs[middle][0], (logrec.LOG_MAP, 7777, 0, 100, [1]))
    assert_rolls_back(h, h.seqs[1], h.dropped_inodes(h.seqs[1]))


def test_a_corrupt_log_block_in_the_middle_of_the_chain_rolls_back_to_the_delta_before_it(image) -> None:
    h = History(image)
    middle = h.seqs[3]
    flip(image, h.logs[middle][0], BS - 7)  # inside the block, not its header: only the checksum fails
    assert_rolls_back(h, h.seqs[2], h.dropped_inodes(middle))  # what the unreadable block held is not known


def test_a_corrupt_newest_log_block_rolls_back_to_the_delta_before(image) -> None:
    h = History(image)
    newest = h.seqs[-1]
    flip(image, h.logs[newest][-1], fmt.HEADER_SIZE + 20)
    assert_rolls_back(h, h.seqs[-2], set())  # the unreadable block's inodes are not known


def test_a_corrupt_header_of_the_only_log_block_rolls_back_to_the_last_unify(image) -> None:
    h = History(image, deltas=1)
    only = h.seqs[0]
    flip(image, h.logs[only][0], 1)  # the kind: not even the header can be trusted
    assert_rolls_back(h, h.base, set())


def test_a_corrupt_header_drops_the_delta_before_it_too_since_it_may_belong_to_it(image) -> None:
    """When the damaged block's header cannot say which delta it belongs to, the newest delta of the readable
    chain before it may be missing that very block: it is dropped as well."""
    h = History(image)
    middle = h.seqs[3]
    flip(image, h.logs[middle][0], 2)
    assert_rolls_back(h, h.seqs[1], h.dropped_inodes(middle))


def test_two_histories_of_one_delta_on_the_disk_are_both_distrusted(image) -> None:
    """A scan for the older part of a broken chain can meet the log block of a commit that never reached its
    superblock, under the same delta number as the one committed after the crash: the rollback stops before it."""
    h = History(image)
    s = h.seqs
    stale = 16384 - 10  # a free block near the end of the 64 MiB volume
    with open(image, "r+b") as f:
        f.seek(stale * BS)
        f.write(logrec.pack_log(BS, h.logs[s[1]][-1], [(logrec.LOG_DESTROY, 9999)], stale, s[2]))
    flip(image, h.logs[s[4]][0], 1)  # an unreadable header: the scan must find the older part
    assert_rolls_back(h, s[1], h.dropped_inodes(s[4]))


def test_the_rollback_counts_match_and_the_volume_is_unified(image) -> None:
    h = History(image)
    flip(image, h.logs[h.seqs[-1]][-1], BS - 1)
    assert fsck(image, repair=True).status == 1
    vol = Volume(image, Options(readonly=True))
    try:
        sb = vol.backend.sb
        assert sb.log_count == 0 and sb.unify_seq > h.seqs[-1]  # no dropped log block is in a live log
        assert vol.backend.sb.used_inodes == len(list(vol.backend.itable.items()))
        assert vol.backend.sb.free_blocks == vol.backend.alloc.free
    finally:
        vol.close_files()


def test_a_mount_refuses_a_damaged_log_and_fsck_rolls_it_back_to_a_volume_that_mounts(tmp_path) -> None:
    require_fuse()
    image = tmp_path / "fs.img"
    subprocess.run([tool("mkfs.tux3"), "-q", "-b", str(BS), "-s", "64M", str(image)], check=True)
    h = History(str(image))
    newest = h.seqs[-1]
    add_record(str(image), h.logs[newest][-1], (logrec.LOG_DESTROY, 9999))
    good = h.seqs[-2]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([tool("tux3fuse"), "-f", str(image), str(mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot be replayed past delta {good}" in r.stderr and f"run fsck.tux3 {image}" in r.stderr, r.stderr
    r = subprocess.run([tool("fsck.tux3"), "-n", str(image)], capture_output=True, text=True)
    assert r.returncode == 4 and f"last consistent delta: {good}" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([tool("fsck.tux3"), str(image)], capture_output=True, text=True)
    assert r.returncode == 1 and f"rolled back to delta {good}" in r.stdout, r.stdout + r.stderr
    m = Mount(image, mnt).start()
    try:
        got = {name.encode(): open(m.path(name), "rb").read() for name in os.listdir(m.mnt)}
    finally:
        m.umount()
    assert got == h.states[good]
    r = subprocess.run([tool("fsck.tux3"), "-n", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_lost_directory_block_reconnects_its_files_under_lost_found_with_their_data(image) -> None:
    from tux3fuse.backend import extents
    from tux3fuse.dir import parse_block

    vol = opened(image)
    d = vol.mkdir(1, b"d", 0o755)
    rnd = random.Random(5)
    data = {}
    for i in range(150):  # 64 of these names fit a block: the directory has three
        if i == 90:  # a subdirectory in the block that is lost: its own files stay under it
            sub = vol.mkdir(d.ino, b"s" * 60, 0o755)
            vol.write(vol.create(sub.ino, b"inner", 0o644).ino, 0, b"inside the subdirectory")
        name = b"file-%03d-" % i + b"x" * 40
        f = vol.create(d.ino, name, 0o644)
        data[name] = rnd.randbytes(rnd.randrange(1, 3 * BS))
        vol.write(f.ino, 0, data[name])
    vol.unmount()
    vol = Volume(image, Options(readonly=True))
    dnode = vol.iget(d.ino)
    assert dnode.rec.size >= 3 * BS
    physical, _, _ = extents.lookup_run(vol.backend.dtree(dnode), 1, 1)
    in_block = {name: ino for _, _, ino, _, name in parse_block(d.ino, 1, vol.backend.dev.read_block(physical)) if ino}
    vol.close_files()
    assert in_block
    flip(image, physical, 100)
    flip(image, physical, 900)  # two bits: no single flip restores it, so its names are lost

    check = fsck(image)
    assert check.status == 4
    repair = fsck(image, repair=True)
    text = "\n".join(repair.lines)
    assert repair.status == 1, text
    assert f"directory {d.ino}: block 1 was unreadable" in text, text
    for ino in in_block.values():
        assert f"reconnected inode {ino} " in text and f"/lost+found/#{ino}" in text, text
    assert fsck(image).status == 0

    vol = opened(image)
    lf = vol.lookup(1, b"lost+found").ino
    for name, content in data.items():
        if name in in_block:
            assert read_all(vol, b"#%d" % in_block[name], lf) == content
            with pytest.raises(FileNotFoundError):
                vol.lookup(d.ino, name)
        else:
            assert read_all(vol, name, d.ino) == content
    assert b"s" * 60 in in_block
    moved = vol.lookup(lf, b"#%d" % sub.ino)
    assert read_all(vol, b"inner", moved.ino) == b"inside the subdirectory"
    assert vol.lookup(moved.ino, b"..").ino == lf  # its parent is /lost+found now
    assert vol.getattr(lf).nlink == 3 and vol.getattr(d.ino).nlink == 2
    vol.unmount()
    assert fsck(image).status == 0


def test_a_data_block_a_dropped_delta_freed_and_a_later_one_rewrote_is_reported_by_its_checksum(image) -> None:
    vol = opened(image, **LOGGED)
    vol.commit(unify=True)
    f = vol.create(1, b"f", 0o644)
    old = os.urandom(2 * BS)
    vol.write(f.ino, 0, old)
    vol.commit()
    good = vol.backend.sb.seq
    vol.setattr(f.ino, size=BS)  # the dropped delta frees the second block...
    vol.commit()
    first_dropped = vol.backend.log_blocks[-1]
    vol.write(f.ino, BS, os.urandom(BS))  # ...and the next one writes it again, right after the first
    vol.commit()
    vol.close_files()
    add_record(image, first_dropped, (logrec.LOG_DESTROY, 9999))
    repair = fsck(image, repair=True)
    text = "\n".join(repair.lines)
    assert f"rolled back to delta {good}" in text, text
    assert repair.status == 4, text
    assert f"inode {f.ino}: data block 1 " in text and "fails its checksum" in text, text
    assert "a dropped delta freed them and a later dropped delta wrote them again" in text, text
    vol = Volume(image, Options(readonly=True))
    try:
        assert vol.read(f.ino, 0, BS) == old[:BS]  # what was not reused reads back
    finally:
        vol.close_files()
