"""scripts/bench_reads.py: the table of how blocks were read, and the worker-thread round trip it measures."""

from __future__ import annotations

import pytest
from conftest import load_script

reads = load_script("bench_reads")

pytestmark = pytest.mark.timeout(120)


def test_rows_give_the_median_rate_its_spread_and_the_shares_of_how_blocks_were_read():
    cell = reads.Cell(rates=[100.0, 300.0, 200.0], cpu_us=[5.0, 7.0, 6.0],
                      how={"read_inline_blocks": 30.0, "read_host_cached": 0.0, "readahead_blocks": 50.0,
                           "threads": 20.0})
    [row] = reads.rows({("nbd", "seqread"): cell}, ["image", "nbd"])
    assert row == ["seqread", "nbd", "200 (100-300) MB/s", "6", "inline 30%, readahead 50%, threads 20%"]


def test_the_worker_thread_round_trip_is_measured_against_the_pread_alone():
    pread_us, pread_cpu, hop_us, hop_cpu = reads.hop_cost(200)
    assert 0 < pread_us < hop_us and 0 <= pread_cpu and 0 < hop_cpu
