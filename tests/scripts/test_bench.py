"""scripts/bench.py's arithmetic: requests and CPU per operation, the better Python floor, every goal line at its
bounds, the tables' cells, and its section of PERFORMANCE.md (the other sections are kept)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import load_script

bench = load_script("bench")
benchkit = load_script("benchkit")

ALL_JOBS = [j.name for j in bench.JOBS]


def results(**values: dict[str, float]) -> dict:
    """{filesystem: {job: value}} as bench results (one op per job)."""
    return {name: bench.FsResult(measures={job: bench.Measure(v, 1) for job, v in jobs.items()})
            for name, jobs in values.items()}


def line_for(lines: list[str], start: str) -> str:
    found = [line for line in lines if start in line]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_requests_and_cpu_per_operation_are_the_differences_over_the_job_divided_by_its_operations() -> None:
    before = bench.Snapshot({"write": 10, "getattr": 4}, 42, 1.25)
    after = bench.Snapshot({"write": 210, "getattr": 6, "fsync": 100}, 42, 1.30)
    requests, cpu = bench.difference(before, after)
    assert requests == {"fsync": 100, "getattr": 2, "write": 200}
    m = bench.Measure(500.0, 100, requests, cpu)
    assert m.requests_per_op() == {"fsync": 1.0, "getattr": 0.02, "write": 2.0}
    assert abs(m.total_per_op() - 3.02) < 1e-9
    assert abs(m.cpu_us_per_op() - 500.0) < 1e-6  # 0.05 s over 100 operations
    # another daemon after (a remount in between): its CPU time says nothing about the job
    assert bench.difference(before, bench.Snapshot(after.requests, 43, 9.0))[1] is None
    assert bench.difference(bench.Snapshot(None, None, None), after) == (None, None)
    assert bench.Measure(1.0, 10).total_per_op() is None and bench.Measure(1.0, 10).cpu_us_per_op() is None


def test_the_better_floor_is_the_faster_one_whichever_way_the_unit_goes() -> None:
    r = results(passthrough={"seqwrite": 800.0, "fsync100": 0.5}, null={"seqwrite": 500.0, "fsync100": 0.2})
    assert bench.better_floor(r, bench.JOB["seqwrite"]) == ("passthrough", 800.0)
    assert bench.better_floor(r, bench.JOB["fsync100"]) == ("null", 0.2)  # seconds: lower is better
    assert bench.better_floor(r, bench.JOB["seqread"]) is None
    assert bench.speed(bench.JOB["fsync100"], 0.4, 0.2) == 0.5 and bench.speed(bench.JOB["create"], 3.0, 2.0) == 1.5


def test_goal_lines_pass_at_their_bounds_and_fail_just_beyond() -> None:
    def goals(t: dict[str, float]) -> list[str]:
        return bench.goal_lines(results(
            tux3fuse=t,
            passthrough={"seqwrite": 100.0, "seqread": 100.0, "randread": 1000.0, "randread-warm": 10_000.0,
                         "fsync100": 1.0},
            null={"seqwrite": 50.0, "randread-warm": 20_000.0, "fsync100": 2.0, "create": 100.0},
            fuse2fs={"fsync": 1000.0, "fsync100": 3.0},
            native={"seqread": 200.0, "randread": 10_000.0}))

    # at the bounds: 0.9 x the floor; fsync100 at 1/0.9 x the floor's time; seqread at 0.9 x native; randread
    # cold at 1.2 x (100 us native + 50 us nullfs warm) = 180 us per read
    at = {"seqwrite": 90.0, "seqread": 180.0, "randread": 1e6 / 180, "randread-warm": 18_000.0,
          "fsync100": 1.0 / 0.9, "create": 90.0, "fsync": 1001.0}
    lines = goals(at)
    assert line_for(lines, "seqwrite >= 0.9 x the better Python floor (passthrough)").startswith("PASS")
    assert line_for(lines, "randread-warm >= 0.9 x the better Python floor (nullfs)").startswith("PASS")
    assert line_for(lines, "fsync100 time <= 1/0.9 x the better Python floor's (passthrough)").startswith("PASS")
    assert line_for(lines, "seqread >= 0.9 x native ext4").startswith("PASS")
    assert line_for(lines, "randread (cold) time per read").startswith("PASS")
    assert line_for(lines, "fsync ahead of fuse2fs").startswith("PASS")
    assert line_for(lines, "fsync100 ahead of fuse2fs").startswith("PASS")
    # fsync has no floor measured: reported, as a miss
    assert line_for(lines, "tux3fuse fsync >= 0.9").startswith("FAIL") and "not measured" in \
        line_for(lines, "tux3fuse fsync >= 0.9")
    for job in ALL_JOBS:  # every job has its floor line
        assert any(line.split(": ", 1)[1].startswith(f"tux3fuse {job} ") for line in lines), job

    beyond = {"seqwrite": 89.0, "seqread": 179.0, "randread": 1e6 / 182, "randread-warm": 17_900.0,
              "fsync100": 1.12, "create": 89.0, "fsync": 1000.0}
    lines = goals(beyond)
    for start in ("seqwrite >= 0.9", "randread-warm >= 0.9", "fsync100 time <= 1/0.9", "seqread >= 0.9 x native",
                  "randread (cold) time per read", "fsync ahead of fuse2fs", "tux3fuse create >= 0.9"):
        assert line_for(lines, start).startswith("FAIL"), start
    assert line_for(lines, "fsync100 ahead of fuse2fs").startswith("PASS")  # 1.12 s < 3.0 s
    assert "182 us vs 1.2 x (100 + 50 (nullfs)) = 180 us" in line_for(lines, "randread (cold)")


def test_goal_lines_say_what_was_not_measured() -> None:
    lines = bench.goal_lines(results(tux3fuse={"seqread": 100.0}))
    assert all(line.startswith("FAIL") for line in lines)
    assert "native ext4 not measured" in line_for(lines, "seqread >= 0.9 x native")
    assert "fuse2fs not measured" in line_for(lines, "fsync100 ahead of fuse2fs")
    cold = line_for(lines, "randread (cold)")
    assert "tux3fuse randread and native ext4 randread and a floor's randread-warm not measured" in cold


def test_the_breakdown_lists_opcodes_most_frequent_first_and_sums_the_rare_ones() -> None:
    per = {"write": 1.0, "create": 1.0, "getattr": 1.0, "lookup": 1.0, "release": 1.0, "setattr": 1.0}
    assert bench.breakdown(per) == "create 1.00, getattr 1.00, lookup 1.00, release 1.00, setattr 1.00, write 1.00"
    assert bench.breakdown({"read": 4.0, "forget": 0.002, "open": 0.002, "flush": 0.02}) == \
        "read 4.00, flush 0.02, other 0.004"
    assert bench.breakdown({"write": 0.5, "forget": 0.0001}) == "write 0.50, other <0.001"


def test_fio_results_give_the_value_and_the_operations_of_the_right_side() -> None:
    def data(read: dict, write: dict) -> dict:
        return {"jobs": [{"error": 0, "read": read, "write": write}]}

    idle = {"total_ios": 0, "iops": 0.0, "bw_bytes": 0}
    assert bench.fio_result("seqwrite", data(idle, {"total_ios": 64, "iops": 300.0, "bw_bytes": 300e6})) == \
        (300.0, 64)
    assert bench.fio_result("randread-warm", data({"total_ios": 3000, "iops": 1000.0, "bw_bytes": 4e6}, idle)) == \
        (1000.0, 3000)
    assert bench.fio_result("fsync", data(idle, {"total_ios": 20, "iops": 10.0, "bw_bytes": 1})) == (10.0, 20)


def test_tables_mark_jobs_a_filesystem_does_not_run_and_jobs_that_failed() -> None:
    r = results(tux3fuse={"seqread": 300.0}, null={"randread-warm": 100.0})
    r["tux3fuse"].errors["create"] = "boom"
    r["tux3fuse"].measures["seqread"] = bench.Measure(300.0, 10, {"read": 40}, 0.01)
    rows = {row[0].split(" ")[0]: row for row in bench.value_rows(r, ["tux3fuse", "null"])}
    assert rows["seqread"][1:] == ["300", "-", "-"]  # nullfs runs no cold job
    assert rows["create"][1] == "error"
    assert rows["randread-warm"][2] == "100"
    req = {row[0].split(" ")[0]: row for row in bench.requests_rows(r, ["tux3fuse"])}
    assert req["seqread"][1] == "4.00"
    cpu = {row[0].split(" ")[0]: row for row in bench.cpu_rows(r, ["tux3fuse"])}
    assert cpu["seqread"][1] == "1,000"  # 0.01 s over 10 reads
    assert bench.breakdown_rows(r, ["tux3fuse", "null"]) == [["seqread", "tux3fuse", "4.00", "read 4.00"]]


def test_the_report_replaces_its_own_section_first_and_keeps_every_other_one(tmp_path: Path) -> None:
    md = tmp_path / "PERFORMANCE.md"
    md.write_text("# Performance\n\nGenerated by `scripts/bench.py` (`make bench`) on then.\n\n## Machine\n\nm\n\n"
                  "## Results\n\nr\n\n## Setup\n\ns\n\n## Jobs\n\nj\n\n## When stable pages hurt\n\nfork\n\n"
                  "## fsync, where the time goes\n\nwhere\n")
    bench.write_report(md, f"{bench.SECTION}\n\nfirst\n")
    assert md.read_text() == (f"# Performance\n\n{bench.SECTION}\n\nfirst\n\n## When stable pages hurt\n\nfork\n\n"
                              "## fsync, where the time goes\n\nwhere\n")
    bench.write_report(md, f"{bench.SECTION}\n\nsecond\n")
    assert md.read_text() == (f"# Performance\n\n{bench.SECTION}\n\nsecond\n\n## When stable pages hurt\n\nfork\n\n"
                              "## fsync, where the time goes\n\nwhere\n")


def test_cpu_seconds_of_a_process_follow_its_cpu_clock() -> None:
    pid = os.getpid()
    before, clock = benchkit.cpu_seconds(pid), time.process_time()
    while time.process_time() - clock < 0.2:  # burn 0.2 s of CPU
        pass
    assert benchkit.cpu_seconds(pid) - before >= 0.15  # clock ticks are 10 ms at most


def test_the_passthrough_example_comes_out_of_the_cached_sdist_or_says_why_not(tmp_path: Path) -> None:
    import io
    import tarfile
    from importlib.metadata import version

    benchfs = load_script("benchfs")
    ver = version("pyfuse3")

    def sdist(cache: Path, members: dict[str, bytes]) -> None:
        cache.mkdir()
        with tarfile.open(cache / f"pyfuse3-{ver}.tar.gz", "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    good = tmp_path / "good"
    sdist(good, {f"pyfuse3-{ver}/examples/passthroughfs.py": b"# the example\n"})
    path = benchfs.passthrough_example(good)
    assert path.read_bytes() == b"# the example\n" and path.parent == good
    assert benchfs.passthrough_example(good) == path  # kept: extracted once

    bad = tmp_path / "bad"
    sdist(bad, {f"pyfuse3-{ver}/README.rst": b"no example here\n"})
    try:
        benchfs.passthrough_example(bad)
    except benchfs.Unavailable as e:
        assert "examples/passthroughfs.py" in str(e)
    else:
        raise AssertionError("an sdist without the example must make the passthrough unavailable")

    r = {"passthrough": bench.FsResult(skipped="cannot fetch the sdist of pyfuse3")}
    assert bench.value_rows(r, ["passthrough"])[0][1] == "skipped"
    assert bench.notes(r) == ["passthrough: cannot fetch the sdist of pyfuse3"]
