"""Byte budgets for every read of a received file, pipe or URL: one bounded reader.

A file named by a manifest row, a ``sizes.json`` over HTTP, an annotation or vocab file
may be endless (``/dev/zero``, a server that never stops) or merely huge; each is read
here with a budget and refused as soon as it holds more (:class:`ReadLimitError`), never
read whole first. Paths that are not regular files (devices, FIFOs) are refused before
they are opened.
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path
from typing import IO, Iterator

from regionvlp.errors import UserError

SIZES_JSON_BYTES = 64 << 20  # sizes.json: a name and a count per shard
ANNOTATION_BYTES = 256 << 20  # QA json/jsonl, manifests, caption sidecars
VOCAB_BYTES = 64 << 20  # an answer vocabulary
MEDIA_BYTES = 512 << 20  # one source video read by `shards write` (as data.max_sample_bytes)
DATASET_JSON_BYTES = 1 << 30  # a dataset's JSON annotation file, parsed whole (MSR-VTT's: ~60 MB)
DATASET_TEXT_BYTES = 8 << 30  # a dataset's CSV/TSV/TXT annotation file, streamed line by line (WebVid-10M: ~2.5 GB)
LINE_BYTES = 16 << 20  # one line of a streamed annotation file (as csv.field_size_limit)
_CHUNK = 1 << 20


class ReadLimitError(UserError):
    """A file, pipe or URL that holds more than its byte budget (or is not a regular file)."""


def read_limited(f: IO[bytes], limit: int, what: str) -> bytes:
    """All of ``f``, refused with :class:`ReadLimitError` once it passes ``limit`` bytes
    (at most ``limit`` + one chunk is ever held)."""
    chunks, got = [], 0  # a list, not a growing buffer: no copy on the way to the budget
    while True:
        chunk = f.read(min(_CHUNK, limit + 1 - got))
        if not chunk:
            return b"".join(chunks)
        got += len(chunk)
        if got > limit:
            del chunks
            raise ReadLimitError(f"{what} holds more than {limit} bytes: refused (not read further)")
        chunks.append(chunk)


def open_bounded(path: str | os.PathLike, limit: int, what: str = "") -> IO[bytes]:
    """``path`` opened for reading (binary) once it is proven a regular file of at most
    ``limit`` bytes (else :class:`ReadLimitError`, before it is opened: a FIFO never
    blocks); a missing file raises ``FileNotFoundError`` as ``open`` does."""
    what = what or str(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ReadLimitError(f"{what}: {path} is not a regular file (a device, FIFO or folder): refused")
    if st.st_size > limit:
        raise ReadLimitError(f"{what}: {path} is {st.st_size} bytes, more than {limit}: refused (not read)")
    return open(path, "rb")


def read_file(path: str | os.PathLike, limit: int, what: str = "") -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (see
    :func:`open_bounded`; a file that grows past it while read is refused too)."""
    what = what or str(path)
    with open_bounded(path, limit, what) as f:
        return read_limited(f, limit, f"{what}: {path}")


def read_text(path: str | os.PathLike, limit: int, what: str = "", encoding: str = "utf-8",
              errors: str = "strict") -> str:
    """:func:`read_file` decoded (``UnicodeDecodeError`` as ``Path.read_text`` raises it)."""
    return read_file(Path(path), limit, what).decode(encoding, errors)


def iter_lines(path: str | os.PathLike, limit: int, what: str = "", line_limit: int = LINE_BYTES,
               encoding: str = "utf-8-sig", errors: str = "replace") -> Iterator[str]:
    """The lines of the regular file ``path`` decoded, line endings kept (what ``csv``
    reads), streamed: one line is held at a time. Refused (:class:`ReadLimitError`) before
    opening when the file is over ``limit`` bytes, and while reading once it has passed
    ``limit`` or a line passes ``line_limit`` (``/dev/zero`` behind a regular-looking name
    never becomes one endless line)."""
    what = what or str(path)
    decoder = codecs.getincrementaldecoder(encoding)(errors)  # a BOM dropped once, at the start
    got = 0
    with open_bounded(path, limit, what) as f:
        while True:
            line = f.readline(line_limit + 1)
            if not line:
                tail = decoder.decode(b"", final=True)
                if tail:
                    yield tail
                return
            got += len(line)
            if got > limit:
                raise ReadLimitError(f"{what}: {path} holds more than {limit} bytes: refused (not read further)")
            if len(line) > line_limit:
                raise ReadLimitError(f"{what}: {path} has a line longer than {line_limit} bytes: refused")
            yield decoder.decode(line)
