"""The flusher: decides when the current delta is committed.

Guarantees:
- While the volume is writable, dirty state is never older than ``interval`` seconds plus one commit: every
  ``interval`` the flusher transitions and commits the current delta if it holds any change.
- Background writeback: once the dirty pages pass ``Options.background_bytes`` the flusher commits at once
  instead of waiting for the timer, so one commit never has to prepare more than about that much data (the
  prepare stage runs on the event loop).
"""

from __future__ import annotations

import logging

import trio

from .fs import Volume, VolumeError

log = logging.getLogger("tux3fuse")


def has_changes(vol: Volume) -> bool:
    return any(vol.dirty_inodes.values()) or bool(vol.alloc.records)


async def run_periodic(vol: Volume, interval: float) -> None:
    """Commit the current delta every ``interval`` seconds while it holds changes, and whenever the dirty pages
    pass the background threshold (runs until cancelled)."""
    kick = trio.Event()

    def over_threshold() -> None:
        kick.set()

    vol.on_background = over_threshold
    while True:
        with trio.move_on_after(interval if interval > 0 else float("inf")):
            await kick.wait()
        kick = trio.Event()
        if vol.failed is None and not vol.readonly and has_changes(vol):
            try:
                await vol.commit_async()
            except VolumeError:
                log.error("periodic commit failed; the volume is read-only now")
                return
