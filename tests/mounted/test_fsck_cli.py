"""fsck.tux3 as a user runs it: damage named by path and inode, -v listing each check with progress on large
volumes, --help saying what the tool does, and an image in use refused with exit 8 however it is reached."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import opened, tool
from volumes import History, flip, flip_bit

from mkfs import mkfs as make_volume
from tux3fuse import format as fmt
from tux3fuse.fs import Options, Volume

pytestmark = pytest.mark.timeout(180)

FILE = b"\x00\x01\x02\x03" * 4096  # 16 KiB: four blocks


def fsck(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([tool("fsck.tux3"), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def tree(image: Path) -> dict[str, int]:
    """A volume holding /d/sub/file (also linked as "/other name"), /d/x and /empty: their inode numbers."""
    make_volume(str(image), 4096, 32 << 20)
    vol = opened(str(image))
    d = vol.mkdir(1, b"d", 0o755).ino
    sub = vol.mkdir(d, b"sub", 0o755).ino
    f = vol.create(sub, b"file", 0o644).ino
    vol.write(f, 0, FILE)
    vol.release(f)
    vol.link(f, 1, b"other name")
    x = vol.create(d, b"x", 0o644).ino
    vol.write(x, 0, b"x" * 5000)
    vol.release(x)
    e = vol.create(1, b"empty", 0o644).ino
    vol.release(e)
    vol.unmount()
    return {"d": d, "sub": sub, "file": f, "x": x}


def block_of(image: Path, ino: int, index: int = 0) -> int:
    """The physical block of logical block ``index`` of inode ``ino``."""
    vol = Volume(str(image), Options(readonly=True))
    try:
        for key, value in vol.backend.dtree(vol.iget(ino)).items():
            physical, csums = fmt.unpack_extent(value)
            if key <= index < key + len(csums):
                return physical + index - key
    finally:
        vol.close_files()
    raise AssertionError(f"inode {ino} has no block {index}")


def smash(image: Path, block: int, at: int = 100) -> None:
    """Damage ``block`` beyond what one flipped bit explains (two bytes changed)."""
    with open(image, "r+b") as f:
        f.seek(block * 4096 + at)
        old = f.read(2)
        f.seek(block * 4096 + at)
        f.write(bytes(b ^ 0xFF for b in old))


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


# ---------------------------------------------------------------------------------------------------------------
# damage by path


def test_a_corrupt_data_block_is_reported_with_the_path_of_its_file_and_its_inode(tmp_path):
    image = tmp_path / "a.img"
    inos = tree(image)
    block = block_of(image, inos["x"])
    smash(image, block)
    for args in (["-n"], []):  # the check and the repair (which cannot restore it) say the same
        r = fsck(*args, image)
        assert r.returncode == 4, r.stdout + r.stderr
        bad = lines_with(r.stdout, "fails its checksum")
        assert bad == [f"inode {inos['x']}: data block 0 (block {block}) fails its checksum; path /d/x"], r.stdout


def test_a_hard_linked_file_is_named_by_every_path_that_reaches_it(tmp_path):
    image = tmp_path / "a.img"
    inos = tree(image)
    block = block_of(image, inos["file"], 2)
    smash(image, block)
    r = fsck("-n", image)
    assert r.returncode == 4
    (line,) = lines_with(r.stdout, "fails its checksum")
    assert line.startswith(f"inode {inos['file']}: data block 2 (block {block}) ")
    assert line.endswith("; paths /other name, /d/sub/file"), line


def test_a_restored_bit_names_the_file_it_was_in(tmp_path):
    image = tmp_path / "a.img"
    inos = tree(image)
    block = block_of(image, inos["file"], 1)
    flip_bit(image, block * 4096 + 77, 3)
    r = fsck(image)
    assert r.returncode == 1, r.stdout
    (line,) = lines_with(r.stdout, "restored bit")
    assert f"of block {block} (data block 1 of inode {inos['file']})" in line
    assert "/d/sub/file" in line and "/other name" in line, line
    assert fsck("-n", image).returncode == 0


def test_a_lost_directory_block_names_the_directory_and_where_reconnected_files_were(tmp_path):
    image = tmp_path / "a.img"
    inos = tree(image)
    block = block_of(image, inos["d"])
    smash(image, block, at=40)
    r = fsck("-n", image)
    assert r.returncode == 4
    assert f"inode {inos['d']}: data block 0 (block {block}) fails its checksum; path /d\n" in r.stdout, r.stdout
    assert f"directory {inos['d']}: link count 3, expected 2; path /d\n" in r.stdout  # its subdirectory's name is lost
    r = fsck(image)
    assert r.returncode == 1, r.stdout
    out = r.stdout
    assert f"directory {inos['d']}: block 0 was unreadable and is now empty; the names in it are lost; path /d" in out
    for name in ("x", "sub"):
        ino = inos[name]
        assert any(line.startswith(f"reconnected inode {ino} ") and f"/lost+found/#{ino}" in line
                   and line.endswith("; its name was in /d") for line in out.splitlines()), out
    assert fsck("-n", image).returncode == 0


def test_a_link_count_error_names_the_paths_the_check_found(tmp_path):
    image = tmp_path / "a.img"
    inos = tree(image)
    vol = opened(str(image))
    with vol.deltas.change() as delta:  # the record says 3 links where two names reach the file
        vol.dirty.mark(vol.iget(inos["file"]), delta).nlink = 3
    vol.unmount()
    r = fsck("-n", image)
    assert r.returncode == 4
    assert f"inode {inos['file']}: link count 3, but 2 names; paths /other name, /d/sub/file" in r.stdout, r.stdout


def test_a_roll_back_names_the_inodes_of_the_dropped_deltas_by_their_paths(tmp_path):
    image = tmp_path / "a.img"
    make_volume(str(image), 4096, 32 << 20)
    h = History(str(image))  # deltas creating f0..f5; f1 unlinked, f2 renamed to g2 along the way
    good = h.seqs[2]
    block = h.logs[h.seqs[3]][0]
    flip(str(image), block, 300)
    flip(str(image), block, 301)
    r = fsck(image)
    assert r.returncode == 1 and f"rolled back to delta {good} " in r.stdout, r.stdout
    (line,) = lines_with(r.stdout, "names of the inodes the dropped delta(s) touched")
    vol = Volume(str(image), Options(readonly=True))
    try:
        f2 = vol.lookup(1, b"f2").ino  # at the delta rolled back to, the rename has not happened
    finally:
        vol.close_files()
    assert f"/f2 (inode {f2})" in line and "/ (inode 1)" in line, line
    assert "; no name: inode(s) " in line  # files the dropped deltas created are gone
    assert fsck("-n", image).returncode == 0


def test_no_line_names_the_image_twice(tmp_path):
    image = tmp_path / "a.img"
    inos = tree(image)
    smash(image, block_of(image, inos["d"]), at=40)
    smash(image, block_of(image, inos["x"]))
    cases = [(fsck("-n", image), 4), (fsck(image), 4), (fsck(tmp_path / "missing.img"), 8), (fsck(tmp_path), 8)]
    for path in (image, tmp_path / "missing.img", tmp_path):
        for r, _ in cases:
            for line in (r.stdout + r.stderr).splitlines():
                assert f"{path}: {path}" not in line and line.count(f"{path}:") <= 1, line
    assert [r.returncode for r, _ in cases] == [code for _, code in cases]
    assert cases[2][0].stderr == f"fsck.tux3: {tmp_path / 'missing.img'}: cannot open: No such file or directory\n"
    assert cases[3][0].stderr == f"fsck.tux3: {tmp_path}: not an image file or block device\n"


# ---------------------------------------------------------------------------------------------------------------
# -v and --help

CHECKS = ["reading the superblock copies, the bitmap and the log", "checked the superblock copies: ",
          "checked the bitmap: ", "replayed the log: ", "checking the inode table", "checking 6 inodes: ",
          "checking directory / (inode 1)", "checking directory /d (inode ", "checking directory /d/sub (inode ",
          "checking data checksums: 6 block(s) of 2 file(s)", "checking link counts and orphans",
          "checking the bitmap against the blocks in use", "checking the free block and inode counts"]


def test_verbose_lists_each_check_in_order_before_the_report(tmp_path):
    image = tmp_path / "a.img"
    tree(image)
    r = fsck("-n", "-v", image)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    at = [next((i for i, line in enumerate(lines) if line.startswith(check)), None) for check in CHECKS]
    assert None not in at and at == sorted(at), r.stdout
    assert lines[-1] == "clean" and lines[-2].startswith(f"{image}: delta ")
    assert r.stderr == ""  # a check this small shows no progress
    quiet = fsck("-n", image)
    assert quiet.stdout.splitlines() == lines[-2:]  # without -v: only the report


def test_verbose_repair_lists_the_repair_and_the_second_check(tmp_path):
    image = tmp_path / "a.img"
    inos = tree(image)
    flip_bit(image, block_of(image, inos["x"]) * 4096 + 5, 1)
    r = fsck("-v", image)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    repair = lines.index("repairing: restoring 1 flipped bit(s)")
    assert lines[repair + 1].startswith("checking again after the repair")
    assert lines.count("checking link counts and orphans") == 2


@pytest.fixture(scope="module")
def large_image(tmp_path_factory) -> Path:
    """A 16 GiB sparse volume of 1 KiB blocks: 16 million bits for the bitmap check, several seconds."""
    image = tmp_path_factory.mktemp("large") / "large.img"
    subprocess.run([tool("mkfs.tux3"), "-q", "-b", "1024", "-s", "16G", str(image)], check=True)
    return image


PROGRESS = re.compile(r"^(.*): checking [a-z ]+: (\d+) of (\d+) (blocks|inodes) \((\d+)%\)$")


def test_verbose_progress_on_a_large_volume_is_one_line_every_few_seconds_when_stderr_is_not_a_terminal(
        large_image):
    r = fsck("-n", "-v", large_image)
    assert r.returncode == 0 and r.stdout.endswith("clean\n")
    progress = r.stderr.splitlines()
    assert progress and "\r" not in r.stderr, r.stderr
    for line in progress:
        m = PROGRESS.match(line)
        assert m and m[1] == str(large_image) and int(m[2]) <= int(m[3]), line


def test_verbose_progress_on_a_terminal_is_rewritten_in_place_and_cleared(large_image):
    main, sub = pty.openpty()
    proc = subprocess.Popen([tool("fsck.tux3"), "-n", "-v", str(large_image)], stdout=subprocess.PIPE,
                            stderr=sub, text=True)
    os.close(sub)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        assert ready, "no output from fsck.tux3 for 60 s"
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed: fsck exited
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.wait(timeout=60) == 0 and out.endswith("clean\n")
    text = seen.decode()
    assert "\n" not in text.replace("\r\n", "") and text.startswith("\r"), repr(text)
    shown = [part.strip() for part in text.split("\r") if part.strip()]
    assert len(shown) >= 2 and all(PROGRESS.match(part) for part in shown), shown
    assert text.endswith("\r") and text.split("\r")[-2].strip() == ""  # cleared before the report


def test_help_says_repair_is_the_default_and_the_exit_codes():
    r = fsck("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Repair is the default: without -n, fsck.tux3 writes its repairs to the image" in text
    assert "-n, --no-action check only: open the image read-only and change nothing" in text
    assert "-y, -p, -a accepted for fsck(8) compatibility: the same as the default" in text
    for code, meaning in (("0", "no errors"), ("1", "errors found and corrected"), ("4", "errors left uncorrected"),
                          ("8", "operational error: the image cannot be opened, or is in use")):
        assert f" {code} {meaning}" in text, text
    assert "as e2fsck" in text


def test_no_action_and_repair_together_are_wrong_usage(tmp_path):
    image = tmp_path / "a.img"
    tree(image)
    r = fsck("-n", "-y", image)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "-n" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# an image in use

IN_USE = "is in use (mounted, or being checked)"
HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)  # as the daemon holds it from the mount until its last commit\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n")


def aliases(image: Path) -> tuple[Path, Path]:
    """A hard link and a symlink to ``image``, in a directory of their own."""
    other = image.parent / "elsewhere"
    other.mkdir(exist_ok=True)
    hard, soft = other / "hard.img", other / "soft.img"
    os.link(image, hard)
    soft.symlink_to(image)
    return hard, soft


def test_an_image_whose_lock_another_process_holds_exits_8_by_any_name(tmp_path):
    image = tmp_path / "a.img"
    tree(image)
    hard, soft = aliases(image)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(image)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        for name in (image, hard, soft):
            for args in (["-n"], [], ["-v"]):
                r = fsck(*args, name)
                assert r.returncode == 8, (args, name, r.stdout, r.stderr)
                assert r.stderr == f"fsck.tux3: {name} {IN_USE}\n" and r.stdout == "", (args, r.stderr)
    finally:
        holder.kill()
        holder.wait()
    assert fsck("-n", hard).returncode == 0


def test_a_mounted_image_reached_through_a_hard_link_or_symlink_exits_8(make_mount):
    m = make_mount(size="64M")
    hard, soft = aliases(m.image)
    for name in (hard, soft, m.image):
        for args in (["-n"], []):
            r = fsck(*args, name)
            assert r.returncode == 8, r.stdout + r.stderr
            assert r.stderr == f"fsck.tux3: {name} is in use (mounted at {m.mnt}); unmount it first\n"
    m.umount()
    assert fsck("-n", hard).returncode == 0


def test_right_after_a_plain_fusermount_u_the_daemon_still_committing_makes_fsck_exit_8(make_mount):
    m = make_mount(size="512M")
    with open(m.path("big"), "wb") as f:  # dirty data the daemon's last commit writes after the unmount
        f.write(os.urandom(64 << 20))
    subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGSTOP)  # held in its last commit: the window in which fsck runs, made to last
    try:
        if m.proc.poll() is not None:
            pytest.skip("the daemon finished its last commit before it could be held")
        for args in (["-n"], []):
            r = fsck(*args, m.image)
            assert r.returncode == 8 and r.stderr == f"fsck.tux3: {m.image} {IN_USE}\n", r.stdout + r.stderr
    finally:
        m.proc.send_signal(signal.SIGCONT)
    assert m.proc.wait(timeout=120) == 0
    m.logfile.close()
    m.proc = None
    deadline = time.monotonic() + 5
    while (r := fsck("-n", m.image)).returncode == 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.returncode == 0, r.stdout + r.stderr
