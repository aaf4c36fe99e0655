"""Tests for scripts/bench_fork.py: the floor run of the mounted path, and how the report states it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script, require_fuse

from tux3fuse.mounts import is_mounted

bench = load_script("bench_fork")


def result(mode: str, latencies_us: list[float], waits: int = 0):
    r = bench.Result("mounted", mode, latencies=[x / 1e6 for x in latencies_us], elapsed=1.0)
    if mode != bench.FLOOR:
        r.stats = {k: 0.0 for k in bench.COUNTERS} | {"waits": float(waits), "forked_pages_peak": 0.0}
    return r


@pytest.mark.timeout(120)
def test_the_floor_run_mounts_nullfs_and_times_the_same_writer(tmp_path: Path) -> None:
    require_fuse()
    cfg = bench.Config(seconds=0.3, hot_pages=16, stream_mbps=4.0, commit_interval=0.01, seed=3, workdir=tmp_path)
    r = bench.run_floor(cfg)
    assert r.mode == bench.FLOOR and r.error is None
    assert r.writes > 10 and r.elapsed >= 0.3 and r.stream_bytes > 0
    assert not any(is_mounted(m) for m in tmp_path.glob("*.mnt"))  # unmounted, and the daemon reaped


def test_the_report_shows_the_floor_beside_the_goal() -> None:
    fork = result("fork", [50.0] * 98 + [400.0, 400.0])
    wait = result("wait", [50.0] * 97 + [3000.0] * 3, waits=3)
    floor = result(bench.FLOOR, [40.0] * 98 + [150.0, 150.0])
    rows = bench.table_rows([fork, wait, floor])
    assert rows[2][1] == "pyfuse3-null" and rows[2][4] == "150" and set(rows[2][7:]) == {"-"}
    assert len(bench.load_rows([fork, wait, floor])) == 2  # no commit load for a filesystem without commits
    lines = bench.goal_lines([fork, wait, floor], hot_pages=16)
    assert any(line.startswith("FAIL: mounted: fork p99 400 µs vs wait p99 3,000 µs") for line in lines)
    floor_line = [line for line in lines if "does nothing" in line]
    assert len(floor_line) == 1 and "p99 150 µs, against the 300 µs the goal allows fork" in floor_line[0]


def test_the_report_compares_fork_with_no_stable_pages() -> None:
    fork = result("fork", [50.0] * 98 + [400.0, 400.0])
    wait = result("wait", [50.0] * 97 + [3000.0] * 3, waits=3)
    none = result("none", [50.0] * 98 + [380.0, 380.0])
    lines = bench.goal_lines([fork, wait, none], hot_pages=16)
    line = [line for line in lines if "fork against none" in line]
    assert len(line) == 1 and "p99 400 vs 380 µs, 100 vs 100 writes/s" in line[0]
    assert not any("fork against none" in line for line in bench.goal_lines([fork, wait], hot_pages=16))
