"""fsck.tux3: the check of a volume (``checker.py``), its repairs (``repair.py``) and the check again.

Guarantee: ``fsck`` without ``repair`` changes nothing and reports everything the check finds (``checker.py``
lists it). ``fsck(repair=True)`` fixes what a mount can fix safely (orphans, leaked blocks, counts) and checks
again.

A log that does not replay past some delta is reported with its last consistent delta, the deltas a rollback drops
and the inodes they touch. ``fsck(repair=True)`` runs the repairs of ``repair.py``, checking again after each, in
this order: a flipped bit of a block the load needs; a log that does not replay (its flipped bits, else a rollback
to that delta, docs/FORMAT.md §9.1); a delta a mount refuses as damaged (its flipped bits, else a rollback to the
delta before, §11); the flipped bits the check found; then, only when every error left is one they fix, the
bitmap rebuild (§8), leaked blocks, counts, orphans and unreadable directory blocks (their inodes reconnected into
/lost+found). Its lines say what each repair restored, dropped or changed.

A report names damage by path as well as by inode (``Names``).
``fsck(verbose=True)`` lists each check as it starts and, on a volume that takes more than a second, shows how far
it is (``Talk``). An image that cannot be opened or is in use (its lock held by a mount's daemon, up to its last
commit, or by another fsck) is refused with status 8 before anything is read; so is an image that holds no tux3fuse
volume at all (too short, or no superblock copy with the signature: ``NotAVolume``), in one line.
"""

from __future__ import annotations

import os

from . import format as fmt
from .backend.log import LogDamage
from .backing import FileBacking, InUse, is_uri, open_backing
from .checker import FSCK_CORRECTED, FSCK_ERROR, FSCK_OK, FSCK_UNCORRECTED, Report, Talk, check
from .failure import NotAVolume, VolumeError
from .recovery import Fix
from .repair import (
    bare,
    damage_lines,
    dropped_names,
    fixable,
    log_fixes,
    repair_found,
    repair_plan,
    restore_bits,
    roll_back_volume,
    settle_damage,
)


def writable(path: str) -> bool:
    """May fsck write its repairs to ``path``? An NBD export says so when it is opened (``backing.py``)."""
    return is_uri(path) or os.access(path, os.W_OK)


def unusable(path: str, repair: bool) -> str | None:
    """Why ``path`` cannot be checked at all, or None: it cannot be opened, is neither a file nor a block device nor
    an NBD export, or is in use: another process holds its lock as a mount's daemon does from the mount until its
    last commit is written, and as fsck.tux3 does (a repair needs the lock alone; a check shares it with other
    checks). An NBD export's lock is the lock file of this machine that stands for its URI (``backing.py``)."""
    try:
        backing = open_backing(path, readonly=True)
    except OSError as e:
        if is_uri(path):
            return e.strerror
        return f"{path}: cannot open: {e.strerror}"
    try:
        if isinstance(backing, FileBacking) and not (backing.regular or backing.block_device):
            return f"{path}: not an image file or block device"
        try:
            backing.lock(exclusive=repair)
        except InUse:
            return f"{path} is in use (mounted, or being checked)"
    finally:
        backing.close()
    return None


def fsck(path: str, repair: bool = False, verbose: bool = False, data: bool = True, talk: Talk | None = None
         ) -> Report:
    """Check (and with ``repair``, fix what can be fixed) a volume that is not mounted. A log that does not replay
    past some delta is reported with that delta; ``repair`` rolls the volume back to it (``roll_back_volume``).

    Guarantees: status FSCK_ERROR with one line and nothing read or written when the image cannot be opened, is not
    a file or block device, or is in use (``unusable``); status FSCK_ERROR with one line and nothing written when
    it holds no tux3fuse volume (``NotAVolume``). Every line about an inode names, after what is wrong,
    every path that reaches it (``Names``), as the directory walk of the check that found it saw them; the inodes of
    dropped deltas are named by the paths they have in the volume as it is left. No line names the image twice
    at its start. ``verbose``: each check is listed on stdout as it starts, with progress on stderr (``Talk``)."""
    talk = talk or Talk(verbose)
    problem = unusable(path, repair and writable(path))
    if problem:
        return Report(status=FSCK_ERROR, lines=[problem])
    try:
        report = _fsck(path, repair, data, talk)
    finally:
        talk.clear()
    report.lines = [_once(path, line) for line in report.lines]
    return report


def _once(path: str, line: str) -> str:
    """``line`` with the image path at its start once."""
    twice = f"{path}: {path}"
    while line.startswith(twice):
        line = line[len(path) + 2:]
    return line


def _about(path: str, e: BaseException | str) -> str:
    """The text of an error as a line about the image: starting with its path, once."""
    text = str(e)
    return text if text.startswith(path) else f"{path}: {text}"

def _fsck(path: str, repair: bool, data: bool, talk: Talk) -> Report:
    rolled: list[str] = []
    dropped: set[int] = set()  # inodes that dropped deltas touched, named once the volume is checked again
    try:
        report, vol = check(path, data, talk)
    except NotAVolume as e:  # nothing to check: as e2fsck, an operational error
        return Report(status=FSCK_ERROR, lines=[_about(path, e)])
    except VolumeError as e:
        damage: LogDamage | None = getattr(e, "damage", None)
        fix: Fix | None = getattr(e, "fix", None)  # a tree block the load needs, one flipped bit off
        if damage is None and fix is None and (problem := unusable(path, False)):
            return Report(status=FSCK_ERROR, lines=[problem])  # taken since the first look: in use after all
        if damage is None and (fix is None or not repair or not writable(path)):
            return Report(status=FSCK_UNCORRECTED, lines=[_about(path, e)])
        if damage is None:
            try:
                talk.step("repairing: restoring one flipped bit")
                rolled = restore_bits(path, [fix])
                report, vol = check(path, data, talk)
            except (VolumeError, OSError, fmt.FormatError) as e2:
                return Report(status=FSCK_UNCORRECTED, lines=[_about(path, e), f"repair failed: {bare(path, e2)}"])
    else:
        damage = None
    if damage is not None:
        fixes = log_fixes(path, damage)  # log blocks one flipped bit off: restored, nothing is rolled back
        if not repair or not writable(path):
            lines = damage_lines(path, damage)
            if fixes:
                lines[-1] = ("fsck.tux3 repair restores " + "; ".join(f.line().removeprefix("restored ") for f in fixes)
                             + ": nothing is lost")
            return Report(status=FSCK_UNCORRECTED, lines=lines)
        try:
            if fixes:
                talk.step(f"repairing: restoring {len(fixes)} flipped bit(s) of the log")
                rolled = restore_bits(path, fixes)
                try:
                    report, vol = check(path, data, talk)
                    damage = None
                except VolumeError as e:  # more damage than those bits: roll back past what still fails
                    damage = getattr(e, "damage", None)
                    if damage is None:
                        raise
            if damage is not None:
                talk.step(f"repairing: rolling back to delta {damage.good}")
                rolled += damage_lines(path, damage, roll_back_volume(path, damage))
                dropped |= damage.inodes
                report, vol = check(path, data, talk)
        except (VolumeError, OSError, fmt.FormatError) as e:
            return Report(status=FSCK_UNCORRECTED, lines=[*rolled, f"{path}: repair failed: {bare(path, e)}"])
    if vol.recovery.refuse:  # a delta written and then damaged (recovery.py): restore it, or roll back past it
        if not repair or not writable(path):
            report.notes.append(repair_plan(vol.recovery, vol.backend.sb.seq))
            dropped |= set(vol.recovery.inodes)
        else:
            try:
                talk.step("repairing: the newest delta is damaged")
                rolled += settle_damage(path, vol)
                dropped |= set(vol.recovery.inodes)
                report, vol = check(path, data, talk)
            except (VolumeError, OSError, fmt.FormatError) as e:
                vol.close_files()
                return Report(status=FSCK_UNCORRECTED, lines=[*map(report.show, report.errors),
                                                              f"repair failed: {bare(path, e)}"])
    elif vol.recovery.dropped:
        dropped |= set(vol.recovery.inodes)
    if report.fixes and repair and writable(path):  # restored first: the blocks they hid are checked
        vol.close_files()
        try:
            talk.step(f"repairing: restoring {len(report.fixes)} flipped bit(s)")
            rolled += map(report.show, restore_bits(path, report.fixes))
            report, vol = check(path, data, talk)
        except (VolumeError, OSError, fmt.FormatError) as e:
            return Report(status=FSCK_UNCORRECTED, lines=[*map(report.show, report.errors),
                                                          f"repair failed: {bare(path, e)}"])
    sb = vol.backend.sb
    raws = [vol.backend.dev.backing.pread(fmt.SUPER_SIZE, offset) for offset in fmt.SUPER_OFFSETS]
    vol.close_files()
    head = (f"{path}: delta {sb.seq}, {sb.volblocks} blocks of {sb.blocksize} bytes, {sb.free_blocks} free, "
            f"{sb.used_inodes} inodes" + ("" if sb.state == fmt.STATE_CLEAN else ", not cleanly unmounted"))
    for copy, raw in enumerate(raws):
        try:
            fmt.Super.unpack(raw, copy)
        except fmt.FormatError as e:
            report.notes.append(f"superblock copy {copy} unusable ({e}); the other copy is in use")
    fixable_all = not [e for e in report.errors if not fixable(e, report.fixed_by_bit, report.lost_dir_blocks)]
    if report.errors and repair and fixable_all and writable(path):
        talk.step("repairing: " + ", ".join(what for what, needed in (
            ("rebuilding the bitmap", report.bitmap_rebuild), ("freeing leaked blocks", report.leaked),
            ("emptying unreadable directory blocks and reconnecting to /lost+found", report.lost_dir_blocks),
            ("setting the counts", True)) if needed))
        try:
            report.repairs += repair_found(path, report.leaked, report.lost_dir_blocks, report.names,
                                           report.bitmap_rebuild, report.owned, report.unmarked)
            again, vol2 = check(path, data, talk)
        except (VolumeError, OSError, fmt.FormatError) as e:
            report.lines = [head, *map(report.show, report.errors), f"repair failed: {bare(path, e)}"]
            report.status = FSCK_UNCORRECTED
            return report
        vol2.close_files()
        if not again.errors:
            report.lines = [head, *rolled, *dropped_names(again.names, dropped),
                            *(f"fixed: {report.show(e)}" for e in report.errors), *report.repairs, *again.notes]
            report.status = FSCK_CORRECTED
            return report
        report = again
    report.lines = [head, *rolled, *(dropped_names(report.names, dropped) if rolled else []), *report.notes,
                    *map(report.show, report.errors)]
    if report.errors:
        report.status = FSCK_UNCORRECTED
        if not rolled:
            report.lines += dropped_names(report.names, dropped)
        reused = sum("fails its checksum" in e for e in report.errors)
        if rolled and reused:
            report.lines.append(f"{reused} data block(s) fail their checksums: a dropped delta freed them and a "
                                "later dropped delta wrote them again, so those files hold other data there now")
        report.lines.append(f"{len(report.errors)} error(s) left uncorrected")
    else:
        report.status = FSCK_CORRECTED if rolled else FSCK_OK
        report.lines.append("clean")
    return report
