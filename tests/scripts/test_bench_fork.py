"""Tests for scripts/bench_fork.py: the sweep over device latency (a tiny one, mounted), the floor run, and how
the report states medians, spreads, goals and torn blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script, require_fuse

from tux3fuse.mounts import is_mounted

bench = load_script("bench_fork")


def result(mode: str, latencies_us: list[float], waits: int = 0, *, workload: str = "hot64", latency: float = 0.0,
           torn: int | None = None, peak: float = 0.0, elapsed: float = 1.0):
    r = bench.Result("mounted", mode, latencies=[x / 1e6 for x in latencies_us], elapsed=elapsed,
                     workload=workload, latency=latency, torn=torn)
    if mode != bench.FLOOR:
        r.stats = {k: 0.0 for k in bench.COUNTERS} | {"waits": float(waits), "forked_pages_peak": peak,
                                                       "blocks_written": 250.0, "hole_fill_bytes": 0.0}
    return r


@pytest.mark.timeout(120)
def test_the_floor_run_mounts_nullfs_and_times_the_same_writer(tmp_path: Path) -> None:
    require_fuse()
    cfg = bench.Config(seconds=0.3, hot_pages=16, stream_mbps=4.0, commit_interval=0.01, seed=3, workdir=tmp_path)
    r = bench.run_floor(cfg)
    assert r.mode == bench.FLOOR and r.error is None
    assert r.writes > 10 and r.elapsed >= 0.3 and r.stream_bytes > 0
    assert not any(is_mounted(m) for m in tmp_path.glob("*.mnt"))  # unmounted, and the daemon reaped


@pytest.mark.timeout(300)
def test_a_tiny_sweep_reports_every_point_with_torn_blocks_on_the_slow_device(tmp_path: Path) -> None:
    require_fuse()
    out = tmp_path / "out"
    code = bench.main(["--only", "mounted", "--latencies", "0,1", "--workloads", "append", "--modes", "fork,none",
                       "--seconds", "0.3", "--repeat", "1", "--no-floor", "--outdir", str(out),
                       "--workdir", str(tmp_path)])
    assert code == 0
    text = (out / "PERFORMANCE.md").read_text()
    assert text.count(bench.SECTION) == 1
    rows = [line for line in text.splitlines() if line.startswith("| mounted | append |")]
    assert len(rows) == 2 * 2 * 2  # (local, 1 ms) x (fork, none), in the table and in the commit load table
    cells = {(r.split("|")[3].strip(), r.split("|")[4].strip()): r.split("|")[-2].strip() for r in rows[:4]}
    assert cells[("local", "fork")] == "-" and cells[("1 ms", "fork")] == "0"  # torn: counted on slow devices
    assert cells[("1 ms", "none")].isdigit()
    assert "PASS: mounted append 1 ms: fork: 0 torn data block(s)" in text
    assert any(line.startswith("- PASS: mounted append local: fork p99") or
               line.startswith("- FAIL: mounted append local: fork p99") for line in text.splitlines())
    assert (out / "bench_fork.png").stat().st_size > 0 and (out / "bench_fork_tails.png").stat().st_size > 0
    assert not list(tmp_path.glob("tux3fork-*"))  # the work directory is gone


def test_points_give_the_median_and_the_spread_of_alternating_runs() -> None:
    runs = [result("fork", [100.0] * 100, elapsed=e) for e in (1.0, 2.0, 4.0)]  # 100, 50 and 25 writes/s
    rows = bench.table_rows(runs)
    assert len(rows) == 1 and rows[0][4] == "3" and rows[0][5] == "50 (25–100)"
    assert rows[0][13] == f"{250 * 4096 / 1e6:,.1f}"  # MB to device: blocks_written x 4 KiB


def test_the_latency_goal_compares_fork_with_wait_on_slow_devices_only() -> None:
    fast = [result("fork", [50.0] * 1000, latency=0.005),
            result("wait", [50.0] * 950 + [20000.0] * 50, waits=50, latency=0.005),
            result("none", [50.0] * 1000, latency=0.005)]
    lines = bench.goal_lines(fast)
    assert any(line.startswith("PASS: mounted hot64 5 ms: fork p99 50.0 vs wait 20,000 µs") for line in lines)
    assert any(line.startswith("PASS: mounted hot64 5 ms: fork p99 50.0 vs none 50.0 µs") for line in lines)
    slow_fork = [result("fork", [50.0] * 980 + [5000.0] * 20, latency=0.005), *fast[1:]]
    lines = bench.goal_lines(slow_fork)
    assert any(line.startswith("FAIL: mounted hot64 5 ms: fork p99 5,000 vs wait") for line in lines)
    assert any(line.startswith("FAIL: mounted hot64 5 ms: fork p99 5,000 vs none 50.0 µs") for line in lines)
    local = [result(m, [50.0] * 1000, latency=0.0) for m in bench.MODES]
    lines = bench.goal_lines(local)
    assert not any("vs wait" in line for line in lines)  # no latency goal on the local image
    assert any(line.startswith("PASS: mounted hot64 local: the three modes tie") for line in lines)


def test_the_local_image_must_tie_and_a_mode_far_off_fails() -> None:
    runs = [result("fork", [50.0] * 1000), result("wait", [50.0] * 980 + [900.0] * 20), result("none", [50.0] * 1000)]
    lines = bench.goal_lines(runs)
    assert any(line.startswith("FAIL: mounted hot64 local: the three modes tie") for line in lines)


def test_torn_blocks_fail_fork_and_wait_but_are_expected_of_none() -> None:
    runs = [result("fork", [50.0] * 100, latency=0.001, torn=1), result("wait", [60.0] * 100, latency=0.001, torn=0),
            result("none", [50.0] * 100, latency=0.001, torn=7)]
    lines = bench.goal_lines(runs)
    assert ("FAIL: mounted hot64 1 ms: fork: 1 torn data block(s) in the image as a crash at the end of the run "
            "leaves it (goal: 0)") in lines
    assert any(line.startswith("PASS: mounted hot64 1 ms: wait: 0 torn") for line in lines)
    assert any(line.startswith("PASS: mounted hot64 1 ms: none: 7 torn") and "expected" in line for line in lines)


def test_forked_pages_beyond_the_hot_set_fail_the_memory_goal() -> None:
    ok = bench.goal_lines([result("fork", [50.0] * 100, peak=64.0)])
    assert any(line.startswith("PASS: mounted hot64 local: forked_pages_peak 64 <= 64") for line in ok)
    bad = bench.goal_lines([result("fork", [50.0] * 100, peak=65.0)])
    assert any(line.startswith("FAIL: mounted hot64 local: forked_pages_peak 65 <= 64") for line in bad)


def test_the_report_shows_the_floor_beside_the_local_image() -> None:
    fork = result("fork", [50.0] * 98 + [400.0, 400.0])
    floor = result(bench.FLOOR, [40.0] * 98 + [150.0, 150.0])
    rows = bench.table_rows([fork, floor])
    assert rows[1][3] == "pyfuse3-null" and rows[1][7] == "150" and set(rows[1][10:]) == {"-"}
    assert len(bench.load_rows([fork, floor])) == 1  # no commit load for a filesystem without commits
    lines = bench.goal_lines([fork, floor])
    assert any("does nothing" in line and "p99 150 µs" in line for line in lines)


def test_device_latencies_are_given_in_milliseconds() -> None:
    assert bench.parse_latencies("0,0.2,1,5,20") == [0.0, 0.0002, 0.001, 0.005, 0.02]
    for bad in ("", "fast", "-1"):
        with pytest.raises(bench.argparse.ArgumentTypeError):
            bench.parse_latencies(bad)
