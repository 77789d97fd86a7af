"""Public datasets read from their own annotation files, as their authors ship them:
one adapter module per dataset, one registry (:data:`ADAPTERS`), and
:func:`~regionvlp.data.datasets.prepare.prepare_dataset` (``regionvlp datasets prepare``)."""

from __future__ import annotations

from regionvlp.data.datasets import activitynet, didemo, lsmdc, msrvtt, msrvtt_qa, msvd, msvd_qa, webvid
from regionvlp.data.datasets.base import Adapter
from regionvlp.errors import UserError


ADAPTERS: dict[str, Adapter] = {m.ADAPTER.name: m.ADAPTER for m in (
    msrvtt, msvd, lsmdc, msrvtt_qa, msvd_qa, didemo, activitynet, webvid)}


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise UserError(f"datasets: unknown dataset '{name}'; one of {', '.join(ADAPTERS)} (regionvlp datasets list)")
    return ADAPTERS[name]


def list_datasets() -> dict:
    """``regionvlp datasets list``: every adapter with the files it reads and its splits."""
    return {"datasets": [{"name": a.name, "description": a.description, "files": a.files, "splits": list(a.splits)}
                         for a in ADAPTERS.values()]}


__all__ = ["ADAPTERS", "Adapter", "get_adapter", "list_datasets"]
