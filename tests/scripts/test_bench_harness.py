"""scripts/benchkit.py, the skeleton of the benchmarks, and tux3fuse/mounts.py, the mount table reader: an
interrupted run leaves nothing mounted, running or on disk, and ends only its own daemons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script, require_fuse

from tux3fuse.mounts import image_mountpoint, is_mounted, mounted_type

benchkit = load_script("benchkit")
benchfs = load_script("benchfs")

pytestmark = pytest.mark.timeout(120)


def test_an_interrupt_unmounts_ends_own_daemons_only_and_removes_the_work_directory(tmp_path: Path) -> None:
    require_fuse()
    h = benchkit.Harness("bench_test", None, "test.png", "quick")
    h.parse(["--workdir", str(tmp_path), "--outdir", str(tmp_path / "out")])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path / "elsewhere")])
    try:
        with h.workdir("t-") as wd:
            fs = benchfs.NullFs(wd)
            fs.setup()
            assert mounted_type(fs.mnt).startswith("fuse")
            daemon = fs.proc
            raise KeyboardInterrupt  # as SIGINT, SIGTERM or SIGHUP would
        assert h.interrupted and not wd.exists() and not is_mounted(fs.mnt)
        assert daemon.wait(timeout=30) is not None  # the daemon serving the work directory is gone
        assert bystander.poll() is None  # a process naming a path outside it is left alone
        assert len(h.loads) == 2
    finally:
        bystander.kill()
        bystander.wait()


def test_mounted_type_finds_a_mount_through_a_symlink_and_a_space(tmp_path: Path) -> None:
    require_fuse()
    fs = benchfs.NullFs(tmp_path)
    fs.mnt = tmp_path / "with space"
    link = tmp_path / "link"
    link.symlink_to(fs.mnt)
    try:
        fs.setup()
        assert mounted_type(link).startswith("fuse") and is_mounted(str(fs.mnt))
        assert mounted_type(tmp_path) is None
        assert image_mountpoint(tmp_path / "missing.img") is None
    finally:
        assert benchfs.dispose(fs) is None
    assert not is_mounted(fs.mnt)


def test_a_report_section_is_replaced_and_every_other_line_kept(tmp_path: Path) -> None:
    md = tmp_path / "PERFORMANCE.md"
    md.write_text("# Performance\n\nintro\n\n## A\n\nold a\n\n## B\n\nkept b\n")
    benchkit.update_section(md, "## A", "## A\n\nnew a\n")
    benchkit.update_section(md, "## C", "## C\n\nnew c\n")
    assert md.read_text() == "# Performance\n\nintro\n\n## A\n\nnew a\n\n## B\n\nkept b\n\n## C\n\nnew c\n"


def test_tables_align_text_and_markdown_the_same_way() -> None:
    rows = [["seqwrite (MB/s)", "186", "0.76"], ["fsync", "1,297", "12.5"]]
    lines = benchkit.text_table(["job", "tux3fuse", "ratio"], rows)
    assert lines[0] == "job              tux3fuse  ratio" and lines[2] == "seqwrite (MB/s)       186   0.76"
    assert benchkit.md_table(["job", "v"], [["a", "1"]])[1] == "|---|---:|"


def test_a_new_first_section_goes_before_the_others_and_a_removed_one_leaves_the_rest(tmp_path: Path) -> None:
    md = tmp_path / "PERFORMANCE.md"
    md.write_text("# Performance\n\nintro\n\n## A\n\na\n\n## B\n\nb\n")
    benchkit.update_section(md, "## Z", "## Z\n\nz\n", first=True)
    assert md.read_text() == "# Performance\n\nintro\n\n## Z\n\nz\n\n## A\n\na\n\n## B\n\nb\n"
    benchkit.update_section(md, "## A", "## A\n\nnew a\n", first=True)  # present: replaced where it is
    assert benchkit.remove_section(md, "## Z") and not benchkit.remove_section(md, "## Y")
    assert md.read_text() == "# Performance\n\nintro\n\n## A\n\nnew a\n\n## B\n\nb\n"
    assert benchkit.remove_section(md, "## B")
    assert md.read_text() == "# Performance\n\nintro\n\n## A\n\nnew a\n"
    empty = tmp_path / "new.md"
    benchkit.update_section(empty, "## Z", "## Z\n\nz\n", first=True)  # no section yet: after the title
    assert empty.read_text() == "# Performance\n\n## Z\n\nz\n"


def test_a_left_aligned_last_column_pads_no_trailing_blanks() -> None:
    lines = benchkit.text_table(["job", "n", "by operation"], [["a", "1", "write 1.00"], ["bb", "10", "x"]],
                                last_left=True)
    assert lines[2] == "a     1  write 1.00" and lines[3] == "bb   10  x"
    assert benchkit.md_table(["a", "b", "c"], [["1", "2", "3"]], last_left=True)[1] == "|---|---:|---|"
