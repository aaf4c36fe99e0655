"""Page forking: what a write does to a page the backend may be writing, and the pages left behind by forks.

Guarantees:
- The frontend never waits on a page the backend owns in ``fork`` mode: a page dirty for an older delta or under
  writeback is copied (``clone_page``), the copy replaces it in the page index and in every shared mapping, and the
  old page is written unchanged by the backend.
- A page never holds data of two deltas, and a forked page is never modified again.
- A forked page is released only when it is clean, not under I/O and not pinned (``ForkRegistry.poll``).
- "The backend owns this page" is one predicate (``backend_owns``): under writeback, or dirty for a delta older than
  the current one. The decision, the wait of stable=wait (``must_wait``), the fast path of whole-page writes and
  truncate's delete-for-writeout (``truncate_for_writeout``) all use it.

Applying a decision to a page is ``make_writable``: dirty it, fork it (``fork_page``: ``clone_page``, the copy
replaces it in the index (``AddressSpace.replace``) and in every shared mapping (``AddressSpace.rmap_cow``), the old
page goes to the registry), or leave it under writeback to change in place.

The decision is one table (``need_fork``), as in Tux3's buffer_fork.c:

| page state                          | fork mode   | wait mode   | none mode   |
|-------------------------------------|-------------|-------------|-------------|
| forked (a stale reference)          | FORKED      | FORKED      | FORKED      |
| under writeback                     | NEED_FORK   | WAIT        | IN_PLACE    |
| clean                               | CAN_DIRTY   | CAN_DIRTY   | CAN_DIRTY   |
| dirty for the current delta         | ALREADY     | ALREADY     | ALREADY     |
| dirty for an older delta            | NEED_FORK   | WAIT        | IN_PLACE    |
| the backend's, its block written    | AFTER_IO    | AFTER_IO    | AFTER_IO    |

The last row is the time between the end of a commit's block writes and the end of the commit (its flush, its
superblock and its completion stage): the page's I/O is over, as after Linux's ``end_page_writeback``, so a
change can neither tear the block nor reach the delta on disk. The page is changed in place and moves to the
current delta when the commit completes. A stable-page writer therefore waits for the page to be written, never
for the flush, which is what Linux's ``wait_on_page_writeback`` waits for.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import TYPE_CHECKING

from .page import CLEAN, Page

if TYPE_CHECKING:
    from .address_space import AddressSpace

FORK, WAIT, NONE = "fork", "wait", "none"
MODES = (FORK, WAIT, NONE)


class Action(enum.Enum):
    FORKED = "look the page up again"
    NEED_FORK = "copy the page and change the copy"
    WAIT = "wait until the backend has written the page"
    IN_PLACE = "change the page while the backend writes it"
    AFTER_IO = "the backend has written the page: change it in place, for this delta"
    CAN_DIRTY = "dirty the page for this delta"
    ALREADY = "the page is already dirty for this delta"


def backend_owns(page: Page, current: int) -> bool:
    """Is ``page`` the backend's: under writeback, or dirty for a delta older than ``current``?"""
    return page.writeback or (page.delta != CLEAN and page.delta != current)


def need_fork(page: Page, delta: int, mode: str, written: bool = False) -> Action:
    """What a change for ``delta`` must do to ``page``. ``written``: the commit in flight has written all its
    blocks (every page that is the backend's belongs to that commit, since one commit is in flight at a time)."""
    if page.forked:
        return Action.FORKED
    if backend_owns(page, delta):
        if written:
            return Action.AFTER_IO
        return Action.NEED_FORK if mode == FORK else Action.WAIT if mode == WAIT else Action.IN_PLACE
    if page.delta == CLEAN:
        return Action.CAN_DIRTY
    return Action.ALREADY


def clone_page(page: Page) -> Page:
    """A new page with the same index and data; its state is the old one's minus I/O and delta: clean."""
    return Page(page.index, bytearray(page.data), page.mapping)


class ForkRegistry:
    """Old pages replaced by forks (or dropped by truncate during writeout), kept until the backend is done."""

    def __init__(self) -> None:
        self.pages: dict[int, Page] = {}
        self.peak = 0
        self.released = 0

    def add(self, page: Page) -> None:
        page.forked = True
        self.pages[id(page)] = page
        self.peak = max(self.peak, len(self.pages))

    def poll(self, force_ino: int | None = None) -> int:
        """Release every forked page that is clean, not under I/O and not pinned; return how many."""
        done = [k for k, p in self.pages.items() if not p.writeback and p.delta == CLEAN and not p.pins]
        for k in done:
            del self.pages[k]
        self.released += len(done)
        return len(done)

    @property
    def live(self) -> int:
        return len(self.pages)


def fork_page(mapping: AddressSpace, page: Page, delta: int, registry: ForkRegistry) -> Page:
    """Copy a page the backend owns; the copy takes its place in the index and in every mapping, dirty for
    ``delta``, and the old page stays with the backend (in the registry) until it is written."""
    new = clone_page(page)
    mapping.replace(page, new)
    registry.add(page)
    mapping.rmap_cow(page, new)
    mapping.mark_dirty(new, delta)
    return new


def make_writable(mapping: AddressSpace, page: Page, delta: int, mode: str, written: bool,
                  registry: ForkRegistry, counters: Counter[str], is_dir: bool = False) -> Page:
    """The page to change for ``delta`` in place of ``page``, by the decision table: ``page`` dirtied, a fork of it,
    or (stable=none, or its block written) ``page`` left under writeback to change in place. ``written``: as in
    ``need_fork``. A WAIT here is a bug: callers check ``must_wait`` before they change anything."""
    action = need_fork(page, delta, mode, written)
    if action is Action.CAN_DIRTY:
        mapping.mark_dirty(page, delta)
    elif action is Action.NEED_FORK:
        page = fork_page(mapping, page, delta, registry)
        counters["forks"] += 1
        counters["dir_forks" if is_dir else "data_forks"] += 1
        counters["bytes_copied"] += len(page.data)
    elif action is Action.IN_PLACE:
        page.redirty = delta
        counters["in_place_writes"] += 1
    elif action is Action.AFTER_IO:  # the block is written: neither the disk nor the delta can see this change
        page.redirty = delta
        counters["after_io_writes"] += 1
    elif action is Action.WAIT:
        raise AssertionError(f"{page} of inode {mapping.ino} needs a wait that was not checked for")
    elif action is Action.FORKED:
        raise AssertionError(f"forked {page} is still in the index of inode {mapping.ino}")
    page.mutable()
    return page


def must_wait(mapping: AddressSpace, current: int, first: int = 0, last: int | None = None) -> bool:
    """stable=wait, a commit in flight whose blocks are not written yet: does a page in [first, last] belong to
    the backend (then the writer waits for the page's I/O, never for the flush)?"""
    pages = mapping.pages
    if last is None or last - first > len(pages):
        return any(backend_owns(p, current) for i, p in pages.items() if i >= first and (last is None or i <= last))
    return any((p := pages.get(i)) is not None and backend_owns(p, current) for i in range(first, last + 1))


def truncate_for_writeout(mapping: AddressSpace, keep: int, current: int, registry: ForkRegistry) -> None:
    """Truncate during writeout (``->truncatepage``): drop the pages from ``keep`` on; those the backend owns are
    deleted for writeout (``cow_delete_from_page_cache``): out of the index, written unchanged, kept in the
    registry until then. No copy, no wait."""
    for page in mapping.truncate(keep, current):
        registry.add(page)
