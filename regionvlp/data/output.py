"""Where shard writers may write, and what member names they may write.

``regions extract`` and ``shards write`` take an output folder from the command line.
It must be a local folder: a ``pipe:`` spec would run a shell command (webdataset's
writers open it with ``popen``), and other URL schemes are not written to. Keys read
from other people's shards are normalised before they name a tar member, so ``..``,
absolute paths and control characters never reach the output archive.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Optional

from regionvlp.errors import UserError


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is a drive
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
MAX_KEY_CHARS = 200


def local_output(out: str | Path, what: str) -> Path:
    """``out`` as a local folder path; ``pipe:`` and URL schemes are a :class:`UserError`."""
    text = str(out)
    m = _SCHEME.match(text)
    if m and m.group(1).lower() != "file":
        raise UserError(f"{what}: output '{text[:80]}' is not a local folder ({m.group(1)}: outputs are not "
                        "written; pipe: would run a shell command); write to a local folder, then upload it")
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not text.strip():
        raise UserError(f"{what}: give an output folder")
    return Path(text)


def safe_key(key: str, index: int) -> str:
    """A tar member stem from an untrusted sample key: path parts other than ``.``/``..``
    and empty ones, characters outside ``[A-Za-z0-9_-]`` replaced by ``_``, at most
    :data:`MAX_KEY_CHARS`; ``sample{index}`` when nothing is left."""
    parts = [p for p in str(key).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    cleaned = _UNSAFE.sub("_", "/".join(parts)).strip("/")
    cleaned = "/".join(p for p in cleaned.split("/") if p.strip("_") not in ("", ".", ".."))
    return cleaned[-MAX_KEY_CHARS:].lstrip("/") or f"sample{index:09d}"


def cut_text(text: str, limit: Optional[int]) -> tuple[str, bool]:
    """``text`` cut to ``limit`` characters, and whether it was cut."""
    if limit is None or len(text) <= limit:
        return text, False
    return text[:limit], True


def cut_captions(items: Iterable[Any], limit: Optional[int]) -> int:
    """Cut every ``item.captions`` entry to ``limit`` characters in place; returns how many were cut."""
    count = 0
    for item in items:
        cut = [cut_text(c, limit) for c in item.captions]
        count += sum(was for _, was in cut)
        item.captions = list(dict.fromkeys(c for c, _ in cut))
    return count


class SampleTarWriter:
    """Samples (``__key__`` + ext → bytes / str / JSON-able) into one local tar file, with
    keys made safe by :func:`safe_key` and distinct within the file."""

    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "w", format=tarfile.GNU_FORMAT)
        self.keys: set[str] = set()
        self.count = 0

    def write(self, sample: dict[str, Any]) -> str:
        key = safe_key(sample["__key__"], self.count)
        if key in self.keys:
            key = f"{key}_{self.count:09d}"
        self.keys.add(key)
        self.count += 1
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            if isinstance(value, str):
                value = value.encode("utf-8")
            elif not isinstance(value, (bytes, bytearray)):
                value = json.dumps(value, default=str).encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(value), 0, 0o644
            self.tar.addfile(info, io.BytesIO(bytes(value)))
        return key

    def close(self) -> None:
        self.tar.close()

    def __enter__(self) -> "SampleTarWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
