"""DeepSpeed checkpoints of a training run: save on every rank, keep the last K, a
manifest of what was written (:mod:`.manifest`), resume only from those; across nodes
and through ``run.remote_dir`` by :mod:`.nodes`."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

from regionvlp import dist
from regionvlp.checkpoint import check_manifest, list_tags, tag_for
from regionvlp.errors import UserError
from regionvlp.train import manifest
from regionvlp.train.nodes import TagSync


WRITE_WORDS = ("write", "space", "file", "unexpected pos")  # torch's RuntimeErrors for a failed file write


class Checkpointer:
    """DeepSpeed checkpoints under ``run_dir/checkpoints/stepNNNNNNNN``, newest K kept.

    Every rank must call :meth:`save` (DeepSpeed writes per-rank optimizer shards).
    ``client_state.done`` marks a checkpoint whose every file is written, so a run
    killed mid-save never resumes from a torn checkpoint.
    """

    def __init__(self, run_dir: Path, keep_last: int, remote_dir: str = "none") -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))
        self.sync = TagSync(self.dir, self.keep_last, remote_dir)  # several nodes, run.remote_dir
        self.checked: tuple[Path, str] | None = None

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        tag = tag_for(step)
        with self._writing(tag):
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
        dist.barrier()
        with self._writing(tag):
            self.sync.finish(tag, step)  # manifest, register, done marker, keep_last, upload
        dist.barrier()
        return self.dir / tag

    def agree(self, resume: str) -> tuple[Path, str] | None:
        """The checkpoint every rank resumes from (rank 0 picks; every folder checked)."""
        self.checked = self.sync.agree(resume)
        return self.checked

    @contextlib.contextmanager
    def _writing(self, tag: str) -> Iterator[None]:
        """A failed write of checkpoint ``tag`` (disk full, quota, a vanished mount; torch
        reports those as RuntimeError "... write ...") as one line. The partial folder has
        no ``client_state.done``, so resume never takes it."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            text = " ".join((getattr(err, "strerror", None) or str(err)).split())
            if not isinstance(err, OSError) and not any(w in text.lower() for w in WRITE_WORDS):
                raise
            try:
                free = f"{shutil.disk_usage(self.dir).free / 2**30:.2f} GiB free"
            except OSError:
                free = "free space unknown"
            old = [t for t in list_tags(self.dir) if t != tag]
            kept = f"the newest whole checkpoint ({old[-1]}) is intact" if old else "no earlier checkpoint"
            raise UserError(f"checkpoint {tag} could not be written to {self.dir} ({text[:200]}; {free}); "
                            f"{kept}: free space, then continue with train.resume=auto") from None

    def set_aside(self, from_step: int) -> list[str]:
        """Rename the checkpoints of step >= ``from_step`` to ``stepNNNNNNNN.nonfinite``
        (each folder's leader), so ``train.resume=auto`` continues from the newest one whose weights still
        gave a finite loss. Returns the tags set aside."""
        bad = [t for t in list_tags(self.dir) if int(t[4:]) >= from_step]
        self.sync.forget(bad)  # remote: no longer listed
        if self.sync.folders.leader and bad:
            manifest.forget(self.dir, bad)
            for tag in bad:
                shutil.rmtree(self.dir / f"{tag}.nonfinite", ignore_errors=True)  # from an earlier abort
                (self.dir / tag).rename(self.dir / f"{tag}.nonfinite")
        dist.barrier()
        return bad

    def check(self, where: tuple[Path, str]) -> None:
        """Refuse (on every rank, with rank 0's message) a folder this run did not write, or
        one changed since: DeepSpeed's load unpickles its files (see
        :mod:`regionvlp.train.manifest`)."""
        problem = None
        if where == self.checked:  # every folder checked it just now (agree)
            return
        if dist.is_main():
            try:
                check_manifest(Path(where[0]) / where[1], self.dir)  # in this run's folder, files unchanged
                manifest.check(self.dir, where[1])  # and saved by this run, not copied in
            except UserError as err:
                problem = str(err)
        problem = dist.gather_objects(problem)[0] if dist.gather_active() else problem
        if problem:
            raise UserError(problem)

    def load(self, engine: Any, where: tuple[Path, str]) -> dict[str, Any]:
        """Engine, optimizer and schedule state from a checkpoint this run wrote."""
        self.check(where)
        load_dir, tag = where
        path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"could not load checkpoint {load_dir}/{tag}; pass train.resume=none to start over")
        return client or {}

