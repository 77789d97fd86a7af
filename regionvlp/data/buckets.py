"""Bucket clients shared by reading and writing, and the error retries stop at.

Google Cloud Storage goes through gcsfs: one filesystem per process and timeout whose
every request is one try bounded by the timeout (retries are the caller's, as boto3's
are for ``s3://``); :func:`open_gs` opens a ``gs://`` object at a byte offset.

``STORAGE_EMULATOR_HOST`` (``http://HOST:PORT``) points gcsfs at an emulator such as
``gcp-storage-emulator``; there, credentials are anonymous and gcsfs's plain JSON-API
filesystem is used (its default one first asks the gRPC storage-control API for the
bucket layout, which emulators do not serve, and waits 60 s per bucket for it).
"""

from __future__ import annotations

import os
from typing import IO, Any

from regionvlp.errors import UserError

GCS_BLOCK_SIZE = 4 << 20  # bytes per ranged GET while streaming a gs:// object (readahead)
_fs_classes: dict[type, type] = {}
_filesystems: dict[tuple[int, float, str | None], Any] = {}


class PermanentError(OSError):
    """Not worth retrying: missing object, no permission, bad request."""


def emulator_host() -> str | None:
    """The GCS emulator gcsfs talks to (``STORAGE_EMULATOR_HOST``), else None."""
    return os.environ.get("STORAGE_EMULATOR_HOST") or None


def _one_try(base: type) -> type:
    """``base`` with gcsfs's request retries (6 tries, up to ~20 s of sleeps) removed, so
    a timeout bounds one try."""
    cls = _fs_classes.get(base)
    if cls is None:
        request = getattr(base._request, "__wrapped__", base._request)
        cls = type(f"OneTry{base.__name__}", (base,), {"_request": request})
        _fs_classes[base] = cls
    return cls


def gcs_filesystem(timeout: float) -> Any:
    """One gcsfs filesystem per process, timeout and endpoint (after fork each DataLoader worker
    makes its own) whose connects and reads time out after ``timeout`` seconds; for
    reading and writing buckets."""
    key = (os.getpid(), float(timeout), emulator_host())
    if key not in _filesystems:
        if any(k[0] != key[0] for k in _filesystems):
            _filesystems.clear()  # a forked child: the parent's sessions belong to its event loop
        _filesystems[key] = _new_filesystem(timeout)
    return _filesystems[key]


def _new_filesystem(timeout: float) -> Any:
    try:
        import aiohttp
        import gcsfs
        import gcsfs.core
    except ImportError as err:
        raise UserError(f"gs:// needs gcsfs: pip install 'regionvlp[gcs]' ({err})") from None
    emulated = emulator_host() is not None
    base = gcsfs.core.GCSFileSystem if emulated else gcsfs.GCSFileSystem
    limits = aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)
    # gcsfs passes requests_timeout to every request (None there would mean no timeout at all)
    return _one_try(base)(token="anon" if emulated else None, requests_timeout=limits,
                          session_kwargs={"timeout": limits}, skip_instance_cache=True)


def classify(err: Exception, url: str) -> Exception:
    """A gcsfs error as :class:`PermanentError` when retrying cannot help, else as is."""
    text = str(err)
    if isinstance(err, (FileNotFoundError, PermissionError)) or text.startswith(("Forbidden", "Bad Request")):
        return PermanentError(f"gs: {type(err).__name__} for {url}: {text.splitlines()[0] if text else ''}")
    return err


def open_gs(url: str, offset: int, timeout: float) -> IO[bytes]:
    """``gs://bucket/key`` open for reading from byte ``offset`` (one ranged GET per
    :data:`GCS_BLOCK_SIZE` bytes)."""
    fs = gcs_filesystem(timeout)
    try:
        f = fs.open(url, "rb", block_size=GCS_BLOCK_SIZE, cache_type="readahead")
        if offset:
            f.seek(offset)
    except Exception as err:
        raise classify(err, url) from None
    return _GSStream(f, url)


class _GSStream:
    """A gcsfs file whose read errors are classified (permanent ones are not retried)."""

    def __init__(self, f: Any, url: str) -> None:
        self.f, self.url = f, url
        size = getattr(f, "size", None)
        self.shard_size = size if type(size) is int else None  # the object's size (a shard's identity)

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except Exception as err:
            raise classify(err, self.url) from None

    def close(self) -> None:
        self.f.close()
