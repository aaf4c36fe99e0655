"""The mount tools as a user meets them: the daemon's errors are findable (a log file, `tux3 stat`), `tux3 umount`
leaves other filesystems alone and says when the daemon died, an unknown `tux3` command is named, mount(8) helpers
exit 32 on failure, and every `--help` names what it documents. Each command runs as a user runs it: one line on
failure, no traceback."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NullMount, is_mounted, mkfs, one_line, require_fuse, tool

pytestmark = pytest.mark.timeout(120)

COMMANDS = "umount, stat, sync, mkfs, fsck, mount"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


class Detached:
    """tux3fuse started as a user starts it: it detaches once the mount is up. ``stop`` leaves nothing mounted and
    the daemon (found through its state file) gone."""

    def __init__(self, image: Path, mnt: Path, options: str = "", env: dict | None = None,
                 file_limit: int | None = None) -> None:
        self.image, self.mnt, self.options, self.env, self.file_limit = image, mnt, options, env or {}, file_limit
        self.pid: int | None = None

    def start(self, prog: str = "tux3fuse", image: str | None = None) -> subprocess.CompletedProcess:
        import json

        from tux3fuse.daemon import state_paths

        def limit() -> None:  # a host file-size limit (ulimit -f): the daemon's writes past it fail with EFBIG
            if self.file_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_limit, self.file_limit))

        self.mnt.mkdir(exist_ok=True)
        args = [tool(prog), *(["-o", self.options] if self.options else []), image or str(self.image), str(self.mnt)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, preexec_fn=limit,
                           env={**os.environ, **self.env})
        assert "Traceback" not in r.stderr + r.stdout, r.stderr
        if r.returncode == 0:
            assert is_mounted(str(self.mnt))
            with open(state_paths(os.path.realpath(self.mnt))[0]) as f:
                self.pid = json.load(f)["pid"]
        return r

    def stop(self) -> None:
        if is_mounted(str(self.mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, timeout=60)
        if self.pid is not None:
            deadline = time.monotonic() + 30
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def detached(tmp_path):
    require_fuse()
    started: list[Detached] = []

    def factory(**kwargs) -> Detached:
        image = tmp_path / "fs.img"
        mkfs(image, "32M")
        d = Detached(image, tmp_path / "mnt", **kwargs)
        started.append(d)
        return d

    yield factory
    for d in started:
        d.stop()


# ---------------------------------------------------------------------------------------------------------------
# 1. the daemon's log

def test_a_failed_commit_is_in_the_log_files_and_in_tux3_stat_with_its_time(detached, tmp_path):
    state_home = tmp_path / "state"
    extra = tmp_path / "extra.log"
    d = detached(options=f"log={extra}", env={"XDG_STATE_HOME": str(state_home)}, file_limit=4 << 20)
    assert d.start().returncode == 0
    default = state_home / "tux3fuse" / (str(d.mnt.resolve()).strip("/").replace("/", "-") + ".log")
    started = time.time()
    with open(d.mnt / "big", "wb") as f:  # 12 MiB: the commit writes past the 4 MiB the host allows
        f.write(os.urandom(12 << 20))
    r = run("tux3", "sync", str(d.mnt))
    assert r.returncode == 1 and "the volume has failed" in one_line(r) and "File too large" in one_line(r)
    r = run("tux3", "stat", str(d.mnt))
    ended = time.time()
    assert r.returncode == 1 and "the volume has failed" in one_line(r)
    places = re.search(r"^log: (.*)$", r.stdout, re.M)
    assert places, r.stdout
    syslog = os.path.exists("/dev/log")
    assert places[1] == ("syslog" if syslog else str(default)) + f", {extra}"
    errors = re.findall(r"^  (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ERROR: (.*)$", r.stdout.split("last errors:")[1], re.M)
    assert any("File too large" in message for _, message in errors), r.stdout
    for when, _ in errors:  # the time each error was logged
        assert int(started) - 1 <= time.mktime(time.strptime(when, "%Y-%m-%d %H:%M:%S")) <= ended + 1
    r = run("tux3", "stat", "--json", str(d.mnt))
    import json
    data = json.loads(r.stdout)
    assert data["read_only"] == 1 and data["log"][-1] == str(extra)
    assert any(e["level"] == "ERROR" and "File too large" in e["message"] and started - 1 <= e["time"] <= ended + 1
               for e in data["recent_errors"])
    for path in [extra] + ([] if syslog else [default]):
        text = path.read_text()
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ tux3fuse\[\d+\] ERROR: .*File too large", text, re.M), (
            path, text)
    r = run("tux3", "umount", str(d.mnt))
    assert r.returncode == 1 and "the daemon reported errors" in one_line(r) and str(extra) in one_line(r)
    assert not is_mounted(str(d.mnt))


def test_a_clean_mount_says_where_it_logs_and_that_there_are_no_errors(detached, tmp_path):
    d = detached(env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert d.start().returncode == 0
    r = run("tux3", "stat", str(d.mnt))
    assert r.returncode == 0 and r.stderr == ""
    assert "\nlast errors: none\n" in r.stdout
    expected = "syslog" if os.path.exists("/dev/log") else str(tmp_path / "state" / "tux3fuse")
    assert re.search(r"^log: (.*)$", r.stdout, re.M)[1].startswith(expected)
    assert run("tux3", "umount", str(d.mnt)).returncode == 0


def test_a_log_file_that_cannot_be_written_fails_the_mount_in_one_line(detached, tmp_path):
    (tmp_path / "afile").write_text("")
    d = detached(options=f"log={tmp_path / 'afile' / 'x.log'}")
    r = d.start()
    assert r.returncode == 1 and "Not a directory" in one_line(r) and "x.log" in one_line(r)
    assert not is_mounted(str(d.mnt))
    d.options = "log="
    r = d.start()
    assert r.returncode == 2 and "log= takes a file name" in one_line(r)


def test_help_names_the_log_place_and_every_mount_option(tmp_path):
    r = run("tux3fuse", "--help", env={"XDG_STATE_HOME": str(tmp_path), "COLUMNS": "10000"})  # no wrapping
    text = r.stdout
    assert r.returncode == 0
    assert f"(here: {tmp_path}/tux3fuse)" in text and "/dev/log" in text and "tux3 stat" in text
    for option in ("log=FILE", "writelog=FILE", "verify_log", "commit=SECONDS", "fsync_ahead=SIZE|off", "ro|rw,",
                   "cache=SIZE (at least 1M)"):
        assert option in text, option


# ---------------------------------------------------------------------------------------------------------------
# 2. tux3 umount leaves other filesystems alone, and says when the daemon died

def test_umount_refuses_a_fuse_filesystem_that_is_not_tux3fuse_and_leaves_it_mounted(tmp_path):
    require_fuse()
    m = NullMount(tmp_path / "mnt", tmp_path / "nullfs.log", [])
    try:
        (m.mnt / "kept").write_bytes(b"still here")
        for cmd in (["tux3", "umount"], ["umount.tux3"], ["tux3", "umount", "-z"]):
            r = run(*cmd, str(m.mnt))
            assert r.returncode == 2, r.stderr
            assert "not a tux3fuse filesystem (it is fuse.nullfs)" in one_line(r)
            assert is_mounted(str(m.mnt)) and (m.mnt / "kept").read_bytes() == b"still here"
        for sub in ("stat", "sync"):
            r = run("tux3", sub, str(m.mnt))
            assert r.returncode == 2 and "not a mounted tux3fuse filesystem" in one_line(r)
        assert m.umount() == 0
    finally:
        m.cleanup()


def test_umount_refuses_a_filesystem_that_is_not_fuse():
    r = run("tux3", "umount", "/proc")
    assert r.returncode == 2 and "not a tux3fuse filesystem (it is proc)" in one_line(r)
    assert is_mounted("/proc")


def test_after_the_daemon_was_killed_stat_and_umount_say_so_and_umount_takes_the_dead_mount_down(detached):
    d = detached()
    assert d.start().returncode == 0
    (d.mnt / "uncommitted").write_bytes(b"lost with the daemon")
    os.kill(d.pid, signal.SIGKILL)
    while _alive(d.pid):
        time.sleep(0.01)
    died = f"the daemon of {d.mnt.resolve()} (pid {d.pid}) died without unmounting"
    check = f"fsck.tux3 {d.image.resolve()}"
    r = run("tux3", "stat", str(d.mnt))
    assert r.returncode == 1 and died in one_line(r) and "tux3 umount" in one_line(r) and check in one_line(r)
    r = run("tux3", "umount", str(d.mnt))
    line = one_line(r)
    assert r.returncode == 1 and died in line and "unmounted it" in line and check in line, line
    assert "reported errors" not in line and "running" not in line
    assert not is_mounted(str(d.mnt))
    assert run("fsck.tux3", "-n", str(d.image)).returncode == 0  # a committed delta: nothing to repair


# ---------------------------------------------------------------------------------------------------------------
# 3. unknown tux3 commands

@pytest.mark.parametrize("args", [["frob", "MNT"], ["frob"], ["stats", "MNT", "--json"]])
def test_an_unknown_command_is_named_with_the_list_of_commands(args, tmp_path):
    os.chdir(tmp_path)
    (tmp_path / "MNT").mkdir()
    r = run("tux3", *args)
    assert r.returncode == 2
    assert one_line(r) == f"tux3: unknown command '{args[0]}'; the commands are {COMMANDS} (see tux3 --help)"


def test_tux3_image_mountpoint_still_mounts_as_mount_fuse3_runs_it(detached):
    d = detached()
    r = d.start(prog="tux3", image=str(d.image.resolve()))
    assert r.returncode == 0, r.stderr
    (d.mnt / "f").write_bytes(b"x")
    assert run("tux3", "umount", str(d.mnt)).returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# 4. mount(8) helpers and --help texts

def test_mount_helpers_exit_32_on_every_failure(tmp_path):
    require_fuse()
    image = tmp_path / "fs.img"
    mkfs(image, "32M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notimage = tmp_path / "notes.txt"
    notimage.write_text("not a volume\n" * 1000)
    cases = [
        (["mount.fuse.tux3", str(tmp_path / "missing.img"), str(mnt)], "no such image"),
        (["mount.fuse.tux3", str(notimage), str(mnt)], "not a tux3fuse volume"),
        (["mount.fuse.tux3", str(image), str(tmp_path / "nowhere")], "does not exist"),
        (["mount.fuse.tux3", "-o", "bogus", str(image), str(mnt)], "unknown mount option 'bogus'"),
        (["mount.fuse.tux3", "-o", "commit=soon", str(image), str(mnt)], "commit="),
        (["mount.fuse.tux3", str(image)], "required: mountpoint"),
        (["tux3", str(tmp_path / "missing.img"), str(mnt), "-o", "rw"], "no such image"),
        (["tux3", str(image), str(mnt), "-o", "bogus"], "unknown mount option 'bogus'"),
    ]
    for args, words in cases:
        r = run(*args)
        assert r.returncode == 32, (args, r.returncode, r.stderr)
        assert words in one_line(r), (args, r.stderr)
        assert not is_mounted(str(mnt))
    r = run("mount.fuse.tux3", "--help")
    assert r.returncode == 0 and "usage: mount.fuse.tux3" in r.stdout


@pytest.mark.parametrize("sub", ["umount", "mount", "stat", "sync", "mkfs", "fsck"])
def test_tux3_subcommand_help_names_the_subcommand_in_its_usage_line(sub):
    r = run("tux3", sub, "--help")
    assert r.returncode == 0
    assert r.stdout.startswith(f"usage: tux3 {sub} "), r.stdout.splitlines()[:1]


def test_tux3_help_lists_every_command():
    r = run("tux3", "--help")
    assert r.returncode == 0
    for sub in COMMANDS.split(", "):
        assert re.search(rf"^\s+{sub}\s", r.stdout, re.M), sub


def test_tux3_stat_counts_requests_by_operation_and_close_sends_no_flush(detached, tmp_path):
    import json
    d = detached(env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert d.start().returncode == 0
    before = json.loads(run("tux3", "stat", "--json", str(d.mnt)).stdout)
    for i in range(20):
        fd = os.open(d.mnt / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
        os.close(fd)
    after = json.loads(run("tux3", "stat", "--json", str(d.mnt)).stdout)
    done = {k[5:]: after[k] - before.get(k, 0) for k in after if k.startswith("fuse.")}
    assert done["create"] == 20 and done["fsync"] == 20 and done["release"] == 20
    assert done["write"] == 20  # each 4 KiB page reaches the daemon once, at its fsync
    # the first close's FLUSH is refused with ENOSYS and the kernel sends no more
    assert after.get("fuse.flush", 0) <= 1 and done.get("flush", 0) <= 1
    assert run("tux3", "umount", str(d.mnt)).returncode == 0


def test_the_label_and_uuid_mkfs_wrote_are_shown_by_tux3_stat_mounted_or_not_and_by_fsck(detached):
    import json
    import uuid
    d = detached()
    assert run("mkfs.tux3", "-q", "-f", "-L", "photos 2026", "-s", "32M", str(d.image)).returncode == 0
    assert d.start().returncode == 0
    mounted = json.loads(run("tux3", "stat", "--json", str(d.mnt)).stdout)
    assert mounted["label"] == "photos 2026" and str(uuid.UUID(mounted["uuid"])) == mounted["uuid"]
    def head(target) -> list[list[str]]:  # the first three lines of tux3 stat: device, label, uuid
        return [line.split(None, 1) for line in run("tux3", "stat", str(target)).stdout.splitlines()[:3]]

    identity = [["label", "photos 2026"], ["uuid", mounted["uuid"]]]
    assert head(d.mnt)[1:] == identity
    assert run("tux3", "umount", str(d.mnt)).returncode == 0
    r = run("tux3", "stat", "--json", str(d.image))
    assert r.returncode == 0, r.stderr
    image = json.loads(r.stdout)
    assert (image["label"], image["uuid"], image["state"]) == ("photos 2026", mounted["uuid"], "clean")
    assert head(d.image)[1:] == identity
    verbose = run("fsck.tux3", "-n", "-v", str(d.image)).stdout.splitlines()
    assert verbose[2:4] == ["label: photos 2026", f"uuid: {mounted['uuid']}"], verbose[:4]
    assert run("mkfs.tux3", "-q", "-f", "-s", "32M", str(d.image)).returncode == 0  # no label, a new UUID
    again = json.loads(run("tux3", "stat", "--json", str(d.image)).stdout)
    assert again["label"] == "" and again["uuid"] != mounted["uuid"]
    assert head(d.image)[1] == ["label", "<none>"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
