"""Extent trees: the map from a file's logical blocks to physical blocks, with a checksum per data block.

Guarantees:
- Extents never overlap; a key is the first logical block of its extent and the extent's length is the number of
  checksums it carries (at most ``max_extent_blocks``).
- Remapping or unmapping a range hands every physical block it drops to ``free`` exactly once.
- Data is never overwritten in place: a rewritten block always gets a new physical block (the caller allocates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..format import extend_extent, extent_head, max_extent_blocks, pack_extent, slice_extent, unpack_extent
from .btree import BTree

Free = Callable[[int, int], None]


def extents(tree: BTree, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, int, list[int]]]:
    """(logical, physical, checksums) of the extents overlapping [lo, hi)."""
    first = tree.floor(lo)
    if first is not None:
        key, value = first
        physical, csums = unpack_extent(value)
        if key + len(csums) > lo and key < lo:
            yield key, physical, csums
    for key, value in tree.items(lo, hi):
        physical, csums = unpack_extent(value)
        yield key, physical, csums


def _records(tree: BTree, lo: int, hi: int | None) -> list[tuple[int, bytes]]:
    """(key, record) of the extents overlapping [lo, hi), without unpacking their checksums."""
    found = []
    first = tree.floor(lo)
    if first is not None and first[0] < lo and first[0] + extent_head(first[1])[1] > lo:
        found.append(first)
    found.extend(tree.items(lo, hi))
    return found


def unmap(tree: BTree, lo: int, hi: int | None, free: Free) -> int:
    """Remove the mapping of logical blocks [lo, hi); return how many mapped blocks were dropped."""
    dropped = 0
    for key, value in _records(tree, lo, hi):
        physical, count = extent_head(value)
        end = key + count
        cut_lo, cut_hi = max(key, lo), end if hi is None else min(end, hi)
        if cut_lo >= cut_hi:
            continue
        free(physical + cut_lo - key, cut_hi - cut_lo)
        dropped += cut_hi - cut_lo
        if key < cut_lo:  # the part before the cut keeps the key: replaced in place
            tree.insert(key, slice_extent(value, 0, cut_lo - key))
        else:
            tree.delete(key)
        if cut_hi < end:
            tree.insert(cut_hi, slice_extent(value, cut_hi - key, end - cut_hi))
    return dropped


def map_run(tree: BTree, logical: int, physical: int, csums: list[int], free: Free, blocksize: int) -> int:
    """Map logical blocks [logical, logical+n) to physical blocks [physical, physical+n); return blocks dropped."""
    n = len(csums)
    end = logical + n
    limit = max_extent_blocks(blocksize)
    # the extent starting last before the end: only it can tell whether any overlaps
    found = tree.floor_at(end - 1)
    if found is None:
        last = tree.floor(end - 1)  # in a leaf further left, or none
    else:
        path, i = found
        leaf = path[-1][0]
        last = leaf.keys[i], leaf.vals[i]
        lphys, lcount = extent_head(last[1])
        if last[0] == logical and lcount == n and i > 0:  # a rewrite of exactly one extent, whose neighbour
            pkey = leaf.keys[i - 1]  # before is in the same leaf: replaced in place, with one walk of the tree
            pphys, pcount = extent_head(leaf.vals[i - 1])
            if not (pkey + pcount == logical and pphys + pcount == physical and pcount < limit):  # no merge
                free(lphys, n)
                tree.replace_at(path, i, pack_extent(physical, csums))
                return n
    replace = False
    if last is None or last[0] + extent_head(last[1])[1] <= logical:
        dropped = 0  # nothing mapped in the range (a file growing): the extent before is ``last``
        prev = last
    else:
        lphys, lcount = extent_head(last[1])
        prev = tree.floor(logical - 1) if logical else None
        if last[0] == logical and lcount == n:  # the run replaces exactly one extent (a rewrite of its blocks)
            free(lphys, n)
            dropped = n
            replace = True
        else:
            dropped = unmap(tree, logical, end, free)
            if prev is not None and prev[0] + extent_head(prev[1])[1] > logical:
                prev = tree.floor(logical - 1)  # the unmap cut it: read it again
    if prev is not None:  # extend the extent just before when it is contiguous on disk too
        key, value = prev
        pphys, count = extent_head(value)
        if key + count == logical and pphys + count == physical and count < limit:
            if replace:
                tree.delete(logical)
                replace = False
            take = min(limit - count, n)
            tree.insert(key, extend_extent(value, csums[:take]))
            logical, physical, csums = logical + take, physical + take, csums[take:]
    while csums:  # a replaced extent's key is written over by the first of these
        tree.insert(logical, pack_extent(physical, csums[:limit]))
        logical, physical, csums = logical + limit, physical + limit, csums[limit:]
    return dropped


def physical_at(tree: BTree, index: int) -> int:
    """The physical block behind logical block ``index``, 0 in a hole (reads no checksums)."""
    found = tree.floor(index)
    if found is None:
        return 0
    key, value = found
    physical, count = extent_head(value)
    return physical + index - key if index < key + count else 0


def lookup_run(tree: BTree, index: int, limit: int) -> tuple[int, list[int], int]:
    """What backs logical block ``index``: (physical, checksums, n) for n mapped blocks from index, or
    (0, [], n) for a hole of n blocks (n <= limit)."""
    found = tree.floor(index)
    if found is not None:
        key, value = found
        physical, csums = unpack_extent(value)
        if index < key + len(csums):
            n = min(limit, key + len(csums) - index)
            return physical + index - key, csums[index - key: index - key + n], n
    for key, _ in tree.items(index + 1, index + limit):
        return 0, [], key - index
    return 0, [], limit
