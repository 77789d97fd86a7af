"""Training: the loop (:mod:`.loop`), the DeepSpeed engine (:mod:`.engine`), the
training batches (:mod:`.data`), resume state (:mod:`.state`), validation
(:mod:`.validate`) and ``train.init_from`` (:mod:`.finetune`).

Library use: ``regionvlp.train.train(cfg) -> dict`` (the JSON summary); launcher use:
``deepspeed --module regionvlp.train CONFIG [k=v …]`` (see :mod:`.__main__`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from regionvlp.config import load_config
from regionvlp.train.loop import train

__all__ = ["run", "train"]


def run(config: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load ``config`` with ``key=value`` overrides and train it (logging to stderr)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    return train(load_config(config, list(overrides)))
