"""Strangers' files, round 3 (issue 25, the data side): each hostile input, generated small
(headers only, sparse files, deflate bombs), is a counted skip or a one-line error, quickly
and with bounded memory (VmHWM of a fresh subprocess, as tests/test_security.py measures)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
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


def _header_bomb(path: Path, kind: bytes, size: int) -> None:
    """A tar whose first member is a ``size``-byte GNU long-name (``L``) or pax (``x``)
    header member, then a good sample: a sparse file (the header member is a hole)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, size
    with path.open("wb") as f:
        f.write(info.tobuf(tarfile.GNU_FORMAT))
        f.seek(512 + size + (-size % 512))
        f.write(_good_tail())


_READ_ALL = """
import json, os, resource, sys, time
from regionvlp.data.reader import ReadOptions, tar_samples
from regionvlp.data.skips import SkipCounter
out = {}
for path in sys.argv[1:]:
    counter, t0 = SkipCounter(), time.monotonic()
    keys = [s['__key__'] for s in tar_samples([path], counter, ReadOptions(max_sample_bytes=1 << 20))]
    out[os.path.basename(path)] = {'keys': keys, 'skipped': counter.skipped, 's': time.monotonic() - t0}
hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))
print(json.dumps({'cases': out, 'peak_kib': int(hwm.split()[1])}))
"""


def _measured(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
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
    for name in ("long_name.tar", "pax_header.tar"):  # refused at the header, never read whole
        assert out[name]["keys"] == [] and out[name]["skipped"] == {"corrupt_shard": 1}, out[name]
    # a pax size that is a lie (2 MiB declared, 1.6 KB there): the shard ends broken, not in a loop
    assert out["pax_size_then_good.tar"]["skipped"] == {"oversize": 1, "corrupt_shard": 1}
    assert out["oversize_then_good.tar"] == {**out["oversize_then_good.tar"], "keys": ["good/a"],
                                             "skipped": {"oversize": 1}}
    assert out["plain.tar"]["keys"] == ["good/b", "good/a"]
