"""Per-file page index, per-delta dirty lists, shared mappings (rmap); a global LRU that bounds clean pages.

Guarantees:
- A dirty page is on the dirty list of exactly the delta it is tagged with, and stays in memory until the backend
  has written it (dirty pages and pages under writeback are never evicted).
- ``replace`` swaps a page for its fork in the index atomically, and ``rmap_cow`` points every shared mapping
  that mapped the old page at the new one, read-only, so that its next write faults.
- Clean pages are evicted in least-recently-used order once their total size passes the cache limit; an evicted
  page is unmapped from every shared mapping first.
"""

from __future__ import annotations

from collections import OrderedDict

from .fork import backend_owns
from .page import CLEAN, Page

MIN_PAGES = 16  # the fewest clean pages kept, whatever the limit (a mount's least cache, 1 MiB, is 16 of 64 KiB)


class PageCache:
    """Accounting shared by every address space of a volume."""

    def __init__(self, limit_bytes: int, pagesize: int) -> None:
        self.limit_pages = max(MIN_PAGES, limit_bytes // pagesize)
        self.pagesize = pagesize
        self.clean: OrderedDict[tuple[int, int], Page] = OrderedDict()
        self.dirty_pages = 0
        self.evictions = 0

    def touch(self, mapping: AddressSpace, page: Page) -> None:
        key = (mapping.ino, page.index)
        if page.delta == CLEAN:
            self.clean[key] = page
            self.clean.move_to_end(key)
            if len(self.clean) > self.limit_pages:
                self._evict(mapping.registry)
        else:
            self.clean.pop(key, None)

    def drop_clean(self, registry: dict[int, AddressSpace]) -> None:
        """Evict every clean page nothing holds (the host's ``drop_caches``): the next read of each goes to the
        device."""
        self._evict(registry, 0)

    def _evict(self, registry: dict[int, AddressSpace], keep: int | None = None) -> None:
        keep = self.limit_pages if keep is None else keep
        while len(self.clean) > keep:
            (ino, index), page = self.clean.popitem(last=False)
            mapping = registry.get(ino)
            if mapping is not None and mapping.pages.get(index) is page and page.delta == CLEAN and not (
                    page.writeback or page.pins):
                del mapping.pages[index]
                mapping.unmap_page(page)
                self.evictions += 1

    def forget(self, ino: int, index: int) -> None:
        self.clean.pop((ino, index), None)


class AddressSpace:
    """The cached pages of one file, by index, and its dirty pages by delta."""

    def __init__(self, ino: int, cache: PageCache, registry: dict[int, AddressSpace]) -> None:
        self.ino = ino
        self.cache = cache
        self.registry = registry
        self.pages: dict[int, Page] = {}
        self.dirty: dict[int, dict[int, Page]] = {}
        self.mmaps: list = []  # shared mappings of this file (the rmap)

    # -- shared mappings -------------------------------------------------------------------------------------------

    def rmap_cow(self, old: Page, new: Page) -> None:
        """page_cow_file: every mapping that maps ``old`` now maps ``new``, read-only."""
        for m in self.mmaps:
            pte = m.ptes.get(old.index)
            if pte is not None and pte[0] is old:
                pte[0], pte[1] = new, False

    def page_mkclean(self, page: Page) -> None:
        """Write-protect the page in every mapping: the next store through a mapping faults."""
        for m in self.mmaps:
            pte = m.ptes.get(page.index)
            if pte is not None and pte[0] is page:
                pte[1] = False

    def unmap_page(self, page: Page) -> None:
        for m in self.mmaps:
            pte = m.ptes.get(page.index)
            if pte is not None and pte[0] is page:
                del m.ptes[page.index]

    def replace(self, old: Page, new: Page) -> None:
        """Swap ``old`` for ``new`` in the index; old keeps its delta tag and its place on that delta's list."""
        new.mapping = self
        self.pages[old.index] = new
        self.cache.forget(self.ino, old.index)

    def get(self, index: int) -> Page | None:
        return self.pages.get(index)

    def insert(self, page: Page) -> None:
        page.mapping = self
        self.pages[page.index] = page
        self.cache.touch(self, page)

    def mark_dirty(self, page: Page, delta: int) -> None:
        if page.delta == delta:
            return
        if page.delta != CLEAN:
            raise AssertionError(f"{page} would hold data of two deltas")
        page.delta = delta
        self.dirty.setdefault(delta, {})[page.index] = page
        self.cache.dirty_pages += 1
        self.cache.touch(self, page)

    def retag(self, delta: int, later: int) -> None:
        """Move every page dirty for ``delta`` to ``later`` (which has none yet): the delta was split."""
        pages = self.dirty.pop(delta, None)
        if pages:
            for page in pages.values():
                page.delta = later
            self.dirty[later] = pages

    def write_pages(self, first: int, data: memoryview, delta: int, slow) -> None:
        """Overwrite whole pages from ``first`` with ``data`` (a multiple of the page size), dirty for delta.
        Pages the backend owns go through ``slow(index)``, which forks (or waits, or allows in-place change)."""
        size = self.cache.pagesize
        pages = self.pages
        dirty = self.dirty.setdefault(delta, {})
        clean = self.cache.clean
        added = 0
        for i in range(len(data) // size):
            index = first + i
            chunk = data[i * size: (i + 1) * size]
            page = pages.get(index)
            if page is None:
                page = Page(index, chunk, self)
                pages[index] = page
            elif backend_owns(page, delta):
                page = slow(index)
                if page.writeback:  # stable=none: change the very buffer under I/O
                    page.mutable()[:] = chunk
                else:
                    page.data = chunk
                continue
            else:
                page.data = chunk
                if page.delta == delta:
                    continue
                clean.pop((self.ino, index), None)
            page.delta = delta
            dirty[index] = page
            added += 1
        self.cache.dirty_pages += added

    # -- what a commit's stages change (the backend calls these; it never edits this state itself) ---------------

    def protect_for_writeout(self, delta: int, current: int) -> int:
        """At the transition of ``delta``: write-protect its pages in every mapping, so that the next store
        faults into the new delta. A pinned page is never forked: the backend gets a private copy of it in its
        place, and the pinned page moves to ``current`` (the reverse fork). Returns how many pages moved."""
        pages = self.dirty.get(delta)
        if not self.mmaps or not pages:  # no page table to protect, and no pins (closing a mapping drops its pins)
            return 0
        moved = 0
        for index, page in list(pages.items()):
            if page.pins:
                copy = Page(page.index, bytes(page.data), self)
                copy.delta = delta
                copy.forked = True
                self.cache.dirty_pages += 1
                self.page_mkclean(page)
                page.delta = current
                self.dirty.setdefault(current, {})[index] = page
                pages[index] = copy
                moved += 1
            else:
                self.page_mkclean(page)
        return moved

    def start_writeback(self, pages: list[Page], in_place: bool) -> None:
        """The backend writes these pages from now on. ``in_place`` (stable=none): a change during the I/O must
        reach the very buffer being written."""
        for page in pages:
            if in_place:
                page.mutable()
            page.writeback = True

    def drop_from_delta(self, page: Page) -> None:
        """A dirty page past the size of its delta: nothing of it is written, and it is clean for that delta."""
        if not page.forked:
            self.mark_clean(page)
        else:
            page.delta = CLEAN

    def end_writeback(self, pages: list[Page]) -> None:
        """The backend has written these pages: one changed during or after its I/O is dirty for that later delta
        (``Page.redirty``); the others are clean (or, dropped by a truncate since, gone with their changes)."""
        done = []
        for page in pages:
            page.writeback = False
            target, page.redirty = page.redirty, CLEAN
            if target != CLEAN and not page.forked:
                page.delta = target
                self.dirty.setdefault(target, {})[page.index] = page
            else:
                done.append(page)
        if done:
            self.mark_clean_many(done)

    def take_dirty(self, delta: int) -> dict[int, Page]:
        """Hand the dirty pages of a delta to the backend."""
        return self.dirty.pop(delta, {})

    def mark_clean(self, page: Page) -> None:
        if page.delta != CLEAN:
            page.delta = CLEAN
            self.cache.dirty_pages -= 1
        if self.pages.get(page.index) is page:
            self.cache.touch(self, page)

    def mark_clean_many(self, pages: list[Page]) -> None:
        """The backend wrote these pages: they are clean now and join the LRU."""
        cache = self.cache
        clean = cache.clean
        ino = self.ino
        own = self.pages
        n = 0
        for page in pages:
            if page.delta != CLEAN:
                page.delta = CLEAN
                n += 1
            if own.get(page.index) is page:
                clean[(ino, page.index)] = page
        cache.dirty_pages -= n
        if len(clean) > cache.limit_pages:
            cache._evict(self.registry)

    def truncate(self, first: int, current: int) -> list[Page]:
        """Drop every page at index >= first from the index and unmap it. A page the backend owns (under
        writeback, or dirty for a delta older than ``current``) is deleted for writeout: the backend still writes
        it, unchanged; no copy, no wait. Any other page also leaves its dirty list. Returns the pages deleted for
        writeout."""
        gone = [p for i, p in self.pages.items() if i >= first]
        kept = []
        for page in gone:
            del self.pages[page.index]
            self.cache.forget(self.ino, page.index)
            self.unmap_page(page)
            if backend_owns(page, current):
                kept.append(page)
            elif page.delta != CLEAN:
                self.dirty.get(page.delta, {}).pop(page.index, None)
                page.delta = CLEAN
                self.cache.dirty_pages -= 1
        for m in self.mmaps:  # pages past the end are gone from every mapping
            for index in [i for i in m.ptes if i >= first]:
                del m.ptes[index]
        return kept

    def drop_all(self) -> None:
        """The inode is gone: forget every page, dirty ones included (nothing of it is written any more)."""
        for pages in self.dirty.values():
            for page in pages.values():
                if page.delta != CLEAN:
                    page.delta = CLEAN
                    self.cache.dirty_pages -= 1
        self.dirty.clear()
        for index in self.pages:
            self.cache.forget(self.ino, index)
        self.pages.clear()
        for m in self.mmaps:
            m.ptes.clear()
        self.registry.pop(self.ino, None)

    def dirty_count(self) -> int:
        return sum(len(d) for d in self.dirty.values())
