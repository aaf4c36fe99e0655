"""A commit never writes a log that does not replay, and the counts it writes are those of the trees.

The orders here are those of the create/unlink/fsync bug that destroyed volumes: a file is unlinked while the kernel
still holds a reference, the delta is transitioned, and the kernel's forget (or the last release) arrives in the
next delta before the sliced prepare has reached the file. Every volume the tests open checks after each commit
that the image replays to the state in memory (conftest sets ``TUX3FUSE_VERIFY_LOG``); these tests check the counts
and a fresh load on top.
"""

from __future__ import annotations

import os

import pytest
from conftest import fsck

from tux3fuse import format as fmt
from tux3fuse.fs import Options, Volume, VolumeError
from tux3fuse.replaycheck import check_replay


def inode_count(vol: Volume) -> int:
    return len(list(vol.backend.itable.items()))


def assert_counts_exact(vol: Volume) -> None:
    n = inode_count(vol)
    assert vol.backend.used_inodes == n, f"used_inodes {vol.backend.used_inodes}, {n} inodes"
    assert vol.backend.sb.used_inodes == n, f"superblock counts {vol.backend.sb.used_inodes}, {n} inodes"


def assert_image_sound(path: str) -> None:
    again = Volume(path, Options(readonly=True, lock=False))  # replays the log as a mount does
    try:
        assert again.backend.sb.used_inodes == inode_count(again)
    finally:
        again.close_files()


def sliced_commit(vol: Volume, between) -> None:
    """Commit the current delta with its prepare stage stepped by hand; ``between(step)`` runs frontend work in
    the next delta before each step."""
    job = vol.flusher.start_commit(prepare=False)
    steps = job.prepare_steps()
    step = 0
    while True:
        between(step)
        step += 1
        try:
            next(steps)
        except StopIteration:
            break
    job.write()
    job.complete()


def busy_delta(vol: Volume, n: int = 40, prefix: bytes = b"busy") -> None:
    """Enough dirty inodes that the prepare stage yields many times."""
    for i in range(n):
        a = vol.create(1, prefix + b"%d" % i, 0o644)
        vol.write(a.ino, 0, b"x" * 5000)
        vol.release(a.ino)


@pytest.mark.parametrize("committed_first", [False, True], ids=["new-file", "committed-file"])
@pytest.mark.parametrize("late", ["forget", "release"])
@pytest.mark.parametrize("at_step", [0, 7])
def test_a_file_whose_last_reference_goes_after_the_transition_is_destroyed_once(
        make_vol, committed_first: bool, late: str, at_step: int) -> None:
    vol = make_vol()
    busy_delta(vol, 10)
    a = vol.create(1, b"victim", 0o644)
    vol.write(a.ino, 0, b"v" * 9000)
    if late == "forget":
        vol.release(a.ino)  # the kernel keeps its lookup reference
    else:
        vol.forget(a.ino, 1)  # the file stays open
    if committed_first:
        vol.commit()
        busy_delta(vol, 20, b"more")
    vol.unlink(1, b"victim")

    def between(step: int) -> None:
        if step == at_step:
            (vol.forget if late == "forget" else lambda ino, _n: vol.release(ino))(a.ino, 1)

    sliced_commit(vol, between)
    assert_counts_exact(vol)
    vol.commit()
    assert_counts_exact(vol)
    assert vol.lookup(1, b"busy0").ino
    assert a.ino not in dict(vol.backend.itable.items())
    vol.unmount()
    assert_image_sound(vol.path)
    r = fsck(vol.path, "-n")
    assert r.returncode == 0, r.stdout + r.stderr


def test_rename_over_a_referenced_file_whose_forget_comes_late_keeps_the_count(make_vol) -> None:
    """The atomic-save pattern: write t.tmp, rename it over target, while the kernel still references target."""
    vol = make_vol()
    for round_ in range(30):
        t = vol.create(1, b"t.tmp", 0o644)
        vol.write(t.ino, 0, b"%d" % round_ * 100)
        vol.release(t.ino)
        vol.forget(t.ino, 1)
        old = vol.lookup(1, b"target").ino if round_ else None  # the kernel's reference to the old target
        vol.rename(1, b"t.tmp", 1, b"target")

        def between(step: int, old=old) -> None:
            if old is not None and step == 1:
                vol.forget(old, 1)

        sliced_commit(vol, between)
        assert_counts_exact(vol)
    vol.unmount()
    assert_image_sound(vol.path)
    assert fsck(vol.path, "-n").returncode == 0


def test_a_superblock_with_an_impossible_count_is_refused_before_anything_is_written(make_vol) -> None:
    vol = make_vol()
    vol.create(1, b"f", 0o644)
    vol.commit()
    with open(vol.path, "rb") as f:
        image = f.read()
    vol.create(1, b"g", 0o644)
    vol.backend.used_inodes = -3  # what the double destroy led to
    with pytest.raises(VolumeError, match="used inode count -"):
        vol.commit()
    assert vol.failed is not None
    with open(vol.path, "rb") as f:
        assert f.read() == image, "the refused commit wrote to the image"
    vol.close_files()
    assert fsck(vol.path, "-n").returncode == 0


def test_a_superblock_copy_with_an_impossible_value_does_not_load() -> None:
    sb = fmt.Super(blockbits=12, volblocks=1000, used_inodes=4, next_inum=10, free_blocks=900, itree_root=5,
                   bitmap_blocks=1, bitmap_start=(3, 4))
    raw = bytearray(sb.pack())
    assert fmt.Super.unpack(bytes(raw), 0).used_inodes == 4
    sb.free_blocks = 5000
    with pytest.raises(fmt.FormatError, match="free block count 5000"):
        sb.pack()
    sb.free_blocks, sb.log_count = 900, 3  # a log of three blocks and no head
    with pytest.raises(fmt.FormatError, match="log of 3 blocks"):
        sb.pack()


def test_the_replay_check_finds_memory_that_the_log_does_not_hold(make_vol) -> None:
    vol = make_vol(verify_log=True)
    a = vol.create(1, b"f", 0o644)
    vol.write(a.ino, 0, b"data")
    vol.commit()
    assert check_replay(vol) == []
    assert vol.counters["replay_checks"] >= 1
    rec = fmt.InodeRecord.unpack(vol.backend.itable.lookup(a.ino))
    vol.backend.itable.insert(a.ino + 100, rec.pack())  # a tree change no log record carries
    problems = check_replay(vol)
    assert f"inode table: key {a.ino + 100} is in memory but not in the replayed state" in problems
    vol.write(a.ino, 0, b"more")
    with pytest.raises(VolumeError, match="does not replay"):
        vol.commit()
    assert vol.failed is not None


def test_verify_log_is_on_for_every_volume_the_tests_open(image) -> None:
    assert os.environ.get("TUX3FUSE_VERIFY_LOG") == "1"
    vol = Volume(image, Options())
    try:
        assert vol.options.verify_log
    finally:
        vol.close_files()


def test_the_commit_the_flusher_slices_keeps_the_count_with_late_forgets(make_vol) -> None:
    """The same orders through commit_async and a real trio loop: forgets arrive while the prepare is sliced."""
    import trio

    vol = make_vol()

    async def main() -> None:
        for _ in range(15):
            busy_delta(vol, 30)
            held = []
            for i in range(10):
                a = vol.create(1, b"tmp%d" % i, 0o644)
                vol.release(a.ino)
                vol.unlink(1, b"tmp%d" % i)
                held.append(a.ino)
            for i in range(30):
                vol.unlink(1, b"busy%d" % i)

            async def late_forgets(held: list[int] = held) -> None:
                for ino in held:
                    await trio.sleep(0)
                    vol.forget(ino, 1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(vol.flusher.commit_async)
                nursery.start_soon(late_forgets)
            assert_counts_exact(vol)

    trio.run(main)
    vol.commit()
    assert_counts_exact(vol)
    vol.unmount()
    assert fsck(vol.path, "-n").returncode == 0
