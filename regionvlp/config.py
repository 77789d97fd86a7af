"""One structured config for a whole run.

The schema is a tree of dataclasses; OmegaConf merges YAML files and ``key=value``
overrides onto it, checks every key and type, and resolves ``${...}`` interpolation.
An unknown key or a wrong type raises :class:`ConfigError` with one line that names
the key (and the nearest valid key).

Each section belongs to one part of the library; extend a section rather than
adding top-level keys. ``base:`` at the top of a YAML file names other YAML files
(relative to it) that are merged first, so tiny/finetune configs only state what
differs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regionvlp.errors import UserError


# --------------------------------------------------------------------------- data
@dataclass
class SplitConfig:
    """One split's shards. ``urls`` are shard specs (brace patterns, ``::``-joined
    sources with optional ``@weight``, local / http(s) / s3 / gs / pipe:)."""

    urls: List[str] = field(default_factory=list)
    samples_per_epoch: Optional[int] = None  # None: read sizes.json beside the shards


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    num_frames: int = 4  # T frames per clip
    size: int = 224  # output H = W
    train_sampling: str = "random_segment"  # random_segment | uniform | first | keyframe
    eval_sampling: str = "uniform"
    backend: str = "auto"  # auto | decord | pyav
    decode_device: str = "cpu"  # cpu: workers decode everything | cuda: frame-shard JPEGs decoded per batch on the GPU
    batch_size: int = 8  # per rank
    num_workers: Any = 2  # DataLoader workers per rank, or "auto": cores per local rank, minus one
    shuffle_buffer: int = 1000  # samples; 0 disables
    resampled: bool = False  # True: sample shards with replacement, with_epoch per rank
    allow_pipe: bool = False  # pipe: URLs run shell commands; off unless asked for
    max_words: int = 32  # token ids per caption, [CLS]/[SEP] included
    tokenizer: Optional[str] = None  # None: the text tower's model.text.name
    retries: int = 3  # transient read errors per shard
    retry_backoff: float = 0.5  # seconds, doubled each retry


# -------------------------------------------------------------------------- model
@dataclass
class TextConfig:
    name: str = "distilbert-base-uncased"  # transformers hub name or local folder
    freeze_embeddings: bool = False
    freeze_layers: int = 0  # lowest N transformer layers frozen


@dataclass
class DetectorConfig:
    arch: str = "fasterrcnn_resnet50_fpn"
    weights: str = "DEFAULT"  # DEFAULT | an enum name | local checkpoint path | none
    num_regions: int = 30  # K boxes per frame
    min_size: Optional[int] = None  # detector input resize; None: the arch's own (800, 320 for *_320_fpn)
    max_size: Optional[int] = None  # None: the arch's own (1333, 640 for *_320_fpn)
    rpn_pre_nms_top_n: Optional[int] = None  # per FPN level before RPN NMS; None: tuned for the arch (regions.detector.TUNED_RPN)
    rpn_post_nms_top_n: Optional[int] = None  # per frame after RPN NMS (box-head cost); None: tuned (200; stock 1000)
    nms_thresh: float = 0.5  # class-agnostic NMS IoU over the final boxes
    score_thresh: float = 0.0  # min confidence (max non-background class probability)
    autocast: str = "bf16"  # bf16 | fp16 | none; only applied on GPU
    channels_last: bool = True  # only applied on GPU


@dataclass
class RegionTransformerConfig:
    feature_dim: int = 1024
    hidden: int = 768
    layers: int = 4
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    max_frames: int = 16
    frame_local: bool = False


@dataclass
class LearnerConfig:
    backbone: str = "vit_base_patch16_224"
    pretrained: str = "none"  # none | timm | local checkpoint path
    img_size: int = 224
    depth: int = 0  # ViT blocks; 0 = the backbone's own (fewer for tiny CPU configs)
    max_frames: int = 16
    divided_space_time: bool = False
    codebook_size: int = 2048
    code_dim: int = 256
    ema_decay: float = 0.99
    ema_eps: float = 1.0e-5
    dead_code_threshold: float = 1.0e-3  # EMA cluster size under which a code restarts
    commitment: float = 0.0  # beta; 0 disables the commitment loss
    num_regions: int = 8  # R masks
    mask_norm: str = "softmax"  # softmax | sigmoid
    interaction_layers: int = 1
    insert_after: int = -1  # ViT block index; -1 the last
    checkpoint: str = "none"  # none | a saved learned-pathway (or whole model) state dict to start from
    temporal_resize: str = "interpolate"  # interpolate | zeros: time embeddings when max_frames changed


@dataclass
class ModelConfig:
    regions: str = "detector"  # detector | learned
    embed_dim: int = 256  # D, the joint space
    text: TextConfig = field(default_factory=TextConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    region_transformer: RegionTransformerConfig = field(default_factory=RegionTransformerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)


# --------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    temperature: float = 0.05  # tau of the global InfoNCE
    learnable_temperature: bool = False
    min_temperature: float = 0.01  # clamp when learnable
    align_temperature: float = 0.05  # tau_a of the region-word softmax
    local_weight: float = 1.0  # lambda
    chunk_size: int = 32  # sentences per chunk of the region-word similarity
    gather: bool = True  # negatives from every rank


# ------------------------------------------------------------------ optim / train
@dataclass
class OptimConfig:
    lr: float = 1.0e-4
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    text_lr_mult: float = 1.0
    video_lr_mult: float = 1.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    log_every: int = 10
    val_every: int = 0  # 0: only at the end
    ckpt_every: int = 500
    keep_last: int = 2
    resume: str = "none"  # none | auto | PATH
    frame_curriculum: List[List[int]] = field(default_factory=list)  # [[step, T], ...]
    max_nonfinite: int = 10  # consecutive non-finite losses before aborting
    grad_accum: int = 1  # micro-batches per optimizer step (deepspeed gradient_accumulation_steps)
    init_from: str = "none"  # none | an export folder | a run dir / checkpoint: weights only (finetuning)


@dataclass
class QAConfig:
    """Open-ended video QA (see regionvlp.qa): a head over the dual encoder, a classifier
    over the K most frequent training answers."""

    enabled: bool = False  # True: the run trains / evaluates the QA head, not retrieval
    num_answers: int = 1500  # K, the answer vocabulary (1500 MSRVTT-QA, 1000 MSVD-QA)
    fusion_layers: int = 2  # transformer layers: question tokens cross-attend to region tokens + [CLS]
    heads: int = 4  # attention heads of the fusion layers (must divide model.embed_dim)
    dropout: float = 0.1
    vocab: str = "auto"  # auto: built from data.train at the start of training | a vocab.json path


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    name: str = "regionvlp"
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class Config:
    seed: int = 0
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # passed to deepspeed.initialize


CHOICES: dict[str, tuple[str, ...]] = {
    "model.regions": ("detector", "learned"),
    "data.backend": ("auto", "decord", "pyav"),
    "data.decode_device": ("cpu", "cuda"),
    "data.train_sampling": ("random_segment", "uniform", "first", "keyframe"),
    "data.eval_sampling": ("random_segment", "uniform", "first"),
    "model.learner.mask_norm": ("softmax", "sigmoid"),
    "model.detector.autocast": ("bf16", "fp16", "none"),
    "run.device": ("auto", "cpu", "cuda"),
}


class ConfigError(UserError):
    """A config that cannot describe a run: unknown key, wrong type, bad value."""


# ------------------------------------------------------------------------ loading
def _package_dir(name: str) -> str:
    """``${pkgdir:NAME}``: the folder of an installed package, found without importing it
    (so configs can point at assets that packages ship, e.g. a bundled text model)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"${{pkgdir:{name}}}: package '{name}' is not installed (pip install it)")
    return str(Path(list(spec.submodule_search_locations)[0]))


if not OmegaConf.has_resolver("pkgdir"):
    # omegaconf >= 2.4 names it register_resolver; 2.3 only has register_new_resolver
    _register = getattr(OmegaConf, "register_resolver", None)
    if _register is None or not hasattr(OmegaConf, "legacy_register_resolver"):
        _register = OmegaConf.register_new_resolver
    _register("pkgdir", _package_dir)


def default_config() -> DictConfig:
    return OmegaConf.structured(Config)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its ``base:`` files merged underneath it (untyped)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: 'base' includes form a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml parse errors
        detail = " ".join(str(err).split())
        raise ConfigError(f"config {path}: not valid YAML: {detail}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    bases = node.pop("base", None)
    if bases is None:
        return node
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(base), seen + (path,)))
    return OmegaConf.merge(merged, node)


def _schema_keys(schema: DictConfig, dotted_parent: str) -> list[str]:
    node: Any = schema
    for part in [p for p in dotted_parent.split(".") if p]:
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line that names the key."""
    full_key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    msg = str(getattr(err, "msg", "") or err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        parent, _, leaf = full_key.rpartition(".")
        candidates = _schema_keys(default_config(), parent)
        near = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.5)
        hint = f"; did you mean '{(parent + '.' if parent else '') + near[0]}'?" if near else ""
        valid = f" (valid keys here: {', '.join(candidates)})" if candidates and not near else ""
        return ConfigError(f"{source}: unknown config key '{full_key}'{hint}{valid}")
    return ConfigError(f"{source}: bad value for config key '{full_key}': {msg}")


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(allowed)}")
    positive = ["data.num_frames", "data.size", "data.batch_size", "data.max_words",
                "model.embed_dim", "model.detector.num_regions", "train.max_steps"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {OmegaConf.select(cfg, key)}")
    workers = cfg.data.num_workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"config key 'data.num_workers' must be an integer >= 0 or 'auto', got {workers!r}")
    if cfg.loss.temperature <= 0 or cfg.loss.align_temperature <= 0:
        raise ConfigError("config keys 'loss.temperature' and 'loss.align_temperature' must be > 0")
    check_qa_config(cfg)


def check_qa_config(cfg: DictConfig) -> None:
    """The ``qa`` section: positive sizes, heads dividing the joint width, dropout in [0, 1)."""
    qa = cfg.qa
    for key in ("num_answers", "fusion_layers", "heads"):
        if int(qa[key]) <= 0:
            raise ConfigError(f"config key 'qa.{key}' must be > 0, got {qa[key]}")
    if int(cfg.model.embed_dim) % int(qa.heads):
        raise ConfigError(f"config key 'qa.heads' ({qa.heads}) must divide model.embed_dim ({cfg.model.embed_dim})")
    if not 0.0 <= float(qa.dropout) < 1.0:
        raise ConfigError(f"config key 'qa.dropout' must be in [0, 1), got {qa.dropout}")
    if not str(qa.vocab).strip():
        raise ConfigError("config key 'qa.vocab' is empty; use auto or the path of a `regionvlp qa vocab` file")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema ← YAML (with its bases) ← ``key=value`` overrides; checked and resolved."""
    cfg = default_config()
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except OmegaConfBaseException:
            pass  # a key error: explained by the merge below
        except Exception as err:  # yaml parse errors of the value
            detail = " ".join(str(err).split())
            raise ConfigError(f"override '{override}': the value is not valid YAML ({detail}); quote strings "
                              "with braces or commas, e.g. 'data.train.urls=[\"shards/{000000..000009}.tar\"]'"
                              ) from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise _explain(err, "override") from None
    try:
        OmegaConf.resolve(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise _explain(err, str(path or "config")) from None
    _check_choices(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig | ListConfig) -> Any:
    """Plain dicts and lists (for DeepSpeed, JSON, checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True)
