"""Page forking: what a write does to a page the backend may be writing, and the pages left behind by forks.

Guarantees:
- The frontend never waits on a page the backend owns in ``fork`` mode: a page dirty for an older delta or under
  writeback is copied (``clone_page``), the copy replaces it in the page index and in every shared mapping, and the
  old page is written unchanged by the backend.
- A page never holds data of two deltas, and a forked page is never modified again.
- A forked page is released only when it is clean, not under I/O and not pinned (``ForkRegistry.poll``).

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

from .page import CLEAN, Page

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


def need_fork(page: Page, delta: int, mode: str, written: bool = False) -> Action:
    """What a change for ``delta`` must do to ``page``. ``written``: the commit in flight has written all its
    blocks (every page that is the backend's belongs to that commit, since one commit is in flight at a time)."""
    if page.forked:
        return Action.FORKED
    busy = page.writeback or (page.delta != CLEAN and page.delta != delta)
    if busy:
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
