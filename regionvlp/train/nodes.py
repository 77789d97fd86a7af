"""Checkpoints when the ranks do not share a disk: one tag for every rank, and
``run.remote_dir``.

Each node writes its own ranks' files of a tag into its own ``run.out_dir`` (DeepSpeed's
model states on global rank 0, each rank's RNG / loader position / ZeRO shards where that
rank runs). So that a tag means the same on every node:

- **Folders.** Each ``checkpoints/`` folder carries a random id (``.folder_id``); the ranks
  gather them once, and the lowest rank of each folder is its *leader*. One node, or
  several on a shared disk: one folder, one leader (rank 0).
- **Save.** After DeepSpeed wrote, each leader lists its folder's files (size, SHA-256);
  the listings are gathered and every leader writes the *union* as the tag's
  ``manifest.json`` (and records it in its ``run_manifest.json``). With a remote dir each
  leader uploads its own files, then, when every upload succeeded, rank 0 uploads the
  manifest and after it the remote ``run_manifest.json``: a tag whose upload was cut
  short is never listed there, so it is never resumed from. ``keep_last`` prunes the
  remote too (its manifest first).
- **Resume.** Rank 0 picks the tag (``auto``: the newest complete one, local or remote)
  and broadcasts it with its manifest's SHA-256; each leader checks that its folder
  holds that very manifest and every file it lists, fetching what is missing from the
  remote dir; every problem of every rank is gathered and raised on every rank as one
  :class:`UserError` (no rank waits on another that gave up).

Nothing downloaded is unpickled before the manifest check
(:func:`regionvlp.checkpoint.check_manifest`, :mod:`regionvlp.train.manifest`) passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regionvlp import dist, remote
from regionvlp.remote_run import DONE, RemoteTags
from regionvlp.checkpoint import MANIFEST, check_manifest, file_listing, list_tags, resolve_resume, write_manifest
from regionvlp.errors import UserError
from regionvlp.runtime import file_sha256
from regionvlp.train import manifest

log = logging.getLogger("regionvlp.train")
FOLDER_ID = ".folder_id"


def folder_id(ckpt_dir: Path) -> str:
    """The random id of checkpoints folder ``ckpt_dir`` (created once, atomically: the
    first rank to link its file wins)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / FOLDER_ID
    if not path.is_file():
        tmp = ckpt_dir / f".{FOLDER_ID}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(uuid.uuid4().hex)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


@dataclass
class Folders:
    """Which ranks share a checkpoints folder (``ids[r]``: rank r's folder id)."""

    ids: list[str]
    rank: int

    @property
    def leader(self) -> bool:
        """The lowest rank of this rank's folder: it writes and uploads the folder's manifest."""
        return self.ids.index(self.ids[self.rank]) == self.rank

    @classmethod
    def gather(cls, ckpt_dir: Path) -> "Folders":
        ids = dist.gather_objects(folder_id(ckpt_dir))
        return cls(ids, dist.rank() if dist.gather_active() else 0)


def merge_listings(parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The union of the leaders' listings of one tag; one name with two contents is an error."""
    files: dict[str, Any] = {}
    for part in parts:
        for name, info in (part or {}).items():
            if name in files and files[name] != info:
                raise UserError(f"checkpoint file {name} differs between two nodes' folders; "
                                "two runs share one run.out_dir?")
            files[name] = info
    return files


def problem_of(fn: Any, *args: Any) -> str | None:
    """``fn(*args)``'s :class:`UserError` (or OS error) as text, None when it passed."""
    try:
        fn(*args)
    except (UserError, OSError) as err:
        return f"rank {dist.rank()}: {err}"
    return None


def agreed(problem: str | None) -> None:
    """Every rank's problem (one collective); raised on every rank when there is one."""
    problems = [p for p in dist.gather_objects(problem) if p]
    if problems:
        raise UserError("; ".join(dict.fromkeys(problems)))


# ------------------------------------------------------------------ one run's tags
class TagSync:
    """The node-aware half of :class:`regionvlp.train.engine.Checkpointer`."""

    def __init__(self, ckpt_dir: Path, keep_last: int, remote_dir: str = "none") -> None:
        remote.check_url(remote_dir, "run.remote_dir")  # every rank, before any collective
        self.dir = ckpt_dir
        self.keep_last = keep_last
        self.remote = RemoteTags(str(remote_dir)) if remote.is_set(remote_dir) else None
        self.remote_run = str(remote_dir) if self.remote else None
        self._folders: Folders | None = None

    @property
    def folders(self) -> Folders:
        """Gathered on first use (a collective: every rank gets here together)."""
        if self._folders is None:
            self._folders = Folders.gather(self.dir)
        return self._folders

    # ---------------------------------------------------------------- save
    def finish(self, tag: str, step: int) -> None:
        """After every rank wrote its files of ``tag``: the union manifest in every folder,
        the register, the done marker, local keep_last; then the upload."""
        lead = self.folders.leader
        mine = file_listing(self.dir / tag) if lead else None
        files = merge_listings(dist.gather_objects(mine))
        keep = dist.broadcast_object(([t for t in list_tags(self.dir) if t != tag] + [tag])[-self.keep_last:])
        if lead:
            write_manifest(self.dir / tag, files)  # every node's files, their SHA-256
            manifest.record(self.dir, tag, keep)  # and that this run wrote it; before the done marker
            (self.dir / tag / DONE).write_text(str(step))
            for stale in list_tags(self.dir):
                if stale not in keep:
                    shutil.rmtree(self.dir / stale, ignore_errors=True)
        if self.remote is not None:
            self.push(tag, sorted(mine or {}), keep)

    def push(self, tag: str, names: list[str], keep: list[str]) -> None:
        """Each leader uploads its own files; rank 0 then the manifest, prunes, and the
        run's logs. A failed upload is a warning (the local checkpoint stands)."""
        assert self.remote is not None
        problem = problem_of(self.remote.upload, self.dir / tag, names) if self.folders.leader else None
        problems = [p for p in dist.gather_objects(problem) if p]
        if dist.rank() == 0:
            if not problems:
                problems = [p for p in [problem_of(self.publish, tag, keep)] if p]
            if problems:
                log.warning("run.remote_dir: %s not uploaded (%s); the local checkpoint stands", tag,
                            "; ".join(problems))
        dist.barrier()

    def publish(self, tag: str, keep: list[str]) -> None:
        assert self.remote is not None and self.remote_run is not None
        self.remote.publish(self.dir / tag, manifest.read(self.dir)["tags"])
        self.remote.prune(keep)
        push_run_files(self.dir.parent, self.remote_run)

    def forget(self, tags: list[str]) -> None:
        """Rank 0: ``tags`` leave the remote run manifest (set aside after non-finite steps)."""
        if self.remote is None or dist.rank() != 0 or not tags:
            return
        problem = problem_of(lambda: self.remote.publish_register(
            {t: d for t, d in self.remote.register().items() if t not in tags}))
        if problem:
            log.warning("run.remote_dir: could not set aside %s (%s)", ", ".join(tags), problem)

    # ---------------------------------------------------------------- resume
    def choose(self, resume: str) -> tuple[str, str] | None:
        """Rank 0: ``(tag, manifest SHA-256)`` to resume from, or None for a fresh run."""
        if resume in ("", "none"):
            if self.remote is not None and self.remote.register():
                raise UserError(f"run.remote_dir {self.remote.url} already holds checkpoints of another run; "
                                "continue it with train.resume=auto, or pick a new run.remote_dir")
            return None
        where = resolve_resume(resume, self.dir)
        local = None if where is None else (where[1], digest_of(Path(where[0]) / where[1]))
        if resume != "auto" or self.remote is None:
            return local
        newest = self.remote.newest()
        if newest is not None and (local is None or newest[0] > local[0]):
            return newest
        return local

    def agree(self, resume: str) -> tuple[Path, str] | None:
        """The tag every rank resumes from (None: a fresh run), checked on every folder."""
        choice, problem = None, None
        if dist.rank() == 0:
            try:
                choice = self.choose(resume)
            except UserError as err:
                problem = str(err)
        choice, problem = dist.broadcast_object((choice, problem))
        if problem:
            raise UserError(problem)
        agreed(problem_of(self.prepare, choice) if self.folders.leader else None)
        return None if choice is None else (self.dir, choice[0])

    def prepare(self, choice: tuple[str, str] | None) -> None:
        """This folder holds ``choice``'s files (fetched from the remote dir when missing),
        unchanged and listed by this run; or, for a fresh run, no checkpoints at all."""
        if choice is None:
            if list_tags(self.dir):
                raise UserError(f"{self.dir} already holds checkpoints of another run; continue it with "
                                "train.resume=auto, or pick a new run.out_dir")
            return
        tag, digest = choice
        tag_dir = self.dir / tag
        if digest_of(tag_dir) != digest or missing_files(tag_dir):
            if self.remote is None:
                raise UserError(
                    f"rank 0 resumes from {tag}, but {tag_dir} does not hold it "
                    f"({', '.join(missing_files(tag_dir)[:4]) or 'another or no manifest'}): the nodes do not share "
                    "a disk; set run.remote_dir (s3://, gs:// or a shared path) so each node can fetch it")
            self.remote.fetch(tag, digest, tag_dir, manifest.record)
        check_manifest(tag_dir, self.dir)
        manifest.check(self.dir, tag)


def digest_of(tag_dir: Path) -> str:
    """SHA-256 of a tag folder's manifest ('' when it has none)."""
    return file_sha256(tag_dir / MANIFEST) if (tag_dir / MANIFEST).is_file() else ""


def missing_files(tag_dir: Path) -> list[str]:
    """Files the tag's manifest lists that this folder lacks (all, when no manifest)."""
    try:
        listed = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [MANIFEST]
    return sorted(name for name in listed if not (tag_dir / name).is_file())


# ------------------------------------------------------------------ logs and metrics
def push_run_files(run_dir: Path, url: str) -> None:
    """Rank 0's config, metrics, summary, extractor weights / QA vocabulary and
    TensorBoard events into the remote run dir (whole files, each replaced)."""
    names = [p.name for p in sorted(run_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
    for name in names:
        remote.put_file(run_dir / name, remote.join(url, name))
    events = run_dir / "tensorboard"
    for path in sorted(events.glob("events.*")) if events.is_dir() else []:
        remote.put_file(path, remote.join(url, "tensorboard", path.name))


def pull_run_files(run_dir: Path, url: str) -> list[str]:
    """Files of the remote run dir missing locally (a resume into an empty run.out_dir:
    the metrics log continues, the frozen extractor keeps its weights). Returns their names."""
    run_dir.mkdir(parents=True, exist_ok=True)
    got = []
    for name, size in remote.list_files(url).items():
        if not (run_dir / name).exists() and name != "config.yaml":
            remote.get_file(remote.join(url, name), run_dir / name, size)
            got.append(name)
    return got
