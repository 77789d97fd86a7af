"""Optimizer building blocks every trainer in the package shares: which parameters take
no weight decay, and the linear-warmup + cosine learning-rate schedule.

Modules declare their own no-decay parameters, as timm's models do: a module with a
``no_weight_decay()`` method returns the names (relative to itself) of parameters that
must not decay — position and time embeddings, [CLS] tokens. On top of those, biases,
normalisation and embedding-table weights and every 0/1-d tensor (temperatures, scales)
never decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                                           nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                           nn.Embedding)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)


def declared_no_decay(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules list in their ``no_weight_decay()``."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + str(n) for n in declare())
    return names


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that get no weight decay: biases, norm/embedding weights, 0/1-d
    tensors, and whatever a module declares in ``no_weight_decay()``."""
    names = declared_no_decay(model)
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or param.ndim <= 1 or p_name == "bias":
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warmup, cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupCosine:
    """:func:`lr_lambda` as a picklable callable for ``LambdaLR`` (whose state_dict keeps
    the callable's ``__dict__``)."""

    warmup_steps: int
    max_steps: int
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_lambda(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)
