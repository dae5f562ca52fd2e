"""The bounded tar reader (core/tar_members.py) and the key rule the read tasks group members by."""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile

import pytest
from webdataset.tariterators import base_plus_ext

from core.tar_members import Member, ShardFormatError, ShardTruncatedError, iter_members, member_cap
from pipeline.data.source import key_and_extension


def _tar(*members: tuple[str, bytes], **pax: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax and name == members[0][0]:
                info.pax_headers = dict(pax)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _read(data: bytes, cap: int, keep=lambda name: True) -> list[Member]:  # noqa: ANN001
    return list(iter_members(io.BytesIO(data), cap, keep))


@pytest.mark.parametrize("name", ["k.mp4", "k.seg.json", "dir/k.mp4", "../../escaped.mp4", "/tmp/abs.cls",
                                  "d.x/k.mp4", "noext", ".hidden", "dir/", "k."])  # fmt: skip
def test_the_key_rule_is_webdatasets(name: str) -> None:
    """Equal to webdataset's rule, except that a last component starting with a dot (``a/b/.c``) has no key
    here, where webdataset keys it by its folder (``a/b/``): either way no sample is read from it."""
    expected = base_plus_ext(name)
    assert key_and_extension(name) == (tuple(expected) if expected[0] is not None else (None, None))
    assert key_and_extension("a/b/.c") == (None, None) and base_plus_ext("a/b/.c")[0] == "a/b/"


def test_member_cap_is_headroom_times_the_mean_sample_under_the_ceiling() -> None:
    assert member_cap(1000, 10, headroom=16, ceiling=10_000) == 1600
    assert member_cap(1000, 10, headroom=16, ceiling=500) == 500
    assert member_cap(1000, 1, headroom=1, ceiling=10_000) == 1000  # one sample: at least the whole shard
    with pytest.raises(ValueError):
        member_cap(1000, 10, headroom=0.5)


def test_regular_members_are_read_and_a_member_over_the_cap_is_skipped_unread() -> None:
    data = _tar(("a.mp4", b"x" * 100), ("b.mp4", b"y" * 5000), ("c.cls", b"1"))
    members = _read(data, cap=1000)
    assert [(m.name, m.data) for m in members] == [("a.mp4", b"x" * 100), ("b.mp4", None), ("c.cls", b"1")]
    assert members[1].problem == "member 'b.mp4' claims 5000 bytes, over the cap of 1000 for this shard"


@pytest.mark.parametrize("pack, kind", [(bz2.compress, "bzip2"), (lzma.compress, "xz")])
def test_compressed_shards_are_refused_by_their_magic(pack, kind: str) -> None:  # noqa: ANN001
    with pytest.raises(ShardFormatError, match=f"the shard is {kind}-compressed"):
        _read(pack(_tar(("a.mp4", b"x"))), cap=1000)


def test_an_extended_header_cannot_claim_more_than_the_cap() -> None:
    """A pax record is held whole by tarfile while it parses it: 64 KiB of it over a 1 KiB cap is refused."""
    data = _tar(("a.mp4", b"x"), comment="c" * (200 << 10))
    with pytest.raises(ShardFormatError, match="claims more than the cap allows"):
        _read(data, cap=1024)
    assert [m.data for m in _read(data, cap=1 << 20)] == [b"x"]  # under a cap that admits it: read


def test_a_cut_member_ends_the_reading_by_name_whether_kept_or_skipped() -> None:
    data = _tar(("a.mp4", b"x" * 600), ("b.mp4", b"y" * 3000))
    cut = data[: data.index(b"y" * 3000) + 1000]
    with pytest.raises(ShardTruncatedError, match="member 'b.mp4' claims 3000 bytes but the shard ends before them"):
        _read(cut, cap=10_000)
    seen: list[Member] = []
    with pytest.raises(ShardTruncatedError, match="member 'b.mp4' claims 3000 bytes"):
        seen.extend(iter_members(io.BytesIO(cut), 10_000, keep=lambda name: name != "b.mp4"))
    assert [(m.name, m.data) for m in seen] == [("a.mp4", b"x" * 600), ("b.mp4", None)]
