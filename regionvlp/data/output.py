"""What the shard writers (``shards write``, ``shards convert``, ``data synth``,
``regions extract``) share: where they may write, what member names they may write, the
one tar writer, and the shard folder around it (``NNNNNN.tar``, ``sizes.json``,
``skipped.jsonl``).

An output folder comes from the command line. It must be a local folder or an
``s3://`` / ``gs://`` bucket (staged locally, :mod:`regionvlp.data.staging`): a ``pipe:``
spec would run a shell command (webdataset's writers open it with ``popen``), and other
URL schemes are not written to. Keys read from other people's shards are normalised
before they name a tar member, so ``..``, absolute paths and control characters never
reach the output archive. Every tar is written by :class:`SampleTarWriter`
(``webdataset.TarWriter`` on a file opened here).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import webdataset as wds

from regionvlp.errors import UserError


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is a drive
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
MAX_KEY_CHARS = 200


def local_output(out: str | Path, what: str) -> Path:
    """``out`` as a local folder path; ``pipe:`` and URL schemes are a :class:`UserError`."""
    text = str(out)
    m = _SCHEME.match(text)
    if m and m.group(1).lower() != "file":
        raise UserError(f"{what}: output '{text[:80]}' is not a local folder or a bucket ({m.group(1)}: outputs "
                        "are not written there; pipe: would run a shell command); write to a folder, "
                        "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
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
    """Samples (``__key__`` + ext → bytes / str / JSON-able) into one local tar file: the
    one tar writer of ``shards write``, ``shards convert``, ``data synth`` and ``regions
    extract``, on ``webdataset.TarWriter``.

    The file is opened here and handed over open, never as a name: webdataset's ``gopen``
    would run a name that reads ``pipe:…`` as a shell command. Keys are made safe by
    :func:`safe_key` and distinct within the file (a repeated key gets ``_<n>``), so
    members are regular files under the output folder, never links or paths outside it.
    Member metadata is fixed (mtime 0, mode 0644, no owner), so the same samples give the
    same bytes; webdataset writes a sample's members sorted by extension."""

    def __init__(self, path: str | Path) -> None:
        self.file = open(path, "wb")
        self.tar = wds.TarWriter(self.file, encoder=encode_sample, mode=0o644, mtime=0, user="", group="")
        self.keys: set[str] = set()
        self.count = 0  # samples written
        self.bytes = 0  # member bytes written

    def write(self, sample: dict[str, Any]) -> str:
        """Write one sample; returns the key it was written under."""
        key = safe_key(sample["__key__"], self.count)
        if key in self.keys:
            key = f"{key}_{self.count:09d}"
        self.keys.add(key)
        self.count += 1
        members = {ext: value for ext, value in sample.items() if not ext.startswith("__")}
        self.bytes += self.tar.write({"__key__": key, **members})
        return key

    def close(self) -> None:
        try:
            self.tar.close()
        finally:
            self.file.close()

    def __enter__(self) -> "SampleTarWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Member values as bytes (the ``encoder`` of the tar writer): str as UTF-8, other
    non-bytes values as JSON; ``__key__`` and other ``__`` entries as they are."""
    out: dict[str, Any] = {}
    for ext, value in sample.items():
        if ext.startswith("__") or isinstance(value, (bytes, bytearray, memoryview)):
            out[ext] = value
        elif isinstance(value, str):
            out[ext] = value.encode("utf-8")
        else:
            out[ext] = json.dumps(value, default=str).encode("utf-8")
    return out


# -------------------------------------------------------------------- shard folders
class ShardSink:
    """Samples → ``NNNNNN.tar`` files of ``shard_size`` each, written under a temporary
    name and renamed when complete (never a half-written shard under a final name)."""

    def __init__(self, out_dir: Path, shard_size: int, first_shard: int = 0) -> None:
        self.out_dir, self.shard_size = out_dir, shard_size
        self.index, self.count = first_shard, 0
        self.sizes: dict[str, int] = {}
        self._tar: SampleTarWriter | None = None  # fixed member metadata: the same bytes per seed
        self._tmp: Path | None = None

    def _open(self) -> None:
        self._tmp = self.out_dir / temp_name(f"{self.index:06d}.tar")  # per process: never another writer's
        self._tar = SampleTarWriter(self._tmp)

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self.count += 1
        if self.count == self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = f"{self.index:06d}.tar"
        os.replace(self._tmp, self.out_dir / name)
        self.sizes[name] = self.count
        self.index, self.count, self._tar, self._tmp = self.index + 1, 0, None, None

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def temp_name(name: str) -> str:
    """The per-process temporary name of output file ``name`` (``NAME.PID.tmp``): two
    writers never share one, and :func:`clear_stale_temps` can tell whose it is."""
    return f"{name}.{os.getpid()}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clear_stale_temps(out: Path, pattern: str = "*.tar*.tmp") -> list[Path]:
    """Remove the leftovers of interrupted writers in ``out`` (called with OUT locked):
    a ``NAME.PID.tmp`` of a dead process (or of this pid: a reused one), and a name that
    carries no pid (older writers' ``NAME.tmp``); a live process's temp is never touched.
    Returns what was removed."""
    removed = []
    for tmp in out.glob(pattern):
        pid = tmp.name[:-len(".tmp")].rpartition(".")[2]
        if pid.isdigit() and 0 < int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_sizes(out_dir: Path, sizes: dict[str, int]) -> None:
    """``sizes.json``: shard file name → samples (what ``data.epoch_size`` sums)."""
    tmp = out_dir / temp_name("sizes.json")
    tmp.write_text(json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
    os.replace(tmp, out_dir / "sizes.json")


def shard_urls(folder: Path | str, n: int) -> str:
    """The brace pattern naming ``n`` shards ``000000.tar`` … in ``folder`` (a path or a
    bucket URL; "" for none)."""
    if n == 0:
        return ""
    return f"{str(folder).rstrip('/')}/" + ("000000.tar" if n == 1 else f"{{000000..{n - 1:06d}}}.tar")


def finish_outputs(out: Path, stats_files: dict[str, Path], command: str
                   ) -> tuple[dict[str, int], dict[str, int], list[dict[str, Any]], int]:
    """Per-shard stats → ``sizes.json`` and ``skipped.jsonl`` in ``out``, skips printed on
    stderr; returns (sizes, skip counts by reason, skipped items, bytes written)."""
    sizes: dict[str, int] = {}
    skipped: dict[str, int] = {}
    items: list[dict[str, Any]] = []
    total = 0
    for name, path in stats_files.items():
        stats = json.loads(path.read_text())
        sizes[name] = stats["samples"]
        total += stats["bytes"]
        for s in stats["skipped"]:
            skipped[s["reason"]] = skipped.get(s["reason"], 0) + 1
            items.append(s)
    write_sizes(out, sizes)
    with (out / "skipped.jsonl").open("w") as f:
        for s in items:
            f.write(json.dumps(s) + "\n")
    for s in items:
        print(f"{command}: skipped {s['key']} ({s['source']}): {s['reason']} {s['detail']}".rstrip(), file=sys.stderr)
    return sizes, skipped, items, total


def process_pool(workers: int):
    """A process pool for ``workers`` > 1 (fork on Linux: no re-import per worker), else None."""
    if workers <= 1:
        return None
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
