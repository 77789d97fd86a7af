"""Shard specs → shard URLs, and opening one shard from wherever it lives.

A spec is a string such as ``data/train-{000..009}.tar``. Several specs may be given;
one string may also join sources with ``::`` and give each an optional weight after
``@``: ``s3://a/{0..99}.tar@3::https://host/b/{0..9}.tar@1``. Weights set how often a
source's shards are drawn in resampled mode; a non-resampled epoch reads every shard
of every source once.

Schemes: local paths (or ``file://``, or a folder: its ``*.tar``), ``http(s)://``,
``s3://`` (boto3; honours ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the
standard credential chain, so MinIO / Ceph / R2 work), ``gs://`` (fsspec + gcsfs) and
``pipe:CMD`` (runs a shell command; refused unless ``data.allow_pipe: true``).

Transient read errors are retried with exponential backoff, resuming at the byte
offset already read; a shard that still fails is skipped and counted by the caller.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Optional, Sequence
from urllib.parse import urlparse

import braceexpand

from regionvlp.config import mask_secrets
from regionvlp.data.buckets import PermanentError, emulator_host, open_gs
from regionvlp.errors import UserError
from regionvlp.limits import SIZES_JSON_BYTES, ReadLimitError, read_file, read_limited


log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs")
_WEIGHT = re.compile(r"^(?P<spec>.+?)@(?P<weight>\d+(?:\.\d*)?|\.\d+)$")


@dataclass
class Source:
    """The shards of one ``::``-part of a spec and its sampling weight."""

    urls: list[str]
    weight: float = 1.0
    spec: str = ""


@dataclass
class ShardList:
    sources: list[Source] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [u for s in self.sources for u in s.urls]


# ------------------------------------------------------------------------ specs
MAX_SPEC_URLS = 1_000_000  # URLs one brace pattern may name (braceexpand builds each range whole)
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


def _braceexpand(spec: str) -> list[str]:
    """The URLs of one brace pattern; refused before expanding when its numeric ranges
    would name more than :data:`MAX_SPEC_URLS`."""
    count = 1
    for lo, hi, step in _RANGE.findall(spec):
        count *= abs(int(hi) - int(lo)) // max(abs(int(step or 1)), 1) + 1
        if count > MAX_SPEC_URLS:
            raise UserError(f"shard spec '{spec[:80]}' names more than {MAX_SPEC_URLS} URLs; "
                            "split the shard set or name fewer shards")
    return list(braceexpand.braceexpand(spec))


def scheme_of(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    parsed = urlparse(url)
    if len(parsed.scheme) <= 1:  # "" or a Windows drive letter
        return "file"
    return parsed.scheme.lower()


def _expand_local(url: str) -> list[str]:
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise UserError(f"shard folder {path} holds no *.tar files")
        return tars
    return [url]


def parse_specs(specs: Sequence[str] | str, *, allow_pipe: bool = False) -> ShardList:
    """Expand shard specs into sources of URLs (brace patterns, ``::``, ``@weight``).

    Raises :class:`UserError` for an empty spec list, an unknown scheme, or ``pipe:``
    without ``allow_pipe``.
    """
    if isinstance(specs, str):
        specs = [specs]
    sources: list[Source] = []
    for spec in specs:
        for part in str(spec).split("::"):
            part = part.strip()
            if not part:
                continue
            weight = 1.0
            m = _WEIGHT.match(part)
            if m and not part.startswith("pipe:"):
                part, weight = m.group("spec"), float(m.group("weight"))
            if weight <= 0:
                raise UserError(f"shard spec '{part}': weight must be > 0")
            urls: list[str] = []
            for url in _braceexpand(part):
                check_url(url, allow_pipe=allow_pipe)
                urls.extend(_expand_local(url) if scheme_of(url) == "file" else [url])
            sources.append(Source(urls=urls, weight=weight, spec=part))
    if not sources or not any(s.urls for s in sources):
        raise UserError("no shard URLs given (set data.train.urls / data.val.urls or pass URLS)")
    return ShardList(sources)


def check_url(url: str, *, allow_pipe: bool) -> None:
    scheme = scheme_of(url)
    if scheme == "pipe" and not allow_pipe:
        raise UserError(
            f"shard URL '{url[:80]}' runs a shell command; set data.allow_pipe=true "
            "(or --allow-pipe) if you trust the config that names it"
        )
    if scheme not in ("file", "pipe") + REMOTE_SCHEMES:
        raise UserError(f"shard URL '{url[:80]}': unsupported scheme '{scheme}' (use a path, http(s)://, s3://, gs:// or pipe:)")


# ----------------------------------------------------------------------- opening
DEFAULT_TIMEOUT = 60.0  # seconds to connect and between bytes read (data.read_timeout_s)
_s3_clients: dict[tuple[int, float], object] = {}


def s3_endpoint() -> str:
    """The S3 endpoint boto3 talks to (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (no AWS_ENDPOINT_URL)"


def endpoint_of(url: str) -> str:
    """Where a shard URL is read from, for error messages: the S3 endpoint, the HTTP(S)
    host, Google Cloud Storage, the local folder or the pipe command."""
    scheme = scheme_of(url)
    if scheme == "s3":
        return s3_endpoint()
    if scheme in ("http", "https"):
        parsed = urlparse(url)
        return f"{parsed.scheme}://{parsed.netloc}"
    if scheme in ("gs", "gcs"):
        return emulator_host() or "Google Cloud Storage"
    if scheme == "pipe":
        return url[:80]
    return str(Path(url[len("file://"):] if url.startswith("file://") else url).parent)


def s3_client(timeout: float = DEFAULT_TIMEOUT):
    """One boto3 S3 client per process and timeout (after fork each worker makes its own).
    ``timeout`` bounds the connect and every read; boto3 does not retry on its own
    (:class:`RetryingStream` does, ``data.retries`` times)."""
    pid = os.getpid()
    client = _s3_clients.get((pid, timeout))
    if client is None:
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise UserError("s3:// shards need boto3: pip install 'regionvlp[s3]'") from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        config = BotoConfig(connect_timeout=timeout, read_timeout=timeout,
                            retries={"total_max_attempts": 1, "mode": "standard"})
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        if any(key[0] != pid for key in _s3_clients):
            _s3_clients.clear()
        _s3_clients[(pid, timeout)] = client
    return client


def _open_s3(url: str, offset: int, timeout: float) -> IO[bytes]:
    from botocore.exceptions import ClientError

    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    kw = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = s3_client(timeout).get_object(Bucket=bucket, Key=key, **kw)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "404", "403") or 400 <= status < 500:
            raise PermanentError(f"s3: {code or status} for {url}") from None
        raise OSError(f"s3: {code or status} for {url}") from None
    body = resp["Body"]
    total = str(resp.get("ContentRange") or "").rpartition("/")[2]  # "bytes 100-999/1000"
    length = resp.get("ContentLength")
    body.shard_size = int(total) if total.isdigit() else offset + length if type(length) is int else None
    return body


def _open_http(url: str, offset: int, timeout: float) -> IO[bytes]:
    headers = {"User-Agent": "regionvlp"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if 400 <= err.code < 500 and err.code not in (408, 429):
            raise PermanentError(f"http {err.code} for {url}") from None
        raise OSError(f"http {err.code} for {url}") from None
    if offset and resp.status != 206:
        resp.close()
        raise PermanentError(f"{url}: server ignores byte ranges; cannot resume at {offset}")
    return resp


class _PipeStream:
    """stdout of a shell command; a non-zero exit is a read error at EOF."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if (not data and n != 0) and self.proc.wait() != 0:
            err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise PermanentError(f"pipe command exited {self.proc.returncode}: {err[-1] if err else self.cmd}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def open_raw(url: str, offset: int = 0, *, allow_pipe: bool = False, timeout: float = DEFAULT_TIMEOUT) -> IO[bytes]:
    """Open a shard URL for reading from byte ``offset`` (no retries). ``timeout``
    (seconds) bounds connecting and each read of http(s), s3 and gs."""
    check_url(url, allow_pipe=allow_pipe)
    scheme = scheme_of(url)
    if scheme == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        try:
            f = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise PermanentError(str(err)) from None
        f.seek(offset)
        return f
    if scheme in ("http", "https"):
        return _open_http(url, offset, timeout)
    if scheme == "s3":
        return _open_s3(url, offset, timeout)
    if scheme in ("gs", "gcs"):
        return open_gs(url, offset, timeout)
    if scheme == "pipe":
        if offset:
            raise PermanentError("a pipe: shard cannot resume after a read error")
        return _PipeStream(url[len("pipe:"):])  # type: ignore[return-value]
    raise UserError(f"unsupported shard URL {url}")


def reported_size(f, http_end: Optional[int]) -> Optional[int]:
    """A just-opened shard's whole size in bytes as its source says: a file's stat, the
    HTTP ``Content-Length`` (plus the range start), S3 ``ContentLength`` / GCS object size
    (``shard_size``, set by their openers); None when it says nothing (``pipe:``, chunked)."""
    size = getattr(f, "shard_size", None)
    if type(size) is int:
        return size
    if isinstance(f, io.BufferedReader):
        return os.fstat(f.fileno()).st_size
    return http_end


PROGRAMMING_ERRORS = (NameError, AttributeError, TypeError, AssertionError, ImportError)


class RetryingStream:
    """A read-only stream that reopens its URL at the current offset after a transient
    error, up to ``retries`` times with exponential backoff."""

    def __init__(self, url: str, *, retries: int = 3, backoff: float = 0.5, allow_pipe: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, offset: int = 0) -> None:
        self.url, self.retries, self.backoff, self.allow_pipe = url, retries, backoff, allow_pipe
        self.timeout = timeout
        self.offset = offset
        self.attempts = 0  # retries spent so far on this shard
        self.end: Optional[int] = None  # total size when the server says (HTTP Content-Length)
        self.size: Optional[int] = None  # the shard's size in bytes as its source reports it (None: pipe:)
        self._f = self._with_retries(lambda: self._open(offset))

    def _open(self, offset: int):
        f = open_raw(self.url, offset, allow_pipe=self.allow_pipe, timeout=self.timeout)
        remaining = getattr(f, "length", None)  # http.client.HTTPResponse: body bytes still to come
        if isinstance(remaining, int):
            self.end = offset + remaining
        if self.size is None:
            self.size = reported_size(f, self.end)
        return f

    def _with_retries(self, fn):
        while True:
            try:
                return fn()
            except (UserError, PermanentError) + PROGRAMMING_ERRORS:
                raise
            except Exception as err:  # OSError, http.client / botocore transient errors
                if self.attempts >= self.retries:
                    raise OSError(f"{self.url}: {err} (gave up after {self.retries} retries)") from None
                delay = self.backoff * (2**self.attempts)
                self.attempts += 1
                log.warning("shard %s: %s; retry %d/%d in %.1fs", mask_secrets(self.url), mask_secrets(str(err)),
                            self.attempts, self.retries, delay)
                time.sleep(delay)

    def _reopen(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass
        self._f = self._open(self.offset)

    def read(self, n: int = -1) -> bytes:
        first = True

        def attempt() -> bytes:
            nonlocal first
            if not first:  # a previous attempt failed: resume at the offset read so far
                self._reopen()
            first = False
            data = self._f.read(n)
            if not data and n != 0 and self.end is not None and self.offset < self.end:
                raise OSError(f"connection closed at byte {self.offset} of {self.end}")
            return data

        data = self._with_retries(attempt)
        self.offset += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass

    def __enter__(self) -> "RetryingStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str, *, retries: int = 3, backoff: float = 0.5, allow_pipe: bool = False,
               timeout: float = DEFAULT_TIMEOUT, offset: int = 0) -> RetryingStream:
    """``url`` opened at byte ``offset`` with retries; connects and reads time out after
    ``timeout`` seconds (each timeout is one retry)."""
    return RetryingStream(url, retries=retries, backoff=backoff, allow_pipe=allow_pipe, timeout=timeout, offset=offset)


def read_bytes(url: str, *, limit: int, allow_pipe: bool = False, retries: int = 1, backoff: float = 0.2,
               timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """All of ``url`` (any scheme), refused with ``ReadLimitError`` past ``limit`` bytes
    (a local path that is not a regular file is refused unopened)."""
    if scheme_of(url) == "file" and not url.startswith("file://"):
        return read_file(url, limit)
    with open_shard(url, retries=retries, backoff=backoff, allow_pipe=allow_pipe, timeout=timeout) as f:
        return read_limited(f, limit, mask_secrets(url))


# ------------------------------------------------------------ webdataset hookup
def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO[bytes]:
    """webdataset ``gopen`` handler for ``s3://`` (boto3, honours AWS_ENDPOINT_URL)."""
    if mode != "rb":
        raise ValueError(f"{url}: s3 handler only reads (mode 'rb')")
    return open_shard(url)  # type: ignore[return-value]


def gopen_gs(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> IO[bytes]:
    """webdataset ``gopen`` handler for ``gs://`` through fsspec/gcsfs."""
    if mode != "rb":
        raise ValueError(f"{url}: gs handler only reads (mode 'rb')")
    return open_shard(url)  # type: ignore[return-value]


def register_webdataset_handlers() -> None:
    """Make ``webdataset.gopen`` (and so any ``wds.WebDataset``) read s3:// and gs://
    through boto3 / fsspec instead of shelling out to the aws / gsutil CLIs."""
    wgopen = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function of that name)
    wgopen.gopen_schemes["s3"] = gopen_s3
    wgopen.gopen_schemes["gs"] = gopen_gs
    wgopen.gopen_schemes["gcs"] = gopen_gs


# -------------------------------------------------------------------- sizes.json
def _parent(url: str) -> tuple[str, str]:
    """(folder URL, file name) of a shard URL."""
    head, _, name = url.rpartition("/")
    return head, name


def read_sizes(urls: Iterable[str], *, allow_pipe: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Optional[int]:
    """Samples in ``urls`` according to the ``sizes.json`` beside them, or None when a
    folder has none (or it does not list a shard).

    ``sizes.json`` maps shard file names to sample counts: ``{"train-000.tar": 100, ...}``.
    """
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        if scheme_of(url) == "pipe":
            return None
        head, name = _parent(url)
        by_dir.setdefault(head, []).append(name)
    total = 0
    for head, names in by_dir.items():
        sizes_url = f"{head}/sizes.json" if head else "sizes.json"
        shards = load_sizes(sizes_url, allow_pipe=allow_pipe, timeout=timeout)
        if shards is None or any(name not in shards for name in names):
            return None
        total += sum(shards[name] for name in names)
    return total


def load_sizes(sizes_url: str, *, allow_pipe: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Optional[dict[str, int]]:
    """Shard name → samples from the ``sizes.json`` at ``sizes_url`` (at most
    ``SIZES_JSON_BYTES`` read); None when absent, unreadable or not a JSON object. An
    entry that is not a whole non-negative number is left out with a warning."""
    try:
        data = read_bytes(sizes_url, limit=SIZES_JSON_BYTES, allow_pipe=allow_pipe, timeout=timeout)
        sizes = json.loads(data)
    except (ReadLimitError, ValueError) as err:  # endless / huge, not JSON (or not UTF-8)
        log.warning("%s ignored: %s", mask_secrets(sizes_url), " ".join(str(err).split())[:200])
        return None
    except Exception:  # absent or unreadable: no sizes
        return None
    if not isinstance(sizes, dict):
        log.warning("%s ignored: not a JSON object of shard name -> samples", mask_secrets(sizes_url))
        return None
    shards = sizes.get("shards", sizes) if isinstance(sizes.get("shards"), dict) else sizes
    good = {k: v for k, v in shards.items() if type(v) is int and v >= 0}
    if len(good) < len(shards):
        bad = next(k for k in shards if k not in good)
        log.warning("%s: %d entries are not sample counts (e.g. %s: %s); left out", mask_secrets(sizes_url),
                    len(shards) - len(good), str(bad)[:80], str(shards[bad])[:40])
    return good


def describe_unreadable(shards: ShardList, unreadable: Iterable[str]) -> str:
    """``unreadable`` shard URLs by source, for an error line: how many of each source's
    shards could not be read, its spec and endpoint (at most 3 sources named)."""
    bad = set(unreadable)
    parts = []
    for src in shards.sources:
        n = sum(u in bad for u in src.urls)
        if n:
            parts.append(f"{n} of {len(src.urls)} shards of {src.spec} (endpoint {endpoint_of(src.urls[0])})")
    more = f" and {len(parts) - 3} more sources" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more
