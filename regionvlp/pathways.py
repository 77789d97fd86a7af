"""The pathway registry: one entry per ``model.regions`` value, read by everything that
differs per pathway (as timm's ``register_model`` and LAVIS's registry are).

An entry names, for its pathway:

* ``sections`` — the config sections under ``model`` it reads (``compare`` reports them
  per pathway);
* ``builder`` — ``"module:function"``, ``cfg -> nn.Module`` whose ``forward(batch)``
  returns a :class:`~regionvlp.outputs.VideoOutput` (:func:`regionvlp.model.build_pathway`);
* ``batch_transform`` — ``"module:function"`` or None: the frozen ``cfg -> callable``
  that turns ``frames`` into ``region_*`` tensors before the model
  (:func:`regionvlp.model.build_batch_transform`);
* ``views`` — what ``show`` / ``compare`` draw of its regions: ``boxes`` (the batch
  transform's real boxes) and/or ``masks`` (the RegionLearner's masks, through the
  pathway's ``capture_masks()``);
* ``region_shape`` — the config keys of K (boxes per frame) and F (feature size) that
  region shards must match (the loader's check), or None: it reads frames only;
* ``tokens_per_frame`` — the config keys whose sum is its region tokens per frame;
* ``img_size`` — the config key of its own input side, or None (``bench train --size``
  sets it with ``data.size``).

Builders are ``"module:function"`` strings imported on use, so importing regionvlp (and
this registry, which ``config`` reads for the valid ``model.regions``) imports neither
torchvision's detection models nor timm. Adding a pathway is one :func:`register` call
below, its package and its config section (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from regionvlp.errors import UserError

VIEWS = ("boxes", "masks")


@dataclass(frozen=True)
class Pathway:
    name: str
    sections: tuple[str, ...]
    builder: str
    batch_transform: Optional[str] = None
    views: tuple[str, ...] = ()
    region_shape: Optional[tuple[str, str]] = None
    tokens_per_frame: tuple[str, ...] = ()
    img_size: Optional[str] = None
    summary: str = ""

    def build(self, cfg: Any) -> Any:
        """The pathway module for ``cfg`` (its package imported now)."""
        return resolve(self.builder)(cfg)

    def build_batch_transform(self, cfg: Any) -> Optional[Callable]:
        """The frozen batch transform for ``cfg``, or None when the pathway has none."""
        return None if self.batch_transform is None else resolve(self.batch_transform)(cfg)

    def regions_per_frame(self, cfg: Any) -> int:
        """Region tokens per frame under ``cfg`` (the sum of ``tokens_per_frame``)."""
        return sum(int(select(cfg, key)) for key in self.tokens_per_frame)


_REGISTRY: dict[str, Pathway] = {}


def register(entry: Pathway) -> Pathway:
    """Add ``entry`` (its name must be new; its views known)."""
    if entry.name in _REGISTRY:
        raise ValueError(f"pathway {entry.name!r} is registered twice")
    unknown = [v for v in entry.views if v not in VIEWS]
    if unknown:
        raise ValueError(f"pathway {entry.name!r}: unknown views {unknown}; known: {', '.join(VIEWS)}")
    _REGISTRY[entry.name] = entry
    return entry


def names() -> tuple[str, ...]:
    """The registered ``model.regions`` values, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Pathway:
    """The entry for ``name``; a :class:`UserError` naming the choices otherwise."""
    try:
        return _REGISTRY[str(name)]
    except KeyError:
        raise UserError(f"config key 'model.regions' is {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def of(cfg: Any) -> Pathway:
    """The entry ``cfg.model.regions`` names."""
    return get(str(cfg.model.regions))


def with_view(view: str) -> tuple[str, ...]:
    """The pathways whose regions ``show`` draws as ``view``."""
    return tuple(name for name, entry in _REGISTRY.items() if view in entry.views)


def resolve(target: str) -> Callable:
    """``"package.module:function"`` -> the function (its module imported now)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def select(cfg: Any, key: str) -> Any:
    """``cfg``'s value at dotted ``key`` (attribute access; OmegaConf or plain objects)."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


# ----------------------------------------------------------------- the entries
register(Pathway(
    name="detector",
    sections=("detector", "region_transformer"),
    builder="regionvlp.detector:build_pathway",
    batch_transform="regionvlp.detector:build_extractor",
    views=("boxes",),
    region_shape=("model.detector.num_regions", "model.region_transformer.feature_dim"),
    tokens_per_frame=("model.detector.num_regions",),
    summary="frozen Faster R-CNN regions -> region transformer",
))
register(Pathway(
    name="learned",
    sections=("learner",),
    builder="regionvlp.region_learner:build_pathway",
    views=("masks",),
    tokens_per_frame=("model.learner.num_regions",),
    img_size="model.learner.img_size",
    summary="RegionLearner inside a timm ViT",
))
register(Pathway(
    name="fused",
    sections=("detector", "region_transformer", "learner", "fused"),
    builder="regionvlp.fused:build_pathway",
    batch_transform="regionvlp.detector:build_extractor",
    views=("boxes", "masks"),
    tokens_per_frame=("model.detector.num_regions", "model.learner.num_regions"),
    img_size="model.learner.img_size",
    summary="detector box tokens and learned regions in one region set",
))
