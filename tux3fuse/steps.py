"""Step generators: work cut at yield points, so that the event loop can serve requests between the pieces.

A commit's stages (``backend/commit.py``) and the helpers they call (log packing, write planning) are generators
that yield at safe points and return their result. ``Runner.sliced`` runs them in slices on the loop; code that
wants the whole result at once runs them here.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")


def run_steps(steps: Generator[None, None, T]) -> T:
    """Run a step generator to its end and return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
