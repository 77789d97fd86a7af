"""The loader's own plain-tar header parser agrees with :mod:`tarfile` on what the reader uses."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from regionvlp.data.reader import tar_samples
from regionvlp.data.skips import SkipCounter
from regionvlp.data.tarstream import PlainTar, PrefixedStream, looks_plain


def _tar(fmt: int, members: list[tuple[str, bytes]], *, extra_dir: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        if extra_dir:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("a.txt", b"caption"), ("a.frame000.jpg", b"\xff\xd8" + bytes(range(256)) * 5), ("b.json", b"{}"),
           ("p" * 90 + "/" + "q" * 60 + ".txt", b"ustar prefix"),  # prefix + name in ustar, a long name elsewhere
           ("d/" + "long" * 60 + ".mp4", b"x" * 1000), ("\u00e9t\u00e9.txt", b"non-ascii name: pax path"),
           ("empty.txt", b"")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_plain_members_match_tarfile(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0]) < 200 and m[0].isascii()]
    data = _tar(fmt, members)
    assert looks_plain(data[:512])
    plain = PlainTar(io.BytesIO(data))
    got = [(m.name, m.isreg, m.offset, m.size, m.read() if m.isreg else None) for m in plain]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        want = [(i.name, i.isreg(), i.offset, i.size, tf.extractfile(i).read() if i.isreg() else None) for i in tf]
        end = tf.offset
    assert got == want and plain.offset == end


def test_unread_members_are_passed_over_and_bad_input_raises_or_stops():
    data = _tar(tarfile.PAX_FORMAT, MEMBERS)
    names = [m.name for m in PlainTar(io.BytesIO(data))]  # nothing read: every member still found
    assert names[1:] == [n for n, _ in MEMBERS]
    with pytest.raises(tarfile.ReadError):  # cut off inside a member's data
        [m.read() for m in PlainTar(io.BytesIO(data[:2048]))]
    with pytest.raises(tarfile.ReadError):  # a garbled first header
        list(PlainTar(io.BytesIO(b"\x01" * 1024)))
    one = _tar(tarfile.GNU_FORMAT, MEMBERS[:1], extra_dir=False)
    garbled = one[:1024] + b"garbage!" * 64 + one[1024:]  # stops at the garbled header, as tarfile does
    plain = PlainTar(io.BytesIO(garbled))
    assert [m.name for m in plain] == ["a.txt"] and plain.offset == 1024
    assert PrefixedStream(b"ab", io.BytesIO(b"cdef")).read(3) == b"abc"


def test_reader_groups_the_same_from_plain_and_gzipped_tars(tmp_path):
    data = _tar(tarfile.PAX_FORMAT, MEMBERS[:3])
    (tmp_path / "s.tar").write_bytes(data)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(data))
    plain, gzipped = SkipCounter(), SkipCounter()
    a = [{k: v for k, v in s.items() if k not in ("__url__", "__ref__")} for s in tar_samples([str(tmp_path / "s.tar")], plain)]
    b = [{k: v for k, v in s.items() if k not in ("__url__", "__ref__")}
         for s in tar_samples([str(tmp_path / "s.tar.gz")], gzipped)]
    assert a == b and [s["__key__"] for s in a] == ["a", "b"] and a[0]["frame000.jpg"] == MEMBERS[1][1]
    assert plain.skipped == gzipped.skipped == {}  # no false corrupt_shard at a gzipped tar's end
