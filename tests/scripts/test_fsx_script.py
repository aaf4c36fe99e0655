"""Tests for scripts/fsx.py, the seeded fsx-style file exerciser (local disk, no FUSE needed)."""

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fsx.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsx_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fsx = _load()


def _ops(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_run_passes_and_prints_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "f"
    rc = fsx.run(str(target), 3000, 1234)
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0] == "fsx: seed 1234"
    assert out[-1] == "fsx: 3000 ops passed, seed 1234"
    assert not (tmp_path / "f.fsxlog").exists()


def test_all_op_kinds_generated(tmp_path: Path) -> None:
    log = tmp_path / "log"
    assert fsx.run(str(tmp_path / "f"), 3000, 99, quiet=True, log=str(log)) == 0
    ops = _ops(log)
    assert ops[0] == {"op": "header", "version": 1, "seed": 99}
    kinds = {op["op"] for op in ops[1:]}
    assert kinds == {"read", "write", "truncate", "mapread", "mapwrite", "fsync", "fdatasync", "reopen", "check"}
    assert len(ops) == 3001


def test_same_seed_same_log(tmp_path: Path) -> None:
    logs = []
    for i in range(2):
        log = tmp_path / f"log{i}"
        assert fsx.run(str(tmp_path / f"f{i}"), 2000, 4242, quiet=True, log=str(log)) == 0
        logs.append(log.read_bytes())
    assert logs[0] == logs[1]
    assert (tmp_path / "f0").read_bytes() == (tmp_path / "f1").read_bytes()
    other = tmp_path / "other"
    assert fsx.run(str(tmp_path / "f2"), 2000, 4243, quiet=True, log=str(other)) == 0
    assert other.read_bytes() != logs[0]


def test_replay_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log"
    assert fsx.run(str(tmp_path / "a"), 2000, 777, quiet=True, log=str(log)) == 0
    capsys.readouterr()
    relog = tmp_path / "relog"
    # Different generator options must not matter: the log alone drives the replay.
    rc = fsx.run(str(tmp_path / "b"), 5, 1, quiet=True, maxlen=10, mapread=False, replay=str(log), log=str(relog))
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0] == "fsx: seed 777"
    assert out[-1] == "fsx: 2000 ops passed, seed 777"
    assert relog.read_bytes() == log.read_bytes()
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_alignment_and_no_mmap(tmp_path: Path) -> None:
    log = tmp_path / "log"
    rc = fsx.run(str(tmp_path / "f"), 1500, 5, quiet=True, log=str(log), readbdy=512, writebdy=4096, truncbdy=4096,
                 mapread=False, mapwrite=False, closeprob=0, fsyncprob=0, checkprob=0)
    assert rc == 0
    ops = _ops(log)[1:]
    assert {op["op"] for op in ops} == {"read", "write", "truncate"}
    for op in ops:
        if op["op"] == "read":
            assert op["off"] % 512 == 0 and op["len"] % 512 == 0
        elif op["op"] == "write":
            assert op["off"] % 4096 == 0 and op["len"] % 4096 == 0
        else:
            assert op["size"] % 4096 == 0


def _check_failure_dump(tmp_path: Path, err: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "Traceback" not in err
    assert "FAILURE at op #" in err and "seed 31337" in err
    assert "first bad byte at file offset 0x" in err
    assert "expected @0x" in err and "actual   @0x" in err
    assert "last 20 ops:" in err
    fsxlog = tmp_path / "f.fsxlog"
    good = tmp_path / "f.fsxgood"
    assert fsxlog.exists() and good.exists()
    ops = _ops(fsxlog)
    assert ops[0]["seed"] == 31337
    # The dump is replayable and, without the injected corruption, reproduces the expected contents.
    rc = fsx.run(str(tmp_path / "g"), 0, None, quiet=True, replay=str(fsxlog))
    assert rc == 0
    assert capsys.readouterr().out.splitlines()[0] == "fsx: seed 31337"
    assert (tmp_path / "g").read_bytes() == good.read_bytes()


def test_corrupt_read_hook_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = fsx.run(str(tmp_path / "f"), 3000, 31337, quiet=True, corrupt_read_at=1000)
    err = capsys.readouterr().err
    assert rc == 1
    _check_failure_dump(tmp_path, err, capsys)


def test_corrupt_pread_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_pread = os.pread
    state = {"calls": 0, "corrupted": False}

    def bad_pread(fd: int, n: int, off: int) -> bytes:
        data = real_pread(fd, n, off)
        state["calls"] += 1
        if state["calls"] >= 400 and data and not state["corrupted"]:
            state["corrupted"] = True
            data = bytes([data[0] ^ 0x01]) + data[1:]  # one flipped bit
        return data

    monkeypatch.setattr(fsx.os, "pread", bad_pread)
    rc = fsx.run(str(tmp_path / "f"), 3000, 31337, quiet=True, mapread=False)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1
    assert state["corrupted"]
    _check_failure_dump(tmp_path, err, capsys)


def test_short_read_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_pread = os.pread
    monkeypatch.setattr(fsx.os, "pread", lambda fd, n, off: real_pread(fd, n, off)[: n // 2])
    rc = fsx.run(str(tmp_path / "f"), 500, 3, quiet=True)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1
    assert "length mismatch" in err and "missing (short read)" in err
    assert "Traceback" not in err


def test_unexpected_oserror_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fsx.os, "fsync", eio)
    rc = fsx.run(str(tmp_path / "f"), 2000, 8, quiet=True, fsyncprob=5)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1
    assert "fsync: unexpected error" in err and "Input/output error" in err
    assert (tmp_path / "f.fsxlog").exists()
    assert "Traceback" not in err


def test_open_failure_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = fsx.run(str(tmp_path / "missing" / "f"), 10, 1, quiet=True)
    err = capsys.readouterr().err
    assert rc == 1
    assert "open: unexpected error" in err and "Traceback" not in err


def test_bad_replay_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log"
    log.write_text('{"op":"write","off":0,"len":-1,"dseed":1}\n')
    assert fsx.run(str(tmp_path / "f"), 10, 1, replay=str(log)) == 2
    assert "non-negative integer 'len'" in capsys.readouterr().err
    log.write_text("not json\n")
    assert fsx.run(str(tmp_path / "f"), 10, 1, replay=str(log)) == 2
    assert fsx.run(str(tmp_path / "f"), 10, 1, replay=str(tmp_path / "nonexistent")) == 2


def test_cli(tmp_path: Path) -> None:
    target = tmp_path / "f"
    proc = subprocess.run([sys.executable, str(SCRIPT), "-q", "-N", "300", "-S", "11", "-c", "0", "-R",
                           "--log", str(tmp_path / "log"), str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["fsx: seed 11", "fsx: 300 ops passed, seed 11"]
    ops = _ops(tmp_path / "log")[1:]
    assert all(op["op"] not in ("reopen", "mapread") for op in ops)

    proc = subprocess.run([sys.executable, str(SCRIPT), "-N", "many", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid integer" in proc.stderr and "Traceback" not in proc.stderr

    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage:" in proc.stderr

    proc = subprocess.run([sys.executable, str(SCRIPT), "-h"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--replay" in proc.stdout


def test_default_seed_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fsx.main(["-q", "-N", "50", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out.splitlines()
    seed = int(out[0].removeprefix("fsx: seed "))
    assert out[-1] == f"fsx: 50 ops passed, seed {seed}"
