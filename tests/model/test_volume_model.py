"""The embedded filesystem API (tux3fuse.fs.Volume) against an in-memory model of files, directories and links.

The machine runs random namespace and data operations on a freshly made image, commits at random points, remounts
cleanly (unmount, open, mount) and "crashes" (drops the volume without committing, then opens and mounts it again,
which must bring back exactly the last committed state). After every step the whole tree is compared with the
model; after every remount or crash the allocation bitmap is also checked against the blocks the volume really
uses (no leak, no block used twice).
"""

from __future__ import annotations

import copy
import errno
import os
import random
import shutil
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mkfs import mkfs
from tux3fuse import format as fmt
from tux3fuse.backend import extents
from tux3fuse.fs import Options, Volume

MAX_OFFSET = 200 * 1024


class MFile:
    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.data = bytearray()


class MSymlink:
    def __init__(self, ino: int, target: bytes) -> None:
        self.ino = ino
        self.target = target


class MDir:
    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.entries: dict[bytes, MFile | MSymlink | MDir] = {}


NAMES = [b"a", b"b", b"c", b"dir", b"f.txt", b"x" * 180]
names_st = st.sampled_from(NAMES)


def mounted(path: str, **options) -> Volume:
    vol = Volume(path, Options(**options))
    try:
        vol.mount()
    except BaseException:
        vol.close_files()
        raise
    return vol


def expect_errno(code: int, fn, *args, **kw) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kw)
    assert info.value.errno == code, f"{fn.__name__}{args}: {os.strerror(info.value.errno)}, want {os.strerror(code)}"


def used_blocks(vol: Volume) -> dict[int, str]:
    """Every block the committed volume uses, with its owner; fails on a block owned twice. The trees are those
    of the volume, as the log replayed onto the trees on disk: nodes they changed keep their old blocks until the
    next unify, and nodes they dropped stay allocated until then too."""
    owners: dict[int, str] = {}

    def own(start: int, count: int, what: str) -> None:
        for b in range(start, start + count):
            assert b not in owners, f"block {b} used by {owners[b]} and by {what}"
            assert 0 <= b < vol.backend.sb.volblocks, f"{what} uses block {b} outside the volume"
            owners[b] = what

    sb = vol.backend.sb
    own(0, fmt.reserved_blocks(vol.blocksize), "superblocks")
    for region in (0, 1):
        own(sb.bitmap_start[region], sb.bitmap_blocks, f"bitmap region {region}")
    for b in vol.backend.log_blocks:
        own(b, 1, "log")
    for b in vol.backend.unify_frees:
        own(b, 1, "dropped tree node")
    for b in vol.backend.itable.blocks():
        own(b, 1, "inode table")
    for b in vol.backend.otree.blocks():
        own(b, 1, "orphan tree")
    for ino, raw in vol.backend.itable.items():
        rec = fmt.InodeRecord.unpack(raw)
        loaded = vol.icache.inodes.get(ino)
        be = vol.backend
        tree = be.dtree(loaded) if loaded is not None else be.tree(fmt.KIND_DLEAF, rec.dtree_root, f"inode {ino}")
        for b in tree.blocks():
            own(b, 1, f"extent tree of inode {ino}")
        mapped = 0
        for _, physical, csums in extents.extents(tree):
            own(physical, len(csums), f"data of inode {ino}")
            mapped += len(csums)
        assert rec.blocks == mapped, f"inode {ino} counts {rec.blocks} blocks but maps {mapped}"
    return owners


class VolumeMachine(RuleBasedStateMachine):
    BLOCKSIZE = 4096
    SIZE = 32 << 20
    OPTIONS: dict = {}

    @initialize(seed=st.integers(0, 1 << 30))
    def setup(self, seed: int) -> None:
        self.tmp = tempfile.mkdtemp(prefix="tux3model-")
        self.path = os.path.join(self.tmp, "vol.img")
        mkfs(self.path, self.BLOCKSIZE, self.SIZE)
        self.vol: Volume | None = mounted(self.path, **self.OPTIONS)
        self.root = MDir(fmt.ROOT_INO)
        self.committed_root = copy.deepcopy(self.root)
        self.rng = random.Random(seed)
        self.check_space_on_disk()

    def teardown(self) -> None:
        if getattr(self, "vol", None) is not None:
            self.vol.close_files()
        if getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- model helpers ---------------------------------------------------------------------------------------------

    def dirs(self) -> list[tuple[MDir, bytes]]:
        out, stack = [], [(self.root, b"")]
        while stack:
            d, path = stack.pop()
            out.append((d, path))
            for name, child in sorted(d.entries.items()):
                if isinstance(child, MDir):
                    stack.append((child, path + b"/" + name))
        return sorted(out, key=lambda x: x[1])

    def files(self) -> list[MFile]:
        seen: dict[int, MFile] = {}
        for d, _ in self.dirs():
            for child in d.entries.values():
                if isinstance(child, MFile):
                    seen[id(child)] = child
        return sorted(seen.values(), key=lambda f: f.ino)

    def symlinks(self) -> list[MSymlink]:
        return [c for d, _ in self.dirs() for c in d.entries.values() if isinstance(c, MSymlink)]

    def links(self) -> list[tuple[MDir, bytes, MFile | MSymlink | MDir]]:
        return [(d, n, c) for d, _ in self.dirs() for n, c in sorted(d.entries.items())]

    def nlink(self, f: MFile) -> int:
        return sum(1 for _, _, c in self.links() if c is f)

    def contains(self, d: MDir, other: MDir) -> bool:
        """Is ``other`` the directory ``d`` or inside it?"""
        if d is other:
            return True
        return any(isinstance(c, MDir) and self.contains(c, other) for c in d.entries.values())

    def op(self, fn, *args, **kw):
        """Run a changing operation; if it committed on its own (to make room), that commit holds the old state."""
        before = copy.deepcopy(self.root)
        committed = self.vol.deltas.committed
        result = fn(*args, **kw)
        if self.vol.deltas.committed != committed:
            self.committed_root = before
        return result

    def pick(self, data: st.DataObject, items: list, label: str):
        return items[data.draw(st.integers(0, len(items) - 1), label=label)]

    # -- namespace -------------------------------------------------------------------------------------------------

    @rule(data=st.data(), name=names_st)
    def create(self, data: st.DataObject, name: bytes) -> None:
        d, _ = self.pick(data, self.dirs(), "dir")
        if name in d.entries:
            expect_errno(errno.EEXIST, self.op, self.vol.create, d.ino, name, 0o644)
            return
        attr = self.op(self.vol.create, d.ino, name, 0o644)
        self.vol.release(attr.ino)
        self.vol.forget(attr.ino, 1)
        assert stat.S_ISREG(attr.mode) and attr.size == 0 and attr.nlink == 1
        d.entries[name] = MFile(attr.ino)

    @rule(data=st.data(), count=st.integers(1, 40))
    def populate(self, data: st.DataObject, count: int) -> None:
        d, _ = self.pick(data, self.dirs(), "dir")
        for i in range(count):
            name = b"n%03d" % i
            if name not in d.entries:
                attr = self.op(self.vol.create, d.ino, name, 0o600)
                self.vol.release(attr.ino)
                self.vol.forget(attr.ino, 1)
                d.entries[name] = MFile(attr.ino)

    @rule(data=st.data(), name=names_st)
    def mkdir(self, data: st.DataObject, name: bytes) -> None:
        d, path = self.pick(data, self.dirs(), "dir")
        if name in d.entries:
            expect_errno(errno.EEXIST, self.op, self.vol.mkdir, d.ino, name, 0o755)
            return
        if path.count(b"/") >= 4:
            return
        attr = self.op(self.vol.mkdir, d.ino, name, 0o755)
        self.vol.forget(attr.ino, 1)
        assert stat.S_ISDIR(attr.mode) and attr.nlink == 2
        d.entries[name] = MDir(attr.ino)

    @rule(data=st.data(), name=names_st, dest=st.binary(min_size=1, max_size=1500))
    def symlink(self, data: st.DataObject, name: bytes, dest: bytes) -> None:
        d, _ = self.pick(data, self.dirs(), "dir")
        if name in d.entries:
            expect_errno(errno.EEXIST, self.op, self.vol.symlink, d.ino, name, dest)
            return
        attr = self.op(self.vol.symlink, d.ino, name, dest)
        self.vol.forget(attr.ino, 1)
        assert stat.S_ISLNK(attr.mode) and attr.size == len(dest)
        d.entries[name] = MSymlink(attr.ino, dest)

    @precondition(lambda self: self.files())
    @rule(data=st.data(), name=names_st)
    def link(self, data: st.DataObject, name: bytes) -> None:
        f = self.pick(data, self.files(), "file")
        d, _ = self.pick(data, self.dirs(), "dir")
        if name in d.entries:
            expect_errno(errno.EEXIST, self.op, self.vol.link, f.ino, d.ino, name)
            return
        attr = self.op(self.vol.link, f.ino, d.ino, name)
        self.vol.forget(f.ino, 1)
        d.entries[name] = f
        assert attr.nlink == self.nlink(f)

    @precondition(lambda self: self.links())
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        d, name, child = self.pick(data, self.links(), "link")
        if isinstance(child, MDir):
            expect_errno(errno.EISDIR, self.op, self.vol.unlink, d.ino, name)
            if child.entries:
                expect_errno(errno.ENOTEMPTY, self.op, self.vol.rmdir, d.ino, name)
                return
            self.op(self.vol.rmdir, d.ino, name)
        else:
            self.op(self.vol.unlink, d.ino, name)
        del d.entries[name]
        expect_errno(errno.ENOENT, self.vol.lookup, d.ino, name)

    @precondition(lambda self: self.links())
    @rule(data=st.data(), new=names_st)
    def rename(self, data: st.DataObject, new: bytes) -> None:
        sdir, old, src = self.pick(data, self.links(), "source")
        ddir, _ = self.pick(data, self.dirs(), "target dir")
        dst = ddir.entries.get(new)
        call = (self.vol.rename, sdir.ino, old, ddir.ino, new)
        if dst is src:  # two names of one inode (or the same name): nothing happens
            self.op(*call)
            return
        if isinstance(src, MDir) and self.contains(src, ddir):
            expect_errno(errno.EINVAL, self.op, *call)
            return
        if dst is not None:
            if isinstance(src, MDir) and not isinstance(dst, MDir):
                expect_errno(errno.ENOTDIR, self.op, *call)
                return
            if not isinstance(src, MDir) and isinstance(dst, MDir):
                expect_errno(errno.EISDIR, self.op, *call)
                return
            if isinstance(dst, MDir) and dst.entries:
                expect_errno(errno.ENOTEMPTY, self.op, *call)
                return
        self.op(*call)
        del sdir.entries[old]
        ddir.entries[new] = src

    # -- data ------------------------------------------------------------------------------------------------------

    @precondition(lambda self: self.files())
    @rule(data=st.data(), offset=st.integers(0, MAX_OFFSET), length=st.integers(1, 24 * 1024),
          kind=st.sampled_from(["random", "zeros", "byte"]))
    def write(self, data: st.DataObject, offset: int, length: int, kind: str) -> None:
        f = self.pick(data, self.files(), "file")
        if data.draw(st.booleans(), label="aligned"):
            offset -= offset % self.BLOCKSIZE
        payload = {"random": lambda: self.rng.randbytes(length), "zeros": lambda: bytes(length),
                   "byte": lambda: bytes([self.rng.randrange(1, 256)]) * length}[kind]()
        assert self.op(self.vol.write, f.ino, offset, payload) == length
        if len(f.data) < offset:
            f.data.extend(bytes(offset - len(f.data)))
        f.data[offset: offset + length] = payload
        assert self.vol.read(f.ino, offset, length) == payload

    @precondition(lambda self: self.files())
    @rule(data=st.data(), size=st.one_of(st.integers(0, MAX_OFFSET + 20000), st.just(0)))
    def truncate(self, data: st.DataObject, size: int) -> None:
        f = self.pick(data, self.files(), "file")
        if data.draw(st.booleans(), label="near the end"):
            size = max(0, len(f.data) + data.draw(st.integers(-3 * self.BLOCKSIZE, 3 * self.BLOCKSIZE)))
        attr = self.op(self.vol.setattr, f.ino, size=size)
        assert attr.size == size
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))

    # -- commits, remounts, crashes --------------------------------------------------------------------------------

    @rule(unify=st.booleans())
    def commit(self, unify: bool) -> None:
        self.vol.commit(unify=unify)
        self.committed_root = copy.deepcopy(self.root)

    @rule()
    def remount(self) -> None:
        self.vol.unmount()
        self.vol = None
        self.vol = mounted(self.path, **self.OPTIONS)
        self.committed_root = copy.deepcopy(self.root)
        self.check_lookup_paths()
        self.check_space_on_disk()

    @rule()
    def crash(self) -> None:
        """Drop the volume without a commit: it must come back exactly as of its last commit."""
        self.vol.close_files()
        self.vol = None
        self.vol = mounted(self.path, **self.OPTIONS)
        self.root = copy.deepcopy(self.committed_root)
        self.check_lookup_paths()
        self.check_space_on_disk()

    # -- checks ----------------------------------------------------------------------------------------------------

    @invariant()
    def tree_matches_model(self) -> None:
        vol = getattr(self, "vol", None)
        if vol is None:
            return
        for d, path in self.dirs():
            full = list(vol.readdir(d.ino, 0))
            listed = {name: ino for name, ino, _ in full}
            assert len(listed) == len(full), f"a name listed twice in {path or b'/'!r}"
            assert listed == {n: c.ino for n, c in d.entries.items()}, f"directory {path or b'/'!r}"
            if len(full) >= 2:  # resuming from a returned position lists exactly the rest
                k = len(full) // 2
                assert list(vol.readdir(d.ino, full[k - 1][2])) == full[k:]
            attr = vol.getattr(d.ino)
            assert stat.S_ISDIR(attr.mode)
            subdirs = sum(isinstance(c, MDir) for c in d.entries.values())
            assert attr.nlink == 2 + subdirs, f"nlink of directory {path or b'/'!r}"
        for f in self.files():
            attr = vol.getattr(f.ino)
            assert stat.S_ISREG(attr.mode)
            assert attr.size == len(f.data), f"size of inode {f.ino}"
            assert attr.nlink == self.nlink(f), f"nlink of inode {f.ino}"
            got = vol.read(f.ino, 0, len(f.data) + 4096)
            if got != f.data:
                at = next((i for i, (a, b) in enumerate(zip(got, f.data, strict=False)) if a != b),
                          min(len(got), len(f.data)))
                raise AssertionError(f"inode {f.ino}: content differs from byte {at} "
                                     f"(read {len(got)} bytes, model has {len(f.data)})")
        for link in self.symlinks():
            attr = vol.getattr(link.ino)
            assert stat.S_ISLNK(attr.mode) and attr.nlink == 1 and attr.size == len(link.target)
            assert vol.readlink(link.ino) == link.target

    def check_lookup_paths(self) -> None:
        vol = self.vol
        for d, _ in self.dirs():
            for name, child in d.entries.items():
                attr = vol.lookup(d.ino, name)
                vol.forget(attr.ino, 1)
                assert attr.ino == child.ino

    def check_space_on_disk(self) -> None:
        vol = self.vol
        owners = used_blocks(vol)
        assert list(vol.backend.otree.items()) == [], "orphans left after mount"
        assert vol.backend.alloc.pending_count() == 0
        marked = {b for b in range(vol.backend.sb.volblocks) if vol.backend.alloc.is_used(b)}
        leaked = sorted(marked - owners.keys())
        assert not leaked, f"{len(leaked)} blocks marked used but owned by nothing, e.g. {leaked[:10]}"
        unmarked = sorted(owners.keys() - marked)
        assert not unmarked, f"blocks in use but free in the bitmap: {[(b, owners[b]) for b in unmarked[:10]]}"
        assert vol.backend.alloc.free == vol.backend.sb.volblocks - len(owners)
        inodes = sum(1 for _ in vol.backend.itable.items())
        assert inodes == vol.backend.used_inodes == len(self.files()) + len(self.dirs()) + len(self.symlinks())


class Volume4096Machine(VolumeMachine):
    BLOCKSIZE = 4096
    SIZE = 32 << 20


class Volume512Machine(VolumeMachine):
    BLOCKSIZE = 512
    SIZE = 16 << 20


class VolumeLongLogMachine(VolumeMachine):
    """No unify but at unmount: every crash replays all the deltas since the last clean remount."""
    BLOCKSIZE = 1024
    SIZE = 16 << 20
    OPTIONS = {"unify_deltas": 1 << 30, "unify_log_blocks": 1 << 30}


_SETTINGS = settings(max_examples=80, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                            HealthCheck.data_too_large])
TestVolume4096 = Volume4096Machine.TestCase
TestVolume4096.settings = _SETTINGS
TestVolume512 = Volume512Machine.TestCase
TestVolume512.settings = _SETTINGS
TestVolumeLongLog = VolumeLongLogMachine.TestCase
TestVolumeLongLog.settings = _SETTINGS


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [4096, 512])
def test_full_volume_gives_enospc_and_recovers_after_delete(tmp_path, blocksize: int) -> None:
    path = str(tmp_path / "small.img")
    mkfs(path, blocksize, 4 << 20)
    vol = mounted(path)
    rng = random.Random(blocksize)
    keep = rng.randbytes(300_000)
    k = vol.create(fmt.ROOT_INO, b"keep", 0o644).ino
    vol.write(k, 0, keep)
    vol.commit()

    fill = vol.create(fmt.ROOT_INO, b"fill", 0o644).ino
    chunk = rng.randbytes(64 * 1024)
    written = 0
    with pytest.raises(OSError) as info:
        for _ in range(200):
            written += vol.write(fill, written, chunk)
    assert info.value.errno == errno.ENOSPC
    assert 2 << 20 < written < 4 << 20
    assert vol.read(k, 0, len(keep) + 1) == keep
    assert vol.read(fill, written - len(chunk), len(chunk)) == chunk
    vol.commit()  # everything accepted before ENOSPC can be committed
    vol.release(fill)
    vol.forget(fill, 1)

    vol.unlink(fmt.ROOT_INO, b"fill")
    after = rng.randbytes(1 << 20)
    a = vol.create(fmt.ROOT_INO, b"after", 0o644).ino
    assert vol.write(a, 0, after) == len(after)
    vol.release(a)
    vol.forget(a, 1)
    vol.release(k)
    vol.forget(k, 1)
    vol.unmount()

    vol = mounted(path)
    try:
        names = {name for name, _, _ in vol.readdir(fmt.ROOT_INO, 0)}
        assert names == {b"keep", b"after"}
        assert vol.read(k, 0, len(keep) + 1) == keep
        assert vol.read(a, 0, len(after) + 1) == after
        owners = used_blocks(vol)
        assert vol.backend.alloc.free == vol.backend.sb.volblocks - len(owners)
    finally:
        vol.unmount()


def test_enospc_write_leaves_the_volume_committable_and_consistent(tmp_path) -> None:
    path = str(tmp_path / "tiny.img")
    mkfs(path, 4096, 1 << 20)
    vol = mounted(path)
    f = vol.create(fmt.ROOT_INO, b"big", 0o644).ino
    with pytest.raises(OSError) as info:
        vol.write(f, 0, bytes(range(256)) * 8192)  # 2 MiB in one call on a 1 MiB volume
    assert info.value.errno == errno.ENOSPC
    assert vol.getattr(f).size == 0
    vol.write(f, 0, b"small")
    vol.release(f)
    vol.forget(f, 1)
    vol.unmount()
    vol = mounted(path)
    try:
        assert vol.read(f, 0, 100) == b"small"
    finally:
        vol.unmount()
