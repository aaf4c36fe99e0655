"""The flusher: decides when the current delta is committed.

Guarantee: while the volume is writable, dirty state is never older than ``interval`` seconds plus one commit:
every ``interval`` the flusher transitions and commits the current delta if it holds any change.
"""

from __future__ import annotations

import logging

import trio

from .fs import Volume, VolumeError

log = logging.getLogger("tux3fuse")


def has_changes(vol: Volume) -> bool:
    return any(vol.dirty_inodes.values()) or bool(vol.alloc.records)


async def run_periodic(vol: Volume, interval: float) -> None:
    """Commit the current delta every ``interval`` seconds while it holds changes (runs until cancelled)."""
    while True:
        await trio.sleep(interval)
        if vol.failed is None and not vol.readonly and has_changes(vol):
            try:
                await vol.commit_async()
            except VolumeError:
                log.error("periodic commit failed; the volume is read-only now")
