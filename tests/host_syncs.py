"""Counting host syncs on CPU: the ops that, on a GPU, make the host wait for the device.

``aten::_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``),
``aten::nonzero`` (boolean indexing, ``masked_select`` and ``nonzero`` need the count)
``aten::masked_select``, and ops that read a size back on CUDA although their CPU kernel
does not: ``aten::bincount`` (its maximum), ``aten::unique*`` and ``torchvision::nms``
(the kept count). (``.tolist()`` of a CPU tensor is invisible to the profiler: keep it
out of the code paths these tests cover.)
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::bincount",
            "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "torchvision::nms")


def host_syncs(fn: Callable[[], Any]) -> tuple[int, Counter]:
    """(number of host syncs, count per op name) while running ``fn()`` (profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = Counter(e.name for e in prof.events() if e.name in SYNC_OPS)
    return sum(names.values()), names
