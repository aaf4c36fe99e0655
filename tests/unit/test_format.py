"""On-disk packing in tux3fuse.format: round trips, checksums and the errors a damaged block must raise."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tux3fuse import format as fmt
from tux3fuse import logrecord as logrec

BLOCKSIZES = [512, 4096, 65536]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
i64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def _layout(blockbits: int, volblocks: int) -> dict:
    """The bitmap regions mkfs lays out for ``volblocks`` blocks of 2^blockbits bytes."""
    bs = 1 << blockbits
    n = fmt.bitmap_blocks_for(bs, volblocks)
    return dict(bitmap_blocks=n, bitmap_start=(fmt.reserved_blocks(bs), fmt.reserved_blocks(bs) + n))


def _super(blockbits: int = 12, **kw) -> fmt.Super:
    base = dict(blockbits=blockbits, volblocks=123457, seq=77, itree_root=900, otree_root=901, log_head=902,
                log_count=3, unify_seq=70, bitmap_cur=1, state=fmt.STATE_MOUNTED, free_blocks=100000,
                used_inodes=42, next_inum=4242, label=b"volume-label", uuid=bytes(range(16)),
                created_ns=1_700_000_000_123_456_789, **_layout(blockbits, kw.get("volblocks", 123457)))
    base.update(kw)
    return fmt.Super(**base)


def _reseal_super(buf: bytearray) -> bytes:
    """Recompute the superblock checksum after a deliberate change to its fields."""
    struct.pack_into("<Q", buf, fmt.SUPER_SIZE - 8, xxhash.xxh3_64_intdigest(bytes(buf[: fmt.SUPER_SIZE - 8])))
    return bytes(buf)


# ---------------------------------------------------------------------------------------------------------------
# Superblock


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_super_pack_unpack_round_trip_keeps_every_field(blocksize: int) -> None:
    sb = _super(blockbits=blocksize.bit_length() - 1)
    buf = sb.pack()
    assert len(buf) == fmt.SUPER_SIZE
    assert buf[:8] == fmt.MAGIC
    back = fmt.Super.unpack(buf, copy=1)
    assert back == sb
    assert back.copy == 1
    assert back.blocksize == blocksize
    assert back.bitmap_start == (fmt.reserved_blocks(blocksize), fmt.reserved_blocks(blocksize) + back.bitmap_blocks)
    assert back.label == b"volume-label"


@given(seq=st.integers(0, fmt.MAX_SEQ), volblocks=st.integers(0, fmt.MAX_VOLBLOCKS), roots=st.tuples(u64, u64, u64),
       counts=st.tuples(u32, u64, u64), label=st.binary(max_size=32).map(lambda b: b.rstrip(b"\0")),
       uuid=st.binary(min_size=16, max_size=16), created=u64, bits=st.integers(fmt.MIN_BLOCKBITS, fmt.MAX_BLOCKBITS),
       cur=st.sampled_from([0, 1]))
@FAST
def test_super_round_trip_for_arbitrary_field_values(seq, volblocks, roots, counts, label, uuid, created, bits,
                                                      cur) -> None:
    volblocks = max(volblocks, fmt.min_volblocks(1 << bits))
    layout = _layout(bits, volblocks)
    first = layout["bitmap_start"][1] + layout["bitmap_blocks"]
    room = volblocks - first
    head = first + roots[2] % room if roots[2] % 3 else 0
    next_inum = 2 + counts[2] % fmt.MAX_INUM
    sb = fmt.Super(blockbits=bits, volblocks=volblocks, seq=seq, itree_root=first + roots[0] % room,
                   otree_root=first + roots[1] % room if roots[1] % 2 else 0, log_head=head,
                   log_count=1 + counts[0] % room if head else 0, unify_seq=seq // 2, bitmap_cur=cur,
                   free_blocks=counts[1] % (room + 1), used_inodes=counts[2] % next_inum, next_inum=next_inum,
                   label=label, uuid=uuid, created_ns=created, **layout)
    assert fmt.Super.unpack(sb.pack(), 0) == sb


REFUSED = [  # (field values, what the refusal says) for a volume of 123457 blocks of 4 KiB (docs/FORMAT.md §2)
    (dict(volblocks=14), "a volume of 4096-byte blocks has 64 to"),
    (dict(volblocks=fmt.MAX_VOLBLOCKS + 1), "blocks: a volume of 4096-byte blocks has"),
    (dict(bitmap_blocks=0), "bitmap regions of 0 blocks"),
    (dict(bitmap_start=(3, 5)), "bitmap regions of 4 blocks at (3, 5)"),
    (dict(bitmap_cur=2), "bitmap region 2 or state 1 is neither 0 nor 1"),
    (dict(state=7), "bitmap region 1 or state 7 is neither 0 nor 1"),
    (dict(next_inum=(1 << 64) - 1), f"next inode number {(1 << 64) - 1} outside [2, {fmt.MAX_INUM + 1}]"),
    (dict(next_inum=1, used_inodes=0), "next inode number 1 outside"),
    (dict(used_inodes=4242), "used inode count 4242 outside [0, 4242)"),
    (dict(free_blocks=123457), "free block count 123457 outside"),
    (dict(itree_root=0), "itree_root 0 outside the allocatable blocks [11, 123457)"),
    (dict(itree_root=1), "itree_root 1 outside the allocatable blocks"),
    (dict(otree_root=4), "otree_root 4 outside the allocatable blocks"),
    (dict(log_head=123457), "log_head 123457 outside the allocatable blocks"),
    (dict(log_count=(1 << 32) - 1), f"log of {(1 << 32) - 1} blocks with head 902"),
    (dict(log_count=0), "log of 0 blocks with head 902"),
    (dict(unify_seq=78), "last unify at delta 78, after delta 77"),
    (dict(seq=(1 << 64) - 1), f"delta {(1 << 64) - 1} above {1 << 62}"),
]


@pytest.mark.parametrize("fields, said", REFUSED, ids=[next(iter(f)) + "=" + str(next(iter(f.values())))
                                                       for f, _ in REFUSED])
def test_a_superblock_with_a_value_the_format_refuses_is_neither_written_nor_read(fields, said) -> None:
    sb = _super()
    with pytest.raises(fmt.FormatError) as info:
        fmt.Super(**{**sb.__dict__, **fields}).pack()
    assert "refused: " in str(info.value) and said in str(info.value)
    raw = bytearray(sb.pack())  # the same values sealed by hand, as a crafted image holds them
    bad = fmt.Super(**{**sb.__dict__, **fields})
    fmt._SUPER.pack_into(raw, 0, fmt.MAGIC, fmt.VERSION, bad.blockbits, bad.state, bad.seq, bad.volblocks,
                         bad.itree_root, bad.otree_root, bad.log_head, bad.log_count, bad.bitmap_blocks, bad.unify_seq,
                         bad.bitmap_start[0], bad.bitmap_start[1], bad.bitmap_cur, 0, bad.free_blocks,
                         bad.used_inodes, bad.next_inum, bad.label.ljust(32, b"\0"), bad.uuid, bad.created_ns, 0)
    with pytest.raises(fmt.FormatError) as info:
        fmt.Super.unpack(_reseal_super(raw), 0)
    assert str(info.value).startswith("superblock copy 0: ") and said in str(info.value)


@pytest.mark.parametrize("at", [8, 12, 20, 100, 300, fmt.SUPER_SIZE - 9, fmt.SUPER_SIZE - 1])
def test_flipped_byte_in_superblock_is_a_checksum_format_error(at: int) -> None:
    buf = bytearray(_super().pack())
    buf[at] ^= 0x40
    with pytest.raises(fmt.FormatError, match="superblock copy 1: checksum mismatch"):
        fmt.Super.unpack(bytes(buf), 1)


def test_superblock_with_wrong_magic_says_wrong_magic() -> None:
    buf = bytearray(_super().pack())
    buf[0:4] = b"EXT2"
    with pytest.raises(fmt.FormatError, match="wrong magic"):
        fmt.Super.unpack(bytes(buf), 0)


def test_superblock_of_another_version_names_both_versions() -> None:
    buf = bytearray(_super().pack())
    struct.pack_into("<I", buf, 8, fmt.VERSION + 1)
    with pytest.raises(fmt.FormatError) as info:
        fmt.Super.unpack(_reseal_super(buf), 0)
    msg = str(info.value)
    assert f"unsupported format version {fmt.VERSION + 1}" in msg
    assert f"version {fmt.VERSION}" in msg


def test_short_superblock_is_a_format_error() -> None:
    with pytest.raises(fmt.FormatError, match="too short"):
        fmt.Super.unpack(_super().pack()[:100], 0)


@pytest.mark.parametrize("bits", [fmt.MIN_BLOCKBITS - 1, fmt.MAX_BLOCKBITS + 1, 0, 40])
def test_superblock_with_block_size_out_of_range_is_rejected(bits: int) -> None:
    buf = bytearray(_super().pack())
    struct.pack_into("<H", buf, 12, bits)
    with pytest.raises(fmt.FormatError, match="out of range"):
        fmt.Super.unpack(_reseal_super(buf), 0)




def test_reserved_blocks_cover_both_superblock_copies() -> None:
    for bs in BLOCKSIZES + [1024, 2048, 8192]:
        n = fmt.reserved_blocks(bs)
        assert n * bs >= fmt.SUPER_OFFSETS[1] + fmt.SUPER_SIZE
        assert (n - 1) * bs < fmt.SUPER_OFFSETS[1] + fmt.SUPER_SIZE


# ---------------------------------------------------------------------------------------------------------------
# Sealed metadata blocks


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_sealed_block_unseals_with_its_header_fields(blocksize: int) -> None:
    buf = bytearray(blocksize)
    buf[fmt.HEADER_SIZE:] = bytes((i * 7) & 0xFF for i in range(blocksize - fmt.HEADER_SIZE))
    fmt.seal(buf, fmt.KIND_DLEAF, 3, 17, 1234, 99)
    assert fmt.unseal(bytes(buf), 1234, (fmt.KIND_DLEAF, fmt.KIND_BNODE)) == (fmt.KIND_DLEAF, 3, 17, 99)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("where", ["header_count", "blocknr_field", "delta_field", "checksum", "body", "last"])
def test_flipped_byte_in_leaf_is_detected_as_checksum_mismatch(blocksize: int, where: str) -> None:
    buf = fmt.pack_leaf(blocksize, fmt.KIND_ILEAF, [1, 5, 9], [b"one", b"five", b"nine"], 777, 4)
    at = {"header_count": 6, "blocknr_field": 8, "delta_field": 24, "checksum": fmt.CSUM_AT + 3,
          "body": fmt.HEADER_SIZE + 2, "last": blocksize - 1}[where]
    buf[at] ^= 0x01
    with pytest.raises(fmt.CorruptBlock) as info:
        fmt.unseal(bytes(buf), 777, (fmt.KIND_ILEAF,))
    assert info.value.block == 777
    assert info.value.kind == "ileaf"
    assert info.value.reason == "checksum mismatch"
    assert "777" in str(info.value)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_block_read_from_the_wrong_block_number_is_detected(blocksize: int) -> None:
    buf = fmt.pack_bnode(blocksize, 1, [0, 10], [50, 51], 40, 2)
    with pytest.raises(fmt.CorruptBlock) as info:
        fmt.unseal(bytes(buf), 41, (fmt.KIND_BNODE,))
    assert info.value.block == 41
    assert info.value.kind == "bnode"
    assert "claims to be block 40" in info.value.reason


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_block_of_an_unexpected_kind_is_rejected(blocksize: int) -> None:
    buf = fmt.pack_leaf(blocksize, fmt.KIND_OLEAF, [3], [b""], 8, 1)
    with pytest.raises(fmt.CorruptBlock) as info:
        fmt.unseal(bytes(buf), 8, (fmt.KIND_ILEAF, fmt.KIND_BNODE))
    assert info.value.block == 8
    assert info.value.kind == "oleaf"
    assert "expected a ileaf/bnode block" in info.value.reason


def test_zeroed_block_is_rejected_not_accepted_as_empty() -> None:
    with pytest.raises(fmt.CorruptBlock) as info:
        fmt.unseal(bytes(4096), 5, (fmt.KIND_DLEAF,))
    assert info.value.block == 5
    assert info.value.kind == "metadata"


# ---------------------------------------------------------------------------------------------------------------
# Btree nodes


def _leaf_contents(blocksize: int):
    """Strictly increasing keys with values whose total cost fits one leaf of ``blocksize``."""
    cap = fmt.leaf_capacity(blocksize)
    max_value = min(cap // 2 - 12, 3000)

    @st.composite
    def build(draw):
        keys = sorted(draw(st.sets(u64, max_size=60)))
        values, used = [], 0
        for _ in keys:
            v = draw(st.binary(max_size=max_value))
            if used + fmt.leaf_entry_cost(len(v)) > cap:
                v = b""
                if used + fmt.leaf_entry_cost(0) > cap:
                    break
            values.append(v)
            used += fmt.leaf_entry_cost(len(v))
        return keys[: len(values)], values

    return build()


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_pack_leaf_unpack_leaf_round_trip(blocksize: int) -> None:
    @given(content=_leaf_contents(blocksize), blocknr=st.integers(1, 1 << 40), delta=u64)
    @FAST
    def check(content, blocknr, delta) -> None:
        keys, values = content
        buf = fmt.pack_leaf(blocksize, fmt.KIND_DLEAF, keys, values, blocknr, delta)
        assert len(buf) == blocksize
        kind, level, count, d = fmt.unseal(bytes(buf), blocknr, (fmt.KIND_DLEAF,))
        assert (kind, level, count, d) == (fmt.KIND_DLEAF, 0, len(keys), delta)
        assert fmt.unpack_leaf(bytes(buf), count) == (keys, values)

    check()


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_leaf_filled_exactly_to_capacity_round_trips(blocksize: int) -> None:
    cap = fmt.leaf_capacity(blocksize)
    big = cap // 2 - fmt.leaf_entry_cost(0)  # two entries of this size fill the leaf exactly
    values = [bytes([1]) * big, bytes([2]) * big]
    assert sum(fmt.leaf_entry_cost(len(v)) for v in values) == cap
    buf = fmt.pack_leaf(blocksize, fmt.KIND_ILEAF, [10, 20], values, 3, 1)
    assert fmt.unpack_leaf(buf, 2) == ([10, 20], values)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_leaf_one_byte_over_capacity_overflows(blocksize: int) -> None:
    cap = fmt.leaf_capacity(blocksize)
    big = cap // 2 - fmt.leaf_entry_cost(0)
    with pytest.raises(ValueError, match="overflow"):
        fmt.pack_leaf(blocksize, fmt.KIND_ILEAF, [10, 20], [b"x" * big, b"y" * (big + 1)], 3, 1)


def test_leaf_value_pointing_outside_the_block_is_rejected() -> None:
    buf = fmt.pack_leaf(512, fmt.KIND_ILEAF, [1], [b"abcdef"], 3, 1)
    struct.pack_into("<QHH", buf, fmt.HEADER_SIZE, 1, 510, 6)
    with pytest.raises(ValueError, match="outside the block"):
        fmt.unpack_leaf(buf, 1)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_pack_bnode_unpack_bnode_round_trip(blocksize: int) -> None:
    cap = fmt.bnode_capacity(blocksize)
    assert cap == (blocksize - fmt.HEADER_SIZE) // 16

    @given(keys=st.sets(u64, max_size=min(cap, 300)).map(sorted), level=st.integers(1, 20), data=st.data())
    @FAST
    def check(keys, level, data) -> None:
        children = data.draw(st.lists(u64, min_size=len(keys), max_size=len(keys)))
        buf = fmt.pack_bnode(blocksize, level, keys, children, 11, 12)
        assert fmt.unseal(bytes(buf), 11, (fmt.KIND_BNODE,)) == (fmt.KIND_BNODE, level, len(keys), 12)
        assert fmt.unpack_bnode(bytes(buf), len(keys)) == (keys, children)

    check()


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_full_bnode_round_trips(blocksize: int) -> None:
    cap = fmt.bnode_capacity(blocksize)
    keys = [i * 3 for i in range(cap)]
    children = [1000 + i for i in range(cap)]
    buf = fmt.pack_bnode(blocksize, 2, keys, children, 5, 6)
    assert fmt.unpack_bnode(buf, cap) == (keys, children)


# ---------------------------------------------------------------------------------------------------------------
# Inode records


xattr_names = st.binary(min_size=1, max_size=255)
inode_records = st.builds(
    fmt.InodeRecord, mode=u32, uid=u32, gid=u32, nlink=u32, size=u64, rdev=u64, atime_ns=i64, mtime_ns=i64,
    ctime_ns=i64, dtree_root=u64, blocks=u64, parent=u64, flags=u32,
    xattrs=st.dictionaries(xattr_names, st.binary(max_size=300), max_size=6))


@given(rec=inode_records)
@FAST
def test_inode_record_round_trip_including_xattrs(rec: fmt.InodeRecord) -> None:
    raw = rec.pack()
    assert len(raw) == fmt.INODE_FIXED + sum(fmt.xattr_cost(n, v) for n, v in rec.xattrs.items())
    assert fmt.InodeRecord.unpack(raw) == rec


def test_inode_record_packing_is_independent_of_xattr_insertion_order() -> None:
    a = fmt.InodeRecord(mode=0o100644, xattrs={b"user.b": b"2", b"user.a": b"1"})
    b = fmt.InodeRecord(mode=0o100644, xattrs={b"user.a": b"1", b"user.b": b"2"})
    assert a.pack() == b.pack()


def test_inode_record_with_trailing_bytes_is_rejected() -> None:
    raw = fmt.InodeRecord(mode=0o40755, xattrs={b"user.x": b"y"}).pack()
    with pytest.raises(ValueError, match="trailing"):
        fmt.InodeRecord.unpack(raw + b"\0")


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_largest_inode_record_fits_two_to_a_leaf(blocksize: int) -> None:
    limit = fmt.max_inode_record(blocksize)
    assert 2 * fmt.leaf_entry_cost(limit) <= fmt.leaf_capacity(blocksize)
    value_len = limit - fmt.INODE_FIXED - fmt.xattr_cost(b"user.big", b"")
    rec = fmt.InodeRecord(mode=0o100600, xattrs={b"user.big": b"v" * value_len})
    raw = rec.pack()
    assert len(raw) == limit
    buf = fmt.pack_leaf(blocksize, fmt.KIND_ILEAF, [2, 3], [raw, raw], 9, 1)
    keys, values = fmt.unpack_leaf(buf, 2)
    assert [fmt.InodeRecord.unpack(v) for v in values] == [rec, rec]


# ---------------------------------------------------------------------------------------------------------------
# Extent records


@given(physical=u64, csums=st.lists(u64, min_size=1, max_size=300))
@FAST
def test_extent_pack_unpack_round_trip(physical: int, csums: list[int]) -> None:
    raw = fmt.pack_extent(physical, csums)
    assert len(raw) == 12 + 8 * len(csums)
    assert fmt.unpack_extent(raw) == (physical, csums)


def test_extent_of_zero_blocks_is_rejected() -> None:
    with pytest.raises(ValueError):
        fmt.unpack_extent(fmt.pack_extent(5, []))


def test_truncated_extent_record_is_rejected() -> None:
    with pytest.raises(ValueError, match="extent record"):
        fmt.unpack_extent(fmt.pack_extent(5, [1, 2, 3])[:-1])


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_longest_extent_fits_two_to_a_leaf(blocksize: int) -> None:
    n = fmt.max_extent_blocks(blocksize)
    assert 1 <= n <= 1024
    raw = fmt.pack_extent(1 << 40, list(range(n)))
    assert 2 * fmt.leaf_entry_cost(len(raw)) <= fmt.leaf_capacity(blocksize)
    buf = fmt.pack_leaf(blocksize, fmt.KIND_DLEAF, [0, n], [raw, raw], 3, 1)
    _, values = fmt.unpack_leaf(buf, 2)
    assert [fmt.unpack_extent(v) for v in values] == [(1 << 40, list(range(n)))] * 2


def test_data_checksum_is_xxh3_of_the_block() -> None:
    data = bytes(range(256)) * 16
    assert fmt.checksum(data) == xxhash.xxh3_64_intdigest(data)
    assert fmt.checksum(data) != fmt.checksum(data[:-1] + b"\x01")


# ---------------------------------------------------------------------------------------------------------------
# Log blocks


log_records = st.tuples(st.sampled_from([logrec.LOG_ALLOC, logrec.LOG_FREE]), u64, u32)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_log_pack_unpack_round_trip(blocksize: int) -> None:
    cap = logrec.log_capacity(blocksize)

    @given(prev=u64, records=st.lists(log_records, max_size=min(cap, 200)), blocknr=st.integers(1, 1 << 40))
    @FAST
    def check(prev, records, blocknr) -> None:
        buf = logrec.pack_log(blocksize, prev, records, blocknr, 7)
        kind, level, count, delta = fmt.unseal(bytes(buf), blocknr, (fmt.KIND_LOG,))
        assert (kind, count, delta) == (fmt.KIND_LOG, len(records), 7)
        assert logrec.unpack_log(bytes(buf), count) == (prev, records)

    check()


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_full_log_block_round_trips(blocksize: int) -> None:
    cap = logrec.log_capacity(blocksize)
    records = [(logrec.LOG_ALLOC if i % 2 else logrec.LOG_FREE, i + 1, i % 13 + 1) for i in range(cap)]
    buf = logrec.pack_log(blocksize, 99, records, 3, 1)
    assert logrec.unpack_log(buf, cap) == (99, records)


def test_log_record_with_unknown_code_is_rejected() -> None:
    buf = logrec.pack_log(512, 0, [(logrec.LOG_ALLOC, 10, 1)], 3, 1)
    buf[fmt.HEADER_SIZE + 12] = 9  # code of the first record
    with pytest.raises(ValueError, match="unknown log record code 9"):
        logrec.unpack_log(buf, 1)


def test_log_count_disagreeing_with_byte_length_is_rejected() -> None:
    buf = logrec.pack_log(512, 0, [(logrec.LOG_ALLOC, 10, 1), (logrec.LOG_FREE, 10, 1)], 3, 1)
    with pytest.raises(ValueError, match="disagree"):
        logrec.unpack_log(buf, 1)


# ---------------------------------------------------------------------------------------------------------------
# Directory record lengths


def test_rec_len_is_eight_byte_aligned_and_holds_the_name() -> None:
    for n in range(1, fmt.NAME_MAX + 1):
        rl = fmt.rec_len(n)
        assert rl % 8 == 0
        assert fmt.DIRENT_HEADER + n <= rl < fmt.DIRENT_HEADER + n + 8


def test_rec_len_of_a_whole_64k_block_survives_16_bit_encoding() -> None:
    assert fmt.decode_rec_len(fmt.encode_rec_len(65536)) == 65536
    for n in (16, 4096, 65528):
        assert fmt.decode_rec_len(fmt.encode_rec_len(n)) == n


@given(physical=st.integers(1, 1 << 40), csums=st.lists(u64, min_size=1, max_size=60), data=st.data())
def test_extent_records_slice_and_extend_as_their_checksum_lists_do(physical, csums, data):
    start = data.draw(st.integers(0, len(csums) - 1))
    count = data.draw(st.integers(1, len(csums) - start))
    rec = fmt.pack_extent(physical, csums)
    assert fmt.slice_extent(rec, start, count) == fmt.pack_extent(physical + start, csums[start: start + count])
    more = data.draw(st.lists(u64, min_size=1, max_size=10))
    assert fmt.extend_extent(rec, more) == fmt.pack_extent(physical, csums + more)
    assert fmt.extent_head(rec) == (physical, len(csums))
