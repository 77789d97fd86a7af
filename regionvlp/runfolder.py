"""Output folders: created and proven writable, and held by one process at a time.

:class:`FolderLock` is an exclusive ``fcntl.flock`` on ``.lock`` inside the folder, held
for the life of a run (``regionvlp train``) or a shard set being written (``shards
write``, ``shards convert``, ``regions extract``: :meth:`regionvlp.data.staging.Output.held`). The kernel drops it when the holder exits or crashes (``kill -9`` included),
so a stale lock never blocks the next run. A second holder is refused with one line
naming the first (pid, host, start time), which the lock file records.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from regionvlp.errors import ConfigError, UserError

LOCK_NAME = ".lock"
HOLDER_BYTES = 512  # the holder record read back for the message, at most


def check_out_dir(path: str | Path, key: str = "run.out_dir") -> Path:
    """Create the output folder ``path`` (config key ``key``) and prove it is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a folder; pick another {key}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot write there ({err.strerror or err}); "
                          f"pick a writable {key}") from None
    return path


def _holder(fd: int) -> str:
    """The holder record of a locked file, as ``pid P on host H since T``."""
    try:
        raw = json.loads(os.pread(fd, HOLDER_BYTES, 0).decode("utf-8", "replace") or "{}")
        return f"pid {int(raw['pid'])} on host {str(raw['host'])[:64]} since {str(raw['start'])[:32]}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its record yet"


class FolderLock:
    """``with FolderLock(folder, key):`` — the folder is this process's until the block
    ends (or the process dies). ``enabled=False``: a no-op (ranks other than 0). ``name``:
    the lock file in ``folder`` (default ``.lock``); ``shown``: what the refusal names
    (default the folder; a bucket OUT names its URL, the lock being its staging folder's)."""

    def __init__(self, folder: str | Path, key: str = "run.out_dir", enabled: bool = True,
                 name: str = LOCK_NAME, shown: Optional[str] = None) -> None:
        self.folder, self.key, self.enabled = Path(folder), key, enabled
        self.name, self.shown = name, shown or str(folder)
        self.fd: Optional[int] = None

    def __enter__(self) -> "FolderLock":
        if not self.enabled:
            return self
        check_out_dir(self.folder, self.key)
        fd = os.open(self.folder / self.name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.key}={self.shown}: cannot lock it ({err.strerror or err})") from None
            raise UserError(f"{self.key}={self.shown} is in use by {holder}; wait for that run to end "
                            f"or pick another {self.key}") from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
