"""Directory blocks and their name index (tux3fuse.dir.DirIndex) against a dict model."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tux3fuse import format as fmt
from tux3fuse.dir import CorruptDir, DirIndex, parse_block

INO = 77

names_st = st.one_of(st.binary(min_size=1, max_size=24), st.binary(min_size=200, max_size=fmt.NAME_MAX))


class Blocks:
    """A directory's data blocks in memory; ``write`` hands out (and creates) a block's bytes."""

    def __init__(self, blocksize: int) -> None:
        self.bs = blocksize
        self.data: dict[int, bytearray] = {}
        self.writes: list[int] = []

    def read(self, block: int) -> bytearray:
        return self.data[block]

    def write(self, block: int) -> bytearray:
        self.writes.append(block)
        if block not in self.data:
            self.data[block] = bytearray(self.bs)
        return self.data[block]


class DirMachine(RuleBasedStateMachine):
    BLOCKSIZE = 512

    @initialize()
    def setup(self) -> None:
        self.blocks = Blocks(self.BLOCKSIZE)
        self.index = DirIndex(INO, self.BLOCKSIZE, 0, self.blocks.read)
        self.model: dict[bytes, tuple[int, int]] = {}
        self.pos: dict[bytes, int] = {}

    def _position(self, name: bytes) -> int:
        _, _, block, off = self.index.get(name)
        return block * self.BLOCKSIZE + off

    @rule(name=names_st, inum=st.integers(1, (1 << 64) - 1), dtype=st.integers(1, 7))
    def add(self, name: bytes, inum: int, dtype: int) -> None:
        if name in self.model:
            return
        before = self.index.nblocks
        appended = self.index.add(name, inum, dtype, self.blocks.write)
        assert appended == (self.index.nblocks == before + 1)
        assert self.index.nblocks in (before, before + 1)
        assert len(self.blocks.data) == self.index.nblocks
        self.model[name] = (inum, dtype)
        self.pos[name] = self._position(name)
        if appended:
            assert self.pos[name] == before * self.BLOCKSIZE, "a new block's first entry is not at its start"

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)), label="name")
        entry = self.index.remove(name, self.blocks.write)
        inum, dtype = self.model.pop(name)
        pos = self.pos.pop(name)
        assert entry == (inum, dtype, pos // self.BLOCKSIZE, pos % self.BLOCKSIZE)
        assert self.index.get(name) is None

    @precondition(lambda self: self.model)
    @rule(data=st.data(), inum=st.integers(1, 1 << 40), dtype=st.integers(1, 7))
    def retarget(self, data: st.DataObject, inum: int, dtype: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)), label="name")
        self.index.retarget(name, inum, dtype, self.blocks.write)
        self.model[name] = (inum, dtype)

    @rule()
    def reparse_from_scratch(self) -> None:
        fresh = DirIndex(INO, self.BLOCKSIZE, self.index.nblocks, self.blocks.read)
        assert {n: (e[0], e[1]) for n, e in fresh.names.items()} == self.model
        assert {n: e[2] * self.BLOCKSIZE + e[3] for n, e in fresh.names.items()} == self.pos
        self.index = fresh  # carry on with the rebuilt index (its free-space hints are its own)

    @rule(data=st.data())
    def entries_from_a_position(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(0, self.index.nblocks * self.BLOCKSIZE), label="start")
        got = list(self.index.entries(start, self.blocks.read))
        expect = sorted((p, n) for n, p in self.pos.items() if p >= start)
        assert [n for n, *_ in got] == [n for _, n in expect]
        for name, inum, dtype, nxt in got:
            assert (inum, dtype) == self.model[name]
            assert nxt == self.pos[name] + 1

    @precondition(lambda self: self.model)
    @rule(data=st.data(), bad=st.sampled_from(["zero", "unaligned", "past_end", "shorter_than_name"]))
    def corrupted_rec_len_is_reported(self, data: st.DataObject, bad: str) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)), label="name")
        pos = self.pos[name]
        block, off = divmod(pos, self.BLOCKSIZE)
        copy = {b: bytearray(d) for b, d in self.blocks.data.items()}
        raw = {"zero": 0, "unaligned": fmt.rec_len(len(name)) + 3, "past_end": self.BLOCKSIZE - off + 8,
               "shorter_than_name": fmt.rec_len(len(name)) - 8}[bad]
        if raw > 0xFFFE:
            raw = 0xFFF8 + 1  # still past the end and unaligned: a 64 KiB block has no room for 0xFFF9 bytes
        struct.pack_into("<H", copy[block], off + 8, raw)
        with pytest.raises(CorruptDir) as info:
            DirIndex(INO, self.BLOCKSIZE, self.index.nblocks, copy.__getitem__)
        assert info.value.ino == INO
        assert info.value.block == block
        assert "record length" in info.value.reason

    @invariant()
    def index_matches_model(self) -> None:
        if not hasattr(self, "index"):
            return
        assert len(self.index) == len(self.model)
        for name, (inum, dtype) in self.model.items():
            entry = self.index.get(name)
            assert entry is not None and entry[:2] == (inum, dtype)
            assert self._position(name) == self.pos[name], f"entry {name!r} moved"
        listed = [n for n, *_ in self.index.entries(0, self.blocks.read)]
        assert sorted(listed) == sorted(self.model), "entries() must list every live name exactly once"
        assert len(listed) == len(set(listed))
        # every block parses into records that tile it exactly
        for block in range(self.index.nblocks):
            total = sum(rl for _, rl, *_ in parse_block(INO, block, self.blocks.data[block]))
            assert total == self.BLOCKSIZE


class Dir512Machine(DirMachine):
    BLOCKSIZE = 512


class Dir4096Machine(DirMachine):
    BLOCKSIZE = 4096


class Dir65536Machine(DirMachine):
    BLOCKSIZE = 65536


_SETTINGS = settings(max_examples=60, stateful_step_count=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestDir512 = Dir512Machine.TestCase
TestDir512.settings = _SETTINGS
TestDir4096 = Dir4096Machine.TestCase
TestDir4096.settings = _SETTINGS
TestDir65536 = Dir65536Machine.TestCase
TestDir65536.settings = settings(_SETTINGS, max_examples=25)


# ---------------------------------------------------------------------------------------------------------------


def _dir_with(blocksize: int, names: list[bytes]) -> tuple[DirIndex, Blocks]:
    blocks = Blocks(blocksize)
    index = DirIndex(INO, blocksize, 0, blocks.read)
    for i, name in enumerate(names):
        index.add(name, 100 + i, fmt.DT_REG, blocks.write)
    return index, blocks


def _on_disk(blocks: Blocks, nblocks: int) -> dict[bytes, tuple[int, int]]:
    """name -> (inode number, position) as a fresh parse of the blocks sees them."""
    fresh = DirIndex(INO, blocks.bs, nblocks, blocks.read)
    return {n: (e[0], e[2] * blocks.bs + e[3]) for n, e in fresh.names.items()}


def test_adding_after_a_removal_keeps_neighbours_in_place_and_fits_the_block() -> None:
    index, blocks = _dir_with(512, [b"a", b"bb", b"ccc"])
    before = {n: index.get(n)[2:] for n in (b"a", b"ccc")}
    index.remove(b"bb", blocks.write)
    assert index.add(b"dd", 7, fmt.DT_DIR, blocks.write) is False
    assert {n: index.get(n)[2:] for n in (b"a", b"ccc")} == before
    assert _on_disk(blocks, 1) == {n: (e[0], e[2] * 512 + e[3]) for n, e in index.names.items()}


@pytest.mark.parametrize("blocksize", [512, 4096, 65536])
def test_name_added_after_removing_the_last_entry_is_on_disk(blocksize: int) -> None:
    index, blocks = _dir_with(blocksize, [b"AA", b"B"])
    index.remove(b"B", blocks.write)  # merged into the record of "AA"
    index.add(b"C", 9, fmt.DT_REG, blocks.write)
    assert [n for n, *_ in index.entries(0, blocks.read)] == [b"AA", b"C"]
    assert set(_on_disk(blocks, index.nblocks)) == {b"AA", b"C"}


def test_removing_the_first_entry_of_a_block_keeps_its_place_as_an_empty_record() -> None:
    index, blocks = _dir_with(512, [b"first", b"second"])
    index.remove(b"first", blocks.write)
    recs = list(parse_block(INO, 0, blocks.data[0]))
    assert recs[0][0] == 0 and recs[0][2] == 0  # offset 0, inode number 0
    assert index.get(b"second")[3] == recs[1][0]
    assert [n for n, *_ in index.entries(0, blocks.read)] == [b"second"]


def test_full_block_spills_into_a_new_block() -> None:
    names = [bytes([65 + i % 26]) * 200 + str(i).encode() for i in range(4)]  # 216-byte records: two per block
    index, blocks = _dir_with(512, names)
    assert index.nblocks == 2
    assert [index.get(n)[2] for n in names] == [0, 0, 1, 1]


def test_64k_block_first_record_spans_the_whole_block() -> None:
    index, blocks = _dir_with(65536, [b"only"])
    ((off, rl, inum, _, name),) = list(parse_block(INO, 0, blocks.data[0]))
    assert (off, rl, inum, name) == (0, 65536, 100, b"only")
    assert struct.unpack_from("<H", blocks.data[0], 8)[0] == 0xFFFF


def test_zero_rec_len_is_corrupt_not_an_endless_loop() -> None:
    index, blocks = _dir_with(4096, [b"x", b"y"])
    struct.pack_into("<H", blocks.data[0], 8, 0)
    with pytest.raises(CorruptDir) as info:
        DirIndex(INO, 4096, 1, blocks.read)
    assert (info.value.ino, info.value.block) == (INO, 0)
    assert "bad record length 0 at offset 0" in str(info.value)


def test_rec_len_crossing_the_block_end_is_corrupt() -> None:
    index, blocks = _dir_with(512, [b"x", b"y"])
    off = index.get(b"y")[3]
    struct.pack_into("<H", blocks.data[0], off + 8, 512 - off + 8)
    with pytest.raises(CorruptDir, match=f"bad record length {512 - off + 8} at offset {off}"):
        DirIndex(INO, 512, 1, blocks.read)


def test_duplicate_name_on_disk_is_corrupt() -> None:
    index, blocks = _dir_with(512, [b"same", b"other"])
    off = index.get(b"other")[3]
    blocks.data[0][off + fmt.DIRENT_HEADER: off + fmt.DIRENT_HEADER + 5] = b"same\0"
    struct.pack_into("<B", blocks.data[0], off + 10, 4)
    with pytest.raises(CorruptDir, match="duplicate name"):
        DirIndex(INO, 512, 1, blocks.read)


def test_live_entry_with_empty_name_is_corrupt() -> None:
    index, blocks = _dir_with(512, [b"name"])
    struct.pack_into("<B", blocks.data[0], 10, 0)
    with pytest.raises(CorruptDir, match="empty name"):
        DirIndex(INO, 512, 1, blocks.read)
