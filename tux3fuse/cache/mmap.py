"""Emulated shared file mappings (MAP_SHARED) with page tables, write faults and pins.

Guarantees:
- Every mapping of a file shows the same bytes as ``read()``: a store goes into the page the file's index holds,
  because a fork points every mapping at the copy (``AddressSpace.rmap_cow``) and a page that is not writable in a
  mapping faults into ``page_mkwrite`` first.
- A store through a mapping belongs to the delta that is current when it is made: when a delta transitions, its
  pages are write-protected in every mapping (``page_mkclean``), so the next store faults and the fault dirties
  the page for the new delta (forking it if the backend owns it).
- A pin (the get_user_pages analogue that ptrace, O_DIRECT and RDMA take) holds one page object and may write it
  at any moment without faulting. A pinned page is never replaced by a fork: at a transition the backend gets a
  private copy of it instead (``AddressSpace.protect_for_writeout``), and the pinned page stays in the index, dirty
  for the new delta. So a write through a pin is never lost and always lands in the delta current when it was made.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..inode import Inode
    from .page import Page


class Faults(Protocol):
    """What a mapping asks of its filesystem: the volume's embedded API provides it."""

    blocksize: int

    def page_for_mapping(self, inode: Inode, index: int) -> Page: ...
    def page_mkwrite(self, smap: SharedMapping, index: int) -> list: ...
    def release(self, ino: int) -> None: ...


class SharedMapping:
    """A MAP_SHARED mapping of a whole file: ``ptes[index] = [page, writable]``."""

    def __init__(self, vol: Faults, inode: Inode) -> None:
        self.vol = vol
        self.inode = inode
        self.ptes: dict[int, list] = {}
        self.pins: list[Pin] = []
        inode.mapping.mmaps.append(self)
        inode.opens += 1  # a mapping keeps the file alive, as an open file does

    def _range(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.inode.rec.size:
            raise OSError(errno.EFAULT, "access past the end of the mapped file (SIGBUS)")

    def read(self, offset: int, size: int) -> bytes:
        self._range(offset, size)
        bs = self.vol.blocksize
        out = bytearray()
        pos = offset
        while pos < offset + size:
            index, lo = divmod(pos, bs)
            n = min(bs - lo, offset + size - pos)
            pte = self.ptes.get(index)
            if pte is None:  # read fault: map the cached page read-only
                pte = self.ptes[index] = [self.vol.page_for_mapping(self.inode, index), False]
            out += pte[0].data[lo: lo + n]
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Store bytes through the mapping, page by page (each store may fault)."""
        self._range(offset, len(data))
        bs = self.vol.blocksize
        pos = 0
        while pos < len(data):
            index, lo = divmod(offset + pos, bs)
            n = min(bs - lo, len(data) - pos)
            pte = self.ptes.get(index)
            if pte is None or not pte[1]:
                pte = self.vol.page_mkwrite(self, index)
            pte[0].mutable()[lo: lo + n] = data[pos: pos + n]
            pos += n

    def pin(self, offset: int) -> Pin:
        """Pin the page holding ``offset`` for writing (get_user_pages with FOLL_WRITE)."""
        self._range(offset, 1)
        index = offset // self.vol.blocksize
        pte = self.ptes.get(index)
        if pte is None or not pte[1]:
            pte = self.vol.page_mkwrite(self, index)
        pin = Pin(self, pte[0])
        self.pins.append(pin)
        return pin

    def unmap(self) -> None:
        for pin in list(self.pins):
            pin.release()
        if self in self.inode.mapping.mmaps:
            self.inode.mapping.mmaps.remove(self)
            self.ptes.clear()
            self.vol.release(self.inode.ino)


class Pin:
    """One pinned page: reads and writes go straight to the page object, as DMA would."""

    def __init__(self, mapping: SharedMapping, page: Page) -> None:
        self.mapping = mapping
        self.page = page
        self.index = page.index
        page.pins += 1
        self.released = False

    @property
    def valid(self) -> bool:
        """False once the page was truncated away (its later writes are discarded, as truncated data is)."""
        return self.page.mapping is not None and self.mapping.inode.mapping.pages.get(self.index) is self.page

    def write(self, offset: int, data: bytes) -> None:
        if self.released:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.page.mutable()[offset: offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.page.data[offset: offset + size])

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.page.pins -= 1
            self.mapping.pins.remove(self)
