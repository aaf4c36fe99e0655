"""Values users write never fail a commit: through a real mount, any user's extreme timestamp is stored as the
nearest time the format holds (as the kernel clamps to a superblock's range), and nothing else in the delta is
lost. (xfstests generic/634 checks the same through the kernel.)"""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import tool

from tux3fuse.format import TIME_MAX_SEC, TIME_MIN_SEC

pytestmark = pytest.mark.timeout(180)
NS = 1_000_000_000
MAX_NS, MIN_NS = TIME_MAX_SEC * NS, TIME_MIN_SEC * NS


def touch(path: str, when: str) -> None:
    subprocess.run(["touch", "-d", when, path], check=True)


def test_a_time_outside_the_format_is_clamped_and_the_delta_commits_whole(make_mount) -> None:
    m = make_mount(size="64M")
    with open(m.path("before"), "w") as f:
        f.write("before")
    for name in ("future", "past", "huge", "tiny"):
        with open(m.path(name), "w") as f:
            f.write(name)
    os.mkdir(m.path("dir"))
    touch(m.path("future"), "2500-01-01 00:00:00 UTC")
    touch(m.path("past"), "1600-01-01 00:00:00 UTC")
    os.utime(m.path("huge"), ns=((1 << 40) * NS, (1 << 40) * NS + 5))  # 2^40 seconds: year 36812
    os.utime(m.path("tiny"), ns=(-(1 << 40) * NS, -(1 << 40) * NS))
    touch(m.path("dir"), "2500-01-01 00:00:00 UTC")
    # a directory's attributes are not the kernel's own under the writeback cache: it shows the daemon's answer
    assert os.stat(m.path("dir")).st_mtime_ns == MAX_NS
    r = subprocess.run([tool("tux3"), "sync", str(m.mnt)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert m.stat_json()["read_only"] == 0
    with open(m.path("after"), "w") as f:  # the volume still takes writes
        f.write("after")
    m.umount()
    m.start()
    with open(m.path("before")) as f:
        assert f.read() == "before"
    with open(m.path("after")) as f:
        assert f.read() == "after"
    times = {name: os.stat(m.path(name)) for name in ("future", "past", "huge", "tiny", "dir")}
    assert times["future"].st_mtime_ns == MAX_NS
    assert times["huge"].st_atime_ns == times["huge"].st_mtime_ns == MAX_NS
    assert times["past"].st_mtime_ns == MIN_NS
    assert times["tiny"].st_atime_ns == times["tiny"].st_mtime_ns == MIN_NS
    assert times["dir"].st_mtime_ns == MAX_NS
    m.umount()  # the fixture requires a clean fsck
