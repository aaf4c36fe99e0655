"""Tests for scripts/bench_unify.py: its measurements on tiny configurations, and the invariants they rely on."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script

bench = load_script("bench_unify")


def test_fsync_commit_writes_one_data_and_one_log_block_until_the_log_is_full(tmp_path: Path) -> None:
    """K = 1 does not unify an fsync's commit: the log grows by one block per fsync up to L, then one unify."""
    r = bench.run_fsync(tmp_path / "img", 1, 8, file_mib=4, min_fsyncs=20, min_unifies=2)
    assert r.unifies >= 2 and r.fsyncs >= 20 and r.steps[-1].unified
    log = 0
    for step in r.steps:
        if step.unified:
            assert log == 8  # only the log length forces the unify of an fsync's commit
            assert step.log_blocks == 0
        else:
            assert step.blocks == 2  # the data block and one log block; the tree nodes wait for the unify
            assert step.log_blocks == log + 1
        log = step.log_blocks
    assert r.log_max == 8
    assert r.flushes == r.fsyncs + r.unifies  # one flush per fsync; a unify takes two


def test_mixed_with_k1_unifies_every_commit_and_leaves_an_empty_log(tmp_path: Path) -> None:
    r = bench.run_mixed(tmp_path / "img", 1, 64, commits=4, ops=12)
    assert r.commits == 4 and r.unifies == 4 and all(r.unify_after)
    assert r.log_after == [0, 0, 0, 0] and r.log_max == 0
    assert r.peak_nodes > 0  # every unify writes the nodes its own delta changed
    assert r.flushes_per_commit == 2
    assert r.crash is not None and r.crash.log_blocks == 0  # the longest log a periodic crash leaves is empty


def test_mixed_unifies_every_k_commits_and_crashes_with_the_longest_log(tmp_path: Path) -> None:
    r = bench.run_mixed(tmp_path / "img", 4, 1000, commits=8, ops=12)
    assert r.unify_after == [False, False, False, True] * 2
    grows = r.log_after[:3]
    assert grows[0] > 0 and grows == sorted(grows) and len(set(grows)) == 3
    k1 = bench.run_mixed(tmp_path / "img1", 1, 1000, commits=8, ops=12, crash=False)
    assert r.peak_nodes > k1.peak_nodes  # four deltas of changed nodes wait for the unify, not one
    assert r.flushes == r.commits + r.unifies
    assert r.crash is not None and r.crash.log_blocks > 0  # three deltas since the last unify
    assert r.crash.records > 0 and r.crash.mount_unified  # the mount's commit is the fourth: it unifies


def test_crash_run_leaves_a_log_of_l_blocks_and_the_mount_replays_it(tmp_path: Path) -> None:
    c = bench.run_crash(tmp_path / "img", 4, file_mib=4, repeats=1)
    assert c.log_blocks == 4
    assert c.records >= 4 * bench.log_batch()  # dense: a map, an allocate and a free record per page
    assert c.replay > 0 and c.mount > 0 and c.mount_unified


def _fsync(l: int, blocks: float) -> object:
    return bench.FsyncResult(1, l, fsyncs=100, blocks=round(blocks * 100), flushes=100 + 100 // l)


def _mixed(k: int, l: int, blocks: float, flushes: float, nodes: int = 100) -> object:
    return bench.MixedResult(k, l, commits=100, pages=1000, blocks=round(blocks * 1000),
                             flushes=round(flushes * 100), peak_nodes=nodes,
                             crash=bench.CrashResult(log_blocks=1, replay=0.01))


def test_decision_takes_the_cheapest_l_within_the_replay_bound_and_the_smallest_k_near_the_best() -> None:
    fsync = {16: _fsync(16, 3.1), 64: _fsync(64, 2.7), 256: _fsync(256, 2.2)}
    crash = {16: bench.CrashResult(16, replay=0.03), 64: bench.CrashResult(64, replay=0.09),
             256: bench.CrashResult(256, replay=0.4)}
    mixed = {(1, 64): _mixed(1, 64, 1.6, 2.0), (8, 64): _mixed(8, 64, 1.36, 1.125),
             (16, 64): _mixed(16, 64, 1.34, 1.0625), (64, 64): _mixed(64, 64, 1.33, 1.05, nodes=5000),
             (4, 16): _mixed(4, 16, 1.42, 1.3), (8, 16): _mixed(8, 16, 1.40, 1.2), (16, 16): _mixed(16, 16, 1.40, 1.2)}
    d = bench.recommend(fsync, mixed, crash, budget_ms=100, memory_nodes=4096, tolerance=0.05)
    assert (d.k, d.l) == (16, 64)  # 256 replays too long; K = 64 holds too many nodes; K = 8 flushes 7 % more
    assert any("memory bound: K = 64" in line for line in d.lines)
    assert any("close call" in line and "K = 8, L = 16" in line for line in d.lines)  # 90 of 100 ms
    d = bench.recommend(fsync, mixed, crash, budget_ms=200, memory_nodes=4096, tolerance=0.05)
    assert not any("close call" in line for line in d.lines)
    d = bench.recommend(fsync, mixed, crash, budget_ms=20, memory_nodes=4096, tolerance=0.05)
    assert (d.k, d.l) == (None, None)
