"""scripts/fuzz.py and scripts/reseal.py: crafted images reach the parsers, a seeded fuzz pass finds nothing, and
every image the fuzzer ever broke the code with (tests/images/fuzz-*.img) now ends in a one-line answer.

The fuzz pass and the replays run in subprocesses with their address space limited; their timeouts only detect a
hang."""

from __future__ import annotations

import struct
import subprocess
import sys

from conftest import ROOT, address_space, load_script, tool

from mkfs import mkfs
from tux3fuse import format as fmt
from tux3fuse.fsck import fsck

IMAGES = sorted((ROOT / "tests" / "images").glob("fuzz-*.img"))
LIMIT = 3 << 30  # bytes of address space the fuzzer's process may map (its own limit is the same)
reseal = load_script("reseal")


def fuzz(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), *args], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=address_space(LIMIT))


def test_a_patched_inode_resealed_reaches_the_check_of_its_links_instead_of_its_checksum(tmp_path) -> None:
    img = tmp_path / "a.img"
    mkfs(str(img), 512, 128 << 10)
    image = bytearray(img.read_bytes())
    sb = fmt.Super.unpack(bytes(image[4096: 4096 + fmt.SUPER_SIZE]), 0)
    _, off, _ = struct.unpack_from("<QHH", image, sb.itree_root * 512 + 32)
    struct.pack_into("<I", image, sb.itree_root * 512 + off + 12, 7)  # the root directory's link count
    img.write_bytes(image)
    assert "checksum mismatch" in "\n".join(fsck(str(img)).lines)
    img.write_bytes(reseal.reseal(image))
    lines = "\n".join(fsck(str(img)).lines)
    assert "checksum" not in lines and "directory 1: link count 7, expected 2" in lines, lines


def test_a_seeded_fuzz_pass_finds_nothing(tmp_path) -> None:
    r = fuzz("--dir", str(tmp_path), "run", "--runs", "250", "--seed", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "Done 250 runs" in r.stderr
    assert not list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*")) + list(tmp_path.glob("oom-*"))


def test_every_regression_image_gets_a_one_line_answer_within_bounds() -> None:
    assert IMAGES, "tests/images holds the images the fuzzer found"
    r = fuzz("check", *map(str, IMAGES))
    assert r.returncode == 0 and r.stdout.count(": ok\n") == len(IMAGES), r.stdout + r.stderr[-6000:]
    for img in IMAGES:
        r = subprocess.run([tool("fsck.tux3"), "-n", str(img)], capture_output=True, text=True, timeout=300,
                           preexec_fn=address_space(LIMIT))
        assert r.returncode in (0, 4, 8) and "Traceback" not in r.stdout + r.stderr, f"{img}: {r.stdout}{r.stderr}"
