"""A device error in the middle of an operation never leaves it half done (SQLite's anomaly tests, on a volume).

Every namespace and file operation reads what it needs before it changes anything. So, failing the Nth read the
operation makes, for N = 1, 2, 3 ... until it succeeds: the operation either succeeds, or fails with EIO having
changed nothing, in memory or on disk, and the volume stays writable; the volume then commits, and checks clean.
And should anything fail after a change began, the volume turns read-only before that delta can commit.
"""

from __future__ import annotations

import errno
import logging
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from mkfs import mkfs as make_volume
from tux3fuse.checker import check
from tux3fuse.fs import Options, Volume
from tux3fuse.namespace import RENAME_EXCHANGE

ROOT = 1


def walk(vol: Volume) -> dict[str, tuple]:
    """Every path of the volume with its type, mode, link count, size and content (a symlink's target)."""
    out: dict[str, tuple] = {}

    def visit(ino: int, path: str) -> None:
        for name, child, _ in list(vol.readdir(ino, 0)):
            a = vol.getattr(child)
            sub = f"{path}/{name.decode()}"
            body = b""
            if stat.S_ISREG(a.mode) or stat.S_ISLNK(a.mode):
                body = vol.read(child, 0, a.size)
            out[sub] = (child, a.mode, a.nlink, a.size, body)
            if stat.S_ISDIR(a.mode):
                visit(child, sub)

    visit(ROOT, "")
    return out


def lookup(vol: Volume, path: str) -> int:
    ino = ROOT
    for part in path.strip("/").split("/"):
        ino = vol.lookup(ino, part.encode()).ino
        vol.forget(ino, 1)
    return ino


def populate(vol: Volume) -> None:
    """Directories of several blocks (512-byte blocks), files of several blocks, a symlink, a hard link, a fifo."""
    a = vol.mkdir(ROOT, b"A", 0o755).ino
    vol.mkdir(ROOT, b"B", 0o755)
    c = vol.mkdir(ROOT, b"C", 0o755).ino
    vol.mkdir(c, b"D", 0o755)
    for i in range(40):
        f = vol.create(a, b"file%d" % i, 0o644).ino
        vol.write(f, 0, bytes([i]) * (1500 + 37 * i))
        vol.release(f)
    vol.symlink(a, b"link", b"file1")
    vol.link(lookup(vol, "A/file9"), ROOT, b"hard")
    vol.mknod(c, b"fifo", stat.S_IFIFO | 0o644)


def op_write(vol: Volume) -> None:
    f = lookup(vol, "A/file7")
    vol.write(f, 100, b"w" * 1000)  # a partial first page and a partial last one


def op_truncate(vol: Volume) -> None:
    vol.setattr(lookup(vol, "A/file8"), size=700)  # the cut goes through a page


def op_mmap_store(vol: Volume) -> None:
    smap = vol.mmap(lookup(vol, "A/file10"))
    smap.write(1000, b"m" * 10)
    smap.unmap()


OPS: dict[str, Callable[[Volume], object]] = {
    "create": lambda v: v.release(v.create(lookup(v, "A"), b"new", 0o644).ino),
    "mkdir": lambda v: v.mkdir(lookup(v, "A"), b"newdir", 0o755),
    "symlink": lambda v: v.symlink(lookup(v, "A"), b"newlink", b"target" * 20),
    "mknod": lambda v: v.mknod(lookup(v, "A"), b"newfifo", stat.S_IFIFO | 0o600),
    "link": lambda v: v.link(lookup(v, "A/file1"), lookup(v, "C"), b"hard"),
    "unlink": lambda v: v.unlink(lookup(v, "A"), b"file2"),
    "rmdir": lambda v: v.rmdir(lookup(v, "C"), b"D"),
    "rename to a new name": lambda v: v.rename(lookup(v, "A"), b"file3", lookup(v, "B"), b"moved"),
    "rename over a name": lambda v: v.rename(lookup(v, "A"), b"file4", lookup(v, "A"), b"file39"),
    "rename exchange": lambda v: v.rename(lookup(v, "A"), b"file5", ROOT, b"C", RENAME_EXCHANGE),
    "rename a directory": lambda v: v.rename(ROOT, b"C", lookup(v, "B"), b"C2"),
    "write": op_write,
    "truncate": op_truncate,
    "store through a mapping": op_mmap_store,
}


class FailingReads:
    """Fail the ``n``th read of the volume's device (counting from when ``armed``) with EIO."""

    def __init__(self, vol: Volume, n: int) -> None:
        self.n, self.count, self.armed, self.failed = n, 0, False, False
        backing = vol.backend.dev.backing
        real = backing.pread

        def pread(count: int, offset: int) -> bytes:
            if self.armed:
                self.count += 1
                if self.count == self.n:
                    self.failed = True
                    raise OSError(errno.EIO, "injected read error")
            return real(count, offset)

        backing.pread = pread


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("io") / "base.img"
    make_volume(str(path), 512, 8 << 20)
    vol = Volume(str(path), Options())
    vol.mount()
    populate(vol)
    vol.unmount()  # a unify: every tree and directory block is on disk, none in memory
    return path


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "names in memory, blocks not"])
@pytest.mark.parametrize("name", list(OPS))
def test_a_read_error_at_any_read_of_an_operation_fails_it_whole_or_not_at_all(base, tmp_path, name, warm) -> None:
    """Cold: nothing of the volume in memory. Warm: every name and tree in memory, no block in the page cache
    (directories are indexed when first used; their blocks are read again when changed)."""
    op = OPS[name]
    image = tmp_path / "v.img"
    shutil.copyfile(base, image)
    vol = Volume(str(image), Options())
    vol.mount()
    before = walk(vol)
    vol.unmount()
    failures = 0
    for n in range(1, 200):
        shutil.copyfile(base, image)
        vol = Volume(str(image), Options())
        vol.mount()
        if warm:
            walk(vol)
            vol.icache.cache.drop_clean(vol.icache.registry)
        reads = FailingReads(vol, n)
        reads.armed = True
        try:
            op(vol)
        except OSError as e:
            assert reads.failed, f"{name} failed without the injected error: {e}"
            assert e.errno == errno.EIO, e
            failures += 1
            reads.armed = False
            assert vol.failed is None, f"{name}, read {n} failing: the volume failed: {vol.failed}"
            assert walk(vol) == before, f"{name}, read {n} failing: the operation was half done"
            vol.unmount()
            report, again = check(str(image))
            again.close_files()
            assert report.errors == [], report.errors
            again = Volume(str(image), Options(readonly=True))
            try:
                assert walk(again) == before
            finally:
                again.close_files()
            continue
        reads.armed = False
        assert not reads.failed, f"{name} succeeded although its read {n} failed"
        after = walk(vol)
        assert after != before
        vol.unmount()
        report, again = check(str(image))
        again.close_files()
        assert report.errors == [], report.errors
        break
    else:
        raise AssertionError(f"{name} never succeeded")
    assert failures >= 1, f"{name} read nothing from the device: the test does not test it"


def test_an_error_after_a_change_began_turns_the_volume_read_only_before_its_delta_commits(
        tmp_path, monkeypatch, caplog) -> None:
    path = tmp_path / "v.img"
    make_volume(str(path), 4096, 32 << 20)
    vol = Volume(str(path), Options())
    vol.mount()
    a = vol.create(ROOT, b"committed", 0o644)
    vol.write(a.ino, 0, b"durable")
    vol.release(a.ino)
    vol.commit()
    b = vol.create(ROOT, b"same delta", 0o644)  # changed in the delta that fails: lost with it, as in a crash
    vol.release(b.ino)
    d = vol.mkdir(ROOT, b"d", 0o755).ino
    real = vol.names._dir_writer

    def writer(inode, delta):
        write = real(inode, delta)

        def fail_on_the_source(block):
            if inode.ino == ROOT:
                raise OSError(errno.EIO, "injected error inside the change")
            return write(block)
        return fail_on_the_source

    monkeypatch.setattr(vol.names, "_dir_writer", writer)
    with caplog.at_level(logging.ERROR, logger="tux3fuse"), pytest.raises(OSError) as info:
        vol.rename(ROOT, b"committed", d, b"moved")  # the new name is added, then removing the old one fails
    assert info.value.errno == errno.EIO
    assert vol.failed is not None
    assert f"rename(1, b'committed', {d}, b'moved') failed after it began changing delta" in vol.failed
    assert any("rename(1, b'committed'" in r.getMessage() for r in caplog.records), "the log names the operation"
    with pytest.raises(OSError) as info:
        vol.create(ROOT, b"later", 0o644)
    assert info.value.errno == errno.EROFS
    monkeypatch.undo()
    vol.unmount()  # a failed volume commits nothing
    report, again = check(str(path))
    again.close_files()
    assert report.errors == [], report.errors
    vol = Volume(str(path), Options(readonly=True))
    try:
        names = {name for name, _, _ in vol.readdir(ROOT, 0)}
        assert names == {b"committed"}  # the delta with the half-done rename never reached the disk
    finally:
        vol.close_files()
