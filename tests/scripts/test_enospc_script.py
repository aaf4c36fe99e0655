"""scripts/enospc.py's writer and checks, on a plain file (the mounted tests run it on a full volume)."""

from __future__ import annotations

import errno

from conftest import load_script

enospc = load_script("enospc")


def test_every_word_of_the_pattern_holds_its_own_index_so_a_moved_block_is_seen():
    data = enospc.pattern(0, 64)
    assert [int.from_bytes(data[i:i + 8], "little") for i in range(0, 64, 8)] == list(range(8))
    assert enospc.pattern(4096, 16) == (512).to_bytes(8, "little") + (513).to_bytes(8, "little")
    assert enospc.pattern(0, 8192)[4096:] == enospc.pattern(4096, 4096)


def test_the_writer_stops_at_its_limit_without_an_error_and_the_check_finds_a_wrong_or_missing_byte(tmp_path):
    path = str(tmp_path / "f")
    filled = enospc.fill(path, block=4096, limit=3 * 4096)
    assert filled.created and filled.accepted == 3 * 4096 and filled.error is None and filled.close_error is None
    assert enospc.first_wrong_byte(path, 3 * 4096) is None
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff")
    assert enospc.first_wrong_byte(path, 3 * 4096) == 5000
    assert enospc.first_wrong_byte(path, 4 * 4096) == 5000
    assert enospc.first_wrong_byte(str(tmp_path / "f"), 4999) is None
    with open(path, "r+b") as f:
        f.truncate(4096)
    assert enospc.first_wrong_byte(path, 2 * 4096) == 4096  # the file ends short of the size said


def test_a_run_fails_for_no_enospc_a_size_that_changed_a_wrong_byte_or_fsck():
    ok = enospc.Filled("/m/a", accepted=10, error=errno.ENOSPC, close_error=errno.ENOSPC, created=True)
    run = enospc.Run([ok], stored=[8], remounted=[8], wrong=[None], capacity=100, fsck=0)
    assert run.problems() == []
    never = enospc.Filled("/m/b", accepted=400, created=True)
    run = enospc.Run([never, ok, ok], stored=[400, 8, 8], remounted=[400, 9, 8], wrong=[None, None, 3],
                     capacity=100, fsck=4)
    assert run.problems() == ["b: ended with no error after 400 bytes, not ENOSPC",
                              "a: 9 bytes after a remount, 8 after the close", "a: byte 3 is not what was written",
                              "fsck exit status 4"]
