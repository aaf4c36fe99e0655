"""The top-level ``mkfs`` package: it writes a volume from the on-disk format alone, the daemon never imports it,
and what it writes is a volume a mount, the embedded API and fsck take as it is.

Besides the format and the size units, mkfs may load ``tux3fuse.backing``: a volume on an NBD export is reached
only through it, and it imports nothing of tux3fuse (checked here as for ``units``), so the format still depends on
nothing of the daemon.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import ROOT, Mount, fsck, require_fuse

import mkfs
from tux3fuse import format as fmt
from tux3fuse.fs import Options, Volume

pytestmark = pytest.mark.timeout(120)

# the only modules of tux3fuse that mkfs may load: the format, the size units its messages use, and the backings
# (image file, block device, NBD export) it writes through; the last two import nothing of tux3fuse
ALLOWED = {"tux3fuse", "tux3fuse.format", "tux3fuse.units", "tux3fuse.backing"}


def loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; the modules of tux3fuse and mkfs it loaded, and whether the FUSE and
    event-loop libraries were loaded."""
    probe = (f"import sys, json\n{code}\n"
             "print(json.dumps({'tux3fuse': sorted(m for m in sys.modules if m.split('.')[0] == 'tux3fuse'),"
             " 'mkfs': sorted(m for m in sys.modules if m.split('.')[0] == 'mkfs'),"
             " 'daemon_libs': sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules)}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_mkfs_builds_an_image_with_no_module_of_tux3fuse_but_the_format(tmp_path):
    image = tmp_path / "a.img"
    seen = loaded_after(f"import mkfs\nmkfs.mkfs({str(image)!r}, 4096, 1 << 20)")
    assert set(seen["tux3fuse"]) <= ALLOWED, seen["tux3fuse"]
    assert "tux3fuse.format" in seen["tux3fuse"]
    assert seen["daemon_libs"] == []
    with open(image, "rb") as f:  # and it did write a volume
        f.seek(fmt.SUPER_OFFSETS[0])
        assert fmt.Super.unpack(f.read(fmt.SUPER_SIZE), 0).used_inodes == 1


def test_the_mkfs_command_loads_no_module_of_tux3fuse_but_the_format(tmp_path):
    image = tmp_path / "a.img"
    seen = loaded_after(f"from mkfs.command import run\nassert run(['-q', '-s', '1M', {str(image)!r}]) == 0")
    assert set(seen["tux3fuse"]) <= ALLOWED, seen["tux3fuse"]
    assert seen["daemon_libs"] == []
    assert image.stat().st_size == 1 << 20


@pytest.mark.parametrize("module", ["units", "backing"])
def test_the_units_and_backing_modules_import_nothing_of_tux3fuse(module):
    tree = ast.parse((ROOT / "tux3fuse" / f"{module}.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [m for m in imported if m.startswith(("tux3fuse", "."))] and "" not in imported


def test_importing_the_daemon_does_not_import_mkfs():
    seen = loaded_after("import tux3fuse.daemon, tux3fuse.fs, tux3fuse.fuse_ops, tux3fuse.cli")
    assert "tux3fuse.fs" in seen["tux3fuse"] and "tux3fuse.daemon" in seen["tux3fuse"]
    assert seen["mkfs"] == []


def _imports_of_mkfs(path) -> list[str]:
    """Where the module at ``path`` imports the mkfs package, even inside a function: 'line N in FUNCTION'."""
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else where
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module or ""]
            if any(n.split(".")[0] == "mkfs" for n in names):
                found.append(f"line {child.lineno} in {where}")
            visit(child, name)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def test_no_module_of_tux3fuse_imports_mkfs_but_the_tux3_mkfs_subcommand():
    modules = sorted((ROOT / "tux3fuse").rglob("*.py"))
    assert len(modules) > 10
    importers = {p.relative_to(ROOT).as_posix(): _imports_of_mkfs(p) for p in modules}
    importers = {k: v for k, v in importers.items() if v}
    assert list(importers) == ["tux3fuse/cli.py"], importers
    assert [w.split(" in ")[1] for w in importers["tux3fuse/cli.py"]] == ["mkfs_run"]


def _super(image, copy: int) -> fmt.Super:
    with open(image, "rb") as f:
        f.seek(fmt.SUPER_OFFSETS[copy])
        return fmt.Super.unpack(f.read(fmt.SUPER_SIZE), copy)


def _root_and_counts(image) -> tuple[fmt.InodeRecord, int, int, int, int]:
    """As the embedded API loads the volume read-only: the root's attributes, used inodes, next inode number,
    free blocks in the superblock and free blocks in the bitmap."""
    vol = Volume(str(image), Options(readonly=True))
    try:
        sb = vol.backend.sb
        return vol.iget(fmt.ROOT_INO).rec, sb.used_inodes, sb.next_inum, sb.free_blocks, vol.backend.alloc.free
    finally:
        vol.close_files()


@pytest.mark.parametrize("blocksize, size", [(512, (1 << 20) + 3 * 512), (1024, 256 << 10), (4096, 64 << 20),
                                             (65536, 4 << 20), (512, 1 << 30)],
                         ids=["512-odd-block-count", "1024-smallest", "4096", "65536-smallest",
                              "512-many-bitmap-blocks"])
def test_a_new_volume_loads_with_its_root_and_checks_clean(tmp_path, blocksize, size):
    image = tmp_path / "a.img"
    before = mkfs.mkfs(str(image), blocksize, size, label="new", uid=1234, gid=5678)
    copies = _super(image, 0), _super(image, 1)
    assert before == copies[0]
    assert copies[0].seq > copies[1].seq and copies[0].bitmap_cur != copies[1].bitmap_cur
    for sb in copies:
        assert (sb.state, sb.used_inodes, sb.next_inum, sb.label, sb.volblocks) == (
            fmt.STATE_CLEAN, 1, fmt.ROOT_INO + 1, b"new", size // blocksize)
        assert sb.itree_root == fmt.reserved_blocks(blocksize) + 2 * sb.bitmap_blocks
    rec, used, next_inum, free_sb, free_bitmap = _root_and_counts(image)
    assert (rec.mode, rec.uid, rec.gid, rec.nlink, rec.size, rec.parent) == (
        stat.S_IFDIR | 0o755, 1234, 5678, 2, 0, fmt.ROOT_INO)
    assert rec.atime_ns == rec.mtime_ns == rec.ctime_ns == copies[0].created_ns
    assert (used, next_inum) == (1, fmt.ROOT_INO + 1)
    assert free_sb == free_bitmap == size // blocksize - copies[0].itree_root - 1
    r = fsck(image, "-n")
    assert r.returncode == 0, r.stdout + r.stderr


def test_either_superblock_copy_alone_names_the_root(tmp_path):
    for spoiled in (0, 1):
        image = tmp_path / f"spoiled{spoiled}.img"
        mkfs.mkfs(str(image), 4096, 1 << 20)
        with open(image, "r+b") as f:
            f.seek(fmt.SUPER_OFFSETS[spoiled] + 100)
            f.write(b"\xff" * 8)
        vol = Volume(str(image), Options(readonly=True))
        try:
            assert vol.backend.sb.copy == 1 - spoiled
            assert stat.S_ISDIR(vol.getattr(fmt.ROOT_INO).mode)
            sb = vol.backend.sb
            assert vol.backend.bitmap_damage == [] and vol.backend.alloc.free == sb.free_blocks  # its own bitmap region
        finally:
            vol.close_files()


@pytest.mark.mounted
@pytest.mark.parametrize("blocksize", [512, 4096, 65536])
def test_a_volume_from_the_mkfs_package_mounts_takes_files_unmounts_and_checks_clean(tmp_path, blocksize):
    require_fuse()
    image = tmp_path / "a.img"
    mkfs.mkfs(str(image), blocksize, 16 << 20)
    m = Mount(image, tmp_path / "mnt")
    try:
        m.start()
        root = os.stat(m.mnt)
        assert stat.S_IMODE(root.st_mode) == 0o755 and root.st_uid == os.getuid() and root.st_nlink == 2
        os.mkdir(m.path("dir"))
        data = {name: os.urandom(n) for name, n in (("small", 100), ("blocks", 3 * blocksize + 7), ("big", 1 << 20))}
        for name, content in data.items():
            with open(m.path("dir", name), "wb") as f:
                f.write(content)
        m.umount()
        r = fsck(image, "-n")
        assert r.returncode == 0, r.stdout + r.stderr
        m.start()
        for name, content in data.items():
            with open(m.path("dir", name), "rb") as f:
                assert f.read() == content
        m.umount()
    finally:
        m.cleanup()
