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
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regionvlp import pathways
from regionvlp.ds_schema import check_deepspeed
from regionvlp.errors import QUOTE_CHARS, ConfigError, clip
from regionvlp.limits import ReadLimitError, read_file
from regionvlp.resolvers import mask_secrets


# ------------------------------------------------------------ declared checks
# Every bound and choice is declared on its field (``metadata``) and checked once, by
# :func:`validate` at load; the code that reads a value does not check it again.
def bounded(default: Any, lo: Optional[float] = None, hi: Optional[float] = None, *,
            lo_open: bool = False, hi_open: bool = False) -> Any:
    """A number field within ``[lo, hi]`` (``lo_open`` / ``hi_open``: the bound itself is
    not allowed; None: no bound). An Optional field may also be null."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def choice(*choices: str, default: Optional[str] = None) -> Any:
    """A string field that must be one of ``choices`` (default: the first)."""
    return field(default=choices[0] if default is None else default, metadata={"choices": choices})


# --------------------------------------------------------------------------- data
@dataclass
class SplitConfig:
    """One split's shards. ``urls`` are shard specs (brace patterns, ``::``-joined
    sources with optional ``@weight``, local / http(s) / s3 / gs / pipe:)."""

    urls: List[str] = field(default_factory=list)
    samples_per_epoch: Optional[int] = bounded(None, lo=1)  # None: read sizes.json beside the shards


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    test: SplitConfig = field(default_factory=SplitConfig)  # `regionvlp eval --split test`; never read in training
    num_frames: int = bounded(4, lo=1, hi=1024)  # T frames per clip
    size: int = bounded(224, lo=1, hi=8192)  # output H = W
    train_sampling: str = choice("random_segment", "uniform", "first", "keyframe")
    eval_sampling: str = choice("random_segment", "uniform", "first", default="uniform")
    backend: str = choice("auto", "decord", "pyav")
    decode_device: str = choice("cpu", "cuda")  # cpu: workers decode everything | cuda: frame-shard JPEGs decoded per batch on the GPU
    batch_size: int = bounded(8, lo=1, hi=65536)  # per rank
    num_workers: Any = 2  # DataLoader workers per rank, or "auto": cores per local rank, minus one
    shuffle_buffer: int = bounded(1000, lo=0, hi=1_000_000)  # samples; 0 disables
    resampled: bool = False  # True: sample shards with replacement, with_epoch per rank
    qa_pairs_per_visit: str = choice("one", "all")  # QA training: one pair drawn per clip visit | all: every pair of the clip
    allow_pipe: bool = False  # pipe: URLs run shell commands; off unless asked for
    max_words: int = bounded(32, lo=2, hi=4096)  # token ids per caption, [CLS]/[SEP] included
    tokenizer: Optional[str] = None  # None: the text tower's model.text.name
    retries: int = bounded(3, lo=0, hi=100)  # transient read errors per shard
    retry_backoff: float = bounded(0.5, lo=0, hi=3600)  # seconds, doubled each retry
    max_sample_bytes: int = bounded(512 * 1024 * 1024, lo=1, hi=2**34)  # one sample's tar members (from the headers); larger: skipped, oversize
    max_image_pixels: int = bounded(4096 * 4096, lo=1, hi=2**30)  # a still image's width x height, before decoding; larger: skipped, oversize
    max_caption_chars: int = bounded(2000, lo=1, hi=1_000_000)  # longer captions are cut (counted as captions_cut)
    read_timeout_s: float = bounded(60.0, lo=0, hi=3600, lo_open=True)  # http(s)/s3/gs: seconds to connect and between bytes; each timeout is one retry


# -------------------------------------------------------------------------- model
@dataclass
class TextConfig:
    name: str = "distilbert-base-uncased"  # transformers hub name or local folder
    freeze_embeddings: bool = False
    freeze_layers: int = bounded(0, lo=0, hi=1024)  # lowest N transformer layers frozen


@dataclass
class DetectorConfig:
    arch: str = "fasterrcnn_resnet50_fpn"
    weights: str = "DEFAULT"  # DEFAULT | an enum name | local checkpoint path | none
    num_regions: int = bounded(30, lo=1, hi=1000)  # K boxes per frame
    min_size: Optional[int] = bounded(None, lo=1, hi=8192)  # detector input resize; None: data.size (frames are never upsampled)
    max_size: Optional[int] = bounded(None, lo=1, hi=8192)  # None: data.size
    rpn_pre_nms_top_n: Optional[int] = bounded(None, lo=1, hi=100_000)  # per FPN level before RPN NMS; None: tuned for the arch (regions.detector.TUNED_RPN)
    rpn_post_nms_top_n: Optional[int] = bounded(None, lo=1, hi=100_000)  # per frame after RPN NMS (box-head cost); None: tuned (200; stock 1000)
    selection: str = choice("region", "stock")  # region (max class, class-agnostic NMS) | stock (torchvision's postprocess_detections)
    nms_thresh: float = bounded(0.5, lo=0, hi=1, lo_open=True)  # NMS IoU over the final boxes (class-agnostic for region, per class for stock)
    score_thresh: float = bounded(0.0, lo=0, hi=1, hi_open=True)  # min confidence (region: max non-background probability; stock: class probability)
    autocast: str = choice("bf16", "fp16", "none")  # only applied on GPU
    channels_last: bool = True  # only applied on GPU


@dataclass
class RegionTransformerConfig:
    feature_dim: int = bounded(1024, lo=1, hi=65536)
    hidden: int = bounded(768, lo=1, hi=65536)
    layers: int = bounded(4, lo=0, hi=1024)
    heads: int = bounded(12, lo=1, hi=1024)
    mlp_ratio: float = bounded(4.0, lo=0, hi=64, lo_open=True)
    dropout: float = bounded(0.1, lo=0, hi=1, hi_open=True)
    max_frames: int = bounded(16, lo=1, hi=1024)
    frame_local: bool = False  # a region attends only to its own frame's regions and [CLS]
    init: str = "none"  # none | a timm ViT name (timm's weights) | an http(s) URL (torch hub cache) | a local ViT weights file: blocks 0..layers-1
    temporal_resize: str = choice("zeros", "interpolate")  # frame rows beyond an init_from source run's frames


@dataclass
class LearnerConfig:
    backbone: str = "vit_base_patch16_224"
    pretrained: str = "none"  # none | timm | local checkpoint path
    img_size: int = bounded(224, lo=1, hi=8192)
    depth: int = bounded(0, lo=0, hi=1024)  # ViT blocks; 0 = the backbone's own (fewer for tiny CPU configs)
    max_frames: int = bounded(16, lo=1, hi=1024)
    divided_space_time: bool = False
    codebook_size: int = bounded(2048, lo=1, hi=1_000_000)
    code_dim: int = bounded(256, lo=1, hi=65536)
    ema_decay: float = bounded(0.99, lo=0, hi=1, hi_open=True)
    ema_eps: float = bounded(1.0e-5, lo=0, lo_open=True)
    dead_code_threshold: float = bounded(0.1, lo=0, hi=1, hi_open=True)  # restart a code whose EMA count < this x the mean code's; 0 = never
    commitment: float = bounded(0.25, lo=0)  # beta of the commitment loss (VQ-VAE's 0.25); 0 disables it
    num_regions: int = bounded(8, lo=1, hi=1000)  # R masks
    mask_norm: str = choice("softmax", "sigmoid")
    interaction_layers: int = bounded(1, lo=1, hi=1024)
    insert_after: int = bounded(-1, lo=-1, hi=1024)  # ViT block index; -1 the last
    checkpoint: str = "none"  # none | a saved learned-pathway (or whole model) state dict to start from
    temporal_resize: str = choice("interpolate", "zeros")  # time embeddings when max_frames changed


@dataclass
class FusedConfig:
    """``model.regions: fused``: the fusion layers over the detector's box tokens and the
    RegionLearner's regions (which keep their own sections, detector/region_transformer/learner)."""

    layers: int = bounded(1, lo=0, hi=1024)  # blocks over [CLS] + box tokens + learned tokens, at width model.embed_dim
    heads: int = bounded(4, lo=1, hi=1024)  # must divide model.embed_dim
    mlp_ratio: float = bounded(4.0, lo=0, hi=64, lo_open=True)
    dropout: float = bounded(0.1, lo=0, hi=1, hi_open=True)


@dataclass
class ModelConfig:
    regions: str = field(default="detector", metadata={"choices": pathways.names})  # a registered pathway
    embed_dim: int = bounded(256, lo=1, hi=65536)  # D, the joint space
    text: TextConfig = field(default_factory=TextConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    region_transformer: RegionTransformerConfig = field(default_factory=RegionTransformerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    fused: FusedConfig = field(default_factory=FusedConfig)


# --------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    temperature: float = bounded(0.05, lo=0, lo_open=True)  # tau of the global InfoNCE
    learnable_temperature: bool = False
    min_temperature: float = bounded(0.01, lo=0, lo_open=True)  # floor of a learnable temperature, applied after each step
    align_temperature: float = bounded(0.05, lo=0, lo_open=True)  # tau_a of the region-word softmax
    local_weight: float = bounded(1.0, lo=0)  # lambda
    chunk_size: int = bounded(32, lo=1, hi=65536)  # sentences per chunk of the region-word similarity
    gather: bool = True  # negatives from every rank


# ------------------------------------------------------------------ optim / train
@dataclass
class OptimConfig:
    lr: float = bounded(1.0e-4, lo=0, lo_open=True)
    weight_decay: float = bounded(0.05, lo=0)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = bounded(1.0e-8, lo=0, lo_open=True)
    warmup_steps: int = bounded(100, lo=0)
    min_lr_ratio: float = bounded(0.0, lo=0, hi=1)  # cosine floor as a fraction of lr
    text_lr_mult: float = bounded(1.0, lo=0)
    video_lr_mult: float = bounded(1.0, lo=0)
    head_lr_mult: float = bounded(1.0, lo=0)  # the QA head's lr = optim.lr x this (DemoVLP: 1e-4 head over a 3e-5 backbone)
    grad_clip: float = bounded(1.0, lo=0)


@dataclass
class TrainConfig:
    max_steps: int = bounded(1000, lo=1)
    log_every: int = bounded(10, lo=1)
    val_every: int = bounded(0, lo=0)  # 0: only at the end
    ckpt_every: int = bounded(500, lo=1)
    keep_last: int = bounded(2, lo=1, hi=10_000)
    resume: str = "none"  # none | auto | PATH
    frame_curriculum: List[List[int]] = field(default_factory=list)  # [[step, T], ...]
    max_nonfinite: int = bounded(10, lo=1)  # consecutive non-finite losses before aborting
    grad_accum: int = bounded(1, lo=1)  # micro-batches per optimizer step (deepspeed gradient_accumulation_steps)
    init_from: str = "none"  # none | an export folder | a run dir / checkpoint: weights only (finetuning)


@dataclass
class QAConfig:
    """Open-ended video QA (see regionvlp.qa): a head over the dual encoder, a classifier
    over the K most frequent training answers."""

    enabled: bool = False  # True: the run trains / evaluates the QA head, not retrieval
    num_answers: int = bounded(1500, lo=1, hi=1_000_000)  # K, the answer vocabulary (1500 MSRVTT-QA, 1000 MSVD-QA)
    fusion_layers: int = bounded(2, lo=1, hi=1024)  # transformer layers: question tokens cross-attend to region tokens + [CLS]
    heads: int = bounded(4, lo=1, hi=1024)  # attention heads of the fusion layers (must divide model.embed_dim)
    dropout: float = bounded(0.1, lo=0, hi=1, hi_open=True)
    vocab: str = "auto"  # auto: built from data.train at the start of training | a vocab.json path
    stage_steps: int = bounded(0, lo=0)  # compare / demo: > 0 fine-tunes a QA head this many steps from each retrieval run
    stage_lr: float = bounded(0.0, lo=0)  # optim.lr of that QA stage; 0: the config's optim.lr


@dataclass
class EvalConfig:
    """How ``regionvlp eval`` scores retrieval (stamped in every result's ``protocol``)."""

    rescore: str = choice("none", "dual_softmax")  # dual_softmax: each direction's scores times a softmax over the other axis
    rescore_temperature: float = bounded(0.01, lo=0, lo_open=True)  # tau of that softmax (over cosine-scale scores)
    clips_per_video: int = bounded(1, lo=1, hi=64)  # N evenly spaced clips of data.num_frames each; their embeddings averaged
    captions: str = choice("all", "first")  # all: every caption of a video is a query | first: only its first caption


REPORT_TO = ("tensorboard", "wandb")  # run.report_to: trackers beside metrics.jsonl


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    name: str = "regionvlp"
    device: str = choice("auto", "cpu", "cuda")
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])  # of REPORT_TO; metrics.jsonl always
    offline: bool = False  # true: never download pretrained weights (as HF_HUB_OFFLINE=1)
    remote_dir: str = "none"  # none | s3://bucket/prefix | gs://bucket/prefix | a path (checked by regionvlp.remote)
    collective_timeout_s: float = bounded(600.0, lo=1, hi=86400)  # a collective waiting this long for a gone rank fails


@dataclass
class Config:
    seed: int = bounded(0, lo=0, hi=2**32 - 1)  # numpy / DataLoader seeds are 32-bit
    run: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # passed to deepspeed.initialize


def default_config() -> DictConfig:
    return OmegaConf.structured(Config)


MAX_CONFIG_BYTES = 4 << 20  # one config file (and each of its bases), read at most
def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its ``base:`` files merged underneath it (untyped)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: 'base' includes form a cycle")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a regular file (a device, FIFO or folder)" if path.exists()
                          else f"config file not found: {path}")
    if seen and path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"config {seen[-1]}: base {path} is not a .yaml / .yml file")
    try:  # sized before it is read, and read with the budget (a file growing meanwhile too)
        text = read_file(path, MAX_CONFIG_BYTES, "config")
    except ReadLimitError:
        raise ConfigError(f"config {path} is over {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KB of YAML") from None
    try:
        node = OmegaConf.create(text.decode("utf-8"))
    except Exception as err:  # yaml parse errors, bytes that are not UTF-8
        raise ConfigError(f"config {path}: not valid YAML: {clip(' '.join(str(err).split()))}") from None
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
    raw_key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    full_key = clip(raw_key, QUOTE_CHARS // 2)  # key and message together quote <= QUOTE_CHARS of a file
    msg = (str(getattr(err, "msg", "") or err).splitlines() or [""])[0]
    msg = clip(msg.replace(raw_key, full_key) if raw_key else msg, QUOTE_CHARS // 2)
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        parent, _, leaf = full_key.rpartition(".")
        candidates = _schema_keys(default_config(), parent)
        near = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.5)
        hint = f"; did you mean '{(parent + '.' if parent else '') + near[0]}'?" if near else ""
        valid = f" (valid keys here: {', '.join(candidates)})" if candidates and not near else ""
        return ConfigError(f"{source}: unknown config key '{full_key}'{hint}{valid}")
    return ConfigError(f"{source}: bad value for config key '{full_key}': {msg}")


def _bad(key: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"config key '{key}' is {clip(repr(value))}; it must be {want} (fix it in the YAML or with {key}=...)")


def declared_checks(schema: Optional[type] = None, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted key → the field's declared ``range`` / ``choices`` (see :func:`bounded`,
    :func:`choice`), for every field of the schema that declares one."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields(schema or Config):
        key = prefix + f.name
        if f.metadata:
            out[key] = dict(f.metadata)
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            out.update(declared_checks(f.default_factory, key + "."))
    return out


def _check_range(value: Any, key: str, bounds: tuple[Optional[float], Optional[float], bool, bool]) -> None:
    lo, hi, lo_open, hi_open = bounds
    if value is None:
        return  # an optional key left unset (the schema refuses null for the others)
    want = " and ".join(w for w in (
        None if lo is None else ("> " if lo_open else ">= ") + f"{lo:g}",
        None if hi is None else ("< " if hi_open else "<= ") + f"{hi:g}") if w)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(key, value, f"a number {want}")
    if (lo is not None and (value < lo or (value == lo and lo_open))) or (
            hi is not None and (value > hi or (value == hi and hi_open))):
        raise _bad(key, value, want)


def _check_choice(value: Any, key: str, choices: Any) -> None:
    allowed = tuple(choices() if callable(choices) else choices)  # a callable: e.g. a registry's names
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {clip(repr(value))}; choose one of {', '.join(allowed)}")


def _check_lists(cfg: DictConfig) -> None:
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise _bad("optim.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.98]")
    last, most = -1, declared_checks()["data.num_frames"]["range"][1]  # T: data.num_frames' own bound
    for entry in cfg.train.frame_curriculum:
        pair = list(entry)
        if len(pair) != 2 or pair[0] < 0 or not 1 <= pair[1] <= most or pair[0] <= last:
            raise _bad("train.frame_curriculum", to_container(cfg.train.frame_curriculum),
                       f"[[step, T], ...] with steps >= 0 in increasing order and 1 <= T <= {most:g}")
        last = pair[0]
    for split in ("train", "val", "test"):
        if any(not str(u).strip() for u in cfg.data[split].urls):
            raise _bad(f"data.{split}.urls", list(cfg.data[split].urls), "shard specs without empty entries")


def _check_clip_frames(cfg: DictConfig) -> None:
    frames = max([int(cfg.data.num_frames)] + [int(pair[1]) for pair in cfg.train.frame_curriculum])
    if "learner" in pathways.get(cfg.model.regions).sections and frames > int(cfg.model.learner.max_frames):
        raise ConfigError(f"clips of up to {frames} frames (data.num_frames / train.frame_curriculum) but "
                          f"model.learner.max_frames={cfg.model.learner.max_frames}; set model.learner.max_frames "
                          f">= {frames}")


def _check_relations(cfg: DictConfig) -> None:
    """What no single field can declare: one key against another."""
    rt = cfg.model.region_transformer
    if rt.hidden % rt.heads:
        raise _bad("model.region_transformer.heads", rt.heads, f"a divisor of region_transformer.hidden ({rt.hidden})")
    if cfg.model.embed_dim % cfg.model.fused.heads:
        raise _bad("model.fused.heads", cfg.model.fused.heads, f"a divisor of model.embed_dim ({cfg.model.embed_dim})")
    if int(cfg.model.embed_dim) % int(cfg.qa.heads):
        raise ConfigError(f"config key 'qa.heads' ({cfg.qa.heads}) must divide model.embed_dim ({cfg.model.embed_dim})")
    _check_clip_frames(cfg)


def validate(cfg: DictConfig) -> None:
    """Every value in its declared range, every choice known, lists well formed, related
    keys consistent; :class:`ConfigError` (one line naming the key) otherwise. Run by
    :func:`load_config`; call it again after changing a config in code."""
    for key, declared in declared_checks().items():
        value = OmegaConf.select(cfg, key)
        if "choices" in declared:
            _check_choice(value, key, declared["choices"])
        if "range" in declared:
            _check_range(value, key, declared["range"])
    workers = cfg.data.num_workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 256):
        raise _bad("data.num_workers", workers, "an integer from 0 to 256, or 'auto'")
    _check_lists(cfg)
    if not str(cfg.run.out_dir).strip():
        raise _bad("run.out_dir", cfg.run.out_dir, "a folder path")
    report_to = [str(name) for name in cfg.run.report_to]
    if any(name not in REPORT_TO for name in report_to) or len(set(report_to)) != len(report_to):
        raise _bad("run.report_to", report_to, f"a list of distinct names from {', '.join(REPORT_TO)} (or [])")
    if not str(cfg.qa.vocab).strip():
        raise _bad("qa.vocab", cfg.qa.vocab, "auto or the path of a `regionvlp qa vocab` file")
    check_deepspeed(to_container(cfg.deepspeed), str(cfg.run.out_dir))
    _check_relations(cfg)


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
