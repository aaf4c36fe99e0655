"""Tests for scripts/bench_device.py: a tiny run over the four configurations (mounted, with nbdkit started and
stopped by the script), and the rule that says which figures are within the noise."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script, require_fuse, require_nbd

bench = load_script("bench_device")


@pytest.mark.timeout(300)
def test_a_tiny_run_reports_every_configuration_and_writes_its_section(tmp_path: Path, capsys) -> None:
    require_fuse()
    require_nbd()
    out = tmp_path / "out"
    out.mkdir()
    (out / "PERFORMANCE.md").write_text("# Performance\n\n## Other\n\nkept\n")
    code = bench.main(["--repeat", "1", "--fsyncs", "5", "--seconds", "0.2", "--file-mib", "2",
                       "--outdir", str(out), "--workdir", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("workload"))
    for config in bench.CONFIGS:
        assert bench.LABELS[config] in header
    rate = next(line for line in printed.splitlines() if line.startswith("fsync") and "fsyncs/s" in line)
    assert len([c for c in rate.split("  ") if c.strip()]) == 2 + len(bench.CONFIGS) + 2  # no configuration empty
    assert "-  " not in rate
    text = (out / "PERFORMANCE.md").read_text()
    assert text.count(bench.SECTION) == 1 and "## Other\n\nkept" in text  # the other sections are kept
    rows = [line for line in text.split(bench.SECTION)[1].splitlines() if line.startswith("| ")]
    assert [cell.strip() for cell in rows[0].split("|")[1:-1]] == bench.TABLE_HEADER
    by_figure = {row.split("|")[2].strip(): [c.strip() for c in row.split("|")[1:-1]] for row in rows[1:]}
    assert set(by_figure) == {f.name for f in bench.FIGURES}
    for cells in by_figure.values():
        assert all(c != "-" for c in cells[2:2 + len(bench.CONFIGS)])  # measured on every configuration
    assert by_figure["blocks/fsync"][2] == by_figure["blocks/fsync"][3]  # the same writes on both slow devices
    section = text.split(bench.SECTION)[1]
    assert "- PASS: the device model" in section or "- FAIL: the device model" in section
    assert "which nbdkit's delay filter does not delay" in section
    assert (out / "bench_device.png").stat().st_size > 0
    assert not list(tmp_path.glob("tux3device-*"))  # the work directory is gone
    from benchkit import daemon_pids  # scripts/ is on sys.path once a script is loaded

    assert not daemon_pids(str(tmp_path) + "/")  # no nbdkit or daemon left running


def spread(median: float, low: float, high: float) -> object:
    return bench.Spread(median, low, high)


def test_within_the_noise_means_overlapping_spreads_or_medians_within_twenty_percent() -> None:
    assert bench.within_noise(spread(10, 8, 14), spread(13, 9, 15))  # each median inside the other's range
    assert bench.within_noise(spread(10, 10, 10), spread(11.9, 11.9, 11.9))  # 19 % apart
    assert not bench.within_noise(spread(10, 10, 10), spread(12.5, 12.5, 12.5))  # 25 % apart, no spread
    assert not bench.within_noise(spread(10, 9, 11), spread(15, 10.5, 16))  # one median outside the other's range


def test_the_flush_correction_takes_one_latency_per_flush_off_the_model() -> None:
    fig = bench.FIG["fsync p50 ms"]
    assert bench.corrected(spread(20, 19, 22), fig, 5.0) == spread(15, 14, 17)
    rate = bench.corrected(spread(50, 40, 100), bench.FIG["fsyncs/s"], 5.0)  # 20 ms -> 15 ms per fsync
    assert rate.median == pytest.approx(1e3 / 15)
    assert rate.low == pytest.approx(1e3 / 20) and rate.high == pytest.approx(1e3 / 5)  # 25 -> 20, 10 -> 5 ms
