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
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regionvlp import pathways
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
    test: SplitConfig = field(default_factory=SplitConfig)  # `regionvlp eval --split test`; never read in training
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
    qa_pairs_per_visit: str = "one"  # QA training: one pair drawn per clip visit | all: every pair of the clip
    allow_pipe: bool = False  # pipe: URLs run shell commands; off unless asked for
    max_words: int = 32  # token ids per caption, [CLS]/[SEP] included
    tokenizer: Optional[str] = None  # None: the text tower's model.text.name
    retries: int = 3  # transient read errors per shard
    retry_backoff: float = 0.5  # seconds, doubled each retry
    max_sample_bytes: int = 512 * 1024 * 1024  # one sample's tar members (from the headers); larger: skipped, oversize
    max_image_pixels: int = 4096 * 4096  # a still image's width x height, before decoding; larger: skipped, oversize
    max_caption_chars: int = 2000  # longer captions are cut (counted as captions_cut)
    read_timeout_s: float = 60.0  # http(s)/s3/gs: seconds to connect and between bytes; each timeout is one retry


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
    min_size: Optional[int] = None  # detector input resize; None: data.size (frames are never upsampled)
    max_size: Optional[int] = None  # None: data.size
    rpn_pre_nms_top_n: Optional[int] = None  # per FPN level before RPN NMS; None: tuned for the arch (regions.detector.TUNED_RPN)
    rpn_post_nms_top_n: Optional[int] = None  # per frame after RPN NMS (box-head cost); None: tuned (200; stock 1000)
    selection: str = "region"  # region (max class, class-agnostic NMS) | stock (torchvision's postprocess_detections)
    nms_thresh: float = 0.5  # NMS IoU over the final boxes (class-agnostic for region, per class for stock)
    score_thresh: float = 0.0  # min confidence (region: max non-background probability; stock: class probability)
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
    frame_local: bool = False  # a region attends only to its own frame's regions and [CLS]
    init: str = "none"  # none | a timm ViT name (timm's weights) | an http(s) URL (torch hub cache) | a local ViT weights file: blocks 0..layers-1
    temporal_resize: str = "zeros"  # zeros | interpolate: frame rows beyond an init_from source run's frames


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
    dead_code_threshold: float = 0.1  # restart a code whose EMA count < this x the mean code's; 0 = never
    commitment: float = 0.25  # beta of the commitment loss (VQ-VAE's 0.25); 0 disables it
    num_regions: int = 8  # R masks
    mask_norm: str = "softmax"  # softmax | sigmoid
    interaction_layers: int = 1
    insert_after: int = -1  # ViT block index; -1 the last
    checkpoint: str = "none"  # none | a saved learned-pathway (or whole model) state dict to start from
    temporal_resize: str = "interpolate"  # interpolate | zeros: time embeddings when max_frames changed


@dataclass
class FusedConfig:
    """``model.regions: fused``: the fusion layers over the detector's box tokens and the
    RegionLearner's regions (which keep their own sections, detector/region_transformer/learner)."""

    layers: int = 1  # transformer blocks over [CLS] + box tokens + learned tokens, at width model.embed_dim
    heads: int = 4  # must divide model.embed_dim
    mlp_ratio: float = 4.0
    dropout: float = 0.1


@dataclass
class ModelConfig:
    regions: str = "detector"  # a registered pathway (regionvlp.pathways): detector | learned | ...
    embed_dim: int = 256  # D, the joint space
    text: TextConfig = field(default_factory=TextConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    region_transformer: RegionTransformerConfig = field(default_factory=RegionTransformerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    fused: FusedConfig = field(default_factory=FusedConfig)


# --------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    temperature: float = 0.05  # tau of the global InfoNCE
    learnable_temperature: bool = False
    min_temperature: float = 0.01  # floor of a learnable temperature, applied after each step
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
    head_lr_mult: float = 1.0  # the QA head's lr = optim.lr x this (DemoVLP: 1e-4 head over a 3e-5 backbone)
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
    stage_steps: int = 0  # compare / demo: > 0 fine-tunes a QA head this many steps from each retrieval run
    stage_lr: float = 0.0  # optim.lr of that QA stage; 0: the config's optim.lr


@dataclass
class EvalConfig:
    """How ``regionvlp eval`` scores retrieval (stamped in every result's ``protocol``)."""

    rescore: str = "none"  # none | dual_softmax: each direction's scores times a softmax over the other axis
    rescore_temperature: float = 0.01  # tau of that softmax (over cosine-scale scores)
    clips_per_video: int = 1  # N evenly spaced clips of data.num_frames each; their embeddings averaged
    captions: str = "all"  # all: every caption of a video is a query | first: only its first caption


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    name: str = "regionvlp"
    device: str = "auto"  # auto | cpu | cuda
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])  # of REPORT_TO; metrics.jsonl always
    offline: bool = False  # true: never download pretrained weights (as HF_HUB_OFFLINE=1)


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # passed to deepspeed.initialize


CHOICES: dict[str, tuple[str, ...]] = {
    "model.regions": pathways.names(),  # the registry's entries
    "data.backend": ("auto", "decord", "pyav"),
    "data.decode_device": ("cpu", "cuda"),
    "data.train_sampling": ("random_segment", "uniform", "first", "keyframe"),
    "data.eval_sampling": ("random_segment", "uniform", "first"),
    "model.learner.mask_norm": ("softmax", "sigmoid"),
    "model.learner.temporal_resize": ("interpolate", "zeros"),
    "model.region_transformer.temporal_resize": ("zeros", "interpolate"),
    "model.detector.autocast": ("bf16", "fp16", "none"),
    "model.detector.selection": ("region", "stock"),
    "run.device": ("auto", "cpu", "cuda"),
    "data.qa_pairs_per_visit": ("one", "all"),
    "eval.rescore": ("none", "dual_softmax"),
    "eval.captions": ("all", "first"),
}

REPORT_TO = ("tensorboard", "wandb")  # run.report_to: trackers beside metrics.jsonl

# key -> (lowest, highest, lowest allowed?, highest allowed?); None: no bound. Optional keys may be null.
RANGES: dict[str, tuple[Optional[float], Optional[float], bool, bool]] = {
    "seed": (0, None, True, True),
    "data.train.samples_per_epoch": (1, None, True, True),
    "data.val.samples_per_epoch": (1, None, True, True),
    "data.test.samples_per_epoch": (1, None, True, True),
    "eval.rescore_temperature": (0, None, False, True),
    "eval.clips_per_video": (1, 64, True, True),
    "optim.head_lr_mult": (0, None, True, True),
    "data.num_frames": (1, 1024, True, True),
    "data.size": (1, 8192, True, True),
    "data.batch_size": (1, None, True, True),
    "data.shuffle_buffer": (0, None, True, True),
    "data.max_words": (2, 4096, True, True),  # [CLS] and [SEP] at least
    "data.retries": (0, 100, True, True),
    "data.retry_backoff": (0, 3600, True, True),
    "data.read_timeout_s": (0, 3600, False, True),
    "data.max_sample_bytes": (1, None, True, True),
    "data.max_image_pixels": (1, None, True, True),
    "data.max_caption_chars": (1, None, True, True),
    "model.embed_dim": (1, None, True, True),
    "model.text.freeze_layers": (0, None, True, True),
    "model.detector.num_regions": (1, 1000, True, True),
    "model.detector.min_size": (1, None, True, True),
    "model.detector.max_size": (1, None, True, True),
    "model.detector.rpn_pre_nms_top_n": (1, None, True, True),
    "model.detector.rpn_post_nms_top_n": (1, None, True, True),
    "model.detector.nms_thresh": (0, 1, False, True),
    "model.detector.score_thresh": (0, 1, True, False),
    "model.region_transformer.feature_dim": (1, None, True, True),
    "model.region_transformer.hidden": (1, None, True, True),
    "model.region_transformer.layers": (0, None, True, True),
    "model.region_transformer.heads": (1, None, True, True),
    "model.region_transformer.mlp_ratio": (0, None, False, True),
    "model.region_transformer.dropout": (0, 1, True, False),
    "model.region_transformer.max_frames": (1, None, True, True),
    "model.learner.img_size": (1, None, True, True),
    "model.learner.depth": (0, None, True, True),
    "model.learner.max_frames": (1, None, True, True),
    "model.learner.codebook_size": (1, None, True, True),
    "model.learner.code_dim": (1, None, True, True),
    "model.learner.ema_decay": (0, 1, True, False),
    "model.learner.ema_eps": (0, None, False, True),
    "model.learner.dead_code_threshold": (0, 1, True, False),  # a share of the mean code's use
    "model.learner.commitment": (0, None, True, True),
    "model.learner.num_regions": (1, None, True, True),
    "model.learner.interaction_layers": (1, None, True, True),
    "model.learner.insert_after": (-1, None, True, True),
    "model.fused.layers": (0, None, True, True),
    "model.fused.heads": (1, None, True, True),
    "model.fused.mlp_ratio": (0, None, False, True),
    "model.fused.dropout": (0, 1, True, False),
    "loss.temperature": (0, None, False, True),
    "loss.min_temperature": (0, None, False, True),
    "loss.align_temperature": (0, None, False, True),
    "loss.local_weight": (0, None, True, True),
    "loss.chunk_size": (1, None, True, True),
    "optim.lr": (0, None, False, True),
    "optim.weight_decay": (0, None, True, True),
    "optim.eps": (0, None, False, True),
    "optim.warmup_steps": (0, None, True, True),
    "optim.min_lr_ratio": (0, 1, True, True),
    "optim.text_lr_mult": (0, None, True, True),
    "optim.video_lr_mult": (0, None, True, True),
    "optim.grad_clip": (0, None, True, True),
    "train.max_steps": (1, None, True, True),
    "train.log_every": (1, None, True, True),
    "train.val_every": (0, None, True, True),
    "train.ckpt_every": (1, None, True, True),
    "train.keep_last": (1, None, True, True),
    "train.max_nonfinite": (1, None, True, True),
    "train.grad_accum": (1, None, True, True),
}


class ConfigError(UserError):
    """A config that cannot describe a run: unknown key, wrong type, bad value."""


# ---------------------------------------------------------------------- resolvers
_TOP_LEVEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_VALUES: dict[str, str] = {}  # resolved ${oc.env:NAME} values, masked wherever text leaves the process


def package_dir(name: str) -> str:
    """``${pkgdir:NAME}``: the folder of an installed top-level package (so configs can
    point at assets that packages ship, e.g. a bundled text model). Nothing is imported:
    only a top-level name is accepted, whose spec the path finders give without running
    any package code (a dotted name would import its parents)."""
    name = str(name).strip().replace("-", "_")
    if not _TOP_LEVEL_NAME.match(name):
        raise ConfigError(f"${{pkgdir:{name}}}: give the top-level name of an installed package "
                          "(letters, digits, _ or -; no dots or paths)")
    try:
        spec = importlib.util.find_spec(name)  # a top-level name: no parent package to import
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"${{pkgdir:{name}}}: package '{name}' is not installed (pip install it)")
    return str(Path(list(spec.submodule_search_locations)[0]))


def _env(key: str, default: Any = None) -> Optional[str]:
    """``${oc.env:NAME[,DEFAULT]}``, remembering the value so logs and saved configs can mask it."""
    value = os.environ.get(str(key))
    if value is None:
        if default is None:
            raise ConfigError(f"${{oc.env:{key}}}: environment variable '{key}' is not set; export it or "
                              f"give a default, ${{oc.env:{key},DEFAULT}}")
        return None if str(default) == "null" else str(default)
    if len(value) >= 4:  # shorter ones (flags, counts) would mask unrelated text
        _ENV_VALUES[str(key)] = value
    return value


def mask_secrets(text: str) -> str:
    """``text`` with every resolved environment value replaced by ``${oc.env:NAME}``."""
    for key, value in sorted(_ENV_VALUES.items(), key=lambda kv: -len(kv[1])):
        if value in text:
            text = text.replace(value, f"${{oc.env:{key}}}")
    return text


def _register(name: str, fn: Any) -> None:
    # omegaconf >= 2.4 names it register_resolver (register_new_resolver warns); 2.3 only has the latter
    register = getattr(OmegaConf, "register_resolver", None)
    if register is None or not hasattr(OmegaConf, "legacy_register_resolver"):
        register = OmegaConf.register_new_resolver
    register(name, fn, replace=True)


_register("pkgdir", package_dir)
_register("oc.env", _env)


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


def _bad(key: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"config key '{key}' is {value!r}; it must be {want} (fix it in the YAML or with {key}=...)")


def _check_range(cfg: DictConfig, key: str, bounds: tuple[Optional[float], Optional[float], bool, bool]) -> None:
    lo, hi, lo_ok, hi_ok = bounds
    value = OmegaConf.select(cfg, key)
    if value is None:
        return  # an optional key left unset (the schema refuses null for the others)
    want = " and ".join(w for w in (
        None if lo is None else (">= " if lo_ok else "> ") + f"{lo:g}",
        None if hi is None else ("<= " if hi_ok else "< ") + f"{hi:g}") if w)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(key, value, f"a number {want}")
    if (lo is not None and (value < lo or (value == lo and not lo_ok))) or (
            hi is not None and (value > hi or (value == hi and not hi_ok))):
        raise _bad(key, value, want)


def _check_lists(cfg: DictConfig) -> None:
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise _bad("optim.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.98]")
    last = -1
    for entry in cfg.train.frame_curriculum:
        pair = list(entry)
        if len(pair) != 2 or pair[0] < 0 or pair[1] < 1 or pair[0] <= last:
            raise _bad("train.frame_curriculum", to_container(cfg.train.frame_curriculum),
                       "[[step, T], ...] with steps >= 0 in increasing order and T >= 1")
        last = pair[0]
    for split in ("train", "val", "test"):
        if any(not str(u).strip() for u in cfg.data[split].urls):
            raise _bad(f"data.{split}.urls", list(cfg.data[split].urls), "shard specs without empty entries")
    rt = cfg.model.region_transformer
    if rt.hidden % rt.heads:
        raise _bad("model.region_transformer.heads", rt.heads, f"a divisor of region_transformer.hidden ({rt.hidden})")
    if cfg.model.embed_dim % cfg.model.fused.heads:
        raise _bad("model.fused.heads", cfg.model.fused.heads, f"a divisor of model.embed_dim ({cfg.model.embed_dim})")


def validate(cfg: DictConfig) -> None:
    """Every value in range, every choice known, lists well formed; :class:`ConfigError`
    (one line naming the key) otherwise. Run by :func:`load_config`; call it again after
    changing a config in code."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of {', '.join(allowed)}")
    for key, bounds in RANGES.items():
        _check_range(cfg, key, bounds)
    workers = cfg.data.num_workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 256):
        raise _bad("data.num_workers", workers, "an integer from 0 to 256, or 'auto'")
    _check_lists(cfg)
    if not str(cfg.run.out_dir).strip():
        raise _bad("run.out_dir", cfg.run.out_dir, "a folder path")
    report_to = [str(name) for name in cfg.run.report_to]
    if any(name not in REPORT_TO for name in report_to) or len(set(report_to)) != len(report_to):
        raise _bad("run.report_to", report_to, f"a list of distinct names from {', '.join(REPORT_TO)} (or [])")
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
    if int(qa.stage_steps) < 0 or float(qa.stage_lr) < 0:
        raise ConfigError(f"config keys 'qa.stage_steps' and 'qa.stage_lr' must be >= 0, got {qa.stage_steps}, "
                          f"{qa.stage_lr}")
    if not str(qa.vocab).strip():
        raise ConfigError("config key 'qa.vocab' is empty; use auto or the path of a `regionvlp qa vocab` file")


def check_out_dir(path: str | Path, key: str = "run.out_dir") -> Path:
    """Create the output folder ``path`` (config key ``key``) and prove it is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a folder; pick another {key}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot write there ({err.strerror or err}); "
                          f"pick a writable {key}") from None
    return path


def _env_paths(raw: Any, prefix: str = "") -> dict[str, str]:
    """Dotted paths of the raw (unresolved) values that read the environment."""
    if isinstance(raw, dict):
        items = [(f"{prefix}{k}", v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = [(f"{prefix}{i}", v) for i, v in enumerate(raw)]
    else:
        return {prefix[:-1]: raw} if isinstance(raw, str) and "oc.env:" in raw else {}
    out: dict[str, str] = {}
    for path, value in items:
        out.update(_env_paths(value, path + "."))
    return out


def _resolve(cfg: DictConfig, source: str) -> DictConfig:
    """Resolve every interpolation except environment reads, which stay ``${oc.env:…}``
    in the config (so a saved config.yaml never holds a secret) and resolve on access."""
    raw_env = _env_paths(OmegaConf.to_container(cfg, resolve=False))
    try:
        OmegaConf.resolve(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        cause: Optional[BaseException] = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or _explain(err, source)) from None
    validate(cfg)  # with the environment values in place
    for path, raw in raw_env.items():
        OmegaConf.update(cfg, path, raw, merge=False)
    return cfg


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
    cfg = _resolve(cfg, str(path or "config"))
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML, environment reads left as ``${oc.env:…}`` and any resolved
    environment value that was copied elsewhere masked: safe to write into a run folder."""
    return mask_secrets(OmegaConf.to_yaml(cfg, resolve=False))


def to_container(cfg: DictConfig | ListConfig) -> Any:
    """Plain dicts and lists, environment values resolved (for DeepSpeed, a child process)."""
    return OmegaConf.to_container(cfg, resolve=True)


def saved_container(cfg: DictConfig) -> Any:
    """Plain dicts and lists to store in a file (checkpoints, reports): like
    :func:`to_yaml`, environment reads stay ``${oc.env:…}`` and copied values are masked."""
    return yaml.safe_load(to_yaml(cfg))
