"""Deltas: numbered atomic groups of frontend changes.

Guarantees:
- Every frontend change runs inside ``change()``, which pins the current delta; a transition makes the next delta
  current and hands the old one to the backend only when its last pin is gone. Delta numbers rise by one per
  transition and are committed in order.
- A change is whole or the delta is never committed: an exception that leaves a ``change()`` block (the change may
  be half made) is reported to ``on_abort`` before it goes on, and the volume turns read-only there (``Health.abort``)
  so that no commit takes the delta. Operations therefore read everything they need before they begin a change.
"""

from __future__ import annotations

from collections.abc import Callable


class Deltas:
    def __init__(self, committed: int) -> None:
        self.committed = committed  # last delta durable on disk
        self.current = committed + 1  # the delta the frontend changes
        self.pins = 0
        self.on_abort: Callable[[int, BaseException], None] | None = None  # a change left by an exception

    def change(self) -> Deltas:
        """Pin the current delta for one frontend change: ``with deltas.change() as delta`` (its number)."""
        return self

    def __enter__(self) -> int:
        self.pins += 1
        return self.current

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.pins -= 1
        if exc is not None and self.on_abort is not None:
            self.on_abort(self.current, exc)

    def transition(self) -> int:
        """Make a new delta current; return the number of the one handed to the backend."""
        if self.pins:
            raise AssertionError("transition while a change is in progress")
        old = self.current
        self.current = old + 1
        return old

    def committed_to(self, delta: int) -> None:
        if delta != self.committed + 1:
            raise AssertionError(f"delta {delta} committed after {self.committed}")
        self.committed = delta
