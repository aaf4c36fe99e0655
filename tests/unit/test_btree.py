"""The copy-on-write B+tree (tux3fuse.backend.btree) against a dict model, over an in-memory block store.

The store hands out block numbers from a counter (a block is never reused), refuses to overwrite a block, records
every free, and after each flush "poisons" the blocks freed since the previous flush (drops their content, as a
real allocator would hand them out again), so a tree that still read them would fail.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tux3fuse import format as fmt
from tux3fuse.backend.btree import BTree

KIND = fmt.KIND_ILEAF


class MemStore:
    """Store protocol over a dict of blocks, with an allocation counter and a record of frees and writes."""

    def __init__(self, blocksize: int) -> None:
        self.blocksize = blocksize
        self.blocks: dict[int, bytes] = {}
        self.next_block = 100
        self.ever_written: set[int] = set()
        self.poisoned: set[int] = set()
        self.allocated: list[int] = []  # since the last checkpoint
        self.freed: list[int] = []
        self.written: list[int] = []

    def read_block(self, block: int) -> bytes:
        assert block not in self.poisoned, f"read of block {block}, freed by an earlier flush"
        assert block in self.blocks, f"read of block {block}, never written"
        return self.blocks[block]

    def alloc_meta(self) -> int:
        self.next_block += 1
        self.allocated.append(self.next_block)
        return self.next_block

    def free_meta(self, block: int) -> None:
        self.freed.append(block)

    def write_meta(self, block: int, data: bytearray) -> None:
        assert block in self.allocated, f"write to block {block}, not allocated for this flush"
        assert block not in self.ever_written, f"block {block} overwritten"
        assert len(data) == self.blocksize
        self.ever_written.add(block)
        self.blocks[block] = bytes(data)
        self.written.append(block)

    def checkpoint(self) -> None:
        """The flush is durable: blocks freed since the last one may now be reused (poison them)."""
        for block in self.freed:
            self.blocks.pop(block, None)
            self.poisoned.add(block)
        self.allocated, self.freed, self.written = [], [], []


def walk_disk(store: MemStore, root: int) -> tuple[set[int], list[tuple[int, bytes]]]:
    """Blocks reachable from ``root`` and the items they hold, decoded straight from the store's bytes."""
    if root == 0:
        return set(), []
    live: set[int] = set()
    items: list[tuple[int, bytes]] = []

    def visit(block: int, want_level: int | None, lo: int | None, hi: int | None) -> None:
        assert block not in live, f"block {block} reachable twice"
        live.add(block)
        buf = store.blocks[block]
        kind, level, count, _ = fmt.unseal(buf, block, (KIND, fmt.KIND_BNODE))
        assert count > 0, f"empty node {block} on disk"
        if want_level is not None:
            assert level == want_level
        if level == 0:
            assert kind == KIND
            keys, vals = fmt.unpack_leaf(buf, count)
            items.extend(zip(keys, vals, strict=True))
        else:
            assert kind == fmt.KIND_BNODE
            keys, children = fmt.unpack_bnode(buf, count)
            for i, child in enumerate(children):
                visit(child, level - 1, keys[i], keys[i + 1] if i + 1 < len(keys) else hi)
        assert keys == sorted(set(keys)), f"keys of block {block} not strictly increasing"

    visit(root, None, None, None)
    keys = [k for k, _ in items]
    assert keys == sorted(set(keys)), "keys not in order across leaves"
    return live, items


def value_of(rng_seed: int, length: int) -> bytes:
    return random.Random(rng_seed).randbytes(length)


def max_value_len(blocksize: int) -> int:
    """The largest value BTree.insert accepts: an entry of half a leaf."""
    return fmt.leaf_capacity(blocksize) // 2 - fmt.leaf_entry_cost(0)


keys_st = st.one_of(st.integers(0, 400), st.integers(0, (1 << 64) - 1))


class BTreeMachine(RuleBasedStateMachine):
    BLOCKSIZE = 512

    @initialize()
    def setup(self) -> None:
        self.store = MemStore(self.BLOCKSIZE)
        self.tree = BTree(self.store, KIND)
        self.model: dict[int, bytes] = {}
        self.old_live: set[int] = set()
        self.delta = 0
        self.changed = False
        self.maxlen = max_value_len(self.BLOCKSIZE)
        self.flushes = 0

    # -- changes ---------------------------------------------------------------------------------------------------

    @rule(key=keys_st, data=st.data())
    def insert(self, key: int, data: st.DataObject) -> None:
        length = data.draw(st.integers(0, self.maxlen), label="length")
        value = value_of(data.draw(st.integers(0, 1 << 30), label="seed"), length)
        self.tree.insert(key, value)
        self.model[key] = value
        self.changed = True

    @rule(start=st.integers(0, 5000), count=st.integers(1, 80), step=st.integers(1, 7),
          small=st.booleans(), seed=st.integers(0, 1 << 30))
    def bulk_insert(self, start: int, count: int, step: int, small: bool, seed: int) -> None:
        rng = random.Random(seed)
        for i in range(count):
            key = start + i * step
            value = rng.randbytes(rng.randint(0, 16 if small else self.maxlen))
            self.tree.insert(key, value)
            self.model[key] = value
        self.changed = True

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def replace_existing(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)), label="key")
        length = data.draw(st.integers(0, self.maxlen), label="length")
        value = value_of(key ^ length, length)
        self.tree.insert(key, value)
        self.model[key] = value
        self.changed = True

    @rule(key=keys_st, data=st.data())
    def replace_floor_in_place(self, key: int, data: st.DataObject) -> None:
        """floor_at + replace_at: the entry at or before ``key`` gets a new value (in its leaf, or None when
        it lies in a leaf further left), as ``insert`` would give it."""
        found = self.tree.floor_at(key)
        below = [k for k in self.model if k <= key]
        if found is None:  # no entry at or before key, or it is in a leaf further left: floor still finds it
            got = self.tree.floor(key)
            assert (got[0] if got else None) == (max(below) if below else None)
            return
        path, i = found
        floor_key = path[-1][0].keys[i]
        assert floor_key == max(below)
        length = data.draw(st.integers(0, self.maxlen), label="length")
        value = value_of(floor_key ^ (length << 3), length)
        self.tree.replace_at(path, i, value)
        self.model[floor_key] = value
        self.changed = True
        assert self.tree.lookup(floor_key) == value

    @rule(key=keys_st)
    def delete_any(self, key: int) -> None:
        found = self.tree.delete(key)
        assert found == (key in self.model)
        if found:
            del self.model[key]
            self.changed = True

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_existing(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)), label="key")
        assert self.tree.delete(key) is True
        del self.model[key]
        self.changed = True
        assert self.tree.lookup(key) is None

    @rule(lo=st.integers(0, 6000), span=st.one_of(st.integers(0, 600), st.none()))
    def delete_range(self, lo: int, span: int | None) -> None:
        hi = None if span is None else lo + span
        expect = sorted((k, v) for k, v in self.model.items() if k >= lo and (hi is None or k < hi))
        gone = self.tree.delete_range(lo, hi)
        assert sorted(gone) == expect
        for k, _ in expect:
            del self.model[k]
        self.changed |= bool(expect)

    @rule()
    def flush(self) -> None:
        self._flush()

    @rule()
    def flush_and_reopen(self) -> None:
        root = self._flush()
        self.tree = BTree(self.store, KIND, root)

    @precondition(lambda self: self.model and self.flushes)
    @rule()
    def free_all(self) -> None:
        self.tree.free_all()
        self.model.clear()
        self.changed = True
        assert self.tree.lookup(0) is None and list(self.tree.items()) == []

    def _flush(self) -> int:
        store = self.store
        was_dirty = self.tree.dirty()
        freed_before = list(store.freed)
        self.delta += 1
        root = self.tree.flush(self.delta)
        self.flushes += 1
        new_live, disk_items = walk_disk(store, root)
        # the flushed image holds exactly the model
        assert disk_items == sorted(self.model.items())
        freed = Counter(store.freed)
        double = [b for b, n in freed.items() if n > 1]
        assert not double, f"blocks freed more than once: {double}"
        assert set(freed) == self.old_live - new_live, (
            f"freed {sorted(freed)} but the flush dropped {sorted(self.old_live - new_live)}")
        assert not set(freed) & new_live, "a live block was freed"
        written = set(store.written)
        assert not written & self.old_live, "flush overwrote a block of the previous tree"
        assert written == new_live - self.old_live, "flush wrote blocks the new tree does not use (or vice versa)"
        assert sorted(store.allocated) == sorted(store.written), "allocated blocks were not written"
        if not self.changed:
            assert not was_dirty and not store.written and not freed_before, "an unchanged tree wrote or freed"
        assert set(self.tree.blocks()) == new_live
        assert not self.tree.dirty()
        assert self.tree.root_block == root
        if not self.model:
            assert root == 0
        store.checkpoint()
        self.old_live = new_live
        self.changed = False
        return root

    # -- queries ---------------------------------------------------------------------------------------------------

    @rule(lo=st.integers(0, 6000), span=st.one_of(st.integers(0, 800), st.none()))
    def items_range(self, lo: int, span: int | None) -> None:
        hi = None if span is None else lo + span
        expect = sorted((k, v) for k, v in self.model.items() if k >= lo and (hi is None or k < hi))
        assert list(self.tree.items(lo, hi)) == expect

    @rule(key=keys_st)
    def floor_and_lookup(self, key: int) -> None:
        below = [k for k in self.model if k <= key]
        expect = (max(below), self.model[max(below)]) if below else None
        assert self.tree.floor(key) == expect
        assert self.tree.lookup(key) == self.model.get(key)

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "tree"):
            return
        expect = sorted(self.model.items())
        assert list(self.tree.items()) == expect
        assert len(self.tree) == len(expect)
        keys = [k for k, _ in expect]
        for i, (k, v) in enumerate(expect):
            assert self.tree.lookup(k) == v
            assert self.tree.floor(k) == (k, v)
            if k and (i == 0 or keys[i - 1] != k - 1):
                assert self.tree.floor(k - 1) == (expect[i - 1] if i else None)
                assert self.tree.lookup(k - 1) is None


class BTree512Machine(BTreeMachine):
    BLOCKSIZE = 512


class BTree4096Machine(BTreeMachine):
    BLOCKSIZE = 4096


MACHINE_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestBTree512 = BTree512Machine.TestCase
TestBTree512.settings = MACHINE_SETTINGS
TestBTree4096 = BTree4096Machine.TestCase
TestBTree4096.settings = MACHINE_SETTINGS


# ---------------------------------------------------------------------------------------------------------------
# Deterministic cases


def _fill(tree: BTree, n: int, length: int = 20) -> dict[int, bytes]:
    model = {}
    for k in range(n):
        model[k * 10] = value_of(k, length)
        tree.insert(k * 10, model[k * 10])
    return model


@pytest.mark.parametrize("blocksize", [512, 4096])
def test_deep_tree_survives_reopen_and_lazy_loading(blocksize: int) -> None:
    store = MemStore(blocksize)
    tree = BTree(store, KIND)
    model = _fill(tree, 3000 if blocksize == 512 else 20000, length=24)
    root = tree.flush(1)
    assert tree.root.level >= 2
    live, items = walk_disk(store, root)
    assert items == sorted(model.items())
    again = BTree(store, KIND, root)
    assert again.lookup(12340) == model[12340]
    assert again.floor(12345) == (12340, model[12340])
    assert again.floor(0) == (0, model[0])
    assert list(again.items(500, 560)) == [(k, model[k]) for k in range(500, 560, 10)]
    assert set(again.blocks()) == live


@pytest.mark.parametrize("blocksize", [512, 4096])
def test_deleting_every_key_frees_every_block_and_empties_the_root(blocksize: int) -> None:
    store = MemStore(blocksize)
    tree = BTree(store, KIND)
    model = _fill(tree, 600)
    root = tree.flush(1)
    live, _ = walk_disk(store, root)
    store.checkpoint()
    tree = BTree(store, KIND, root)
    for key in sorted(model, key=lambda k: (k * 7919) % 6007):
        assert tree.delete(key)
    assert tree.root is None
    assert tree.flush(2) == 0
    assert Counter(store.freed) == Counter(live)
    assert store.written == []


def test_update_of_one_key_rewrites_only_its_path() -> None:
    store = MemStore(512)
    tree = BTree(store, KIND)
    _fill(tree, 2000)
    root = tree.flush(1)
    depth = tree.root.level + 1
    store.checkpoint()
    tree.insert(10000 // 2, b"changed")
    new_root = tree.flush(2)
    assert len(store.written) == depth
    assert len(store.freed) == depth
    assert new_root != root
    assert BTree(store, KIND, new_root).lookup(5000) == b"changed"


def test_value_larger_than_half_a_leaf_is_refused() -> None:
    tree = BTree(MemStore(512), KIND)
    limit = fmt.leaf_capacity(512) // 2 - fmt.leaf_entry_cost(0)
    tree.insert(1, b"x" * limit)
    with pytest.raises(ValueError, match="too large"):
        tree.insert(2, b"x" * (limit + 1))


def test_corrupted_node_is_reported_with_its_block_number() -> None:
    store = MemStore(512)
    tree = BTree(store, KIND)
    _fill(tree, 400)
    root = tree.flush(1)
    keys, children = fmt.unpack_bnode(store.blocks[root], fmt.unseal(store.blocks[root], root, (fmt.KIND_BNODE,))[2])
    victim = children[-1]
    buf = bytearray(store.blocks[victim])
    buf[-1] ^= 0xFF
    store.blocks[victim] = bytes(buf)
    fresh = BTree(store, KIND, root)
    assert fresh.lookup(0) is not None  # the first subtree is intact
    with pytest.raises(fmt.CorruptBlock) as info:
        fresh.lookup(3990)
    assert info.value.block == victim
    assert info.value.reason == "checksum mismatch"


@pytest.mark.parametrize("blocksize", [512, 4096])
def test_leaf_split_never_leaves_an_overflowing_leaf(blocksize: int) -> None:
    cap = fmt.leaf_capacity(blocksize)
    entry = fmt.leaf_entry_cost(0)
    small, mid, big = (cap * 3 // 10) - entry, (cap * 4 // 10) - entry, cap // 2 - entry
    tree = BTree(MemStore(blocksize), KIND)
    tree.insert(1, b"a" * small)
    tree.insert(2, b"b" * small)
    tree.insert(4, b"d" * mid)  # the leaf is nearly full: no split yet
    tree.insert(3, b"c" * big)  # legal value (half a leaf) forces a split
    # a split that put the entry crossing the half-way mark (key 3) on the left made that leaf overflow
    root = tree.flush(1)
    assert tree.root.level == 1
    for leaf in tree.root.vals:
        assert leaf.used <= cap
    assert [k for k, _ in BTree(tree.store, KIND, root).items()] == [1, 2, 3, 4]


def test_a_tree_whose_pointers_all_name_one_node_is_corrupt_and_read_once_per_block() -> None:
    """Ten levels of nodes whose 30 pointers all name the node below: a walk that followed every pointer would
    visit 30^10 leaves; the tree reads each block once and calls the second pointer to a block corruption."""
    store = MemStore(512)
    leaf = store.next_block = 1000
    store.blocks[leaf] = bytes(fmt.pack_leaf(512, KIND, [1], [b"v"], leaf, 1))
    child = leaf
    for level in range(1, 11):
        block = child + 1
        store.blocks[block] = bytes(fmt.pack_bnode(512, level, list(range(0, 300, 10)), [child] * 30, block, 1))
        child = block
    reads = Counter()
    read = store.read_block
    store.read_block = lambda b: reads.update([b]) or read(b)
    tree = BTree(store, KIND, child)
    with pytest.raises(fmt.CorruptBlock, match=f"block {leaf}: the tree reaches this block twice"):
        list(tree.items())
    assert max(reads.values()) == 1 and len(reads) == 11


def test_a_child_whose_level_is_not_one_below_its_parent_is_corrupt() -> None:
    store = MemStore(512)
    store.blocks[10] = bytes(fmt.pack_leaf(512, KIND, [1], [b"v"], 10, 1))
    store.blocks[11] = bytes(fmt.pack_bnode(512, 2, [0], [10], 11, 1))  # level 2 over a leaf
    with pytest.raises(fmt.CorruptBlock, match="block 10: level 0 under level 2"):
        BTree(store, KIND, 11).lookup(1)
