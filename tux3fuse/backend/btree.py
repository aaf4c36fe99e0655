"""Copy-on-write B+trees: u64 keys to byte-string values (inode table, extent trees, orphan tree).

Guarantees:
- A tree never overwrites a block that a committed state may reference: ``flush`` writes every node changed since
  the last flush to a newly allocated block, and frees the block it replaces through the store, which defers the
  free until the delta that freed it is durable.
- Keys are strictly increasing across the whole tree; the first key of each interior node bounds its subtree from
  below (the leftmost bound of a node is never relied on).
- Only the backend modifies a tree; lookups from the frontend see the last flushed or the backend's current state
  and never wait (nodes are loaded with a synchronous read).
- A node read from disk is used only after its checks: its seal, its kind and level (a child one level below its
  parent, no level above ``MAX_LEVEL``), its entries (keys strictly increasing, counts that fit the block), the
  store's own check of its values (``check``: pointers and records, ``validity.py``), and that no other pointer of
  the tree reached its block before: a block reached twice is a CorruptBlock, so a walk reads each block of a tree
  at most once and every walk is bounded by the volume, never exponential.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Protocol

from .. import format as fmt


class Store(Protocol):
    blocksize: int

    def read_block(self, block: int) -> bytes: ...
    def alloc_meta(self) -> int: ...
    def free_meta(self, block: int) -> None: ...
    def write_meta(self, block: int, data: bytearray) -> None: ...


class Node:
    __slots__ = ("level", "keys", "vals", "blocknr", "dirty", "used")

    def __init__(self, level: int, keys: list[int], vals: list, blocknr: int = 0, dirty: bool = True) -> None:
        self.level = level
        self.keys = keys
        self.vals = vals  # leaf: values (bytes); interior: children (Node, or block number not yet loaded)
        self.blocknr = blocknr
        self.dirty = dirty
        self.used = sum(fmt.leaf_entry_cost(len(v)) for v in vals) if level == 0 else 0


Check = Callable[[int, list[int], list], "str | None"]  # (level, keys, values) of a node read -> what is wrong


class BTree:
    def __init__(self, store: Store, leaf_kind: bytes, root_block: int = 0, check: Check | None = None) -> None:
        self.store = store
        self.leaf_kind = leaf_kind
        self.root_block = root_block
        self.check = check
        self.loaded: set[int] = set()  # every block this tree has read: reaching one again is corruption
        self._root: Node | None = None
        self.leaf_cap = fmt.leaf_capacity(store.blocksize)
        self.bnode_cap = fmt.bnode_capacity(store.blocksize)
        self.dirty_nodes = 0  # nodes the next flush writes (an upper bound: dropped dirty nodes still count)

    # -- loading ---------------------------------------------------------------------------------------------------

    def _load(self, block: int, level: int | None = None) -> Node:
        """The node in ``block`` (at ``level``, when the parent says), after every check of the module docstring;
        only a node that passes them counts as reached."""
        if block in self.loaded:
            raise fmt.CorruptBlock(block, fmt.KIND_NAMES[self.leaf_kind], "the tree reaches this block twice")
        buf = self.store.read_block(block)
        kind, got, count, _ = fmt.unseal(buf, block, (self.leaf_kind, fmt.KIND_BNODE))
        name = fmt.KIND_NAMES[kind]
        if level is not None and got != level:
            raise fmt.CorruptBlock(block, name, f"level {got} under level {level + 1}")
        try:
            if got > fmt.MAX_LEVEL:
                raise ValueError(f"level {got} above {fmt.MAX_LEVEL}")
            if got == 0:
                if kind != self.leaf_kind:
                    raise ValueError("leaf level in an interior node")
                keys, vals = fmt.unpack_leaf(buf, count)
            else:
                if kind != fmt.KIND_BNODE:
                    raise ValueError("interior level in a leaf")
                keys, vals = fmt.unpack_bnode(buf, count)
        except (ValueError, IndexError) as e:
            raise fmt.CorruptBlock(block, name, str(e)) from None
        if any(a >= b for a, b in zip(keys, keys[1:], strict=False)) or not keys:
            raise fmt.CorruptBlock(block, name, "keys out of order or node empty")
        problem = self.check(got, keys, vals) if self.check is not None else None
        if problem is not None:
            raise fmt.CorruptBlock(block, name, problem)
        self.loaded.add(block)
        return Node(got, keys, vals, block, dirty=False)

    @property
    def root(self) -> Node | None:
        if self._root is None and self.root_block:
            self._root = self._load(self.root_block)
        return self._root

    def _child(self, node: Node, i: int) -> Node:
        child = node.vals[i]
        if isinstance(child, int):
            child = self._load(child, node.level - 1)
            node.vals[i] = child
        return child

    def _path(self, key: int) -> list[tuple[Node, int]]:
        """Nodes from the root to the leaf that holds (or would hold) key, with the child index taken."""
        node = self.root
        path = []
        while node is not None and node.level > 0:
            i = max(0, bisect_right(node.keys, key) - 1)
            path.append((node, i))
            node = self._child(node, i)
        if node is not None:
            path.append((node, -1))
        return path

    # -- reading ---------------------------------------------------------------------------------------------------

    def lookup(self, key: int) -> bytes | None:
        path = self._path(key)
        if not path:
            return None
        leaf = path[-1][0]
        i = bisect_left(leaf.keys, key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            return leaf.vals[i]
        return None

    def leaf_block(self, key: int) -> int:
        """The block of the leaf that holds ``key`` (0 for a leaf not written yet): to name it in an error."""
        path = self._path(key)
        return path[-1][0].blocknr if path else 0

    def items(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(key, value) pairs with lo <= key < hi, in key order. The tree must not change while iterating."""
        root = self.root
        if root is None:
            return
        yield from self._walk(root, lo, hi)

    def _walk(self, node: Node, lo: int, hi: int | None) -> Iterator[tuple[int, bytes]]:
        if node.level == 0:
            for i in range(bisect_left(node.keys, lo), len(node.keys)):
                if hi is not None and node.keys[i] >= hi:
                    return
                yield node.keys[i], node.vals[i]
            return
        first = max(0, bisect_right(node.keys, lo) - 1)
        for i in range(first, len(node.keys)):
            if hi is not None and i > first and node.keys[i] >= hi:
                return
            yield from self._walk(self._child(node, i), lo, hi)

    def floor(self, key: int) -> tuple[int, bytes] | None:
        """The entry with the greatest key <= key."""
        path = self._path(key)
        if not path:
            return None
        leaf = path[-1][0]
        i = bisect_right(leaf.keys, key) - 1
        if i >= 0:
            return leaf.keys[i], leaf.vals[i]
        for depth in range(len(path) - 2, -1, -1):  # the floor sits in a leaf further left
            node, ci = path[depth]
            if ci > 0:
                node = self._child(node, ci - 1)
                while node.level > 0:
                    node = self._child(node, len(node.keys) - 1)
                return node.keys[-1], node.vals[-1]
        return None

    def floor_at(self, key: int) -> tuple[list[tuple[Node, int]], int] | None:
        """Where the entry with the greatest key <= key is: (path to its leaf, its index there), or None when no
        such entry is in the leaf that would hold key (``floor`` looks further left). For ``replace_at``."""
        path = self._path(key)
        if not path:
            return None
        i = bisect_right(path[-1][0].keys, key) - 1
        return (path, i) if i >= 0 else None

    def replace_at(self, path: list[tuple[Node, int]], i: int, value: bytes) -> None:
        """Replace the value of entry ``i`` of the path's leaf, as found by ``floor_at`` with no change to the
        tree since: ``insert`` of that key, without walking the tree again."""
        if fmt.leaf_entry_cost(len(value)) > self.leaf_cap // 2:
            raise ValueError(f"value of {len(value)} bytes too large for a leaf")
        self._dirty(path)
        leaf = path[-1][0]
        leaf.used += len(value) - len(leaf.vals[i])
        leaf.vals[i] = value
        if leaf.used > self.leaf_cap:
            self._split(path)

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    # -- changing --------------------------------------------------------------------------------------------------

    def _dirty(self, path: list[tuple[Node, int]]) -> None:
        for node, _ in path:
            if not node.dirty:
                node.dirty = True
                self.dirty_nodes += 1

    def _new(self, level: int, keys: list[int], vals: list) -> Node:
        self.dirty_nodes += 1
        return Node(level, keys, vals)

    def insert(self, key: int, value: bytes) -> None:
        """Insert or replace."""
        if fmt.leaf_entry_cost(len(value)) > self.leaf_cap // 2:
            raise ValueError(f"value of {len(value)} bytes too large for a leaf")
        path = self._path(key)
        if not path:
            self._root = self._new(0, [key], [value])
            return
        self._dirty(path)
        leaf = path[-1][0]
        i = bisect_left(leaf.keys, key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            leaf.used += len(value) - len(leaf.vals[i])
            leaf.vals[i] = value
        else:
            leaf.keys.insert(i, key)
            leaf.vals.insert(i, value)
            leaf.used += fmt.leaf_entry_cost(len(value))
            if i == 0 and len(path) > 1:
                self._fix_low_key(path, key)
        if leaf.used > self.leaf_cap:
            self._split(path)

    def _fix_low_key(self, path: list[tuple[Node, int]], key: int) -> None:
        for node, ci in reversed(path[:-1]):
            if node.keys[ci] > key:
                node.keys[ci] = key
            if ci != 0:
                break

    def _split(self, path: list[tuple[Node, int]]) -> None:
        depth = len(path) - 1
        node = path[depth][0]
        while True:
            if node.level == 0:  # split where the larger half is smallest: both halves then fit
                costs = [fmt.leaf_entry_cost(len(v)) for v in node.vals]
                best, mid, left = None, 1, 0
                for i in range(1, len(costs)):
                    left += costs[i - 1]
                    worst = max(left, node.used - left)
                    if best is None or worst < best:
                        best, mid = worst, i
                right = self._new(0, node.keys[mid:], node.vals[mid:])
                del node.keys[mid:], node.vals[mid:]
                node.used -= right.used
            else:
                mid = len(node.keys) // 2
                right = self._new(node.level, node.keys[mid:], node.vals[mid:])
                del node.keys[mid:], node.vals[mid:]
            if depth == 0:
                self._root = self._new(node.level + 1, [node.keys[0], right.keys[0]], [node, right])
                return
            parent, ci = path[depth - 1]
            parent.keys.insert(ci + 1, right.keys[0])
            parent.vals.insert(ci + 1, right)
            if len(parent.keys) <= self.bnode_cap:
                return
            depth -= 1
            node = parent

    def delete(self, key: int) -> bool:
        path = self._path(key)
        if not path:
            return False
        leaf = path[-1][0]
        i = bisect_left(leaf.keys, key)
        if i >= len(leaf.keys) or leaf.keys[i] != key:
            return False
        self._dirty(path)
        leaf.used -= fmt.leaf_entry_cost(len(leaf.vals[i]))
        del leaf.keys[i], leaf.vals[i]
        depth = len(path) - 1
        while not path[depth][0].keys:  # remove empty nodes upward
            gone = path[depth][0]
            if gone.blocknr:
                self.store.free_meta(gone.blocknr)
            if depth == 0:
                self._root = None
                self.root_block = 0
                return True
            parent, ci = path[depth - 1]
            del parent.keys[ci], parent.vals[ci]
            depth -= 1
        root = self._root
        while root is not None and root.level > 0 and len(root.keys) == 1:  # collapse a one-child root
            if root.blocknr:
                self.store.free_meta(root.blocknr)
            root = self._root = self._child(root, 0)
            if not root.dirty:
                root.dirty = True
                self.dirty_nodes += 1
        return True

    def delete_range(self, lo: int, hi: int | None = None) -> list[tuple[int, bytes]]:
        """Delete every entry with lo <= key < hi; return them."""
        gone = list(self.items(lo, hi))
        for key, _ in gone:
            self.delete(key)
        return gone

    # -- writing ---------------------------------------------------------------------------------------------------

    def flush(self, delta: int) -> int:
        """Write every changed node to a new block (children first); return the root block (0: empty tree)."""
        root = self._root
        if root is None:
            self.dirty_nodes = 0
            return self.root_block  # never loaded (unchanged), or 0 once emptied
        if root.dirty:
            self._flush(root, delta)
        self.dirty_nodes = 0
        self.root_block = root.blocknr
        return self.root_block

    def _flush(self, node: Node, delta: int) -> None:
        store = self.store
        bs = store.blocksize
        if node.level > 0:
            for child in node.vals:
                if isinstance(child, Node) and child.dirty:
                    self._flush(child, delta)
            children = [c if isinstance(c, int) else c.blocknr for c in node.vals]
        if node.blocknr:
            store.free_meta(node.blocknr)
        node.blocknr = store.alloc_meta()
        if node.level == 0:
            buf = fmt.pack_leaf(bs, self.leaf_kind, node.keys, node.vals, node.blocknr, delta)
        else:
            buf = fmt.pack_bnode(bs, node.level, node.keys, children, node.blocknr, delta)
        store.write_meta(node.blocknr, buf)
        node.dirty = False

    def free_all(self) -> None:
        """Free every block of the tree (the owner is being destroyed)."""
        for block in self.blocks():
            self.store.free_meta(block)
        self._root = None
        self.root_block = 0
        self.dirty_nodes = 0

    def blocks(self) -> Iterator[int]:
        """Block numbers of every node currently on disk."""
        found: list[int] = []
        walk_blocks(self, lambda block, level: found.append(block) if block else None)
        return iter(found)

    def dirty(self) -> bool:
        return self._root is not None and self._root.dirty


def walk_blocks(tree: BTree, visit: Callable[[int, int], None]) -> None:
    """Call visit(block, level) for every node (fsck)."""
    root = tree.root
    if root is None:
        return
    stack = [root]
    while stack:
        node = stack.pop()
        visit(node.blocknr, node.level)
        if node.level > 0:
            stack.extend(tree._child(node, i) for i in range(len(node.keys)))
