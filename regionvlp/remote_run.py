"""A training run's ``run.remote_dir`` read and written as whole files: complete
checkpoint tags (``REMOTE/checkpoints/<tag>/`` + its ``manifest.json``, listed in
``REMOTE/checkpoints/run_manifest.json`` only once complete), and the weights of a remote
run dir or export for ``train.init_from``, ``eval --checkpoint`` and ``load_model``.

The run manifest (``run_manifest.json``, :mod:`regionvlp.train.manifest`) lists each tag
with the SHA-256 of its ``manifest.json``; a tag counts as complete only when that manifest
is there with that digest and every file it lists is there with the listed size.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from regionvlp import remote
from regionvlp.checkpoint import MANIFEST, TAG_PATTERN, file_listing, list_tags
from regionvlp.errors import UserError
from regionvlp.runtime import file_sha256

REGISTER = "run_manifest.json"
DONE = "client_state.done"
MANIFEST_MAX_BYTES = 64 << 20  # a tag's manifest / the run manifest, downloaded


def parse_register(text: str, where: str) -> dict[str, Any]:
    """A run manifest's JSON (from the run folder or ``run.remote_dir``), checked."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UserError(f"{where}: unreadable ({err}); resume with train.resume=none or a new run.out_dir") from None
    if not isinstance(data, dict) or not isinstance(data.get("tags"), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data["tags"].items()):
        raise UserError(f"{where}: not a regionvlp run manifest; resume with train.resume=none")
    return data


def encode_register(tags: dict[str, str]) -> str:
    return json.dumps({"regionvlp_run_manifest": 1, "tags": tags}, indent=1, sort_keys=True)


class RemoteTags:
    """``REMOTE/checkpoints/<tag>/`` files + ``manifest.json``, and
    ``REMOTE/checkpoints/run_manifest.json`` listing the complete tags."""

    def __init__(self, url: str) -> None:
        self.url = remote.join(url, "checkpoints")

    def register(self) -> dict[str, str]:
        """The remote run manifest's ``{tag: manifest SHA-256}`` (empty when none)."""
        where = remote.join(self.url, REGISTER)
        data = remote.get_bytes(where, MANIFEST_MAX_BYTES)
        if data is None:
            return {}
        return dict(parse_register(data.decode("utf-8", "replace"), where)["tags"])

    def upload(self, tag_dir: Path, names: list[str]) -> None:
        for name in names:
            remote.put_file(tag_dir / name, remote.join(self.url, tag_dir.name, name))

    def publish(self, tag_dir: Path, tags: dict[str, str]) -> None:
        """The tag's manifest after its files, the run manifest last."""
        remote.put_file(tag_dir / MANIFEST, remote.join(self.url, tag_dir.name, MANIFEST))
        self.publish_register(tags)

    def publish_register(self, tags: dict[str, str]) -> None:
        remote.put_bytes(encode_register(tags).encode(), remote.join(self.url, REGISTER))

    def prune(self, keep: list[str]) -> None:
        """Remote tags not in ``keep``: their manifest first, then their files."""
        for tag in remote.list_folders(self.url):
            if TAG_PATTERN.match(tag) and tag not in keep:
                folder = remote.join(self.url, tag)
                remote.delete(folder, [MANIFEST])
                remote.delete(folder, sorted(remote.list_files(folder)))

    def newest(self) -> tuple[str, str] | None:
        """``(tag, manifest SHA-256)`` of the newest complete remote tag: listed in the
        remote run manifest, its manifest there with that digest, every file it lists
        there with the listed size."""
        for tag, digest in sorted(self.register().items(), key=lambda kv: kv[0], reverse=True):
            if self.listing(tag, digest) is not None:
                return tag, digest
        return None

    def listing(self, tag: str, digest: str) -> dict[str, Any] | None:
        """The files of complete remote tag ``tag`` (None when it is not complete)."""
        folder = remote.join(self.url, tag)
        data = remote.get_bytes(remote.join(folder, MANIFEST), MANIFEST_MAX_BYTES)
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            return None
        try:
            files = json.loads(data)["files"]
        except (ValueError, KeyError, TypeError):
            return None
        present = remote.list_files(folder)
        if any(present.get(name) != info.get("bytes") for name, info in files.items()):
            return None
        return files

    def fetch(self, tag: str, digest: str, tag_dir: Path, record: Callable[[Path, str, list[str]], None]) -> None:
        """Remote tag ``tag`` into ``tag_dir``: the files missing or different here, then
        its manifest, the run manifest's entry (``record``) and the done marker."""
        files = self.listing(tag, digest)
        if files is None:
            raise UserError(f"{remote.join(self.url, tag)} is not complete in run.remote_dir (cut off mid-upload?)")
        if tag_dir.is_dir() and (not (tag_dir / MANIFEST).is_file() or file_sha256(tag_dir / MANIFEST) != digest):
            shutil.rmtree(tag_dir)  # a torn or different local copy of the tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        here = file_listing(tag_dir)
        for name, info in files.items():
            if here.get(name) != info:
                remote.get_file(remote.join(self.url, tag, name), tag_dir / name, int(info["bytes"]))
        remote.get_file(remote.join(self.url, tag, MANIFEST), tag_dir / MANIFEST, MANIFEST_MAX_BYTES)
        record(tag_dir.parent, tag, list_tags(tag_dir.parent) + [tag])
        (tag_dir / DONE).write_text(str(int(TAG_PATTERN.match(tag).group(1))))


def fetch_run(url: str, local: Path) -> Path:
    """A remote run dir's config, its other top-level files and its newest complete tag
    into ``local`` (a run dir :func:`regionvlp.checkpoint.find_checkpoint` reads)."""
    tags = RemoteTags(url)
    newest = tags.newest()
    if newest is None:
        raise UserError(f"{url}: no complete checkpoint in this remote run dir")
    for name, size in remote.list_files(url).items():
        remote.get_file(remote.join(url, name), local / name, size)
    tags.fetch(*newest, local / "checkpoints" / newest[0], lambda *args: None)
    return local


def local_weights(path: str | Path, what: str) -> Path:
    """``path`` itself, or a bucket URL's weights downloaded into a local folder: an export
    folder whole (``model.safetensors`` …), a run dir's newest complete checkpoint."""
    if not remote.is_remote(path):
        return Path(path)
    url = str(path).rstrip("/")
    local = remote.cache_dir(url)
    try:
        if remote.size_of(remote.join(url, "model.safetensors")) is not None:
            return remote.fetch_folder(url, local)
        return fetch_run(url, local)
    except UserError as err:
        raise UserError(f"{what}: {err}") from None
