"""scripts/stress.py: several processes creating, unlinking, renaming and fsyncing through a real mount, with and
without a SIGKILL of the daemon; and its verifier, which must notice a file whose fsync'd bytes changed and a
name that should be gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_script, require_fuse

pytestmark = [pytest.mark.mounted, pytest.mark.timeout(300)]

stress = load_script("stress")


def run_stress(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    require_fuse()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "stress.py"), "--size", "64M", "--workdir",
                        str(tmp_path), *args], capture_output=True, text=True, timeout=240)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr + r.stdout
    return r


def assert_pass(r: subprocess.CompletedProcess) -> str:
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0 and ": PASS (" in last, r.stdout + r.stderr
    return last


def test_four_processes_of_creates_unlinks_and_fsyncs_pass_with_exact_inode_count(tmp_path: Path) -> None:
    last = assert_pass(run_stress(tmp_path, "--procs", "4", "--ops", "400", "--mix", "cuf", "--seed", "7"))
    used, real = last.split("inodes ")[1].split(",")[0].split(" = ")
    assert used == real and int(real) > 5  # root, shared/ and the four worker directories at least
    assert "fsck clean" in last and not list(tmp_path.iterdir())  # the work directory is removed after a pass


def test_four_processes_of_the_full_mix_with_verify_log_pass(tmp_path: Path) -> None:
    last = assert_pass(run_stress(tmp_path, "--procs", "4", "--ops", "400", "--mix", "full", "--seed", "8",
                                  "--options", "verify_log,commit=0.02"))
    assert int(last.split(" exact file contents")[0].split()[-1]) > 0


def test_sigkill_in_the_middle_loses_nothing_that_was_fsynced(tmp_path: Path) -> None:
    last = assert_pass(run_stress(tmp_path, "--procs", "4", "--ops", "700", "--mix", "full", "--seed", "9",
                                  "--kill"))
    assert "killed at" in last and ", kill:" in last


def test_read_errors_of_the_device_leave_no_operation_half_done(tmp_path: Path) -> None:
    """nbdkit's error filter fails a tenth of the reads: the operations that get EIO changed nothing (the exact
    final state after the clean unmount), no read waits forever for one that failed, and fsck is clean."""
    from conftest import require_nbd

    require_nbd()
    last = assert_pass(run_stress(tmp_path, "--procs", "4", "--ops", "600", "--mix", "full", "--seed", "10",
                                  "--read-errors", "10%", "--options", "cache=1M"))
    injected = int(last.split(" read errors injected")[0].split("(")[-1])
    assert injected > 0, last  # (a commit that meets one turns the volume read-only: then verified as a crash)


def test_a_refused_mount_option_fails_with_one_line(tmp_path: Path) -> None:
    r = run_stress(tmp_path, "--procs", "1", "--ops", "10", "--options", "no_such_option")
    assert r.returncode == 1
    assert ": FAIL: the daemon exited with" in r.stdout.strip().splitlines()[-1]


def _exact_names(journal: Path) -> dict[str, str]:
    """Names whose journaled state after the run is one exact file content."""
    states: dict[str, list[str] | None] = {}
    for w in journal.glob("*.jsonl"):
        for line in w.read_text().splitlines():
            rec = json.loads(line)
            if "n" in rec:
                states[rec["n"]] = rec["a"]
    return {n: a[0] for n, a in states.items() if a and len(a) == 1 and ":" in a[0]}


def test_verifier_reports_a_fsynced_file_whose_bytes_changed_and_a_name_that_should_be_gone(
        make_mount, tmp_path: Path) -> None:
    m = make_mount(size="64M")
    journal = tmp_path / "journal"
    assert stress.run_workers(str(m.mnt), str(journal), 2, 300, 11, "full") == []
    m.umount()
    m.start()
    assert stress.verify(str(m.mnt), str(journal), clean=True).problems == []
    assert stress.verify(str(m.mnt), str(journal), clean=False).problems == []
    exact = _exact_names(journal)
    victim = next(n for n, s in sorted(exact.items()) if int(s.split(":")[1]) > 0)
    with open(m.path(victim), "r+b") as f:  # one byte changed behind the journal's back
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with open(m.path("w0", "stray"), "wb") as f:
        f.write(b"x")
    for clean in (True, False):
        problems = stress.verify(str(m.mnt), str(journal), clean=clean).problems
        assert any(p.startswith(f"{victim}: inode ") and "expected inode" in p for p in problems), problems
    problems = stress.verify(str(m.mnt), str(journal), clean=True).problems
    assert "w0/stray: present, but not in the worker's final state" in problems
    os.unlink(m.path("w0", "stray"))
    m.umount()
