"""Strangers' files, round 3 (issue 25, the data side): each hostile input, generated small
(headers only, sparse files, deflate bombs), is a counted skip or a one-line error, quickly
and with bounded memory (VmHWM of a fresh subprocess, as tests/test_security.py measures)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

PEAK_BYTES = 3 << 29  # 1.5 GiB
GOOD = [("good/a.txt", b"a good caption"), ("good/a.json", b"{}")]


def _member(name: str, data: bytes, fmt: int = tarfile.USTAR_FORMAT, pax: dict | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = pax or {}
    return info.tobuf(fmt, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def _good_tail() -> bytes:
    return b"".join(_member(n, d) for n, d in GOOD) + b"\0" * 1024


def _pax_bomb() -> bytes:
    """A pax header declaring a 10^15-byte member with no data behind it (11.5 KB)."""
    return _member("bomb/a.mp4", b"", tarfile.PAX_FORMAT, {"size": str(10**15)})[:1536] + b"\0" * 10240


def _base256_bomb() -> bytes:
    """A GNU header whose base-256 size field says 10^13 bytes; the data is not there."""
    block = bytearray(_member("bomb/a.mp4", b"", tarfile.GNU_FORMAT))
    block[124:136] = b"\x80" + (10**13).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    return bytes(block[:512])


def _header_bomb(path: Path, kind: bytes, size: int, opener=open) -> None:
    """A tar whose first member is a ``size``-byte GNU long-name (``L``) or pax (``x``)
    header member describing ``bomb/a.mp4``, then a good sample: a sparse file (the header
    member is a hole), or zeros through ``opener`` (``gzip.open``: 64 MiB make ~64 KB)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, size
    with opener(path, "wb") as f:
        f.write(info.tobuf(tarfile.GNU_FORMAT))
        if opener is open:
            f.seek(512 + size + (-size % 512))
        else:
            for _ in range(size >> 20):
                f.write(bytes(1 << 20))
            f.write(bytes(size % (1 << 20) + (-size % 512)))
        f.write(_member("bomb/a.mp4", b"x" * 100) + _good_tail())


_READ_ALL = """
import json, os, resource, sys, time, tracemalloc
from regionvlp.data.reader import ReadOptions, tar_samples
from regionvlp.data.skips import SkipCounter
out = {}
tracemalloc.start()
for path in sys.argv[1:]:
    counter, t0 = SkipCounter(), time.monotonic()
    tracemalloc.reset_peak()
    keys = [s['__key__'] for s in tar_samples([path], counter, ReadOptions(max_sample_bytes=1 << 20))]
    out[os.path.basename(path)] = {'keys': keys, 'skipped': counter.skipped, 's': time.monotonic() - t0,
                                   'traced_peak': tracemalloc.get_traced_memory()[1]}
hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))
print(json.dumps({'cases': out, 'peak_kib': int(hwm.split()[1])}))
"""


def _measured(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = {**lines[-1], "printed": lines[:-1]}  # the measurement, and what the code printed before it
    assert out["peak_kib"] * 1024 < PEAK_BYTES, out
    return out


def test_declared_sizes_and_header_members_are_bounded(tmp_path: Path) -> None:
    cases = {
        "pax_size.tar": _pax_bomb(),  # issue 25 case 1: looped at EOF for days
        "base256.tar": _base256_bomb(),
        "pax_size_then_good.tar": _member("bomb/a.mp4", b"x" * 600, tarfile.PAX_FORMAT,
                                          {"size": str(2 << 20)})[:1536] + b"x" * 1024 + _good_tail(),
        "oversize_then_good.tar": _member("big/a.mp4", b"\0" * (2 << 20)) + _good_tail(),
        "plain.tar": _member("good/b.txt", b"kept") + _good_tail(),
        # a 700 KB long name is read (under 1 MiB) and counts: with 400 KB of data the sample is over 1 MiB
        "long_name_counts.tar": _member("n" * 700_000 + ".mp4", b"x" * 400_000, tarfile.GNU_FORMAT) + _good_tail(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert max(len(d) for d in cases.values()) < 5 << 20
    _header_bomb(tmp_path / "long_name.tar", tarfile.GNUTYPE_LONGNAME, 256 << 20)  # case 4 (1 GiB: 2.6 GB peak)
    _header_bomb(tmp_path / "pax_header.tar", tarfile.XHDTYPE, 256 << 20)
    cases.update({"long_name.tar": b"", "pax_header.tar": b""})
    out = _measured(_READ_ALL, *(str(tmp_path / n) for n in cases))["cases"]
    assert all(c["s"] < 10 for c in out.values()), out
    for name in ("pax_size.tar", "base256.tar"):  # oversize by header, then cut off where the data should be
        assert out[name]["keys"] == [] and out[name]["skipped"] == {"oversize": 1, "corrupt_shard": 1}, out[name]
    for name in ("long_name.tar", "pax_header.tar", "long_name_counts.tar"):  # the sample they describe only
        assert out[name]["keys"] == ["good/a"] and out[name]["skipped"] == {"oversize": 1}, out[name]
        assert out[name]["traced_peak"] < 8 << 20, out[name]  # never read whole
    # a pax size that is a lie (2 MiB declared, 1.6 KB there): the shard ends broken, not in a loop
    assert out["pax_size_then_good.tar"]["skipped"] == {"oversize": 1, "corrupt_shard": 1}
    assert out["oversize_then_good.tar"] == {**out["oversize_then_good.tar"], "keys": ["good/a"],
                                             "skipped": {"oversize": 1}}
    assert out["plain.tar"]["keys"] == ["good/b", "good/a"]


def test_compressed_tars_are_bounded_by_their_headers_too(tmp_path: Path) -> None:
    """The same bombs gzip'ed / bz2'ed (issue 25 cases 1 and 4 as .tar.gz): read through the
    same parser behind a streaming decompressor, never through tarfile's stream mode."""
    cases = {"pax_size.tar.gz": gzip.compress(_pax_bomb()), "base256.tar.gz": gzip.compress(_base256_bomb()),
             "plain.tar.xz": lzma.compress(_member("good/b.txt", b"kept") + _good_tail())}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    _header_bomb(tmp_path / "long_name.tar.gz", tarfile.GNUTYPE_LONGNAME, 64 << 20, gzip.open)
    _header_bomb(tmp_path / "pax_header.tar.bz2", tarfile.XHDTYPE, 64 << 20, bz2.open)
    names = [*cases, "long_name.tar.gz", "pax_header.tar.bz2"]
    assert all((tmp_path / n).stat().st_size < 1 << 20 for n in names)
    out = _measured(_READ_ALL, *(str(tmp_path / n) for n in names))["cases"]
    assert all(c["s"] < 10 for c in out.values()), out
    for name in ("pax_size.tar.gz", "base256.tar.gz"):  # looped for days in tarfile's r|*
        assert out[name]["keys"] == [] and out[name]["skipped"] == {"oversize": 1, "corrupt_shard": 1}, out[name]
    for name in ("long_name.tar.gz", "pax_header.tar.bz2"):  # 64 MiB header members passed over in 64 KiB reads
        assert out[name]["keys"] == ["good/a"] and out[name]["skipped"] == {"oversize": 1}, out[name]
        assert out[name]["traced_peak"] < 8 << 20, out[name]
    assert out["plain.tar.xz"]["keys"] == ["good/b", "good/a"] and out["plain.tar.xz"]["skipped"] == {}


# ------------------------------------------------------------------ regions.npz
def _npy_bomb(name: str, shape: tuple, dtype: str, fill_bytes: int | None = None) -> tuple[str, tuple]:
    """(member name, deflated .npy bytes): a header declaring ``shape`` and ``fill_bytes``
    zero bytes of data (default: what the header declares), compressed as it streams."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": shape})
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize if fill_bytes is None else fill_bytes
    comp = zlib.compressobj(1, zlib.DEFLATED, -15)
    parts, chunk = [comp.compress(header.getvalue())], b"\0" * (1 << 22)
    crc = zlib.crc32(header.getvalue())
    for piece in [chunk] * (n // len(chunk)) + [b"\0" * (n % len(chunk))]:
        parts.append(comp.compress(piece))
        crc = zlib.crc32(piece, crc)
    return name, (b"".join(parts) + comp.flush(), len(header.getvalue()) + n, crc)


def _zip(members: list[tuple[str, tuple]]) -> bytes:
    """A zip of already-deflated members (name, (deflated, size, crc))."""
    import struct

    out, central = io.BytesIO(), []
    for name, (comp, size, crc) in members:
        fname, off = f"{name}.npy".encode(), out.tell()
        out.write(struct.pack("<4s5H3L2H", b"PK\3\4", 20, 0, 8, 0, 0, crc, len(comp), size, len(fname), 0) + fname)
        out.write(comp)
        central.append(struct.pack("<4s6H3L5H2L", b"PK\1\2", 20, 20, 0, 8, 0, 0, crc, len(comp), size, len(fname),
                                   0, 0, 0, 0, 0, off) + fname)
    cd = out.tell()
    for c in central:
        out.write(c)
    out.write(struct.pack("<4s4H2LH", b"PK\5\6", 0, 0, len(central), len(central), out.tell() - cd, cd, 0))
    return out.getvalue()


_DECODE = """
import json, sys, time
from regionvlp.data.decode import DecodeError
from regionvlp.data.regions import decode_regions
out = {}
for path in sys.argv[1:]:
    t0 = time.monotonic()
    try:
        r = decode_regions(open(path, 'rb').read())
        res = 'ok ' + str(list(r['region_feats'].shape))
    except DecodeError as err:
        res = err.reason + ': ' + err.detail
    out[path.rsplit('/', 1)[1]] = {'result': res, 's': time.monotonic() - t0}
hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))
print(json.dumps({'cases': out, 'peak_kib': int(hwm.split()[1])}))
"""


def test_regions_npz_bombs_bounded(tmp_path: Path) -> None:
    """Issue 25 case 2: an npz's arrays may not declare more bytes than the member holds
    (no inflating), and a member is decompressed only up to what its header declares."""
    t, k = 4096, 32
    small = [_npy_bomb("boxes", (t, k, 4), "<f4"), _npy_bomb("mask", (t, k), "|b1")]
    cases = {
        # 256 MiB of fp16 features deflated to ~1 MB (it took 1.3 GB and was accepted)
        "quarter_gib.npz": _zip([_npy_bomb("feats", (t, k, 1024), "<f2")] + small),
        # the header declares 4 GiB: refused before decompressing
        "declared_4gib.npz": _zip([_npy_bomb("feats", (t, k, 16384), "<f2", fill_bytes=1 << 20)] + small),
        # the header declares 8 KB, the deflate stream holds 64 MiB: stops at the declared size
        "lying_header.npz": _zip([_npy_bomb("feats", (1, 4, 1024), "<f2", fill_bytes=64 << 20)]
                                 + [_npy_bomb("boxes", (1, 4, 4), "<f4"), _npy_bomb("mask", (1, 4), "|b1")]),
    }
    for name, data in cases.items():
        assert len(data) < 2 << 20, (name, len(data))
        (tmp_path / name).write_bytes(data)
    out = _measured(_DECODE, *(str(tmp_path / n) for n in cases))["cases"]
    assert all(c["s"] < 10 for c in out.values()), out
    for name in ("quarter_gib.npz", "declared_4gib.npz"):
        assert out[name]["result"].startswith("corrupt_regions: regions.npz arrays declare"), out[name]
    assert out["lying_header.npz"]["result"].startswith("corrupt_regions: regions.npz 'feats' holds more data"), out


def _regions(feats: np.ndarray) -> bytes:
    buf = io.BytesIO()
    t, k, _ = feats.shape
    np.savez(buf, feats=feats, boxes=np.zeros((t, k, 4), np.float32), mask=np.ones((t, k), bool))
    return buf.getvalue()


def test_regions_npz_nonfinite_and_pickles_are_skips() -> None:
    from regionvlp.data.decode import DecodeError
    from regionvlp.data.regions import decode_regions

    feats = np.zeros((2, 3, 8), np.float16)
    assert decode_regions(_regions(feats))["region_feats"].shape == (2, 3, 8)
    for bad in (np.nan, np.inf, -np.inf):
        feats[1, 2, 5] = bad
        with pytest.raises(DecodeError, match="nonfinite_regions"):
            decode_regions(_regions(feats))
    buf = io.BytesIO()
    np.savez(buf, feats=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DecodeError, match="corrupt_regions.*objects"):
        decode_regions(buf.getvalue())


# ------------------------------------------------------------- unbounded reads
_ENDLESS = """
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

class Endless(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        chunk = b"0" * (1 << 20)
        try:
            while True:
                self.wfile.write(chunk)
        except OSError:
            pass

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
base = f"http://127.0.0.1:{server.server_port}"
from regionvlp.data.sources import load_sizes, read_sizes
from regionvlp.data.writer import write_shards
t0 = time.monotonic()
sizes = [load_sizes(base + "/shards/sizes.json"), read_sizes([base + "/shards/000000.tar"])]
t_sizes = time.monotonic() - t0
tmp, good = Path(sys.argv[1]), sys.argv[2]
(tmp / "rows.csv").write_text(f"video,caption\\n/dev/zero,zeros\\n{base}/endless.mp4,endless\\n{good},a good clip\\n")
t0 = time.monotonic()
out = write_shards(tmp / "rows.csv", tmp / "out", progress=False)
t_write = time.monotonic() - t0
hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))
print(json.dumps({"sizes": sizes, "t_sizes": t_sizes, "t_write": t_write, "samples": out["samples"],
                  "skipped": out["skipped"], "peak_kib": int(hwm.split()[1])}))
"""


def test_endless_sizes_json_dev_zero_and_endless_video_are_bounded(tmp_path: Path) -> None:
    """Issue 25 case 3: an endless sizes.json over HTTP is ignored, a manifest row naming
    /dev/zero or an endless HTTP video is skipped as oversize; memory and time bounded."""
    sys.path.insert(0, str(Path(__file__).parent))
    from data_shards import encode_clip

    good = tmp_path / "good.mp4"
    good.write_bytes(encode_clip(8, 32, 24))
    out = _measured(_ENDLESS, str(tmp_path), str(good))
    assert out["sizes"] == [None, None] and out["t_sizes"] < 10, out
    assert out["samples"] == 1 and out["skipped"] == {"oversize": 2} and out["t_write"] < 10, out


def test_sizes_json_non_numbers_are_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    """Issue 25 case 12 (sizes.json part): non-numbers never reach int(), no traceback."""
    from regionvlp.data.check import check_shards
    from regionvlp.data.sources import load_sizes, read_sizes

    sys.path.insert(0, str(Path(__file__).parent))
    from data_shards import write_tar

    write_tar(tmp_path / "a.tar", [{"__key__": "k0", "txt": "x", "jpg": b"\xff\xd8"}])
    write_tar(tmp_path / "b.tar", [])
    for text in ('{"a.tar": "abc", "b.tar": 0}', '{"a.tar": 1e999, "b.tar": 0}', '{"a.tar": [1], "b.tar": true}',
                 '[1, 2]', '{"a.tar": 1.5', "\xff\xfe"):
        (tmp_path / "sizes.json").write_bytes(text.encode("latin-1"))
        caplog.clear()
        assert read_sizes([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]) is None
        assert "sizes.json" in caplog.text, text
        out = check_shards([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
                           overrides=["data.num_frames=2", "data.size=32"], progress=False)
        assert out["sizes_json"]["ok"] is False or out["sizes_json"]["missing"], (text, out["sizes_json"])
    (tmp_path / "sizes.json").write_text('{"a.tar": 1, "b.tar": 0}')
    assert load_sizes(str(tmp_path / "sizes.json")) == {"a.tar": 1, "b.tar": 0}
    assert read_sizes([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]) == 1


# ------------------------------------------------------------------ JPEG / PNG
def _jpeg(w: int, h: int, progressive: bool = False) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 30)).save(buf, format="JPEG", progressive=progressive, quality=80)
    return buf.getvalue()


def _with_dims(jpeg: bytes, w: int, h: int) -> bytes:
    """``jpeg`` with its SOF header claiming ``w`` x ``h`` (the data stays small)."""
    sof = max(jpeg.find(m) for m in (b"\xff\xc0", b"\xff\xc2"))
    out = bytearray(jpeg)
    out[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(out)


def _many_scans(jpeg: bytes, n: int) -> bytes:
    """A progressive ``jpeg`` with its last scan repeated until it has ``n`` scans."""
    last = jpeg.rfind(b"\xff\xda")
    scan = jpeg[last:-2]
    return jpeg[:-2] + scan * (n - jpeg.count(b"\xff\xda")) + b"\xff\xd9"


def test_progressive_and_many_scan_jpegs_obey_the_pixel_bound(tmp_path: Path) -> None:
    """Issue 25 case 10, header only: a 13000² progressive frame (PIL's draft cannot shrink
    its coefficient buffer) is oversize under the default bound and any smaller one; a
    baseline one is bounded by the pixels its reduced decode makes; 1000 scans is oversize."""
    from regionvlp.data.decode import DecodeError, decode_image, open_jpeg
    from regionvlp.data.jpeg_batch import pick_jpegs

    huge_prog = _with_dims(_jpeg(64, 48, progressive=True), 13000, 13000)
    small_prog, small_base = _jpeg(40, 30, progressive=True), _jpeg(40, 30)
    for fn in (lambda d, p: open_jpeg(d, 32, p), lambda d, p: decode_image(d, p),
               lambda d, p: pick_jpegs([d], 2, training=False, max_pixels=p)):
        with pytest.raises(DecodeError, match="oversize.*progressive"):
            fn(huge_prog, 4096 * 4096)
        with pytest.raises(DecodeError, match="oversize.*data.max_image_pixels=1000"):
            fn(small_prog, 1000)  # 1200 pixels
        fn(small_prog, 4096 * 4096)
        fn(small_base, 4096 * 4096)
        with pytest.raises(DecodeError, match="oversize.*scans"):
            fn(_many_scans(small_prog, 1000), 4096 * 4096)
    big_base = _jpeg(4200, 4200)
    assert open_jpeg(big_base, 32).size[0] <= 4200 // 8 + 1  # baseline: decoded at 1/8 scale, 525² pixels
    with pytest.raises(DecodeError, match="oversize"):
        open_jpeg(big_base, 32, 1000)  # the bound applies to the reduced decode too
    with pytest.raises(DecodeError, match="oversize"):
        open_jpeg(big_base, None)  # no reduced decode asked for: full size


def test_hostile_frames_in_a_frame_shard_are_counted_oversize(tmp_path: Path) -> None:
    """The same frames through the stream (``data inspect``): counted skips, bounded memory."""
    prog = _jpeg(64, 48, progressive=True)
    members = [("huge/a.frame000.jpg", _with_dims(prog, 13000, 13000)), ("huge/a.txt", b"huge"),
               ("scans/b.frame000.jpg", _many_scans(prog, 1000)), ("scans/b.txt", b"scans"),
               ("good/c.frame000.jpg", prog), ("good/c.txt", b"good")]
    shard = tmp_path / "frames.tar"
    shard.write_bytes(b"".join(_member(n, d) for n, d in members) + b"\0" * 1024)
    code = ("import json, sys, time\nfrom regionvlp.cli import main\nt0 = time.monotonic()\n"
            "rc = main(['data', 'inspect', sys.argv[1], '--frames', '2', '--size', '32', '--limit', '0'])\n"
            "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
            "print(json.dumps({'rc': rc, 's': time.monotonic() - t0, 'peak_kib': int(hwm.split()[1])}))\n")
    measured = _measured(code, str(shard))
    summary = measured["printed"][-1]
    assert summary["samples"] == 1 and summary["skipped"] == {"oversize": 2}, summary
    assert measured["rc"] == 0 and measured["s"] < 10, measured
