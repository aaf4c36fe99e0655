"""The command-line tools on bad input: one line naming the problem, the right exit status, nothing lost."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import fsck, mkfs, one_line, require_fuse, tool

from tux3fuse import format as fmt
from tux3fuse.fs import Options, Volume

pytestmark = pytest.mark.timeout(120)


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr + r.stdout
    return r


@pytest.mark.parametrize("cmd", ["mkfs.tux3", "tux3fuse", "fsck.tux3", "umount.tux3", "tux3", "mount.fuse.tux3"])
def test_every_command_explains_itself(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage" in r.stdout.lower()


@pytest.mark.parametrize("args", [["mkfs.tux3"], ["mkfs.tux3", "-b", "1000", "-s", "1M", "x.img"],
                                  ["mkfs.tux3", "-s", "lots", "x.img"], ["fsck.tux3", "--bogus", "x"],
                                  ["tux3fuse", "only-one-arg"], ["tux3", "frobnicate"], ["umount.tux3"]])
def test_wrong_usage_is_one_line_and_exit_2(args, tmp_path):
    os.chdir(tmp_path)
    r = run(*args)
    assert r.returncode == 2
    one_line(r)


def test_mkfs_refuses_an_existing_filesystem_without_force(tmp_path):
    img = tmp_path / "a.img"
    assert run("mkfs.tux3", "-s", "32M", "-L", "first", str(img)).returncode == 0
    r = run("mkfs.tux3", "-s", "32M", str(img))
    assert r.returncode == 1 and "tux3fuse filesystem" in one_line(r) and "-f" in one_line(r)
    assert run("mkfs.tux3", "-f", "-b", "512", str(img)).returncode == 0
    assert Volume(str(img), Options(readonly=True)).backend.sb.blocksize == 512
    if shutil.which("mkfs.ext4"):
        ext = tmp_path / "ext.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", str(ext), "16M"], check=True, capture_output=True)
        r = run("mkfs.tux3", str(ext))
        assert r.returncode == 1 and "ext2/3/4" in one_line(r)


def test_mkfs_rejects_a_too_small_image(tmp_path):
    r = run("mkfs.tux3", "-s", "16K", str(tmp_path / "tiny.img"))
    assert r.returncode == 1 and "too small" in one_line(r)


def test_mkfs_sizes_and_block_sizes(tmp_path):
    for bs in (512, 1024, 4096, 65536):
        img = tmp_path / f"b{bs}.img"
        assert run("mkfs.tux3", "-q", "-b", str(bs), "-s", "8M", str(img)).returncode == 0
        assert os.stat(img).st_size == 8 << 20
        assert os.stat(img).st_blocks * 512 < 2 << 20  # sparse
        assert fsck(img).returncode == 0


def corrupt(path, offset: int, data: bytes = b"\xff") -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(bytes(a ^ b for a, b in zip(old, data, strict=True)))


@pytest.mark.parametrize("damage, message", [
    ("zero", "not a tux3fuse volume"),
    ("checksum", "checksum mismatch"),
    ("short", "truncated"),
    ("version", "unsupported format version"),
])
def test_bad_images_are_refused_with_the_reason(tmp_path, damage, message):
    img = tmp_path / "a.img"
    mkfs(img, "32M")
    if damage == "zero":
        with open(img, "r+b") as f:
            f.write(bytes(16384))
    elif damage == "checksum":
        for off in fmt.SUPER_OFFSETS:
            corrupt(img, off + 40)
    elif damage == "short":
        os.truncate(img, 16 << 20)
    elif damage == "version":
        for off in fmt.SUPER_OFFSETS:
            with open(img, "r+b") as f:
                f.seek(off)
                sb = bytearray(f.read(fmt.SUPER_SIZE))
                sb[8:12] = (99).to_bytes(4, "little")
                import xxhash
                sb[-8:] = xxhash.xxh3_64_intdigest(bytes(sb[:-8])).to_bytes(8, "little")
                f.seek(off)
                f.write(sb)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run("tux3fuse", "-f", str(img), str(mnt))
    assert r.returncode == 1 and message in one_line(r)
    r = run("fsck.tux3", "-n", str(img))
    assert r.returncode == (8 if damage == "zero" else 4) and message in r.stdout + r.stderr  # 8: not a volume
    r = run("tux3fuse", "-f", str(tmp_path / "missing.img"), str(mnt))
    assert r.returncode == 1 and "no such image" in one_line(r)


def test_one_torn_superblock_copy_is_survived(tmp_path):
    img = tmp_path / "a.img"
    mkfs(img, "32M")
    vol = Volume(str(img), Options(readonly=True))
    newest = vol.backend.sb.copy
    vol.close_files()
    corrupt(img, fmt.SUPER_OFFSETS[newest] + 100, b"\x5a" * 200)  # the newest copy is torn
    r = fsck(img, "-n")
    assert r.returncode == 0 and "superblock copy" in r.stdout


def test_mount_errors(tmp_path):
    require_fuse()
    img = tmp_path / "a.img"
    mkfs(img, "32M")
    afile = tmp_path / "file"
    afile.write_text("")
    r = run("tux3fuse", str(img), str(afile))
    assert r.returncode == 2 and "not a directory" in one_line(r)
    r = run("tux3fuse", "-o", "bogus", str(img), str(tmp_path))
    assert r.returncode == 2 and "unknown mount option" in one_line(r)
    r = run("tux3fuse", "-o", "commit=soon", str(img), str(tmp_path))
    assert r.returncode == 2
    r = run("tux3", "umount", str(tmp_path))
    assert r.returncode == 2 and "not mounted" in one_line(r)


def test_already_mounted_and_in_use_images(make_mount, tmp_path):
    m = make_mount()
    r = run("tux3fuse", str(m.image), str(m.mnt))
    assert r.returncode == 2 and "already a mountpoint" in one_line(r)
    other = tmp_path / "other"
    other.mkdir()
    r = run("tux3fuse", str(m.image), str(other))
    assert r.returncode == 1 and "in use" in one_line(r)
    r = run("fsck.tux3", str(m.image))
    assert r.returncode == 8 and "mounted" in r.stderr
    r = run("mkfs.tux3", "-f", str(m.image))
    assert r.returncode == 1 and "in use" in one_line(r)


def test_fsck_finds_and_repairs_leaked_blocks(tmp_path):
    img = tmp_path / "a.img"
    mkfs(img, "32M")
    vol = Volume(str(img))
    vol.mount()
    start, count = vol.backend.alloc.alloc_run(5)  # allocated, logged, referenced by nothing
    vol.unmount()
    r = fsck(img, "-n")
    assert r.returncode == 4 and "nothing references" in r.stdout
    r = fsck(img)
    assert r.returncode == 1, r.stdout
    assert fsck(img).returncode == 0


def test_fsck_names_a_corrupt_metadata_block(tmp_path):
    img = tmp_path / "a.img"
    mkfs(img, "32M")
    vol = Volume(str(img))
    vol.mount()
    a = vol.create(1, b"f", 0o644)
    vol.write(a.ino, 0, os.urandom(100_000))
    vol.unmount()
    vol = Volume(str(img), Options(readonly=True))
    leaf = vol.iget(a.ino).rec.dtree_root
    bs = vol.blocksize
    vol.close_files()
    corrupt(img, leaf * bs + 200)
    r = fsck(img, "-n")
    assert r.returncode == 4 and f"block {leaf}" in r.stdout and "checksum" in r.stdout


def test_corrupt_block_while_mounted_gives_eio_and_read_only_without_killing_the_mount(make_mount):
    m = make_mount(size="32M")
    data = os.urandom(200_000)
    with open(m.path("victim"), "wb") as f:
        f.write(data)
    with open(m.path("bystander"), "wb") as f:
        f.write(b"fine")
    m.umount()
    vol = Volume(str(m.image), Options(readonly=True))
    ino = vol.lookup(1, b"victim").ino
    leaf = vol.iget(ino).rec.dtree_root
    bs = vol.blocksize
    vol.close_files()
    corrupt(m.image, leaf * bs + 300)
    m.start()
    with pytest.raises(OSError) as e:
        with open(m.path("victim"), "rb") as f:
            f.read()
    assert e.value.errno == 5  # EIO
    assert sorted(os.listdir(m.mnt)) == ["bystander", "victim"]  # the mount is alive
    with open(m.path("bystander"), "rb") as f:
        assert f.read() == b"fine"
    with pytest.raises(OSError) as e:
        os.mkdir(m.path("new"))
    assert e.value.errno in (30, 5)  # EROFS or EIO: the volume turned read-only
    s = m.stat_json()
    assert s["read_only"] == 1
    assert m.umount(expect_ok=False) == 1  # umount reports that the daemon saw errors
    assert f"block {leaf}" in m.log.read_text()
    assert fsck(m.image, "-n").returncode == 4
    m.image.unlink()  # nothing for the fixture's final fsck to check
    mkfs(m.image, "32M")
