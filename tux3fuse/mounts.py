"""What is mounted where, read from /proc/self/mounts: one reader for the tools, the scripts and the tests.

Guarantees:
- Paths are compared after ``os.path.realpath`` and with the table's octal escapes (``\\040`` for a space) decoded,
  so a mountpoint named through a symlink or holding a space is found.
- ``mounted_type`` gives the topmost filesystem at a path (the last line for it): a tux3fuse mount is
  ``fuse.tux3`` (``TUX3_TYPE``), another FUSE filesystem ``fuse.NAME`` or ``fuse``.
- ``mount_device`` gives the device number of the topmost mount at a resolved path from /proc/self/mountinfo, and
  never looks at the mount itself (the daemon asks it of its own mount).
- When /proc/self/mounts cannot be read, ``mounted_type`` falls back to ``os.path.ismount`` ("" for a mount of
  unknown type) and ``image_mountpoint`` answers None; nothing here raises for an unreadable table.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

TUX3_TYPE = "fuse.tux3"  # the type /proc/mounts gives a tux3fuse mount (subtype=tux3)
MOUNTS = "/proc/self/mounts"
MOUNTINFO = "/proc/self/mountinfo"


class Mount(NamedTuple):
    source: str
    target: str
    fstype: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mounts() -> list[Mount]:
    """Every line of /proc/self/mounts, in order (the last mount at a path is the topmost). OSError if unreadable."""
    with open(MOUNTS) as f:
        lines = f.read().splitlines()
    return [Mount(_unescape(f[0]), _unescape(f[1]), f[2]) for f in (line.split() for line in lines) if len(f) > 2]


def mounted_type(path: str | os.PathLike[str]) -> str | None:
    """The type of the topmost filesystem mounted at ``path``; "" when something is mounted there but the mount
    table cannot be read; None when nothing is."""
    real = os.path.realpath(path)
    try:
        table = mounts()
    except OSError:
        return "" if os.path.ismount(real) else None
    found = None
    for m in table:
        if m.target == real:
            found = m.fstype
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether any filesystem is mounted at ``path``."""
    return mounted_type(path) is not None


def mount_device(real: str) -> str | None:
    """``MAJOR:MINOR`` (st_dev) of the topmost filesystem mounted at ``real``, an absolute path without symlinks
    (``realpath`` would look at the mount itself), read from /proc/self/mountinfo; None when nothing is mounted
    there or the table cannot be read."""
    try:
        with open(MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for fields in (line.split() for line in lines):
        if len(fields) > 4 and _unescape(fields[4]) == real:
            found = fields[2]
    return found


def image_mountpoint(image: str | os.PathLike[str]) -> str | None:
    """Where ``image`` is mounted as a tux3fuse volume, or None: any ``fuse.tux3*`` mount whose source is the same
    file (same device and inode: through a symlink, a hard link or another spelling of its path)."""
    try:
        st = os.stat(image)
        table = mounts()
    except OSError:
        return None
    for m in table:
        if not m.fstype.startswith(TUX3_TYPE):
            continue
        try:
            other = os.stat(m.source)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return m.target
    return None
