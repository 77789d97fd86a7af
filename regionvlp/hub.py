"""Pretrained weights by URL, the way torchvision fetches its own.

A weights URL (a torchvision weights enum's ``url``, or an ``http(s)://`` value of
``model.region_transformer.init`` / ``model.learner.pretrained``) is read from the torch
hub cache, ``$TORCH_HOME/hub/checkpoints/<file name>``, and downloaded there when it is
missing and the machine may go online — torch's own ``download_url_to_file``, with the
SHA-256 prefix check that ``load_state_dict_from_url(check_hash=True)`` applies when the
file name carries one (``name-<hex>.pth``). Offline (``HF_HUB_OFFLINE=1`` /
``TRANSFORMERS_OFFLINE=1``, or ``run.offline: true``, which sets them for the process)
or without a network, a missing file is one :class:`UserError` naming the URL and the
path to put it at. Nothing downloads at import.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from regionvlp.errors import UserError

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's: name-<sha256 prefix>.ext


def is_offline() -> bool:
    """True when the offline switches are set: nothing may be downloaded."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in OFFLINE_ENV)


def apply_offline(cfg: Any) -> None:
    """``run.offline: true``: the offline switches for this process, so the text tower
    (transformers), timm / huggingface_hub and the weights URLs here all stay offline."""
    run = getattr(cfg, "run", None)
    if not bool(getattr(run, "offline", False)):
        return
    for key in OFFLINE_ENV:
        os.environ[key] = "1"
    constants = sys.modules.get("huggingface_hub.constants")  # reads the switch once, at import
    if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
        constants.HF_HUB_OFFLINE = True


def is_url(value: str) -> bool:
    return str(value).startswith(("http://", "https://"))


def cache_path(url: str) -> Path:
    """Where torch's ``load_state_dict_from_url`` caches ``url``."""
    import torch

    name = os.path.basename(urlparse(url).path)
    if not name:
        raise UserError(f"weights URL {url} names no file; give the URL of the weights file itself")
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def cached_file(url: str, key: str, local: str = "/path/to/weights.pth") -> Path:
    """The local copy of the weights at ``url`` (config key ``key``; ``local``: the example
    local path the error suggests), downloaded into the torch hub cache when missing and
    online (see the module doc)."""
    path = cache_path(url)
    if path.is_file():
        return path
    if is_offline():
        raise UserError(f"{key}: pretrained weights {url} are not in the torch hub cache (expected {path}) and "
                        "this run is offline (HF_HUB_OFFLINE / run.offline); download that file to that path "
                        f"(or set TORCH_HOME), go online, or pass a local file with {key}={local}")
    return download(url, path, key, local)


def download(url: str, path: Path, key: str, local: str = "/path/to/weights.pth") -> Path:
    """``url`` -> ``path`` with torch's downloader (atomic: a temp file, then renamed)."""
    import torch

    found = HASH_IN_NAME.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {path}", file=sys.stderr, flush=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=found.group(1) if found else None,
                                       progress=False)
    except (OSError, RuntimeError, ValueError) as err:  # URLError/HTTPError are OSErrors; a hash mismatch
        path.unlink(missing_ok=True)
        detail = " ".join(str(getattr(err, "reason", None) or err).split())[:200]
        raise UserError(f"{key}: could not download pretrained weights {url} ({type(err).__name__}: {detail}); "
                        f"without a network, download that file to {path} (or set TORCH_HOME), "
                        f"or pass a local file with {key}={local}") from None
    return path
