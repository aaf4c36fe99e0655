"""Every tunable of a volume, in one place: the mount's ``-o`` options (cli.py parses them) and the scheduler's
parameters, passed to the parts that use them; no module keeps a tunable of its own. The least value a mount
accepts for each size option is here too (``MIN_*``): cli.py refuses less, naming the minimum."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .cache.fork import FORK
from .device import FILL_CHUNK, WRITE_PIECE
from .format import MAX_BLOCKBITS

# The least a mount takes (cli.py refuses less): one request of the kernel's carries up to 1 MiB (a write under
# the writeback cache), and a readahead window smaller than a block of the largest size reads nothing ahead.
MIN_CACHE_BYTES = 1 << 20  # cache=: the pages of one request and the readahead beyond it (16 of 64 KiB blocks)
MIN_DIRTY_LIMIT = 1 << 20  # dirty_limit= (other than 0, no limit): below one request, every write waits a commit
MIN_READAHEAD = 1 << MAX_BLOCKBITS  # readahead= (other than 0, none): one block of the largest size (64 KiB)
MIN_KERNEL_DIRTY = 1 << 16  # kernel_dirty= (other than 0, off): below a few pages the kernel's writers barely move


@dataclass
class Options:
    readonly: bool = False
    stable: str = FORK  # what a write to a page under writeback does: fork, wait or none
    cache_bytes: int = 256 << 20
    commit_interval: float = 5.0  # seconds: the flusher commits a delta this old (commit=; <= 0: only on demand)
    max_tasks: int = 256  # requests the daemon serves at once: every fsync waiting for a commit holds one
    gc_thresholds: tuple[int, int, int] = (20_000, 50, 100)  # the collector's thresholds while the daemon serves
    # the commit runner (runner.py, Runner.sliced): how long a commit stage holds the event loop at once, in seconds
    prepare_slice: float = 0.00002  # a commit nobody waits for
    urgent_slice: float = 0.0002  # a commit an fsync waits for
    commit_yield: float = 0.001  # a commit passes through the scheduler at least this often, even with no request
    commit_share: float = 0.2  # between two slices requests go first, while the commit has had this share of the loop
    touch_after: float = 1.0  # seconds: a re-dirtied inode moves to its dirty list's tail at most this often
    write_piece: int = WRITE_PIECE  # bytes: the most one write system call of a commit carries (device.py)
    fill_chunk: int = FILL_CHUNK  # bytes: the image's holes are filled this much at a time, around the blocks written
    unify_deltas: int = 16  # unify every this many deltas (not in a commit an fsync waits for): PERFORMANCE.md
    unify_log_blocks: int = 64  # ... or when the log would pass this many 4 KiB (it bounds the replay at mount)
    background_bytes: int = 32 << 20  # dirty data that starts a commit without waiting for the timer
    dirty_limit: int = 128 << 20  # above this much dirty data writers are throttled (0: no limit)
    one_flush: bool = True  # commit with one flush, the superblock proving the delta's blocks (docs/FORMAT.md)
    inline_commit_blocks: int = 8  # commits this small do their I/O on the event loop, not in a worker thread
    # a read of uncached blocks holds the event loop (no worker thread) only while the device's recent reads took
    # less than this, and, for more than one block, no request waits (seconds; 0: always a worker thread): reads.py
    read_inline_max: float = 0.0005
    # bytes: the largest window a sequential reader is read ahead of (0: none; None: 2 MiB on an NBD export, none on
    # an image file or block device, which the host reads ahead itself: readahead.py, window_for)
    readahead: int | None = None
    # bytes: the least the daemon lowers the kernel's dirty limit for the mount to as the volume fills
    # (coherence.py, DirtyBound; kernel_dirty=; 0: the kernel's own limit is left alone)
    kernel_dirty: int = 1 << 20
    fsync_ahead_bytes: int = 1 << 20  # fsync commits only the file when the rest of its delta is dirtier than this
    writelog: str | None = None  # record every write and flush to this file (crash testing)
    # a slower device for experiments (device.py, DeviceModel): every write and flush completes as on a device of
    # this latency (seconds per request) and bandwidth (bytes per second, 0: unlimited); device_latency=,
    # device_bandwidth=
    device_latency: float = 0.0
    device_bandwidth: int = 0
    lock: bool = True  # take the image lock (tests reading a committed state beside a live volume pass False)
    # after every commit, replay the image as a mount would and compare (replaycheck.py): mount option verify_log,
    # or TUX3FUSE_VERIFY_LOG=1 in the environment (the test suite sets it, so every daemon it starts checks too)
    verify_log: bool = field(default_factory=lambda: os.environ.get("TUX3FUSE_VERIFY_LOG") == "1")
