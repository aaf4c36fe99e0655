"""The log between unifies: what a delta writes, what a mount replays, and what a crash leaves.

A delta that is not a unify writes its data blocks and log blocks only; the trees and the bitmap on disk stay as
the last unify wrote them, and a mount rebuilds the rest from the log.
"""

from __future__ import annotations

import os
import random

import pytest
import trio
from conftest import drive, opened, read_all
from hypothesis import given, settings
from hypothesis import strategies as st

from mkfs import mkfs
from tux3fuse import format as fmt
from tux3fuse import logrecord as logrec
from tux3fuse.backend.log import LOG_STEP, split_log, split_log_steps, write_log
from tux3fuse.fs import Options, Volume
from tux3fuse.fsck import fsck

BS = 4096
NO_UNIFY = {"unify_deltas": 1 << 30, "unify_log_blocks": 1 << 30}

u64 = st.integers(0, (1 << 64) - 1)
records = st.one_of(
    st.tuples(st.sampled_from([logrec.LOG_ALLOC, logrec.LOG_FREE]), u64, st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just(logrec.LOG_INODE), u64, st.binary(max_size=200)),
    st.tuples(st.just(logrec.LOG_MAP), u64, u64, u64, st.lists(u64, min_size=1, max_size=40)),
    st.tuples(st.just(logrec.LOG_UNMAP), u64, u64),
    st.tuples(st.sampled_from([logrec.LOG_DESTROY, logrec.LOG_ORPHAN]), u64),
)


@pytest.mark.parametrize("blocksize", [512, 4096])
def test_every_record_kind_round_trips_through_log_blocks(blocksize: int) -> None:
    @given(recs=st.lists(records, max_size=60))
    @settings(max_examples=150, deadline=None, derandomize=True)
    def check(recs) -> None:
        got = []
        for i, group in enumerate(split_log(recs, blocksize)):
            assert sum(logrec.log_record_size(r) for r in group) <= logrec.log_room(blocksize)
            buf = logrec.pack_log(blocksize, i, group, 100 + i, 5)
            _, _, count, _ = fmt.unseal(bytes(buf), 100 + i, (fmt.KIND_LOG,))
            prev, unpacked = logrec.unpack_log(bytes(buf), count)
            assert prev == i
            got.extend(unpacked)
        assert [tuple(r) for r in got] == [tuple(r) for r in recs]

    check()


@given(recs=st.lists(records, max_size=300))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_the_commit_packs_the_log_in_steps_into_the_same_blocks(recs) -> None:
    """A commit splits and packs its log a few records per step (so the event loop is never held long); the
    blocks are byte for byte those of packing each block's records at once, chained in order."""
    steps, groups = drive(split_log_steps(recs, BS))
    assert steps == len(recs) // LOG_STEP
    assert groups == split_log(recs, BS)
    written: dict[int, bytearray] = {}
    blocks = iter(range(1000, 2000))
    steps, (head, chain) = drive(write_log(groups, BS, 77, 9, lambda: next(blocks), written.__setitem__))
    assert chain == list(range(1000, 1000 + len(groups))) and head == (chain[-1] if chain else 77)
    assert steps == sum(-(-len(g) // LOG_STEP) + 1 for g in groups)  # every LOG_STEP records, and every block
    prev = 77
    for block, group in zip(chain, groups, strict=True):
        assert written[block] == logrec.pack_log(BS, prev, group, block, 9)
        prev = block


def test_a_log_block_refuses_records_that_do_not_fit() -> None:
    body = logrec.pack_log_records([(logrec.LOG_MAP, 1, 0, 5, list(range(80)))])
    assert len(body) > logrec.log_room(512)
    with pytest.raises(ValueError, match="do not fit"):
        logrec.seal_log(512, 0, body, 1, 3, 1)


def test_a_truncated_map_record_is_rejected() -> None:
    buf = logrec.pack_log(512, 0, [(logrec.LOG_MAP, 7, 0, 99, [1, 2, 3])], 3, 1)
    length = fmt.HEADER_SIZE + 8
    buf[length: length + 4] = (logrec.log_record_size((logrec.LOG_MAP, 7, 0, 99, [1, 2, 3])) - 8).to_bytes(4, "little")
    with pytest.raises(ValueError):
        logrec.unpack_log(buf, 1)


def test_largest_map_record_fits_one_log_block() -> None:
    for bs in (512, 1024, 4096, 65536):
        n = logrec.log_map_blocks(bs)
        assert logrec.log_record_size((logrec.LOG_MAP, 1, 0, 1, [0] * n)) <= logrec.log_room(bs)




def crash(vol: Volume) -> None:
    """Drop the volume with no further commit, as a power cut after its last commit would."""
    vol.close_files()



def names(vol: Volume) -> list[bytes]:
    return sorted(name for name, _, _ in vol.readdir(1, 0) if name not in (b".", b".."))


def test_overwrite_and_fsync_writes_the_data_block_and_one_log_block_with_one_flush(image) -> None:
    vol = opened(image)
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, os.urandom(256 * BS))
    vol.commit(unify=True)
    roots = (vol.backend.sb.itree_root, vol.backend.sb.bitmap_cur)

    async def overwrite_and_sync(i: int) -> tuple[int, int]:
        blocks, flushes = vol.counters["blocks_written"], vol.backend.dev.stats.flushes
        vol.write(f.ino, BS * (i * 37 % 256), os.urandom(BS))
        await vol.sync()
        return vol.counters["blocks_written"] - blocks, vol.backend.dev.stats.flushes - flushes

    for i in range(20):  # more than unify_deltas: a waiting fsync never pays for a unify that is merely due
        assert trio.run(overwrite_and_sync, i) == (2, 1)  # data + log block; the superblock goes with them
    sb = vol.backend.sb
    assert (sb.itree_root, sb.bitmap_cur) == roots  # no tree node and no bitmap block was rewritten
    assert vol.backend.sb.log_count == 20
    data = vol.read(f.ino, 0, 256 * BS)
    crash(vol)
    vol = opened(image)
    assert vol.read(f.ino, 0, 256 * BS) == data
    vol.unmount()
    assert fsck(image).status == 0


def test_the_log_is_unified_when_it_passes_its_limit_even_under_fsync(image) -> None:
    vol = opened(image, unify_log_blocks=5)
    f = vol.create(1, b"f", 0o644)

    async def main():
        for i in range(12):
            vol.write(f.ino, i * BS, bytes([i]) * BS)
            await vol.sync()
            assert vol.backend.sb.log_count <= 5

    unifies = vol.counters["unifies"]
    trio.run(main)
    assert vol.counters["unifies"] - unifies >= 2
    vol.unmount()
    assert fsck(image).status == 0


@pytest.mark.parametrize("deltas", [0, 1, 40])
def test_remount_after_deltas_without_unify(image, deltas: int) -> None:
    vol = opened(image, **NO_UNIFY)
    vol.commit(unify=True)
    sb0 = (vol.backend.sb.itree_root, vol.backend.sb.otree_root, vol.backend.sb.bitmap_cur)
    expect: dict[bytes, bytes] = {}
    kept = vol.create(1, b"open-unlinked", 0o644)  # an orphan: open, no name
    vol.write(kept.ino, 0, b"orphan data")
    vol.unlink(1, b"open-unlinked")
    vol.open(kept.ino)
    if deltas == 0:
        crash(vol)
        vol = opened(image, **NO_UNIFY)
        assert names(vol) == [] and vol.backend.sb.log_count == 0
    rng = random.Random(deltas)
    for _delta in range(deltas):
        for _ in range(4):
            op = rng.randrange(5)
            name = b"f%d" % rng.randrange(12)
            if op <= 1:
                if name not in expect:
                    vol.create(1, name, 0o644)
                    expect[name] = b""
                ino = vol.lookup(1, name).ino
                at = rng.randrange(0, 6 * BS)
                data = os.urandom(rng.randrange(1, 3 * BS))
                vol.write(ino, at, data)
                old = expect[name].ljust(at, b"\0")
                expect[name] = old[:at] + data + old[at + len(data):]
            elif op == 2 and name in expect:
                size = rng.randrange(0, 4 * BS)
                vol.setattr(vol.lookup(1, name).ino, size=size)
                expect[name] = expect[name][:size].ljust(size, b"\0")
            elif op == 3 and name in expect:
                vol.unlink(1, name)
                del expect[name]
            elif op == 4 and name in expect:
                new = b"r%d" % rng.randrange(4)
                if new in expect:
                    del expect[new]
                vol.rename(1, name, 1, new)
                expect[new] = expect.pop(name)
        vol.commit()
    if deltas:
        assert vol.backend.sb.log_count >= deltas
        sb = vol.backend.sb
        assert (sb.itree_root, sb.otree_root, sb.bitmap_cur) == sb0  # only the log changed
    crash(vol)
    assert fsck(image).status == 0  # fsck replays the log too
    vol = opened(image, **NO_UNIFY)  # this mount reclaims the orphan
    assert names(vol) == sorted(expect)
    for name, data in expect.items():
        assert read_all(vol, name) == data, name
    assert list(vol.backend.otree.items()) == []
    vol.unmount()
    assert fsck(image).status == 0
    vol = Volume(image, Options(readonly=True))  # after the unmount's unify the trees on disk hold it all
    assert vol.backend.sb.log_count == 0
    assert {name: read_all(vol, name) for name in names(vol)} == expect
    vol.close_files()


def test_crash_between_log_write_and_superblock_write_keeps_the_delta_before(image) -> None:
    vol = opened(image, **NO_UNIFY)
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, b"a" * BS)
    vol.commit()
    durable = vol.backend.sb.seq
    vol.write(f.ino, 0, b"b" * BS)
    g = vol.create(1, b"g", 0o644)
    vol.write(g.ino, 0, b"new file")
    job = vol.flusher.start_commit()
    assert job.write_some(len(job.writes))  # data and log blocks are written...
    vol.backend.dev.flush()  # ...and even durable, but the superblock naming them never is
    crash(vol)
    assert fsck(image).status == 0
    vol = opened(image)
    assert vol.backend.sb.seq > durable  # the mount itself commits a delta
    assert names(vol) == [b"f"] and read_all(vol, b"f") == b"a" * BS
    vol.unmount()
    assert fsck(image).status == 0


def test_the_superblock_proof_matches_the_blocks_on_disk(image) -> None:
    """A mount recomputes the digest of a one-flush commit from the disk, block by block, and must find the
    superblock's equal after commits of scattered rewrites, appends and partial pages (or it would take the
    delta before)."""
    from tux3fuse.fs import delta_landed

    vol = opened(image, **NO_UNIFY)
    rnd = random.Random(3)
    files = [vol.create(1, b"f%d" % i, 0o644) for i in range(3)]
    for f in files:
        vol.write(f.ino, 0, rnd.randbytes(40 * BS))
    vol.commit()
    for _ in range(3):
        for f in files:  # scattered rewrites, an append, a partial last page
            for index in rnd.sample(range(40), 12):
                vol.write(f.ino, index * BS, rnd.randbytes(BS))
            vol.write(f.ino, 40 * BS, rnd.randbytes(BS // 3))
        vol.commit()
        assert vol.backend.sb.delta_csum and delta_landed(vol.backend.dev.fd, vol.backend.sb)
    vol.unmount()
    assert fsck(image).status == 0


def test_a_superblock_whose_log_block_is_missing_falls_back_to_the_delta_before(image) -> None:
    vol = opened(image, **NO_UNIFY)
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, b"a" * BS)
    vol.commit()
    vol.write(f.ino, 0, b"b" * BS)
    job = vol.flusher.start_commit()
    assert vol.backend.sb.delta_csum  # a one-flush commit: the superblock proves the delta's blocks
    log_block = vol.backend.sb.log_head
    job.writes = [w for w in job.writes if w[0] != log_block]  # the log block is lost in the crash
    job.plan = vol.backend.dev.plan(job.writes)
    job.write()
    crash(vol)
    vol = opened(image)
    assert read_all(vol, b"f") == b"a" * BS
    vol.unmount()
    assert fsck(image).status == 0


def test_fsck_reports_a_log_record_that_does_not_apply(image) -> None:
    vol = opened(image, **NO_UNIFY)
    f = vol.create(1, b"f", 0o644)
    vol.write(f.ino, 0, b"a" * BS)
    vol.commit()
    head = vol.backend.sb.log_head
    vol.write(f.ino, 0, b"b" * BS)
    vol.commit()  # the newest delta's blocks are proven by its superblock; the one before is taken as written
    crash(vol)
    with open(image, "r+b") as img:  # rewrite the older log block: a map record for an inode that does not exist
        img.seek(head * BS)
        old = img.read(BS)
        _, _, count, delta = fmt.unseal(old, head, (fmt.KIND_LOG,))
        prev, _ = logrec.unpack_log(old, count)
        img.seek(head * BS)
        img.write(logrec.pack_log(BS, prev, [(logrec.LOG_MAP, 999, 0, 5000, [1])], head, delta))
    report = fsck(image)
    assert report.status == 4
    assert any(f"block {head}" in line and "inode 999 does not apply" in line for line in report.lines)


def test_the_log_limit_counts_bytes_so_large_blocks_do_not_lengthen_the_replay(tmp_path) -> None:
    path = str(tmp_path / "big.img")
    mkfs(path, 65536, 64 << 20)
    vol = opened(path, unify_log_blocks=8)  # 8 x 4 KiB: not even one 64 KiB log block beyond the first
    f = vol.create(1, b"f", 0o644)

    async def main():
        for i in range(6):
            vol.write(f.ino, i * 65536, bytes([i + 1]) * 65536)
            await vol.sync()
            assert vol.backend.sb.log_count * 65536 <= 8 * logrec.LOG_UNIT or vol.backend.sb.log_count == 1

    trio.run(main)
    assert vol.counters["unifies"] >= 3
    vol.unmount()
    assert fsck(path).status == 0
