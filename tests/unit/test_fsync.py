"""fsync of one file: when the rest of its delta is large, only the file's own blocks are committed, ahead of
the rest (the delta is split); otherwise the whole delta is, and many fsyncing files share it."""

from __future__ import annotations

import os

import pytest
import trio
from conftest import opened, read_all

from tux3fuse.checker import Checker
from tux3fuse.flusher import Flusher
from tux3fuse.fs import Options, Volume
from tux3fuse.fsck import fsck

BS = 4096
BIG = 4 << 20  # the rest of the delta: well over Options.fsync_ahead_bytes (1 MiB)





def committed_errors(image: str) -> list[str]:
    """fsck's findings on the committed state, read beside the live volume."""
    vol = Volume(image, Options(readonly=True, lock=False))
    try:
        return Checker(vol).run().errors
    finally:
        vol.close_files()


def setup(vol: Volume) -> tuple[int, int]:
    """A small file and a big file, both committed."""
    small = vol.create(1, b"small", 0o644).ino
    big = vol.create(1, b"big", 0o644).ino
    vol.write(small, 0, b"old" * 1000)
    vol.write(big, 0, b"B" * BS)
    vol.commit(unify=True)
    return small, big


def test_fsync_commits_only_the_file_when_the_rest_of_the_delta_is_large(image) -> None:
    vol = opened(image)
    small, big = setup(vol)
    vol.write(big, 0, os.urandom(BIG))  # the rest of the delta
    vol.write(small, 0, b"new" * 1000)
    blocks, flushes = vol.counters["blocks_written"], vol.backend.dev.stats.flushes
    trio.run(vol.fsync, small)
    assert vol.counters["commits_ahead"] == 1
    assert vol.counters["blocks_written"] - blocks == 2  # the file's data block and one log block
    assert vol.backend.dev.stats.flushes - flushes == 1
    assert vol.icache.cache.dirty_pages == BIG // BS  # the big file is still dirty, now in the next delta
    assert vol.deltas.current in vol.iget(big).dirty_deltas
    big_data = vol.read(big, 0, BIG)
    vol.close_files()  # crash: the small file is durable, the big file's new data is not
    assert fsck(image).status == 0
    vol = opened(image)
    assert read_all(vol, b"small") == b"new" * 1000
    assert read_all(vol, b"big") == b"B" * BS
    vol.unmount()
    del big_data


def test_changes_moved_by_the_split_commit_with_the_next_delta(image) -> None:
    vol = opened(image)
    small, big = setup(vol)
    data = os.urandom(BIG)
    vol.write(big, 0, data)
    vol.setattr(big, mode=0o600)
    extra = vol.create(1, b"extra", 0o644).ino  # a new inode: not part of the commit ahead
    vol.write(extra, 0, b"x")
    vol.write(small, 0, b"new")
    trio.run(vol.fsync, small)
    assert vol.counters["commits_ahead"] == 1
    assert committed_errors(image) == []  # the committed state counts the inodes it holds, not the moved new one
    vol.commit()
    vol.close_files()
    vol = opened(image)
    assert read_all(vol, b"big") == data and vol.getattr(big).mode & 0o777 == 0o600
    assert read_all(vol, b"extra") == b"x"
    assert read_all(vol, b"small")[:3] == b"new"
    vol.unmount()
    assert fsck(image).status == 0


@pytest.mark.parametrize("change", ["created in this delta", "linked in this delta", "small rest"])
def test_fsync_commits_the_whole_delta_when_the_file_cannot_go_ahead(image, change: str) -> None:
    vol = opened(image)
    small, big = setup(vol)
    rest = b"r" * BS if change == "small rest" else os.urandom(BIG)
    vol.write(big, 0, rest)
    if change == "created in this delta":
        small = vol.create(1, b"fresh", 0o644).ino  # its name is not committed: it cannot go alone
    elif change == "linked in this delta":
        vol.link(small, 1, b"second")  # its link count must go with the directory entry
    vol.write(small, 0, b"new")
    trio.run(vol.fsync, small)
    assert vol.counters["commits_ahead"] == 0
    assert vol.icache.cache.dirty_pages == 0  # the whole delta went
    vol.close_files()
    vol = opened(image)
    assert read_all(vol, b"big")[: len(rest)] == rest
    vol.unmount()
    assert fsck(image).status == 0


def test_concurrent_fsyncs_through_the_flusher_go_ahead_together(image) -> None:
    vol = opened(image)
    files = [vol.create(1, b"f%d" % i, 0o644).ino for i in range(6)]
    big = vol.create(1, b"big", 0o644).ino
    vol.commit(unify=True)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(Flusher(vol, 30).run)
            vol.write(big, 0, os.urandom(BIG))
            for i, ino in enumerate(files):
                vol.write(ino, 0, b"%d" % i * 100)
            commits = vol.counters["commits"]
            async with trio.open_nursery() as fsyncs:
                for ino in files:
                    fsyncs.start_soon(vol.fsync, ino)
            assert vol.counters["commits"] - commits <= 2  # one ahead of the big file's delta (+ one in flight)
            assert vol.counters["commits_ahead"] >= 1
            assert vol.icache.cache.dirty_pages == BIG // BS  # the big file did not go with them
            nursery.cancel_scope.cancel()

    trio.run(main)
    vol.close_files()
    vol = opened(image)
    for i in range(6):
        assert read_all(vol, b"f%d" % i) == b"%d" % i * 100
    assert read_all(vol, b"big") == b""
    vol.unmount()
    assert fsck(image).status == 0
