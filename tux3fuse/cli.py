"""Command-line tools: thin shells over the library. Wrong usage: one line and exit 2; never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable

from .backing import is_uri
from .fs import Options, VolumeError
from .mounts import TUX3_TYPE, image_mountpoint, mounted_type, mounts
from .options import MIN_CACHE_BYTES, MIN_DIRTY_LIMIT, MIN_KERNEL_DIRTY, MIN_READAHEAD
from .units import human, parse_duration, parse_size

PROG_MOUNT = "tux3fuse"


class UsageError(Exception):
    """Wrong usage: reported as one line, exit status 2."""


MOUNT_FAILED = 32  # mount(8)'s exit status for a failed mount, which its helpers return for every failure


def _message(e: Exception) -> str:
    """The one line that reports a failure to a user (an unexpected exception is named as an internal error)."""
    if isinstance(e, (UsageError, VolumeError)):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return f"internal error: {type(e).__name__}: {e}"


def _run(main: Callable[[list[str]], int], argv: list[str] | None, default_fail: int = 1) -> None:
    """Run a command and exit with its status: wrong usage is one line and 2, any other failure one line and
    ``default_fail``; never a traceback."""
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # output cut short by a pager or `head`: not an error worth a message
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter quiet at exit
        code = 0
    except Exception as e:  # a bug too is said in one line, never a traceback
        print(f"{os.path.basename(sys.argv[0])}: {_message(e)}", file=sys.stderr)
        code = 2 if isinstance(e, UsageError) else default_fail
    sys.exit(code)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def mkfs_run(argv: list[str], prog: str) -> int:
    """``tux3 mkfs``: the mkfs.tux3 command of the top-level ``mkfs`` package (imported here only, so that
    mounting never loads it); it reports its own failures in one line and returns its exit status."""
    from mkfs.command import run

    return run(argv, prog)


# ---------------------------------------------------------------------------------------------------------------
# tux3fuse IMAGE MOUNTPOINT

PASSED = {"allow_other", "allow_root", "nodev", "nosuid", "noexec", "noatime", "sync", "dirsync", "auto_unmount"}
UNDONE = {"dev": "nodev", "suid": "nosuid", "exec": "noexec", "atime": "noatime", "relatime": "noatime",
          "strictatime": "noatime", "async": "sync"}  # an option and the passed one it takes back, as mount(8)
IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "nofail", "_netdev", "nodiratime",
           "default_permissions", "lazytime", "nolazytime"}
# flags that set a setting of their own: the last one given wins, as in mount(8) (ro,rw mounts read-write)
SETTINGS = {"ro": ("ro", True), "rw": ("ro", False), "writeback": ("writeback", True),
            "nowriteback": ("writeback", False), "xattr": ("xattr", True), "noxattr": ("xattr", False),
            "verify_log": ("verify_log", True)}


MAX_COMMIT = 86400.0  # seconds: commit= beyond a day is a mistake, not a setting
FLAGS = set(SETTINGS) | set(PASSED) | set(UNDONE)  # options that take no value
# size options: the least a mount takes, other than 0 where 0 has a meaning of its own (what it means)
SIZE_OPTIONS = {"cache": (MIN_CACHE_BYTES, None), "dirty_limit": (MIN_DIRTY_LIMIT, "no limit"),
                "fsync_ahead": (0, None), "readahead": (MIN_READAHEAD, "none"),
                "kernel_dirty": (MIN_KERNEL_DIRTY, "off")}


def _memory_bytes() -> int:
    """The host's memory: the most the page cache or the dirty data can ever hold."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def _parse_seconds(key: str, value: str, high: float) -> float:
    """A number of seconds from 0 to ``high``: digits and one point only (no sign, nan, inf or exponent)."""
    import re

    if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", value) and float(value) <= high:
        return float(value)
    raise UsageError(f"{key}= takes seconds from 0 (no periodic commit) to {high:g}, not {value!r}")


MAX_DEVICE_LATENCY = 10.0  # seconds: a modelled device slower than this is a mistake


def _parse_latency(value: str, key: str = "device_latency") -> float:
    """device_latency=, read_inline_max=: a duration such as 5ms, 0.2ms, 20us or 0.01 (seconds), up to
    ``MAX_DEVICE_LATENCY``."""
    try:
        latency = parse_duration(value)
    except ValueError:
        latency = -1.0
    if not 0 <= latency <= MAX_DEVICE_LATENCY:
        raise UsageError(f"{key}= takes a duration such as 5ms or 0.2ms, up to {MAX_DEVICE_LATENCY:g}s, "
                         f"not {value!r}")
    return latency


def _parse_option_size(key: str, value: str) -> int:
    """A size (512K, 64M, 1G) from the option's least (``SIZE_OPTIONS``; 0 too where it has a meaning of its own)
    to the host's memory."""
    high = _memory_bytes()
    low, zero = SIZE_OPTIONS[key]
    try:
        size = parse_size(value)
    except ValueError:
        size = None
    if size is None or size > high or size < low and not (size == 0 and zero):
        extra = " or off" if key in ("fsync_ahead", "kernel_dirty") else ""
        least = f"0 ({zero}) or {human(low)}" if zero else human(low) if low else "0"
        raise UsageError(f"{key}= takes a size such as 64M{extra}, from {least} to {human(high)} (this machine's "
                         f"memory), not {value!r}")
    return size


def parse_mount_options(text: str) -> dict:
    """-o string -> settings; raises UsageError on anything unknown and on any value out of its range. Of two
    options that contradict each other the later wins, as in mount(8): ``ro,rw`` is read-write, ``rw,ro``
    read-only."""
    out = {"ro": False, "writeback": True, "xattr": False, "commit": 5.0, "cache": None, "stable": "fork",
           "writelog": None, "dirty_limit": None, "fsync_ahead": None, "readahead": None, "kernel_dirty": None,
           "verify_log": False, "log": None, "read_inline_max": None, "device_latency": 0.0, "device_bandwidth": 0,
           "fuse": set()}
    for opt in filter(None, (text or "").split(",")):
        key, eq, value = opt.partition("=")
        if key in FLAGS and eq:
            raise UsageError(f"{key} takes no value, not {opt!r}")
        if key in SETTINGS:
            setting, on = SETTINGS[key]
            out[setting] = on
        elif key in UNDONE:
            out["fuse"].discard(UNDONE[key])
        elif key == "commit":
            out["commit"] = _parse_seconds(key, value, MAX_COMMIT)
        elif key == "writelog":
            if not value:
                raise UsageError("writelog= takes a file name")
            out["writelog"] = os.path.abspath(value)
        elif key == "log":
            if not value:
                raise UsageError("log= takes a file name")
            out["log"] = os.path.abspath(value)
        elif key == "stable":
            if value not in ("fork", "wait", "none"):
                raise UsageError(f"stable= takes fork, wait or none, not {value!r}")
            out["stable"] = value
        elif key in ("device_latency", "read_inline_max"):
            out[key] = _parse_latency(value, key)
        elif key == "device_bandwidth":
            try:
                out[key] = parse_size(value)
            except ValueError:
                out[key] = -1
            if out[key] <= 0:
                raise UsageError(f"device_bandwidth= takes bytes per second such as 50M, not {value!r}")
        elif key == "fsync_ahead" and value == "off":
            out[key] = -1
        elif key == "kernel_dirty" and value == "off":
            out[key] = 0
        elif key in SIZE_OPTIONS:
            out[key] = _parse_option_size(key, value)
        elif key in PASSED:
            out["fuse"].add(opt)
        elif key in IGNORED or key.startswith("x-") or key in ("fsname", "subtype", "debug"):
            continue
        else:
            raise UsageError(f"unknown mount option {opt!r}")
    return out


def mount_cmd(argv: list[str], prog: str = PROG_MOUNT) -> int:
    from .daemon import default_log_file

    p = _Parser(prog=prog, description="Mount a tux3fuse image. Returns once the mount is up; the daemon then "
                "serves it in the background until `tux3 umount`.",
                epilog="Log: in the foreground on stderr. A detached daemon logs to syslog when /dev/log exists, "
                "otherwise to the file NAME.log, NAME being the mountpoint with its slashes turned into dashes "
                "(/mnt/data: mnt-data.log), in $XDG_STATE_HOME/tux3fuse when that is set, else in /var/log/tux3fuse "
                "for root and in ~/.local/state/tux3fuse for other users (here: "
                f"{os.path.dirname(default_log_file('/'))}). -o log=FILE logs to FILE as well. `tux3 stat "
                "MOUNTPOINT` names the log and shows the last errors with their times.")
    p.add_argument("-o", dest="options", action="append", default=[], help="mount options, comma separated (of two "
                   "that contradict each other the later wins, as in mount(8)): ro|rw, "
                   "allow_other, writeback|nowriteback, xattr, commit=SECONDS (0 to 86400; 0: only fsync, sync and "
                   "unmount commit), cache=SIZE (at least 1M), dirty_limit=SIZE (0: no limit, else at least 1M), "
                   "kernel_dirty=SIZE|off (the least the kernel's dirty limit for the mount is lowered to as the "
                   "volume fills; off or 0: the kernel's own; else at least 64K), "
                   "stable=fork|wait|none, fsync_ahead=SIZE|off, readahead=SIZE (the most read ahead of a sequential "
                   "reader whose reads wait for the device; default 2M on NBD, none on a file or block device; 0: "
                   "none, else at least 64K), read_inline_max=DURATION (reads of a device "
                   "quicker than this run on the event loop, slower ones in worker threads; 0: always threads), "
                   "auto_unmount, log=FILE (log to FILE as well), "
                   "writelog=FILE (record every write and flush to FILE, for crash tests), verify_log (after every "
                   "commit read the volume back as a mount would and compare it with memory: for testing), "
                   "device_latency=DURATION, device_bandwidth=SIZE (every write and flush of the image completes as "
                   "on a device of that latency per request and bytes per second: for experiments)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--debug", action="store_true", help="log every request (implies --foreground)")
    p.add_argument("image", help="the image file, block device or NBD URI (nbd://HOST[:PORT]/EXPORT, "
                   "nbd+unix:///EXPORT?socket=PATH)")
    p.add_argument("mountpoint")
    a = p.parse_args(argv)
    opts = parse_mount_options(",".join(a.options))
    mnt = os.path.realpath(a.mountpoint)
    if not os.path.exists(mnt):
        raise UsageError(f"mountpoint {mnt} does not exist")
    if not os.path.isdir(mnt):
        raise UsageError(f"mountpoint {mnt} is not a directory")
    if os.path.ismount(mnt):
        raise UsageError(f"{mnt} is already a mountpoint")
    if is_uri(a.image):  # an NBD export: Volume says what the server or libnbd said when it cannot be reached
        image = a.image
    else:
        image = os.path.abspath(a.image)
        if not os.path.exists(image):
            raise VolumeError(f"{a.image}: no such image")

    import pyfuse3

    from .daemon import Daemon, DaemonLog, detach
    from .fs import Volume
    from .fuse_ops import Operations

    foreground = a.foreground or a.debug
    logs = DaemonLog(mnt, a.debug, foreground, opts["log"])  # opens the log files: an error here mounts nothing
    options = Options(readonly=opts["ro"], stable=opts["stable"], writelog=opts["writelog"],
                      commit_interval=opts["commit"])
    if opts["cache"] is not None:
        options.cache_bytes = opts["cache"]
    if opts["dirty_limit"] is not None:
        options.dirty_limit = opts["dirty_limit"]  # 0: no limit
    if opts["fsync_ahead"] is not None:
        options.fsync_ahead_bytes = opts["fsync_ahead"]
    if opts["readahead"] is not None:
        options.readahead = opts["readahead"]
    if opts["kernel_dirty"] is not None:
        options.kernel_dirty = opts["kernel_dirty"]  # 0: the kernel's own dirty limit stands
    if opts["read_inline_max"] is not None:
        options.read_inline_max = opts["read_inline_max"]
    if opts["verify_log"]:
        options.verify_log = True
    options.device_latency, options.device_bandwidth = opts["device_latency"], opts["device_bandwidth"]
    vol = Volume(image, options)
    try:
        vol.mount()
        ops = Operations(vol, writeback=opts["writeback"], xattr=opts["xattr"])
        fuse_opts = set(pyfuse3.default_options) | opts["fuse"] | {f"fsname={image}", "subtype=tux3"}
        if opts["ro"]:
            fuse_opts.add("ro")
        if a.debug:
            fuse_opts.add("debug")
        try:
            pyfuse3.init(ops, mnt, fuse_opts)
        except RuntimeError as e:
            raise VolumeError(f"cannot mount on {mnt}: {e}") from None
    except BaseException:
        vol.unmount()
        raise
    if not foreground:
        detach()
        logs.detached()
    return Daemon(vol, ops, mnt, image, logs).run()


def mount_helper_cmd(argv: list[str], prog: str = "mount.fuse.tux3") -> int:
    """mount(8) helper: mount.fuse.tux3 IMAGE MOUNTPOINT [-o OPTIONS] [-n] [-v]. Every failure, wrong usage
    included, is one line and exit status 32 (MOUNT_FAILED), as mount(8) expects of its helpers."""
    args = [x for x in argv if x not in ("-n", "-v", "-s", "-f")]
    try:
        return mount_cmd(args, prog=prog)
    except SystemExit as e:  # from the argument parser: --help (0), or wrong usage already said in one line
        if not e.code:
            raise
        return MOUNT_FAILED
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as e:
        print(f"{prog}: {_message(e)}", file=sys.stderr)
        return MOUNT_FAILED


# ---------------------------------------------------------------------------------------------------------------
# tux3 umount / stat / sync

def _check_hint(state: dict) -> str:
    """What to run once a daemon died: fsck of its image."""
    image = state.get("image")
    return f"check the volume with fsck.tux3 {shlex.quote(image)}" if image else "check the volume with fsck.tux3"


def _died(mnt: str, state: dict) -> str:
    return f"the daemon of {mnt} (pid {state.get('pid')}) died without unmounting"


def umount_cmd(argv: list[str], prog: str = "umount.tux3") -> int:
    from .daemon import daemon_alive, read_state

    p = _Parser(prog=prog, description="Unmount a tux3fuse mount and wait until its daemon has committed "
                "everything and exited. Exit status 1 if the daemon met errors while mounted or had died (killed: "
                "the mount it left is dead; it is unmounted, and the message says to run fsck.tux3), 2 on wrong "
                "usage: a mountpoint where nothing or another filesystem is mounted is left untouched.")
    p.add_argument("-z", "--lazy", action="store_true", help="lazy unmount (the mountpoint may be busy)")
    p.add_argument("mountpoint")
    a = p.parse_args(argv)
    mnt = os.path.realpath(a.mountpoint)
    fstype = mounted_type(mnt)
    state = read_state(mnt)  # {}: no record of the daemon: unmount anyway, but there is nothing to wait for
    died = state.get("status") == "running" and not daemon_alive(state)  # killed: it recorded no end
    if fstype is None:
        if died:  # and the kernel unmounted it (auto_unmount), or someone else did
            print(f"{prog}: {a.mountpoint} is not mounted; {_died(mnt, state)}, so what it had not committed is "
                  f"lost; {_check_hint(state)}", file=sys.stderr)
            return 1
        raise UsageError(f"{a.mountpoint} is not mounted")
    if fstype != TUX3_TYPE and not (fstype == "" and state):
        raise UsageError(f"{a.mountpoint} is not a tux3fuse filesystem (it is {fstype or 'of unknown type'}); "
                         "left mounted")
    cmd = ["fusermount3", "-u"] + (["-z"] if a.lazy else []) + [mnt]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "fusermount3 failed"
        if died:
            msg = (f"{_died(mnt, state)} and left the mount dead, which cannot be unmounted now ({msg}); once "
                   f"nothing uses it, run fusermount3 -u {shlex.quote(mnt)}, then {_check_hint(state)}")
        print(f"{prog}: {msg}", file=sys.stderr)
        return 1
    if died:
        print(f"{prog}: {_died(mnt, state)}, leaving the mount dead: unmounted it; what the daemon had not "
              f"committed is lost; {_check_hint(state)}", file=sys.stderr)
        return 1
    pid = state.get("pid")
    if not pid:
        print(f"{prog}: unmounted, but no daemon state was found; cannot wait for the last commit", file=sys.stderr)
        return 1
    warned = False
    started = time.monotonic()
    while daemon_alive(state):
        time.sleep(0.02)
        if not warned and time.monotonic() - started > 10:
            print(f"{prog}: waiting for the daemon ({pid}) to finish its last commit...", file=sys.stderr)
            warned = True
    state = read_state(mnt) or {"status": "unknown"}
    if state.get("status") != "done":
        places = [p for p in state.get("log") or [] if p != "stderr"]
        logs = f" (log: {', '.join(places)})" if places else ""
        image = state.get("image") or ""
        if state.get("status") == "running":  # it died after the unmount, before it recorded its end
            print(f"{prog}: the daemon of {mnt} (pid {pid}) died before its last commit was written: what it had "
                  f"not committed is lost; {_check_hint(state)}{logs}", file=sys.stderr)
            return 1
        if is_uri(image) and state.get("error"):  # the export failed: what was durable before is on it
            print(f"{prog}: the volume on {image} turned read-only after an error and its last changes were not "
                  f"written: {state['error']}; everything made durable before that is kept{logs}", file=sys.stderr)
            return 1
        print(f"{prog}: the daemon reported errors: {state.get('error') or state.get('status')}{logs}",
              file=sys.stderr)
        return 1
    return 0


def _control(mnt: str, request: str) -> dict:
    from .daemon import daemon_alive, read_state, state_paths

    if mounted_type(mnt) not in (TUX3_TYPE, ""):
        raise UsageError(f"{mnt} is not a mounted tux3fuse filesystem")
    real = os.path.realpath(mnt)
    _, sock = state_paths(real)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(sock)
        except OSError:
            state = read_state(real)
            if state.get("status") == "running" and not daemon_alive(state):
                raise VolumeError(f"{_died(real, state)} and left the mount dead: tux3 umount {shlex.quote(mnt)} "
                                  f"unmounts it; then {_check_hint(state)}") from None
            raise VolumeError(f"no tux3fuse daemon answers for {mnt}") from None
        s.sendall(request.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise VolumeError(f"the tux3fuse daemon for {mnt} gave no answer to {request!r}")
    return reply


IDENTITY = ("device", "label", "uuid")  # what names a volume: first in tux3 stat, as dumpe2fs -h shows them


def _table(values: dict) -> str:
    """``tux3 stat``'s lines: the volume's identity first, then every other key in order; floats to the
    microsecond, an empty label as <none>."""
    keys = [k for k in IDENTITY if k in values] + sorted(k for k in values if k not in IDENTITY)
    width = max(map(len, keys), default=0)
    lines = []
    for key in keys:
        value = values[key]
        text = f"{value:.6f}" if isinstance(value, float) else "<none>" if key == "label" and not value else value
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


def _is_volume(target: str) -> bool:
    """Does ``target`` name a volume to read (an image file, block device or NBD URI) rather than a mountpoint?"""
    if is_uri(target):
        return True
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def tux3_cmd(argv: list[str]) -> int:
    """tux3 COMMAND ...; an unknown command is wrong usage (exit 2). ``tux3 IMAGE MOUNTPOINT [-o OPTIONS]``, as
    mount.fuse3 runs it for the type fuse.tux3, mounts as mount.fuse.tux3 does (failure: exit 32); the first
    argument is taken for an image only when it names an existing file or holds a slash."""
    commands = ("umount", "stat", "sync", "mkfs", "fsck", "mount")
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        if len(argv) >= 2 and (os.path.exists(argv[0]) or "/" in argv[0]):
            return mount_helper_cmd(argv, prog="tux3")
        raise UsageError(f"unknown command {argv[0]!r}; the commands are {', '.join(commands)} (see tux3 --help)")
    p = _Parser(prog="tux3", description="tux3fuse administration.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("umount", help="unmount and wait for the daemon", add_help=False)
    s = sub.add_parser("stat", help="print the label, UUID and counters of a mounted volume, where its daemon logs, "
                       "and its last errors with their times; of an image file, block device or NBD URI, what its "
                       "superblock says (label, UUID, size, counts, state), mounted or not")
    s.add_argument("mountpoint", metavar="MOUNTPOINT|IMAGE")
    s.add_argument("--json", action="store_true", help="one JSON object: the counters, log (where the daemon "
                   "logs) and recent_errors (its last warnings and errors: time, level, message); of an image, "
                   "what its superblock says")
    y = sub.add_parser("sync", help="commit everything now and wait until it is durable")
    y.add_argument("mountpoint")
    sub.add_parser("mkfs", help="same as mkfs.tux3", add_help=False)
    sub.add_parser("fsck", help="same as fsck.tux3", add_help=False)
    sub.add_parser("mount", help="same as tux3fuse", add_help=False)
    if argv and argv[0] in ("umount", "mkfs", "fsck", "mount"):
        rest = argv[1:]
        return {"umount": lambda: umount_cmd(rest, "tux3 umount"), "mkfs": lambda: mkfs_run(rest, "tux3 mkfs"),
                "fsck": lambda: fsck_cmd(rest, "tux3 fsck"), "mount": lambda: mount_cmd(rest, "tux3 mount")}[argv[0]]()
    a = p.parse_args(argv)
    if a.cmd is None:
        p.print_help()
        return 2
    if a.cmd == "stat" and _is_volume(a.mountpoint):
        from .fs import describe

        info = describe(a.mountpoint)
        print(json.dumps(info, sort_keys=True) if a.json else _table(info))
        return 0
    reply = _control(a.mountpoint, a.cmd)
    if a.cmd == "stat":
        stats = reply.get("stat", {})
        places, recent = reply.get("log") or [], reply.get("errors") or []
        if a.json:
            print(json.dumps({**stats, "log": places, "recent_errors": recent}, sort_keys=True))
        else:
            print(_table(stats))
            print(f"log: {', '.join(places) or 'unknown'}")
            print("last errors:" + ("" if recent else " none"))
            for record in recent:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("time", 0)))
                print(f"  {when} {record.get('level', '?')}: {record.get('message', '')}")
    if reply.get("error"):
        print(f"tux3 {a.cmd}: the volume has failed: {reply['error']}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# fsck.tux3

def _export_mountpoint(uri: str) -> str | None:
    """Where the NBD export ``uri`` is mounted as a tux3fuse volume on this machine (the same spelling), or None."""
    try:
        table = mounts()
    except OSError:
        return None
    return next((m.target for m in reversed(table) if m.fstype.startswith(TUX3_TYPE) and m.source == uri), None)


def fsck_cmd(argv: list[str], prog: str = "fsck.tux3") -> int:
    from .fsck import FSCK_ERROR, fsck

    p = _Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Check a tux3fuse volume that is not mounted, and repair what can be repaired safely.\n"
                "Repair is the default: without -n, fsck.tux3 writes its repairs to the image. With -n it only\n"
                "checks and changes nothing. Damage is reported by inode and by every path that reaches it.",
                epilog="exit status (as e2fsck):\n"
                "  0  no errors\n"
                "  1  errors found and corrected\n"
                "  4  errors left uncorrected (with -n: errors found)\n"
                "  8  operational error: the image cannot be opened, or is in use (mounted, or being checked)\n"
                "  2  wrong usage")
    p.add_argument("-n", "--no-action", action="store_true", help="check only: open the image read-only and "
                   "change nothing")
    p.add_argument("-y", "-p", "-a", dest="yes", action="store_true", help="accepted for fsck(8) compatibility: "
                   "the same as the default (repair what can be repaired safely, without questions)")
    p.add_argument("-f", "--force", action="store_true", help="accepted for fsck(8) compatibility: every check "
                   "is always complete")
    p.add_argument("-v", "--verbose", action="store_true", help="list each check as it runs; on a volume whose "
                   "check takes more than a second, show the progress on stderr")
    p.add_argument("image", help="the image file, block device or NBD URI (nbd://HOST[:PORT]/EXPORT, "
                   "nbd+unix:///EXPORT?socket=PATH)")
    a = p.parse_args(argv)
    if a.no_action and a.yes:
        raise UsageError("-n (change nothing) and -y/-p/-a (repair) contradict each other")
    mnt = _export_mountpoint(a.image) if is_uri(a.image) else image_mountpoint(a.image)
    if mnt is not None:
        print(f"{prog}: {a.image} is in use (mounted at {mnt}); unmount it first", file=sys.stderr)
        return FSCK_ERROR
    report = fsck(a.image, repair=not a.no_action, verbose=a.verbose)
    if report.status == FSCK_ERROR:  # nothing was checked: the reason, on stderr
        for line in report.lines:
            print(f"{prog}: {line}", file=sys.stderr)
        return FSCK_ERROR
    for line in report.lines:
        print(line)
    return report.status


def mount_main(argv: list[str] | None = None) -> None:
    _run(mount_cmd, argv)


def mount_helper_main(argv: list[str] | None = None) -> None:
    _run(mount_helper_cmd, argv)


def umount_main(argv: list[str] | None = None) -> None:
    _run(umount_cmd, argv)


def tux3_main(argv: list[str] | None = None) -> None:
    _run(tux3_cmd, argv)


def fsck_main(argv: list[str] | None = None) -> None:
    _run(fsck_cmd, argv, default_fail=8)
