"""The kernel's dirty limit for a mount follows the volume's room (coherence.py, DirtyBound), on a stand-in for the
kernel's sysfs files; the refusals themselves need a mount (tests/mounted/test_enospc.py)."""

from __future__ import annotations

import pytest

from tux3fuse import coherence
from tux3fuse.coherence import DirtyBound, dirty_target

MiB = 1 << 20
DEFAULT = 48 * MiB


@pytest.mark.parametrize(("room", "limit"), [
    (DEFAULT, None),  # room for what the kernel may hold anyway: its own limit
    (10 * DEFAULT, None),
    (DEFAULT - 1, 32 * MiB),  # below: the room rounded down to a power of two
    (10 * MiB, 8 * MiB),
    (8 * MiB, 8 * MiB),
    (3 * MiB, 2 * MiB),
    (MiB + 1, MiB),
    (MiB - 1, MiB),  # never below the floor
    (0, MiB),
])
def test_the_target_is_the_room_in_a_power_of_two_between_the_floor_and_the_kernels_own(room, limit):
    assert dirty_target(room, MiB, DEFAULT) == limit


def test_a_floor_above_the_kernels_own_limit_leaves_the_kernels():
    assert dirty_target(0, 4 * MiB, 3 * MiB) is None
    assert dirty_target(2 * MiB, MiB, 3 * MiB) == 2 * MiB


@pytest.fixture
def bdi(tmp_path, monkeypatch):
    """A stand-in for /sys/class/bdi/0:99 with the kernel's defaults."""
    monkeypatch.setattr(coherence, "BDI", str(tmp_path))
    d = tmp_path / "0:99"
    d.mkdir()
    (d / "max_ratio_fine").write_text("10000\n")
    (d / "max_bytes").write_text(f"{DEFAULT}\n")
    return d


def test_the_limit_is_lowered_as_the_room_shrinks_written_only_when_it_changes_and_given_back(bdi):
    bound = DirtyBound(MiB)
    assert bound.attach("0:99") and bound.default == DEFAULT
    bound.follow(100 * MiB)
    assert (bdi / "max_bytes").read_text() == f"{DEFAULT}\n" and bound.limit is None
    bound.follow(10 * MiB)
    assert (bdi / "max_bytes").read_text() == str(8 * MiB)
    (bdi / "max_bytes").write_text("untouched")
    bound.follow(9 * MiB)  # the same power of two: nothing written
    assert (bdi / "max_bytes").read_text() == "untouched"
    bound.follow(100)
    assert (bdi / "max_bytes").read_text() == str(MiB)
    (bdi / "max_ratio_fine").write_text("212")  # what the kernel shows for 1 MiB
    bound.follow(DEFAULT)  # room again: the kernel's own limit, as a fraction of its dirty threshold
    assert (bdi / "max_ratio_fine").read_text() == "10000" and bound.limit is None


def test_no_floor_or_no_such_device_leaves_the_kernels_limit_alone(bdi):
    assert not DirtyBound(0).attach("0:99")
    assert not DirtyBound(MiB).attach("0:98")
    bound = DirtyBound(0)
    bound.follow(0)
    assert (bdi / "max_bytes").read_text() == f"{DEFAULT}\n"
