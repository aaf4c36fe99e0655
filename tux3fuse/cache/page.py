"""A cached block of a file: its data and the delta that owns it.

Guarantee: a page is in exactly one state — clean (``delta == CLEAN``) or dirty for one delta — so a page never
holds data of two deltas. ``writeback`` marks a page whose data the backend is writing; ``forked`` marks a page
that has been replaced in its address space by a copy and must never be modified again. ``pins`` counts pins
(the get_user_pages analogue): a pinned page may be written at any moment through its pin.
"""

from __future__ import annotations

CLEAN = -1


class Page:
    __slots__ = ("index", "data", "delta", "writeback", "forked", "mapping", "pins", "redirty")

    def __init__(self, index: int, data: bytearray | memoryview, mapping: object = None) -> None:
        self.index = index
        self.data = data
        self.delta = CLEAN
        self.writeback = False
        self.forked = False
        self.mapping = mapping
        self.pins = 0  # get_user_pages-style references that may write the page at any time
        self.redirty = CLEAN  # changed in place for this delta while the backend has it (during its I/O with
        # stable=none, or after it in any mode); the page moves to that delta when the commit completes

    def mutable(self) -> bytearray:
        """The page's data as a bytearray. Pages filled by whole-page writes or reads share the request's or the
        read's buffer (a read-only memoryview) until something changes part of them."""
        if not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)
        return self.data

    @property
    def dirty(self) -> bool:
        return self.delta != CLEAN

    def __repr__(self) -> str:
        state = "clean" if self.delta == CLEAN else f"dirty@{self.delta}"
        return f"<Page {self.index} {state}{' wb' if self.writeback else ''}{' forked' if self.forked else ''}>"
