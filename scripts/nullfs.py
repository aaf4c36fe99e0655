#!/usr/bin/env python3
"""nullfs: the cost floor of a pyfuse3 filesystem that does no work.

An in-memory tree of files and directories (no links, symlinks, devices, renames or xattrs), served the way
tux3fuse serves by default: pyfuse3.default_options (default_permissions), the writeback cache, 300 s entry and
attribute timeouts, keep_cache on open, pyfuse3.main(min_tasks=2, max_tasks=256), and tux3fuse's garbage
collector settings. fsync and fsyncdir return at once, so a benchmark run on nullfs measures what any pyfuse3
filesystem pays for the same requests: the kernel round trips and pyfuse3's per-request machinery. Nothing is
kept after the unmount.

With --fdatasync FILE, every fsync and fsyncdir instead rewrites the first 4 KiB of FILE and calls fdatasync on
it, in a worker thread (trio.to_thread.run_sync, at most 40 at once): the floor of a pyfuse3 filesystem that
makes each fsync durable with one block write and one device flush, and does not group concurrent fsyncs. With
--group as well, concurrent fsyncs share flushes as a journal's group commit does: an fsync waits for the next
write + fdatasync to start after it came, one at a time, so those that arrive while one is in flight share the
next (the floor of a pyfuse3 filesystem with group commit).

Every request is counted by operation (scripts/fusecount.py's wrappers, one increment per request: the same
bookkeeping tux3fuse's adapter does for ``tux3 stat``); with --stats FILE, SIGUSR1 writes the counts so far to FILE
as one JSON object ({"create": 500, "write": 500, ...}; with --fdatasync, "fdatasync" counts the scratch file's
flushes). flush replies ENOSYS, as tux3fuse's does, so the kernel
stops sending it: a close costs no request.

Runs in the foreground until the filesystem is unmounted (fusermount3 -u MOUNTPOINT) or it gets SIGTERM, SIGINT
or SIGHUP (then it unmounts itself).
"""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import signal
import stat
import sys
import time
from collections import Counter
from pathlib import Path

import pyfuse3
import trio
from fusecount import count_requests, dump_on_signal

TIMEOUT = 300.0  # entry and attribute timeouts, as tux3fuse's
MAX_TASKS = 256  # as tux3fuse's daemon (Options.max_tasks)
BLOCK = 4096


class Node:
    """A file or a directory. It is dropped once it has no name and the kernel has forgotten it."""

    __slots__ = ("ino", "parent", "cookie", "mode", "uid", "gid", "nlink", "atime_ns", "mtime_ns", "ctime_ns",
                 "data", "children", "lookups")

    def __init__(self, ino: int, parent: int, cookie: int, mode: int, uid: int, gid: int) -> None:
        self.ino, self.parent, self.cookie = ino, parent, cookie  # cookie: readdir position in the parent
        self.mode, self.uid, self.gid = mode, uid, gid
        self.atime_ns = self.mtime_ns = self.ctime_ns = time.time_ns()
        self.data = bytearray()
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        self.nlink = 2 if self.children is not None else 1
        self.lookups = 0

    def entry(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.ino
        e.entry_timeout = e.attr_timeout = TIMEOUT
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = self.mode, self.nlink, self.uid, self.gid
        e.st_size = len(self.data)
        e.st_blksize = BLOCK
        e.st_blocks = (len(self.data) + 511) // 512
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = self.atime_ns, self.mtime_ns, self.ctime_ns
        return e


class NullOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = True

    def __init__(self, scratch_fd: int | None = None, group: bool = False) -> None:
        super().__init__()
        self.group = group
        self.started = self.done = 0  # grouped flushes started, and finished
        self.flushed: trio.Event | None = None  # set when the flush in flight finishes
        self.counts: Counter[str] = Counter()  # the request counts (--stats), and "fdatasync": the flushes
        root = Node(pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE, 0, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        self.nodes = {root.ino: root}
        self.next_ino = root.ino + 1
        self.next_cookie = 1
        self.scratch_fd = scratch_fd
        self.block = bytes(BLOCK)

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def looked_up(self, node: Node) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return node.entry()

    def maybe_drop(self, node: Node) -> None:
        if node.nlink == 0 and node.lookups <= 0:
            del self.nodes[node.ino]

    def child(self, parent: Node, name: bytes) -> Node:
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node = parent.children.get(name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def new(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Node:
        parent = self.node(parent_ino)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in parent.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(self.next_ino, parent.ino, self.next_cookie, mode & ~ctx.umask, ctx.uid, ctx.gid)
        self.next_ino += 1
        self.next_cookie += 1
        self.nodes[node.ino] = node
        parent.children[name] = node
        parent.mtime_ns = parent.ctime_ns = node.ctime_ns
        return node

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self.node(parent_inode)
        if name == b".":
            return self.looked_up(parent)
        if name == b"..":
            return self.looked_up(self.node(parent.parent))
        return self.looked_up(self.child(parent, name))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is not None and ino != pyfuse3.ROOT_INODE:
                node.lookups -= n
                self.maybe_drop(node)

    async def getattr(self, inode, ctx=None):
        return self.node(inode).entry()

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.node(inode)
        if fields.update_size:
            if attr.st_size < len(node.data):
                del node.data[attr.st_size:]
            else:
                node.data.extend(bytes(attr.st_size - len(node.data)))
            node.mtime_ns = time.time_ns()
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if getattr(fields, "update_ctime", False) else time.time_ns()
        return node.entry()

    async def mkdir(self, parent_inode, name, mode, ctx):
        node = self.new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        self.nodes[parent_inode].nlink += 1
        return self.looked_up(node)

    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self.new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        return pyfuse3.FileInfo(fh=node.ino, keep_cache=True), self.looked_up(node)

    async def unlink(self, parent_inode, name, ctx):
        parent = self.node(parent_inode)
        node = self.child(parent, name)
        if node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self.remove(parent, name, node)

    async def rmdir(self, parent_inode, name, ctx):
        parent = self.node(parent_inode)
        node = self.child(parent, name)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if node.children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        parent.nlink -= 1
        self.remove(parent, name, node)

    def remove(self, parent: Node, name: bytes, node: Node) -> None:
        del parent.children[name]
        node.nlink = 0
        parent.mtime_ns = parent.ctime_ns = node.ctime_ns = time.time_ns()
        self.maybe_drop(node)

    async def open(self, inode, flags, ctx):
        node = self.node(inode)
        if flags & os.O_TRUNC:
            del node.data[:]
            node.mtime_ns = node.ctime_ns = time.time_ns()
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return bytes(self.node(fh).data[off:off + size])

    async def write(self, fh, off, buf):
        node = self.node(fh)
        if off > len(node.data):
            node.data.extend(bytes(off - len(node.data)))
        node.data[off:off + len(buf)] = buf
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)  # nothing to report at close: the kernel stops sending FLUSH

    async def release(self, fh):
        return None

    async def fsync(self, fh, datasync):
        await self.durable()

    async def fsyncdir(self, fh, datasync):
        await self.durable()

    async def durable(self) -> None:
        """Nothing, or (--fdatasync) one 4 KiB write and one fdatasync of the scratch file in a worker thread."""
        if self.scratch_fd is None:
            return
        if not self.group:
            await trio.to_thread.run_sync(self.flush_scratch)
            self.counts["fdatasync"] += 1
            return
        need = self.started + 1  # a flush that starts after this call
        while self.done < need:
            if self.flushed is not None:  # one in flight: wait for it, then see
                await self.flushed.wait()
                continue
            self.started += 1
            ticket, self.flushed = self.started, trio.Event()
            try:
                await trio.to_thread.run_sync(self.flush_scratch)
                self.counts["fdatasync"] += 1
            finally:
                self.done = ticket
                self.flushed.set()
                self.flushed = None

    def flush_scratch(self) -> None:
        os.pwrite(self.scratch_fd, self.block, 0)
        os.fdatasync(self.scratch_fd)

    async def opendir(self, inode, ctx):
        if self.node(inode).children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        # Cookies only grow and names are never re-added under an old cookie, so a listing that goes on while
        # entries are removed neither skips nor repeats the others.
        for name, node in list(self.node(fh).children.items()):
            if node.cookie > start_id:
                if not pyfuse3.readdir_reply(token, name, node.entry(), node.cookie):
                    break
                node.lookups += 1

    async def releasedir(self, fh):
        return None

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        used = sum(len(n.data) + BLOCK - 1 for n in self.nodes.values()) // BLOCK
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks = 1 << 28  # 1 TiB
        s.f_bfree = s.f_bavail = max(0, s.f_blocks - used)
        s.f_files = 1 << 32
        s.f_ffree = s.f_favail = s.f_files - len(self.nodes)
        s.f_namemax = 255
        return s


async def serve() -> None:
    async def stop_on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signals)
        await pyfuse3.main(min_tasks=2, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fdatasync", metavar="FILE", help="make every fsync write and fdatasync 4 KiB of FILE")
    ap.add_argument("--group", action="store_true", help="with --fdatasync: concurrent fsyncs share flushes "
                    "(group commit)")
    ap.add_argument("--nowriteback", action="store_true", help="kernel writeback cache off, as tux3fuse's -o "
                    "nowriteback: every write() is a request")
    ap.add_argument("--stats", type=Path, metavar="FILE", help="on SIGUSR1, write the requests counted so far, "
                    "by operation, to FILE (JSON)")
    ap.add_argument("mountpoint")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="nullfs: %(levelname)s: %(message)s")
    scratch = None
    if args.fdatasync:
        scratch = os.open(args.fdatasync, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(scratch, bytes(BLOCK), 0)  # allocated now, so each fsync only overwrites it
        os.fsync(scratch)
    if args.group and not args.fdatasync:
        ap.error("--group needs --fdatasync FILE")
    ops = NullOperations(scratch, group=args.group)
    ops.enable_writeback_cache = not args.nowriteback
    counts = ops.counts = count_requests(ops)
    if args.stats:
        dump_on_signal(counts, args.stats)
    options = set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=nullfs"}
    try:
        pyfuse3.init(ops, args.mountpoint, options)
    except RuntimeError as e:
        print(f"nullfs: cannot mount on {args.mountpoint}: {e}", file=sys.stderr)
        return 1
    gc.collect()  # as tux3fuse's daemon: fewer, cheaper collections while serving
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
        if scratch is not None:
            os.close(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
