"""Which checkpoint folders this run wrote: ``RUN_DIR/checkpoints/run_manifest.json``.

DeepSpeed's own load path unpickles its ``*_model_states.pt`` / ``*_optim_states.pt``
files, and a pickle runs code. Each tag folder carries a manifest of its files with their
SHA-256 (:func:`regionvlp.checkpoint.write_manifest`), but a folder copied in from
another run brings its own, valid manifest along. So the run also keeps this register:
every tag it saved, with the SHA-256 of that tag's manifest. A resume goes ahead only for
a tag listed here whose manifest is unchanged (and whose files match that manifest).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from regionvlp.checkpoint import MANIFEST, file_sha256
from regionvlp.errors import UserError
from regionvlp.remote_run import encode_register, parse_register

NAME = "run_manifest.json"


def read(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / NAME
    if not path.is_file():
        return {"tags": {}}
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err}); resume with train.resume=none or a new run.out_dir") from None
    return parse(text, str(path))


parse = parse_register  # the remote dir's run manifest has the same format
encode = encode_register


def write(ckpt_dir: Path, tags: dict[str, str]) -> None:
    """Atomically (write, then rename)."""
    tmp = ckpt_dir / f".{NAME}.{os.getpid()}.tmp"
    tmp.write_text(encode(tags))
    os.replace(tmp, ckpt_dir / NAME)


def record(ckpt_dir: Path, tag: str, keep: list[str]) -> None:
    """List ``tag`` (after its own manifest is written); tags not in ``keep`` are dropped."""
    tags = {t: v for t, v in read(ckpt_dir)["tags"].items() if t in keep}
    tags[tag] = file_sha256(ckpt_dir / tag / MANIFEST)
    write(ckpt_dir, tags)


def forget(ckpt_dir: Path, tags: list[str]) -> None:
    write(ckpt_dir, {t: v for t, v in read(ckpt_dir)["tags"].items() if t not in tags})


def check(ckpt_dir: Path, tag: str) -> None:
    """Raise :class:`UserError` unless this run saved ``tag`` with this very manifest."""
    digest = read(ckpt_dir)["tags"].get(tag)
    where = ckpt_dir / tag
    if digest is None:
        raise UserError(f"train.resume: {where} is not listed in {ckpt_dir / NAME}: this run did not write it "
                        "(a folder copied in from elsewhere, or one older than run manifests); refusing to "
                        "unpickle it. Move it away, start over with train.resume=none, or take its weights with "
                        "train.init_from=PATH")
    if file_sha256(where / MANIFEST) != digest:
        raise UserError(f"train.resume: {where / MANIFEST} changed since this run wrote it; refusing to unpickle "
                        "the folder")
