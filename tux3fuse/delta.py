"""Deltas: numbered atomic groups of frontend changes.

Guarantee: every frontend change runs inside ``change()``, which pins the current delta; a transition makes the
next delta current and hands the old one to the backend only when its last pin is gone. Delta numbers rise by one
per transition and are committed in order.
"""

from __future__ import annotations


class Deltas:
    def __init__(self, committed: int) -> None:
        self.committed = committed  # last delta durable on disk
        self.current = committed + 1  # the delta the frontend changes
        self.pins = 0

    def change(self) -> Deltas:
        """Pin the current delta for one frontend change: ``with deltas.change() as delta`` (its number)."""
        return self

    def __enter__(self) -> int:
        self.pins += 1
        return self.current

    def __exit__(self, *exc: object) -> None:
        self.pins -= 1

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
