"""The loader's own plain-tar header parser agrees with :mod:`tarfile` on what the reader uses."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import tarfile

import pytest

from regionvlp.data.reader import tar_samples
from regionvlp.data.skips import SkipCounter
from regionvlp.data.tarstream import READ_ALONG, PlainTar, PrefixedStream, looks_plain


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


COMPRESSORS = {"gz": gzip.compress, "bz2": lambda d: bz2.compress(d, 1), "xz": lzma.compress}  # bz2: 100 KB blocks


def _strip(samples) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in ("__url__", "__ref__")} for s in samples]


@pytest.mark.parametrize("ext", sorted(COMPRESSORS))
def test_reader_groups_the_same_from_plain_and_compressed_tars(tmp_path, ext):
    data = _tar(tarfile.PAX_FORMAT, MEMBERS)
    (tmp_path / "s.tar").write_bytes(data)
    (tmp_path / f"s.tar.{ext}").write_bytes(COMPRESSORS[ext](data))
    plain, packed = SkipCounter(), SkipCounter()
    a = list(tar_samples([str(tmp_path / "s.tar")], plain))
    b = list(tar_samples([str(tmp_path / f"s.tar.{ext}")], packed))
    assert _strip(a) == _strip(b) and [s["__key__"] for s in a][:2] == ["a", "b"]
    assert a[0]["frame000.jpg"] == MEMBERS[1][1]
    assert [s["__ref__"][1] for s in a] == [s["__ref__"][1] for s in b]  # offsets count uncompressed bytes
    assert all(s["__ref__"][3] for s in a) and not any(s["__ref__"][3] for s in b)  # compressed: not seekable
    assert plain.skipped == packed.skipped == {}  # no false corrupt_shard at a compressed tar's end


@pytest.mark.parametrize("ext", sorted(COMPRESSORS))
def test_cut_off_or_corrupted_compressed_tars_keep_the_samples_before(tmp_path, ext):
    rng = random.Random(0)  # incompressible members: the cut falls in the middle of the samples
    members = [(f"k{i:02d}.bin", rng.randbytes(20000)) for i in range(12)]  # bz2 decodes whole blocks
    packed = COMPRESSORS[ext](_tar(tarfile.GNU_FORMAT, members, extra_dir=False))
    (tmp_path / f"cut.tar.{ext}").write_bytes(packed[: len(packed) * 6 // 10])
    middle = len(packed) // 2  # a flipped byte: bad data or a bad CRC (gzip's only at its end)
    (tmp_path / f"flipped.tar.{ext}").write_bytes(packed[:middle] + bytes([packed[middle] ^ 0xFF]) + packed[middle + 1 :])
    full = [f"k{i:02d}" for i in range(12)]
    for name in ("cut", "flipped"):
        counter = SkipCounter()
        keys = [s["__key__"] for s in tar_samples([str(tmp_path / f"{name}.tar.{ext}")], counter)]
        assert counter.skipped == {"corrupt_shard": 1}, (name, counter.bad)
        assert keys == full[: len(keys)] and (0 < len(keys) < 12 or name == "flipped"), (name, keys)


def test_garbled_sizes_end_the_archive_and_unknown_streams_are_corrupt(tmp_path):
    data = bytearray(_tar(tarfile.USTAR_FORMAT, MEMBERS[:3], extra_dir=False))
    second = 1024  # after a.txt's header and data block: a.frame000.jpg's header
    data[second + 124 : second + 136] = b"-0000000001\0"  # a negative size would read the rest of the stream
    data[second + 148 : second + 156] = b" " * 8
    data[second + 148 : second + 156] = b"%06o\0 " % sum(data[second : second + 512])
    plain = PlainTar(io.BytesIO(bytes(data)))
    assert [m.name for m in plain] == ["a.txt"] and plain.offset == second
    info = tarfile.TarInfo("c.txt")
    info.size, info.pax_headers = 3, {"size": "3x"}  # a pax size that is no number
    pax = bytes(data[:second]) + info.tobuf(tarfile.PAX_FORMAT) + b"abc".ljust(512, b"\0") + bytes(1024)
    plain = PlainTar(io.BytesIO(pax))
    assert [m.name for m in plain] == ["a.txt"] and plain.offset == second
    with pytest.raises(tarfile.ReadError):  # the same as the first header
        list(PlainTar(io.BytesIO(bytes(data[second:]))))
    (tmp_path / "neg.tar").write_bytes(bytes(data))
    (tmp_path / "junk.tar").write_bytes(b"neither a tar nor compressed" * 40)
    (tmp_path / "empty.tar").write_bytes(b"")
    for name, keys in (("neg.tar", ["a"]), ("junk.tar", []), ("empty.tar", [])):
        counter = SkipCounter()
        assert [s["__key__"] for s in tar_samples([str(tmp_path / name)], counter)] == keys
        assert counter.skipped == {"corrupt_shard": 1}, (name, counter.bad)


class _ShortReads(io.BytesIO):
    """A stream that returns at most 1000 bytes per read (as an HTTP body may)."""

    def read(self, n=-1):
        return super().read(1000 if n is None or n < 0 else min(n, 1000))


@pytest.mark.parametrize("stream", [io.BytesIO, _ShortReads])
def test_members_of_every_size_read_or_passed_over_match_tarfile(stream):
    along = READ_ALONG
    sizes = [0, 1, 511, 512, 513, along - 512, along - 1, along, along + 1, 3 * along + 7, 5]
    members = [(f"k{i:02d}.bin", (bytes(range(256)) * (n // 256 + 2))[i : i + n]) for i, n in enumerate(sizes)]
    data = _tar(tarfile.PAX_FORMAT, members, extra_dir=False) + bytes(100 << 10)  # zero blocks past the end
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        want = [(i.name, i.offset, i.size, tf.extractfile(i).read()) for i in tf]
        end = tf.offset
    for keep in (lambda i: True, lambda i: i % 2 == 0, lambda i: i % 3 == 1, lambda i: False):
        plain = PlainTar(stream(data))
        got = [(m.name, m.offset, m.size, m.read() if keep(i) else None) for i, m in enumerate(plain)]
        assert got == [(n, o, s, d if keep(i) else None) for i, (n, o, s, d) in enumerate(want)]
        assert plain.end_block == bytes(512) and plain.offset == end


def test_header_checksum_is_the_exact_byte_sum():
    block = bytearray(b"\xff" * 512)  # the largest byte sums: every run at its adler32 bound
    for value in (0xff, 0x00, 0x80):
        block[:148] = bytes([value]) * 148
        unsigned = tarfile.calc_chksums(bytes(block))[0]
        for stored, ok in ((unsigned, True), (unsigned - 1, False), (unsigned + 1, False), (unsigned - 65521, False)):
            block[148:156] = b"%06o\0 " % stored
            assert looks_plain(bytes(block)) is ok, (value, stored - unsigned)
    one = _tar(tarfile.GNU_FORMAT, MEMBERS[:2], extra_dir=False)
    second = bytearray(one)
    second[1024 + 20] ^= 1  # one bit of the second header's name: its checksum no longer agrees
    plain = PlainTar(io.BytesIO(bytes(second)))
    assert [m.name for m in plain] == ["a.txt"] and plain.offset == 1024
    assert plain.end_block == bytes(second[1024:1536])


def test_reader_end_check_sees_the_block_the_parser_stopped_at(tmp_path):
    data = _tar(tarfile.PAX_FORMAT, MEMBERS[:3], extra_dir=False)
    cases = {"padded.tar": (data + bytes(200 << 10), {}),  # long zero padding past the end: a whole tar
             "padded.tar.gz": (gzip.compress(data + bytes(200 << 10)), {}),
             "garbled.tar.gz": (gzip.compress(data[:3072] + b"garbage!" * 64 + data[3072:]), {"corrupt_shard": 1}),
             "garbled.tar": (data[:3072] + b"garbage!" * 64 + data[3072:], {"corrupt_shard": 1}),
             "cut.tar": (data[:3072 + 100], {"corrupt_shard": 1})}  # inside the third header
    for name, (body, skipped) in cases.items():
        (tmp_path / name).write_bytes(body)
        counter = SkipCounter()
        keys = [s["__key__"] for s in tar_samples([str(tmp_path / name)], counter)]
        assert counter.skipped == skipped, name
        assert keys[0] == "a", name
