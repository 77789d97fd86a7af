"""An ``s3://`` / ``gs://`` output folder for the shard writers (``shards write``,
``shards convert``, ``regions extract``).

The writer works in a local staging folder exactly as it does for a local OUT (a shard
under a temporary name, renamed when whole); each finished shard is then uploaded whole
(boto3 goes multipart above 8 MiB) and removed locally, its resume record after it, and
the summary files (``skipped.jsonl``, then ``sizes.json``) last. Objects appear in a bucket
only once their upload is complete, so a shard there is whole; a rerun pulls the resume
state back and skips the shards already in the bucket.

:meth:`Output.held` holds OUT for one writer (:class:`regionvlp.runfolder.FolderLock`)
for the command's life: a local OUT is locked itself; a bucket OUT is locked through a
lock file beside its staging folder (``REGIONVLP_CACHE/remote/<hash>.lock``), taken
before that folder is emptied and refilled, so a second writer of the same URL on this
host exits 2 naming the first instead of clearing its staging folder. A bucket has no
lock of its own: writers of one URL on two hosts are not kept apart (give each its own
prefix).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from regionvlp import remote
from regionvlp.data.matching import check_written
from regionvlp.data.output import finish_outputs, local_output, shard_urls
from regionvlp.runfolder import FolderLock

STATE_MAX_BYTES = 256 << 20  # a resume record / sizes.json pulled back from the bucket


@dataclass
class Output:
    """Where a writer writes (``local``) and, for a bucket OUT, where it goes (``url``)."""

    local: Path
    url: str | None = None

    @classmethod
    def of(cls, out: str | Path, what: str) -> "Output":
        """A local OUT as it is; a bucket OUT staged in a per-URL cache folder, with its
        resume state (every file but the shards) pulled back from the bucket."""
        if not remote.is_remote(out):
            return cls(local_output(out, what))
        url = str(out).rstrip("/")
        staged = cls(remote.cache_dir(url), url)
        staged.local.mkdir(parents=True)
        staged.pull(url, staged.local)
        return staged

    @classmethod
    @contextmanager
    def held(cls, out: str | Path, what: str) -> Iterator["Output"]:
        """:meth:`of`, with OUT locked for this process until the block ends (a second
        writer: :class:`UserError` naming the holder); see the module doc."""
        if not remote.is_remote(out):
            local = local_output(out, what)
            with FolderLock(local, f"{what} OUT"):
                yield cls(local)
            return
        staging = remote.cache_path(str(out).rstrip("/"))
        with FolderLock(staging.parent, f"{what} OUT", name=staging.name + ".lock", shown=str(out).rstrip("/")):
            yield cls.of(out, what)

    def pull(self, url: str, local: Path) -> None:
        for name, size in remote.list_files(url).items():
            if not name.endswith(".tar"):
                remote.get_file(remote.join(url, name), local / name, min(size, STATE_MAX_BYTES))
        for sub in remote.list_folders(url):
            self.pull(remote.join(url, sub), local / sub)

    def has(self, name: str) -> bool:
        """Shard ``name`` is finished: here, or (a bucket OUT) in the bucket."""
        if (self.local / name).is_file():
            return True
        return self.url is not None and remote.size_of(remote.join(self.url, name)) is not None

    def publish(self, *names: str, keep: bool = False) -> None:
        """Upload the finished files ``names`` (relative to ``local``), in this order; the
        shards are then removed locally (``keep``: small state files stay)."""
        if self.url is None:
            return
        for name in names:
            remote.put_file(self.local / name, remote.join(self.url, name))
            if not keep:
                (self.local / name).unlink()

    def finish_shards(self, stats_files: dict[str, Path], n_items: int, command: str) -> dict[str, Any]:
        """``sizes.json`` / ``skipped.jsonl`` from the shards' records (uploaded last for a
        bucket OUT; nothing written at all is an error) and the result keys they give."""
        sizes, skipped, skipped_items, total_bytes = finish_outputs(self.local, stats_files, command)
        check_written(sum(sizes.values()), n_items, skipped, command)
        self.publish("skipped.jsonl", "sizes.json", keep=True)
        return {"out": self.shown(), "samples": sum(sizes.values()), "skipped": skipped, "shards": len(stats_files),
                "urls": shard_urls(self.shown(), len(stats_files)), "bytes": total_bytes,
                "skipped_items": skipped_items[:100]}

    def shown(self) -> str:
        """OUT as the user named it (for the JSON result)."""
        return self.url or str(self.local)
