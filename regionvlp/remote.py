"""Whole files to and from a remote folder: ``s3://bucket/prefix``, ``gs://bucket/prefix``
or a plain path (a second disk, a mount).

Used by the checkpointer (``run.remote_dir``), the shard writers (``shards write`` /
``shards convert`` / ``regions extract`` into a bucket) and the loaders of weights
(``train.init_from``, ``eval --checkpoint``, ``load_model``). Only whole files move: a file
is written locally first, then uploaded in one call (boto3's ``upload_file`` goes multipart
above 8 MiB), so a reader never sees half of one under its final name on a path remote
(written to a temporary name, then renamed) and S3 / GCS publish an object only once
complete. Downloads are bounded in size before a byte is read. ``s3://`` honours
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``gs://`` ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from regionvlp.data.buckets import gcs_filesystem
from regionvlp.data.sources import s3_client
from regionvlp.errors import UserError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
MAX_FILE_BYTES = 1 << 40  # no single downloaded file is larger than this (1 TiB)
ATTEMPTS = 3
TIMEOUT_S = 120.0


def is_remote(url: str | Path) -> bool:
    """True for an ``s3://`` / ``gs://`` URL (a bucket), False for a path."""
    return str(url).startswith(REMOTE_SCHEMES)


def is_set(url: Any) -> bool:
    """A config value naming a remote folder (not empty / ``none``)."""
    return url is not None and str(url).strip() not in ("", "none")


def check_url(url: Any, key: str) -> None:
    """A config value naming a remote folder: ``none``, ``s3://…``, ``gs://…`` or a path."""
    text = str(url).strip()
    if not text or ("://" in text and not is_remote(text)):
        raise UserError(f"config key '{key}' is {url!r}; it must be none, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
                        f"or a path (fix it in the YAML or with {key}=...)")


def join(base: str, *parts: str) -> str:
    """``base/part/…`` for a URL or a path (no doubled slashes)."""
    return "/".join([str(base).rstrip("/")] + [p.strip("/") for p in parts if p])


def _split(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of an ``s3://`` / ``gs://`` URL."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"{url}: no bucket name (expected {scheme}://BUCKET/PREFIX)")
    return scheme, bucket, key


def _retry(what: str, url: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` up to :data:`ATTEMPTS` times on network errors; then one clear error."""
    for attempt in range(ATTEMPTS):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, UserError):
            raise
        except Exception as err:  # botocore / gcsfs / OS errors: transient until proven otherwise
            if attempt == ATTEMPTS - 1:
                raise UserError(f"{what} {url} failed after {ATTEMPTS} tries: {type(err).__name__}: "
                                f"{' '.join(str(err).split())[:200]}") from None
            time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")


def _gcs() -> Any:
    """The gcsfs filesystem the readers use too (one try per request, timeouts set,
    ``STORAGE_EMULATOR_HOST`` honoured); :func:`_retry` retries."""
    return gcs_filesystem(TIMEOUT_S)


def _missing(err: Exception) -> bool:
    """A botocore error saying the object is not there."""
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


# ------------------------------------------------------------------ one file
def put_file(local: str | Path, url: str) -> None:
    """Upload the whole file ``local`` to ``url`` (a path: copied to a temporary name, then
    renamed)."""
    local = Path(local)
    if not is_remote(url):
        dest = Path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return
    scheme, bucket, key = _split(url)
    if scheme == "s3":
        _retry("upload to", url, lambda: s3_client(TIMEOUT_S).upload_file(str(local), bucket, key))
    else:
        _retry("upload to", url, lambda: _gcs().put_file(str(local), f"{bucket}/{key}"))


def put_bytes(data: bytes, url: str) -> None:
    """``data`` as the whole file ``url``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part"
        path.write_bytes(data)
        put_file(path, url)


def size_of(url: str) -> int | None:
    """The size of file ``url`` in bytes, None when it does not exist."""
    if not is_remote(url):
        return Path(url).stat().st_size if Path(url).is_file() else None
    scheme, bucket, key = _split(url)
    if scheme == "s3":
        def head() -> int | None:
            try:
                return int(s3_client(TIMEOUT_S).head_object(Bucket=bucket, Key=key)["ContentLength"])
            except Exception as err:
                if _missing(err):
                    return None
                raise
        return _retry("size of", url, head)
    fs = _gcs()
    return _retry("size of", url, lambda: int(fs.info(f"{bucket}/{key}")["size"]) if fs.exists(f"{bucket}/{key}")
                  else None)


def get_file(url: str, local: str | Path, max_bytes: int = MAX_FILE_BYTES) -> int:
    """Download ``url`` to ``local`` (a temporary name, then renamed); refuses a file
    larger than ``max_bytes`` before reading it. Returns its size."""
    size = size_of(url)
    if size is None:
        raise UserError(f"{url}: no such file")
    if size > max_bytes:
        raise UserError(f"{url}: {size} bytes, more than the {max_bytes} allowed here; refusing to download it")
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.{os.getpid()}.part"
    if not is_remote(url):
        shutil.copyfile(url, tmp)
    else:
        scheme, bucket, key = _split(url)
        if scheme == "s3":
            _retry("download of", url, lambda: s3_client(TIMEOUT_S).download_file(bucket, key, str(tmp)))
        else:
            _retry("download of", url, lambda: _gcs().get_file(f"{bucket}/{key}", str(tmp)))
    if tmp.stat().st_size != size:
        tmp.unlink()
        raise UserError(f"{url}: changed while downloading ({size} bytes announced); try again")
    os.replace(tmp, local)
    return size


def get_bytes(url: str, max_bytes: int) -> bytes | None:
    """The content of the small file ``url`` (None when absent); bounded by ``max_bytes``."""
    if size_of(url) is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        get_file(url, Path(tmp) / "part", max_bytes)
        return (Path(tmp) / "part").read_bytes()


# ------------------------------------------------------------------ folders
def list_files(url: str) -> dict[str, int]:
    """``{name: bytes}`` of the files directly in folder ``url`` (empty when absent)."""
    if not is_remote(url):
        folder = Path(url)
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    return {name: size for name, size in _list(url) if size is not None}


def list_folders(url: str) -> list[str]:
    """Names of the sub-folders directly in folder ``url``."""
    if not is_remote(url):
        folder = Path(url)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return sorted(name for name, size in _list(url) if size is None)


def _list(url: str) -> list[tuple[str, int | None]]:
    """``(name, bytes)`` of files and ``(name, None)`` of sub-folders under ``url``."""
    scheme, bucket, key = _split(url)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    if scheme == "s3":
        def pages() -> list[tuple[str, int | None]]:
            out: list[tuple[str, int | None]] = []
            paginator = s3_client(TIMEOUT_S).get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                out += [(o["Key"][len(prefix):], int(o["Size"])) for o in page.get("Contents", [])]
                out += [(p["Prefix"][len(prefix):].rstrip("/"), None) for p in page.get("CommonPrefixes", [])]
            return out
        return _retry("listing of", url, pages)
    fs = _gcs()

    def entries() -> list[tuple[str, int | None]]:
        try:
            found = fs.ls(f"{bucket}/{prefix}", detail=True, refresh=True)
        except FileNotFoundError:
            return []
        return [(e["name"].rstrip("/").rsplit("/", 1)[-1], None if e["type"] == "directory" else int(e["size"]))
                for e in found]
    return _retry("listing of", url, entries)


def delete(url: str, names: list[str]) -> None:
    """Delete files ``names`` of folder ``url`` (absent ones are fine)."""
    for name in names:
        target = join(url, name)
        if not is_remote(url):
            Path(target).unlink(missing_ok=True)
            continue
        scheme, bucket, key = _split(target)
        if scheme == "s3":
            _retry("delete of", target, lambda: s3_client(TIMEOUT_S).delete_object(Bucket=bucket, Key=key))
        else:
            fs = _gcs()
            _retry("delete of", target, lambda: fs.rm_file(f"{bucket}/{key}") if fs.exists(f"{bucket}/{key}")
                   else None)
    if not is_remote(url) and Path(url).is_dir() and not any(Path(url).iterdir()):
        Path(url).rmdir()


def put_folder(local: Path, url: str, last: str = "") -> None:
    """Every file under ``local`` to folder ``url`` (sub-folders kept), ``last`` after the rest."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.relative_to(local).as_posix() == last):
        put_file(path, join(url, path.relative_to(local).as_posix()))


def fetch_folder(url: str, local: Path, max_bytes: int = MAX_FILE_BYTES) -> Path:
    """Every file of remote folder ``url`` (and its sub-folders) into ``local``; for weights
    given as a bucket URL (``train.init_from``, ``eval --checkpoint``, ``load_model``)."""
    files = list_files(url)
    folders = list_folders(url)
    if not files and not folders:
        raise UserError(f"{url}: an empty or missing remote folder")
    for name in files:
        get_file(join(url, name), local / name, max_bytes)
    for name in folders:
        fetch_folder(join(url, name), local / name, max_bytes)
    return local


def cache_path(url: str) -> Path:
    """The per-URL folder under ``REGIONVLP_CACHE`` (default ``~/.cache/regionvlp``), as it is."""
    import hashlib

    root = Path(os.environ.get("REGIONVLP_CACHE", Path.home() / ".cache" / "regionvlp")) / "remote"
    return root / hashlib.sha256(url.encode()).hexdigest()[:16]


def cache_dir(url: str) -> Path:
    """:func:`cache_path` emptied."""
    local = cache_path(url)
    shutil.rmtree(local, ignore_errors=True)
    return local


def local_copy(path: str | Path, what: str) -> Path:
    """``path`` itself, or for a bucket URL its folder downloaded into :func:`cache_dir`.
    Nothing downloaded is unpickled by the callers: weights load as safetensors."""
    if not is_remote(path):
        return Path(path)
    try:
        return fetch_folder(str(path).rstrip("/"), cache_dir(str(path).rstrip("/")))
    except UserError as err:
        raise UserError(f"{what}: {err}") from None
