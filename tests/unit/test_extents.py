"""Extent maps (tux3fuse.backend.extents) on a BTree against a dict model {logical: (physical, checksum)}."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tux3fuse import format as fmt
from tux3fuse.backend import extents
from tux3fuse.backend.btree import BTree


class MemStore:
    def __init__(self, blocksize: int) -> None:
        self.blocksize = blocksize
        self.blocks: dict[int, bytes] = {}
        self.next_block = 1 << 40

    def read_block(self, block: int) -> bytes:
        return self.blocks[block]

    def alloc_meta(self) -> int:
        self.next_block += 1
        return self.next_block

    def free_meta(self, block: int) -> None:
        pass

    def write_meta(self, block: int, data: bytearray) -> None:
        self.blocks[block] = bytes(data)


class ExtentMachine(RuleBasedStateMachine):
    BLOCKSIZE = 512

    @initialize()
    def setup(self) -> None:
        self.store = MemStore(self.BLOCKSIZE)
        self.tree = BTree(self.store, fmt.KIND_DLEAF)
        self.model: dict[int, tuple[int, int]] = {}
        self.next_physical = 1000
        self.longest = fmt.max_extent_blocks(self.BLOCKSIZE)
        self.delta = 0

    def _free_recorder(self):
        freed: Counter[int] = Counter()

        def free(start: int, count: int) -> None:
            assert count > 0
            freed.update(range(start, start + count))

        return freed, free

    def _apply_drop(self, lo: int, hi: int | None, freed: Counter[int], dropped: int) -> None:
        gone = [k for k in self.model if k >= lo and (hi is None or k < hi)]
        assert dropped == len(gone)
        expect = Counter(self.model[k][0] for k in gone)
        assert freed == expect, "dropped physical blocks not freed exactly once (or live blocks freed)"
        for k in gone:
            del self.model[k]

    def _map(self, logical: int, physical: int, n: int, seed: int) -> None:
        rng = random.Random(seed)
        csums = [rng.getrandbits(64) for _ in range(n)]
        freed, free = self._free_recorder()
        dropped = extents.map_run(self.tree, logical, physical, csums, free, self.BLOCKSIZE)
        self._apply_drop(logical, logical + n, freed, dropped)
        for i in range(n):
            self.model[logical + i] = (physical + i, csums[i])

    @rule(logical=st.integers(0, 400), data=st.data(), seed=st.integers(0, 1 << 30))
    def map_run(self, logical: int, data: st.DataObject, seed: int) -> None:
        n = data.draw(st.integers(1, 2 * self.longest + 3), label="n")  # longer runs are cut into extents
        physical = self.next_physical
        self.next_physical += n + 1  # a gap: never contiguous on disk with the previous run by accident
        self._map(logical, physical, n, seed)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 1 << 30))
    def append_contiguous(self, data: st.DataObject, seed: int) -> None:
        """Map the blocks right after an extent to the physical blocks right after it: the extent grows."""
        key, physical, csums = data.draw(st.sampled_from(list(extents.extents(self.tree))), label="extent")
        room = self.longest - len(csums)
        if room <= 0:
            return
        n = data.draw(st.integers(1, room), label="n")
        start = physical + len(csums)
        live = {p for p, _ in self.model.values()}
        if any(p in live for p in range(start, start + n)):
            return
        self.next_physical = max(self.next_physical, start + n + 1)
        logical = key + len(csums)
        self._map(logical, start, n, seed)
        first = next(extents.extents(self.tree, logical, logical + 1))
        if logical + n <= key + self.longest:
            assert first[0] == key, "a run contiguous in file and on disk was not merged into the extent before"

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 1 << 30), after_prev=st.booleans())
    def rewrite_extent(self, data: st.DataObject, seed: int, after_prev: bool) -> None:
        """Map exactly the blocks of one extent to new places (a rewrite of a hot block): to fresh blocks, or to
        the blocks right after the extent before it on disk, when that extent ends where this one starts."""
        every = list(extents.extents(self.tree))
        i = data.draw(st.integers(0, len(every) - 1), label="extent")
        key, _, csums = every[i]
        n = len(csums)
        start = self.next_physical
        merges = False
        if after_prev and i > 0:
            pkey, pphys, pcsums = every[i - 1]
            live = {p for p, _ in self.model.values()}
            candidate = pphys + len(pcsums)
            if pkey + len(pcsums) == key and not any(p in live for p in range(candidate, candidate + n)):
                start, merges = candidate, len(pcsums) < self.longest
        self.next_physical = max(self.next_physical, start + n + 1)
        self._map(key, start, n, seed)
        if merges:
            first = next(extents.extents(self.tree, key, key + 1))
            assert first[0] == every[i - 1][0], "a rewrite contiguous with the extent before was not merged into it"

    @rule(lo=st.integers(0, 450), span=st.one_of(st.integers(0, 80), st.none()))
    def unmap(self, lo: int, span: int | None) -> None:
        hi = None if span is None else lo + span
        freed, free = self._free_recorder()
        dropped = extents.unmap(self.tree, lo, hi, free)
        self._apply_drop(lo, hi, freed, dropped)

    @rule(index=st.integers(0, 460), limit=st.integers(1, 64))
    def lookup_run(self, index: int, limit: int) -> None:
        physical, csums, n = extents.lookup_run(self.tree, index, limit)
        assert 1 <= n <= limit
        if index in self.model:
            assert physical != 0 and len(csums) == n
            for i in range(n):
                assert self.model.get(index + i) == (physical + i, csums[i])
        else:
            assert physical == 0 and csums == []
            assert all(index + i not in self.model for i in range(n))
            assert n == limit or index + n in self.model, "hole reported shorter than it is"

    @rule(index=st.integers(0, 460))
    def physical_at(self, index: int) -> None:
        assert extents.physical_at(self.tree, index) == self.model.get(index, (0, 0))[0]

    @rule(lo=st.integers(0, 460), span=st.one_of(st.integers(0, 80), st.none()))
    def extents_in_range(self, lo: int, span: int | None) -> None:
        hi = None if span is None else lo + span
        every = list(extents.extents(self.tree))
        overlapping = [e for e in every if e[0] + len(e[2]) > lo and (hi is None or e[0] < hi)]
        assert list(extents.extents(self.tree, lo, hi)) == overlapping

    @rule()
    def flush_and_reopen(self) -> None:
        self.delta += 1
        root = self.tree.flush(self.delta)
        self.tree = BTree(self.store, fmt.KIND_DLEAF, root)

    @invariant()
    def extents_match_model_and_never_overlap(self) -> None:
        if not hasattr(self, "tree"):
            return
        seen: dict[int, tuple[int, int]] = {}
        end = -1
        for key, physical, csums in extents.extents(self.tree):
            assert key >= end, f"extent at {key} overlaps the one ending at {end}"
            assert 1 <= len(csums) <= fmt.max_extent_blocks(self.BLOCKSIZE)
            assert physical > 0
            for i, c in enumerate(csums):
                seen[key + i] = (physical + i, c)
            end = key + len(csums)
        assert seen == self.model
        physicals = [p for p, _ in self.model.values()]
        assert len(physicals) == len(set(physicals)), "two logical blocks share a physical block"


class Extent512Machine(ExtentMachine):
    BLOCKSIZE = 512


class Extent4096Machine(ExtentMachine):
    BLOCKSIZE = 4096


_SETTINGS = settings(max_examples=80, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestExtents512 = Extent512Machine.TestCase
TestExtents512.settings = _SETTINGS
TestExtents4096 = Extent4096Machine.TestCase
TestExtents4096.settings = _SETTINGS


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [512, 4096, 65536])
def test_long_run_is_cut_into_extents_of_at_most_the_maximum_length(blocksize: int) -> None:
    tree = BTree(MemStore(blocksize), fmt.KIND_DLEAF)
    limit = fmt.max_extent_blocks(blocksize)
    n = 3 * limit + 5
    csums = list(range(100, 100 + n))
    assert extents.map_run(tree, 10, 5000, csums, lambda s, c: pytest.fail("nothing to free"), blocksize) == 0
    got = list(extents.extents(tree))
    assert [(k, p, len(c)) for k, p, c in got] == [
        (10, 5000, limit), (10 + limit, 5000 + limit, limit), (10 + 2 * limit, 5000 + 2 * limit, limit),
        (10 + 3 * limit, 5000 + 3 * limit, 5)]
    assert [c for _, _, cs in got for c in cs] == csums
    tree.flush(1)


def test_remapping_the_middle_of_an_extent_frees_exactly_the_replaced_blocks() -> None:
    tree = BTree(MemStore(4096), fmt.KIND_DLEAF)
    extents.map_run(tree, 0, 100, [1] * 10, lambda s, c: None, 4096)
    freed: list[tuple[int, int]] = []
    dropped = extents.map_run(tree, 3, 500, [2] * 4, lambda s, c: freed.append((s, c)), 4096)
    assert dropped == 4
    assert freed == [(103, 4)]
    assert [(k, p, len(c)) for k, p, c in extents.extents(tree)] == [(0, 100, 3), (3, 500, 4), (7, 107, 3)]


def test_lookup_in_a_hole_reports_the_distance_to_the_next_extent() -> None:
    tree = BTree(MemStore(4096), fmt.KIND_DLEAF)
    extents.map_run(tree, 20, 100, [7, 8], lambda s, c: None, 4096)
    assert extents.lookup_run(tree, 5, 100) == (0, [], 15)
    assert extents.lookup_run(tree, 5, 10) == (0, [], 10)
    assert extents.lookup_run(tree, 21, 100) == (101, [8], 1)
    assert extents.lookup_run(tree, 22, 4) == (0, [], 4)


def test_unmap_to_the_end_of_file_drops_everything_from_the_cut() -> None:
    tree = BTree(MemStore(512), fmt.KIND_DLEAF)
    extents.map_run(tree, 0, 10, [1] * 5, lambda s, c: None, 512)
    extents.map_run(tree, 50, 90, [1] * 5, lambda s, c: None, 512)
    freed: list[tuple[int, int]] = []
    assert extents.unmap(tree, 2, None, lambda s, c: freed.append((s, c))) == 8
    assert sorted(freed) == [(12, 3), (90, 5)]
    assert [(k, p, len(c)) for k, p, c in extents.extents(tree)] == [(0, 10, 2)]
