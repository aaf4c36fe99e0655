"""The volume's device: block reads and writes, flushes, and I/O accounting, on a backing (backing.py: an image
file, a block device or an NBD export).

Guarantee: a block outside the volume is never read or written (``OutOfRange``); a write batch is issued as
vectored writes of contiguous runs, no request carrying more than ``write_piece`` bytes (on an NBD export several
are in flight at once); ``flush`` returns only after the data written before it is durable (fdatasync, or the NBD
flush). A superblock written right after a flush, with nothing else written since, goes out as a FUA write where
the export supports it, and the flush that follows it is then not sent: it would have nothing left to do. The
device never interprets what it stores; the zeros it writes into holes of a sparse image file (``fill``) change no
byte that a read returns.

With a ``DeviceModel`` (``-o device_latency=,device_bandwidth=``) every write and flush returns only when a device
of that latency and bandwidth would have completed it: the experiments' slow device, on any backing store.

Every read the device fails is counted (``IOStats.read_errors``, readahead's also in ``readahead_errors``) and logged
in one line naming the blocks, the inode and file blocks when the reader knows them, and the error; identical lines
and bursts are held back so that a failing device cannot flood the log (``ReadErrors``). The error still reaches
the reader.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .backing import Backing, as_backing, open_backing
from .steps import run_steps
from .writelog import WriteLog

Buffer = bytes | bytearray | memoryview

IOV_MAX = 1024
# bytes: the most one write system call carries. The kernel may run a system call to its end before it switches
# tasks (PREEMPT_NONE): one 1 MiB write into the host's page cache held a CPU for 0.3-0.8 ms, and on two cores the
# event loop's thread and the processes waiting for it could not run meanwhile, whatever the writing thread's
# nice value. Between two pieces they can.
WRITE_PIECE = 64 << 10  # bytes: the most one write system call carries (Options.write_piece)
FILL_CHUNK = 1 << 20  # bytes: the image's holes are filled this much at a time, around the blocks written
NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # preadv2 flag: fail with EAGAIN rather than wait for the disk
NOWAIT_REFUSED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}  # what a file that takes no RWF_NOWAIT says
# read errors logged: at most READ_ERROR_BURST lines every READ_ERROR_INTERVAL seconds, and a line the same as one
# logged less than READ_ERROR_REPEAT seconds before not again (printk's ratelimit, with its figures)
READ_ERROR_BURST, READ_ERROR_INTERVAL, READ_ERROR_REPEAT = 10, 5.0, 60.0

log = logging.getLogger("tux3fuse")


class DeviceModel:
    """A device of ``latency`` seconds per request and ``bandwidth`` bytes per second (0: unlimited), for
    experiments. Requests are served one at a time in the order they are issued; each takes ``latency + size /
    bandwidth`` (a flush: ``latency``). A batch of requests is issued at once, as a device's queue takes several
    in flight, and its caller waits until the last would complete. The waiting is a sleep of the calling thread:
    the runner never writes on the event loop when a model is set (``Device.slow``)."""

    def __init__(self, latency: float, bandwidth: int = 0) -> None:
        if latency < 0 or bandwidth < 0:
            raise ValueError("a device model takes a latency and a bandwidth of 0 or more")
        self.latency = latency
        self.bandwidth = bandwidth
        self.free_at = 0.0  # time.monotonic() when the requests issued so far are all served
        self.lock = threading.Lock()
        self.requests = 0
        self.waited = 0.0  # seconds callers slept in all

    def service(self, size: int) -> float:
        return self.latency + (size / self.bandwidth if self.bandwidth else 0.0)

    def complete(self, sizes: Iterable[int]) -> None:
        """Issue requests of ``sizes`` bytes now and return when the last is served."""
        with self.lock:
            now = time.monotonic()
            done = max(now, self.free_at)
            for size in sizes:
                done += self.service(size)
                self.requests += 1
            self.free_at = done
        if done > now:
            time.sleep(done - now)
            with self.lock:
                self.waited += done - now


class OutOfRange(Exception):
    def __init__(self, block: int, volblocks: int) -> None:
        super().__init__(f"block {block} is outside the volume ({volblocks} blocks)")
        self.block = block


@dataclass
class IOStats:
    blocks_read: int = 0
    read_errors: int = 0  # reads the device failed, readahead's included (ReadErrors)
    readahead_errors: int = 0  # ... of them, reads ahead of a reader
    blocks_written: int = 0
    bytes_written: int = 0
    writes: int = 0  # system calls
    flushes: int = 0
    fua_writes: int = 0  # superblocks written durable on their own (NBD FUA), each in place of a flush
    fill_bytes: int = 0  # zeros written into holes of a sparse image (``Device.fill``)


class ReadErrors:
    """The device's failed reads: each one counted in ``stats`` and logged at ERROR in one line, "read error on
    DEVICE block B (inode I, block F; readahead): ERROR", unless the same line was logged less than ``repeat``
    seconds before or ``burst`` lines were logged in the last ``interval`` seconds; the next line logged then says
    how many were held back. Callable from any thread."""

    def __init__(self, device: str, stats: IOStats, clock: Callable[[], float] = time.monotonic,
                 burst: int = READ_ERROR_BURST, interval: float = READ_ERROR_INTERVAL,
                 repeat: float = READ_ERROR_REPEAT) -> None:
        self.device, self.stats, self.clock = device, stats, clock
        self.burst, self.interval, self.repeat = burst, interval, repeat
        self.lock = threading.Lock()
        self.logged: dict[str, float] = {}  # line -> when it was last logged (the last ``burst`` * 8 lines)
        self.window = float("-inf")  # when the current interval began
        self.in_window = 0  # lines logged in it
        self.held = 0  # errors not logged since the last line

    def failed(self, error: OSError, block: int, count: int = 1, ino: int | None = None, index: int = 0,
               ahead: bool = False) -> None:
        """A read of ``count`` blocks from ``block`` failed with ``error``; ``ino`` and ``index``: the file and its
        block there, when the reader knows them; ``ahead``: the read was a readahead."""
        def span(first: int) -> str:
            return f"block {first}" if count == 1 else f"blocks {first}-{first + count - 1}"
        about = [f"inode {ino}, {span(index)}"] if ino is not None else []
        about += ["readahead"] if ahead else []
        said = str(error.strerror or error).removeprefix(f"{self.device}: ")  # an NBD error names the export
        line = f"read error on {self.device} {span(block)}" + (f" ({'; '.join(about)})" if about else "") + f": {said}"
        with self.lock:
            self.stats.read_errors += 1
            if ahead:
                self.stats.readahead_errors += 1
            now = self.clock()
            if now - self.window >= self.interval:
                self.window, self.in_window = now, 0
            if now - self.logged.get(line, float("-inf")) < self.repeat or self.in_window >= self.burst:
                self.held += 1
                return
            self.in_window += 1
            self.logged[line] = now
            if len(self.logged) > 8 * self.burst:
                del self.logged[min(self.logged, key=self.logged.__getitem__)]
            held, self.held = self.held, 0
        log.error("%s%s", line, f" ({held} more read error(s) not logged)" if held else "")


def _uncovered(first: int, last: int, written: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The ranges [b0, b1) of blocks in [first, last) that the sorted, disjoint ranges ``written`` leave out."""
    b0 = first
    for lo, hi in written:
        if hi <= b0:
            continue
        if lo >= last:
            break
        if lo > b0:
            yield b0, lo
        b0 = max(b0, hi)
    if last > b0:
        yield b0, last


@dataclass
class WritePlan:
    """What ``Device.write_plan`` issues: vectored writes of contiguous runs, after filling the holes of chunks."""

    runs: list[tuple[int, list[Buffer]]]  # (first block, buffers): at most Device.run_max blocks each
    fill: list[tuple[int, list[tuple[int, int]]]]  # (chunk, block ranges written in it), chunks not filled yet


def image_size(target: Backing | int) -> int:
    """Size in bytes of an image file, block device or NBD export (a backing, or an open file descriptor)."""
    return as_backing(target).size()


@contextmanager
def exclusive(path: str) -> Iterator[Backing]:
    """The volume ``path`` (a path or an NBD URI) opened for writing under the lock a mount holds (``InUse``, a
    ``BlockingIOError``, when it is mounted or being checked), for the repairs made while no volume is open; its
    writes are durable when the block ends."""
    backing = open_backing(path)
    try:
        backing.lock(exclusive=True)
        yield backing
        backing.sync()
    finally:
        backing.close()


class Device:
    """Block I/O on a backing: ``target`` is one already open (the device then leaves closing it to its owner) or
    the path or URI of one to open."""

    def __init__(self, target: str | Backing, blocksize: int, volblocks: int, readonly: bool = False,
                 writelog: str | None = None, *, write_piece: int = WRITE_PIECE, fill_chunk: int = FILL_CHUNK,
                 model: DeviceModel | None = None) -> None:
        self.owns = isinstance(target, str)
        self.backing = open_backing(target, readonly) if isinstance(target, str) else target
        self.path = self.backing.name
        self.readonly = readonly
        self.blocksize = blocksize
        self.volblocks = volblocks
        self.stats = IOStats()
        self.read_errors = ReadErrors(self.path, self.stats)
        self.holds: dict[int, tuple[threading.Event, threading.Event]] = {}
        self.writelog = WriteLog(writelog) if writelog else None
        # a regular image file may be sparse: see fill
        self.fill_holes = not readonly and self.backing.regular
        self.write_piece = write_piece
        self.fill_chunk = fill_chunk
        self.zeros = memoryview(bytes(write_piece))
        self.run_max = max(1, min(IOV_MAX, write_piece // blocksize))  # blocks per vectored write
        self.filled = bytearray(-(-volblocks * blocksize // fill_chunk) // 8 + 1)  # bit per chunk: no hole left
        self.model = model
        self.nowait = NOWAIT != 0  # pread_cached may try the host's page cache without waiting
        self.issued: list[int] = []  # with a model: the sizes of the requests of the batch being written
        self.unflushed = True  # written since the last flush (at first: not known, so the first flush is sent)
        self.fua_done = False  # the last write was a FUA write, after a flush: the next flush has nothing to do

    @property
    def fd(self) -> int:
        """The file descriptor of an image file or block device (-1 on an NBD export)."""
        return self.backing.fd

    @property
    def slow(self) -> bool:
        """Does every write wait for a modelled device (then no write may run on the event loop)?"""
        return self.model is not None

    def hold(self, block: int) -> tuple[threading.Event, threading.Event]:
        """Make the next write of ``block`` stop before it is issued (tests): returns (reached, release)."""
        events = (threading.Event(), threading.Event())
        self.holds[block] = events
        return events

    def close(self) -> None:
        if self.writelog is not None:
            self.writelog.close()
            self.writelog = None
        if self.owns:
            self.backing.close()

    def _check(self, block: int, count: int = 1) -> None:
        if block < 0 or block + count > self.volblocks:
            raise OutOfRange(block + count - 1 if block >= 0 else block, self.volblocks)

    def read_block(self, block: int) -> bytes:
        """One block (a tree node, a log or bitmap block); a failed read is counted and logged, and raised."""
        self._check(block)
        try:
            data = self.backing.pread(self.blocksize, block * self.blocksize)
        except OSError as e:
            self.read_errors.failed(e, block)
            raise
        self.stats.blocks_read += 1
        if len(data) < self.blocksize:  # a short image reads as zeros past its end
            data = data.ljust(self.blocksize, b"\0")
        return data

    def read_blocks(self, block: int, count: int, ino: int | None = None, index: int = 0) -> bytes:
        """``count`` blocks from ``block`` (of inode ``ino`` from its block ``index``, when they are a file's); a
        failed read is counted and logged, and raised."""
        try:
            data = self.pread_blocks(block, count)
        except OSError as e:
            self.read_errors.failed(e, block, count, ino, index)
            raise
        self.stats.blocks_read += count
        return data

    def pread_cached(self, block: int, count: int) -> memoryview | None:
        """``count`` blocks from ``block`` if the host's page cache holds them all, else None: an image file's
        read with RWF_NOWAIT, which does not wait for the disk (so the event loop may issue it). Counted by nobody,
        as ``pread_blocks``; None on a backing without a file descriptor, or where such reads are refused."""
        fd = self.backing.fd
        if fd < 0 or not self.nowait:
            return None
        self._check(block, count)
        buf = bytearray(count * self.blocksize)
        try:
            done = os.preadv(fd, [buf], block * self.blocksize, NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:  # not on this file: the worker threads read it all; another error: they meet it too
            if e.errno in NOWAIT_REFUSED:
                self.nowait = False
            return None
        return memoryview(buf).toreadonly() if done == len(buf) else None

    def pread_blocks(self, block: int, count: int) -> bytes:
        """``count`` blocks from ``block``, counted by nobody: safe to call from any thread, several at once and
        beside a commit's writes (a file's pread, or the NBD backing's handle under its mutex). The caller counts
        the blocks on the event loop (``stats.blocks_read``), and a failed read (``read_errors.failed``)."""
        self._check(block, count)
        n = count * self.blocksize
        data = self.backing.pread(n, block * self.blocksize)
        if len(data) < n:  # a short image reads as zeros past its end
            data = data.ljust(n, b"\0")
        return data

    def plan_steps(self, writes: list[tuple[int, Buffer]], step: int = 64) -> Generator[None, None, WritePlan]:
        """The system calls that write ``writes`` ((block, data) pairs sorted by block): vectored writes of
        contiguous runs of at most ``run_max`` blocks, and the chunks whose holes to fill first. A step generator
        yielding every ``step`` pairs: a commit plans on the event loop, so that its I/O thread, which shares the
        interpreter lock with the loop, runs little more than the system calls."""
        runs: list[tuple[int, list[Buffer]]] = []
        spans: list[list[int]] = []  # contiguous ranges [first, end) of blocks written
        run_start, run = -1, []
        for i, (block, data) in enumerate(writes):
            self._check(block)
            if run and (block != run_start + len(run) or len(run) >= self.run_max):
                runs.append((run_start, run))
                run = []
            if not run:
                run_start = block
            run.append(data)
            if spans and spans[-1][1] == block:
                spans[-1][1] = block + 1
            elif not spans or spans[-1][1] < block:
                spans.append([block, block + 1])
            if i % step == step - 1:
                yield
        if run:
            runs.append((run_start, run))
        return WritePlan(runs, self._fill_plan(spans) if self.fill_holes else [])

    def plan(self, writes: list[tuple[int, Buffer]]) -> WritePlan:
        return run_steps(self.plan_steps(writes))

    def _fill_plan(self, spans: list[list[int]]) -> list[tuple[int, list[tuple[int, int]]]]:
        """The chunks around ``spans`` that may still hold holes, each with the spans (clipped to it) that the
        batch writes there."""
        per_chunk = max(1, self.fill_chunk // self.blocksize)
        filled = self.filled
        chunks: dict[int, list[tuple[int, int]]] = {}
        for first, end in spans:
            for chunk in range(first // per_chunk, (end - 1) // per_chunk + 1):
                if not filled[chunk >> 3] & (1 << (chunk & 7)):
                    lo = chunk * per_chunk
                    chunks.setdefault(chunk, []).append((max(first, lo), min(end, lo + per_chunk)))
        return sorted(chunks.items())

    def write_blocks(self, writes: Iterable[tuple[int, Buffer]]) -> None:
        """Write (block, data) pairs: ``plan`` them, then ``write_plan``."""
        self.write_plan(self.plan(sorted(writes, key=lambda w: w[0])))

    def write_plan(self, plan: WritePlan) -> None:
        """Fill the planned holes, then issue the planned writes (with a model: one batch of requests)."""
        if self.fill_holes and plan.fill:
            self.fill(plan.fill)
        holds = self.holds
        if holds:
            for start, bufs in plan.runs:
                if any(start <= b < start + len(bufs) for b in holds):
                    self._write_holding(start, bufs)
                else:
                    self._pwritev(start, bufs)
        elif plan.runs:  # one batch: a backing may keep several in flight
            bs = self.blocksize
            self.unflushed, self.fua_done = True, False
            self.backing.write_runs([(start * bs, bufs) for start, bufs in plan.runs])
            for start, bufs in plan.runs:
                self._written(start, bufs)
        if self.model is not None:
            issued, self.issued = self.issued, []
            self.model.complete(issued)

    def _write_holding(self, start: int, bufs: list[Buffer]) -> None:
        """A run with a block that a test holds: write what comes before it, stop until released, go on."""
        at = 0
        for i in range(len(bufs)):
            hold = self.holds.pop(start + i, None)
            if hold is not None:
                if i > at:
                    self._pwritev(start + at, bufs[at:i])
                at = i
                reached, release = hold
                reached.set()
                release.wait()
        self._pwritev(start + at, bufs[at:])

    def fill(self, chunks: list[tuple[int, list[tuple[int, int]]]]) -> None:
        """Write zeros into the holes of the image ``chunks`` (from ``plan``) that the blocks written there do
        not cover.

        A block written into a hole of a sparse image file makes the host filesystem allocate it, and the next
        flush must then commit the host's journal as well: on ext4 that doubles the cost of an fdatasync. Filling
        the rest of the chunk at the same time makes the following commits there overwrites. Zeros in a hole
        change no byte that a read returns, so this is safe at any moment; if the host is full it stops trying.
        """
        bs = self.blocksize
        per_chunk = max(1, self.fill_chunk // bs)
        filled = self.filled
        end_of_image = self.volblocks * bs
        for chunk, written in chunks:
            if filled[chunk >> 3] & (1 << (chunk & 7)):
                continue
            start, end = chunk * per_chunk * bs, min((chunk + 1) * per_chunk * bs, end_of_image)
            try:
                at = start
                while at < end:
                    hole = os.lseek(self.fd, at, os.SEEK_HOLE)
                    if hole >= end:
                        break
                    try:
                        data = os.lseek(self.fd, hole, os.SEEK_DATA)
                    except OSError:  # no data after the hole (ENXIO)
                        data = end
                    data = min(data, end)
                    first, last = -(-hole // bs), data // bs  # whole blocks of the hole
                    for b0, b1 in _uncovered(first, last, written):
                        for at_byte in range(b0 * bs, b1 * bs, self.write_piece):
                            n = min(self.write_piece, b1 * bs - at_byte)
                            self.unflushed, self.fua_done = True, False
                            self.backing.pwrite(self.zeros[:n], at_byte)
                            if self.model is not None:
                                self.issued.append(n)
                        self.stats.fill_bytes += (b1 - b0) * bs
                    at = data
            except OSError:  # host full, or no SEEK_HOLE here: the blocks are written all the same
                self.fill_holes = False
                return
            filled[chunk >> 3] |= 1 << (chunk & 7)

    def _pwritev(self, block: int, bufs: list) -> None:
        self.unflushed, self.fua_done = True, False
        self.backing.pwritev(bufs, block * self.blocksize)
        self._written(block, bufs)

    def _written(self, block: int, bufs: list) -> None:
        """Account for a run that landed, and record it in the write log."""
        offset = block * self.blocksize
        total = sum(len(b) for b in bufs)
        self.stats.blocks_written += len(bufs)
        self.stats.bytes_written += total
        self.stats.writes += 1
        if self.model is not None:
            self.issued.append(total)
        if self.writelog is not None:
            for i, buf in enumerate(bufs):
                self.writelog.write(offset + i * self.blocksize, buf)

    def write_at(self, offset: int, data: bytes) -> None:
        """Write bytes at a byte offset (superblocks). Right after a flush, on a backing that can make one write
        durable on its own (NBD FUA), the write goes out durable and the next flush is not sent."""
        fua = self.backing.can_fua and not self.unflushed
        self.backing.pwrite(data, offset, fua=fua)
        self.unflushed, self.fua_done = not fua, fua
        if fua:
            self.stats.fua_writes += 1
        self.stats.bytes_written += len(data)
        self.stats.writes += 1
        if self.model is not None:
            self.model.complete([len(data)])
        if self.writelog is not None:
            self.writelog.write(offset, data)

    def flush(self) -> None:
        if self.fua_done and not self.unflushed:  # the one write since the last flush was durable on its own
            self.fua_done = False
        else:
            self.backing.flush()
            self.unflushed = False
            self.stats.flushes += 1
            if self.model is not None:
                self.model.complete([0])
        if self.writelog is not None:
            self.writelog.flush()
