"""scripts/bench_fsync_path.py: the arithmetic of the fsync breakdown, and its embedded measurement for real."""

from __future__ import annotations

import pytest
from conftest import load_script

path = load_script("bench_fsync_path")

pytestmark = pytest.mark.timeout(120)


def test_breakdown_rows_split_the_client_latency_into_stages():
    per = {"commit_prepare_seconds": 100e-6, "commit_data_seconds": 20e-6, "commit_super_seconds": 5e-6,
           "commit_flush_seconds": 200e-6, "commit_write_seconds": 260e-6, "commit_complete_seconds": 30e-6,
           "commit_seconds": 400e-6, "commits": 0.5, "flushes": 0.5, "hole_fill_bytes": 2048.0}
    r = path.Result(fsyncs=1000, latency_us=650.0, write_us=9.0, counters=dict(per), cpu_us=300.0,
                    requests={"write": 1.0, "fsync": 1.0})
    floor = path.Result(latency_us=60.0)
    rows = {row[0].strip(): row[1] for row in path.rows({"fio": r}, 180.0, {"fio": floor})}
    assert rows["thread hop"] == "35"  # 260 - (20 + 5 + 200)
    assert rows["outside the commit"] == "250"  # 650 - 400
    assert rows["fsyncs per commit"] == "2.0"
    assert rows["hole fill per commit (KiB)"] == "4.0"
    assert rows["requests per fsync"] == "fsync 1.00, write 1.00"
    assert rows["pyfuse3-null fsync latency"] == "60" and rows["flush alone (4 KiB pwrite + fdatasync)"] == "180"


def test_embedded_steps_are_each_measured(tmp_path):
    steps = path.embedded(tmp_path, 30)
    assert list(steps) == ["write", "setattr", "transition", "prepare", "write + flush", "complete"]
    assert all(us > 0 for us in steps.values())
    assert not (tmp_path / "embedded.img").exists()
