"""Process-level helpers every layer may use: device choice, moving a batch, autocast,
peak memory, and the one JSON result line a command prints last.

Nothing here reads a config section or imports another regionvlp module, so anything in
the package can import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator, Mapping

import torch

from regionvlp.errors import UserError


# ------------------------------------------------------------------------ devices
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the local GPU when one is visible, else the CPU; otherwise ``name``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_device(want: str = "auto") -> torch.device:
    """This process's device under a launcher: ``cuda:LOCAL_RANK`` (made current) when a
    GPU is wanted and visible, else the CPU. ``want`` is ``auto`` | ``cuda`` | ``cpu``."""
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no GPU is visible; use run.device=cpu")
    if want != "cpu" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------ batches
def to_device(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Tensors to ``device``; floating tensors also to ``dtype`` when given (the engine
    dtype for region features/boxes). Other values pass through."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if dtype is not None and v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
        out[k] = v
    return out


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                 "fp32": torch.float32, "none": None}


def get_autocast(precision: torch.dtype | str | None, device_type: str) -> Callable[[], AbstractContextManager]:
    """The one autocast helper (open_clip's ``get_autocast``): a context factory for
    ``with get_autocast(precision, device.type)():``.

    ``precision`` is a dtype or its name (``bf16`` | ``fp16`` | ``fp32`` | ``none``):
    bf16 / fp16 autocast to it on ``device_type``; fp32 turns autocast off, so the region
    runs in its inputs' dtype whatever autocast the caller runs under; None / ``none``
    leaves the caller's autocast (if any) as it is.
    """
    dtype = AUTOCAST_DTYPES[precision] if isinstance(precision, str) else precision
    if dtype is None:
        return nullcontext
    if dtype == torch.float32:
        return partial(torch.autocast, device_type=device_type, enabled=False)
    return partial(torch.autocast, device_type=device_type, dtype=dtype)


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (fp32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# ------------------------------------------------------------------------ weights
def _keys(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def weights_mismatch(what: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> UserError:
    """One line: ``what: missing keys: …; unexpected keys: …; shape mismatch (checkpoint vs
    model): …`` (the parts that are not empty)."""
    parts = [f"{label}: {_keys(keys)}" for label, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatch (checkpoint vs model)", mismatched)) if keys]
    return UserError(f"{what}: {'; '.join(parts)}")


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, *,
                      allow_missing: tuple[str, ...] = ()) -> None:
    """The one strict weight loader: every key of ``model`` from ``state`` by name and
    shape, after the modules' own load hooks (which may rename keys of older
    checkpoints). Only missing keys starting with an ``allow_missing`` prefix may stay at
    their init. Otherwise :class:`UserError` (:func:`weights_mismatch`) naming the keys;
    ``what`` says which weights into what, e.g. ``"train.init_from=X does not match …"``."""
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise weights_mismatch(what, [], [], mismatched)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch behind a load hook's renamed key
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise weights_mismatch(what, [], [], lines or [str(err).splitlines()[0]]) from None
    missing = [k for k in result.missing_keys if not k.startswith(allow_missing)]
    if missing or result.unexpected_keys:
        raise weights_mismatch(what, missing, list(result.unexpected_keys), [])


# ------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """The CPU high-water mark of this process: Linux's VmHWM (per address space, so a
    process started by fork + exec does not inherit its parent's mark, as ru_maxrss
    does); ru_maxrss (KiB) where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this process: CUDA max allocated on ``device`` (or on the current
    GPU when ``device`` is None and CUDA is in use), else the CPU max resident set."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return max_rss_bytes()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ------------------------------------------------------------------------ counts
def add_counts(total: dict[str, int], more: Mapping[str, int] | None) -> dict[str, int]:
    """``total[k] += more[k]`` for every key (skip counts by reason); returns ``total``."""
    for k, v in (more or {}).items():
        total[k] = total.get(k, 0) + int(v)
    return total


# ---------------------------------------------------------------------- JSON line
def json_default(obj: Any) -> Any:
    """Tensors and numpy scalars/arrays as plain numbers/lists; anything else as text."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


_RESULT_OUT: list[Any] = []  # the real stdout while :func:`json_stdout` holds fd 1 on stderr


def result_stream() -> Any:
    """Where a command's result goes: the real stdout (also inside :func:`json_stdout`)."""
    return _RESULT_OUT[-1] if _RESULT_OUT else sys.stdout


def print_json(obj: Any) -> None:
    """One JSON line on stdout (the machine-readable result), flushed; inside
    :func:`json_stdout` on the real stdout, where nothing else writes."""
    out = result_stream()
    out.write(json.dumps(obj, sort_keys=False, default=json_default) + "\n")
    out.flush()


@contextmanager
def json_stdout() -> Iterator[None]:
    """Inside: stdout is only :func:`print_json`'s lines. Everything else written to
    stdout goes to stderr: ``print`` and loggers bound to ``sys.stdout`` (DeepSpeed's),
    C-level writes to fd 1 and child processes (DeepSpeed's op builders)."""
    real = sys.stdout
    real.flush()
    try:
        on_fd1 = real.fileno() == 1
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (pytest capsys)
        on_fd1 = False
    saved_fd = os.dup(1)
    out = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8") if on_fd1 else real
    os.dup2(2, 1)
    bound = [h for h in _stream_handlers() if h.stream is real or h.stream is sys.__stdout__]
    for h in bound:
        h.setStream(sys.stderr)
    sys.stdout = sys.stderr
    _RESULT_OUT.append(out)
    try:
        yield
    finally:
        _RESULT_OUT.pop()
        sys.stderr.flush()
        sys.stdout = real
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        for h in bound:
            h.setStream(real)
        if out is not real:
            out.close()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


def file_sha256(path: os.PathLike | str) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
