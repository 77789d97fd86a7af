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


def host_syncs(fn: Callable[[], Any], extra: tuple[str, ...] = ()) -> tuple[int, Counter]:
    """(number of host syncs, count per name) while running ``fn()`` (profiler, CPU).

    ``extra``: labels of deliberate reads (``record_function`` names) that count too; the
    ops a labelled read runs inside its label are not counted twice."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    labelled = [(e.time_range.start, e.time_range.end) for e in events if e.name in extra]

    def inside(e) -> bool:
        return any(s <= e.time_range.start and e.time_range.end <= t for s, t in labelled)

    names = Counter(e.name for e in events
                    if e.name in extra or (e.name in SYNC_OPS and not inside(e)))
    return sum(names.values()), names
