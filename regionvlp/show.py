"""Pictures of what each pathway calls a region: ``regionvlp show regions`` and the
``regions.png`` / ``retrieval.png`` figures of the ``compare`` report.

* :func:`pick_clips` — N clips of a shard set, fixed by a seed (the N keys with the
  smallest ``sha256(seed:key)`` among the first ``pool`` samples), decoded as eval does;
* :func:`region_views` — per clip, one sampled frame with each model's views, the ones
  its pathway's registry entry names (:mod:`regionvlp.pathways`): ``boxes``, the real
  boxes of its frozen extractor (its output where ``region_mask`` is True: pixel
  coordinates, scores, class names when the weights name them), and/or ``masks``, the
  RegionLearner's R masks for that frame (the model's own mask output, recorded by the
  pathway's ``capture_masks()``);
* :func:`plot_regions` — one row per clip: the frame, the boxes coloured by score, the
  argmax of the R masks as a colour overlay, the caption;
* :func:`retrieval_views` / :func:`plot_retrieval` — for a few captions, the top-5 clips
  each pathway retrieves (a thumbnail per clip, the true clip outlined).

Everything is drawn by matplotlib's Agg backend (no display); the same seed gives the
same clips and the same picture, and every PNG is kept under :data:`MAX_PNG_BYTES`.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from regionvlp import pathways
from regionvlp.data import SkipCounter, iter_samples, parse_specs, register_webdataset_handlers
from regionvlp.data.loader import batched
from regionvlp.data.reader import ReadOptions, tar_samples
from regionvlp.data.samples import decode_spec, decoded, with_frames
from regionvlp.errors import UserError
from regionvlp.evaluation import embed_local, load_eval_model
from regionvlp.evaluation.embed import Tokenize, similarity_matrix
from regionvlp.model import prepare_batch

MAX_PNG_BYTES = 500_000


@dataclass
class Loaded:
    """A model ready to look at: the dual encoder, its batch transform, its config."""

    model: Any
    transform: Any  # the pathway's frozen batch transform (the detector's region extractor) or None
    cfg: Any
    source: str

    @property
    def regions(self) -> str:
        return str(self.cfg.model.regions)


@dataclass
class Clip:
    key: str
    caption: str
    frames: torch.Tensor  # [T, 3, H, W] uint8, as eval decodes them


@dataclass
class DetectorView:
    boxes: np.ndarray  # [k, 4] pixels (x1, y1, x2, y2) of the real boxes only
    scores: np.ndarray  # [k]
    labels: list[str]  # [k] class names ("" when the detector has none)


@dataclass
class LearnedView:
    masks: np.ndarray  # [R, h, w] the RegionLearner's normalised masks on the patch grid


@dataclass
class ClipView:
    key: str
    caption: str
    frame: np.ndarray  # [H, W, 3] uint8, the frame shown
    frame_index: int  # which of the clip's sampled frames
    num_frames: int
    views: dict[str, DetectorView | LearnedView] = field(default_factory=dict)  # column name -> view


# ------------------------------------------------------------------ loading
def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """A run directory or export folder of any registered pathway; anything else is a UserError."""
    path = Path(checkpoint)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} but no GPU is visible; use --device cpu")
    if path.is_file():
        raise UserError(f"{path} is a file (a `regionvlp detector fit` or pathway weights file?), not a trained "
                        "model; pass a `regionvlp train` run dir or a `regionvlp export` dir")
    if path.is_dir() and not ((path / "model.safetensors").is_file() or (path / "checkpoints").is_dir()
                              or (path / "latest").is_file() or path.name.startswith("step")):
        raise UserError(f"{path} holds no trained model (no model.safetensors, no checkpoints/); pass a "
                        "`regionvlp train` run dir or a `regionvlp export` dir")
    model, transform, cfg, _ = load_eval_model(path, device)
    pathways.get(str(cfg.model.regions))  # a UserError naming the registered ones
    return Loaded(model=model, transform=transform, cfg=cfg, source=str(path))


def expect_view(loaded: Loaded, view: str, name: str) -> None:
    """A UserError when ``loaded``'s pathway has no ``view`` (boxes | masks) to draw;
    ``name`` is the pathway the view comes from."""
    if view not in pathways.get(loaded.regions).views:
        raise UserError(f"{loaded.source} is a {loaded.regions}-pathway checkpoint, not a {name} one "
                        f"(its config has model.regions={loaded.regions}; pathways with {view}: "
                        f"{', '.join(pathways.with_view(view))})")


# -------------------------------------------------------------------- clips
def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def pick_clips(urls: Sequence[str], cfg: Any, n: int, seed: int, *, pool: int = 1000
               ) -> tuple[list[Clip], dict[str, int]]:
    """``n`` clips with frames, fixed by ``seed``, among the first ``pool`` samples of
    ``urls`` (sorted by key); decoded with ``cfg.data`` eval settings. Returns the
    clips and the skip counts (reason -> count) of the samples that could not be shown."""
    if n < 1:
        raise UserError(f"--clips must be >= 1, got {n}")
    shards = parse_specs(list(urls), allow_pipe=bool(cfg.data.allow_pipe))
    register_webdataset_handlers()
    counter = SkipCounter()
    raw = tar_samples(shards.urls, counter, ReadOptions.of(cfg))
    best: list[tuple[str, int, dict[str, Any]]] = []  # the 2n smallest ranks; top = largest (_neg)
    for i, sample in enumerate(raw):
        if i >= pool:
            break
        item = (_neg(_rank(seed, sample["__key__"])), i, sample)
        (heapq.heappush if len(best) < 2 * n else heapq.heappushpop)(best, item)
    ordered = [s for _, _, s in sorted(best, key=lambda x: x[0], reverse=True)]  # smallest rank first
    clips = _decode_clips(ordered, cfg, n, counter)
    if not clips:
        raise UserError(f"no clip with frames to show in {' '.join(urls)} (skipped: {counter.skipped or 'none'}); "
                        "check the shards with `regionvlp shards check`")
    return sorted(clips, key=lambda c: c.key), counter.skipped


def _neg(hexdigest: str) -> str:
    """A key that sorts in the opposite order of ``hexdigest`` (heapq keeps the smallest on top)."""
    return hexdigest.translate(str.maketrans("0123456789abcdef", "fedcba9876543210"))


def _decode_clips(raws: Sequence[dict[str, Any]], cfg: Any, n: int, counter: SkipCounter) -> list[Clip]:
    """The first ``n`` of ``raws`` that decode to frames, decoded as eval does (bad ones counted)."""
    spec = decode_spec(cfg, training=False)
    spec.decode_device = "cpu"  # a picture needs the pixels here, never JPEGs left for a GPU
    clips: list[Clip] = []
    for s in with_frames(decoded(raws, spec, counter, random.Random(0)), counter):
        clips.append(Clip(key=str(s["__key__"]), caption=str(s["caption"]), frames=s["frames"]))
        if len(clips) == n:
            break
    return clips


# -------------------------------------------------------------------- views
def class_names(dcfg: Any) -> list[str] | None:
    """The detector's class names when ``model.detector.weights`` names torchvision weights."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(str(dcfg.arch))
        return list(enum[str(dcfg.weights).split(".")[-1]].meta["categories"])
    except (KeyError, ValueError, AttributeError):
        return None


@torch.no_grad()
def detector_views(loaded: Loaded, frames: torch.Tensor, t: int) -> list[DetectorView]:
    """frames uint8 [B, T, 3, H, W] -> per clip the extractor's real boxes of frame ``t``."""
    expect_view(loaded, "boxes", "detector")
    batch = prepare_batch({"frames": frames.to(loaded.transform.device)}, loaded.transform)
    H, W = frames.shape[-2:]
    scale = torch.tensor([W, H, W, H], dtype=torch.float32)
    names = class_names(loaded.cfg.model.detector)
    views = []
    for b in range(frames.shape[0]):
        real = batch["region_mask"][b, t].cpu()  # [K] bool
        boxes = batch["region_boxes"][b, t].cpu().float()[real] * scale  # [k, 4] pixels
        labels = batch["region_labels"][b, t].cpu()[real].tolist()
        text = [names[i] if names and 0 <= i < len(names) else "" for i in labels]
        views.append(DetectorView(boxes=boxes.numpy(), scores=batch["region_scores"][b, t].cpu().float()[real].numpy(),
                                  labels=text))
    return views


@torch.no_grad()
def learned_views(loaded: Loaded, frames: torch.Tensor, t: int) -> list[LearnedView]:
    """frames uint8 [B, T, 3, H, W] -> per clip the R masks of frame ``t``, as the model's
    own forward computes them (after the pathway's batch transform, when it has one)."""
    expect_view(loaded, "masks", "learned")
    model = loaded.model
    device = next(model.parameters()).device
    with model.pathway.capture_masks() as masks:
        model.encode_video(prepare_batch({"frames": frames.to(device)}, loaded.transform))
    m = masks[-1].float().cpu()  # [B, T, R, h, w]
    return [LearnedView(masks=m[b, t].numpy()) for b in range(frames.shape[0])]


VIEWS = {"boxes": detector_views, "masks": learned_views}  # a registry entry's views -> how they are taken


def region_views(models: Mapping[str, Loaded], clips: Sequence[Clip], *, frame: int | None = None) -> list[ClipView]:
    """One :class:`ClipView` per clip with each model's views of one sampled frame (the
    middle one unless ``frame`` is given): one column per view its pathway's registry
    entry names, called by the model's name (``NAME VIEW`` when it has several)."""
    frames = torch.stack([c.frames for c in clips])  # [B, T, 3, H, W]
    T = frames.shape[1]
    t = T // 2 if frame is None else frame
    if not 0 <= t < T:
        raise UserError(f"frame {t} is outside the clips' {T} sampled frames")
    out = [ClipView(key=c.key, caption=c.caption, frame=c.frames[t].permute(1, 2, 0).numpy(), frame_index=t,
                    num_frames=T) for c in clips]
    for name, loaded in models.items():
        kinds = pathways.get(loaded.regions).views
        for kind in kinds:
            per_clip = VIEWS[kind](loaded, frames, t)
            for view, pv in zip(out, per_clip):
                view.views[name if len(kinds) == 1 else f"{name} {kind}"] = pv
    return out


# ------------------------------------------------------------------ drawing
@contextmanager
def figure(path: Path, nrows: int, ncols: int, cell: tuple[float, float]) -> Iterator[np.ndarray]:
    """A grid of axes (Agg) saved to ``path`` on exit, at a resolution that keeps the PNG
    under :data:`MAX_PNG_BYTES`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(cell[0] * ncols, cell[1] * nrows), squeeze=False)
    try:
        yield axes
        fig.tight_layout()
        for dpi in (100, 80, 60, 45, 30):
            fig.savefig(path, dpi=dpi, metadata={"Software": None})
            if path.stat().st_size < MAX_PNG_BYTES:
                break
    finally:
        plt.close(fig)


def _blank(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def draw_boxes(ax: Any, frame: np.ndarray, view: DetectorView) -> None:
    """The frame with the real boxes [k, 4] (pixels) drawn, coloured by score (cyan = 0 … magenta = 1)."""
    import matplotlib.patches as patches
    from matplotlib import colormaps

    cmap = colormaps["cool"]  # bright at both ends: visible on dark and light frames
    ax.imshow(frame)
    for (x1, y1, x2, y2), score, label in zip(view.boxes.tolist(), view.scores.tolist(), view.labels):
        color = cmap(float(np.clip(score, 0.0, 1.0)))
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.2))
        if label:
            ax.text(x1, y1, f"{label} {score:.2f}", color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": color, "alpha": 0.7, "pad": 0.5, "linewidth": 0})
    _blank(ax)


def draw_masks(ax: Any, frame: np.ndarray, view: LearnedView) -> None:
    """The frame with the argmax of the R masks [R, h, w] over it, one colour per region."""
    from matplotlib import colormaps

    H, W = frame.shape[:2]
    R = view.masks.shape[0]
    ax.imshow(frame)
    owner = view.masks.argmax(axis=0)  # [h, w] which region owns each patch
    ax.imshow(owner, cmap=colormaps["tab20"].resampled(max(R, 2)), vmin=0, vmax=max(R - 1, 1), alpha=0.5,
              interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    _blank(ax)


def plot_regions(views: Sequence[ClipView], path: str | Path) -> Path:
    """One row per clip: the frame, then each pathway's view; the caption under the frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(views[0].views) if views else []
    with figure(path, len(views), 1 + len(names), (2.3, 2.5)) as axes:
        for row, v in zip(axes, views):
            row[0].imshow(v.frame)
            _blank(row[0])
            row[0].set_title(f"{v.key}  (frame {v.frame_index + 1}/{v.num_frames})", fontsize=7)
            row[0].set_xlabel(textwrap.fill(v.caption, 34), fontsize=7)
            for ax, name in zip(row[1:], names):
                view = v.views[name]
                if isinstance(view, DetectorView):
                    draw_boxes(ax, v.frame, view)
                    ax.set_title(f"{name}: {len(view.boxes)} boxes (colour = score)", fontsize=7)
                else:
                    draw_masks(ax, v.frame, view)
                    ax.set_title(f"{name}: argmax of {view.masks.shape[0]} masks", fontsize=7)
    return path


# ---------------------------------------------------------------- retrieval
@dataclass
class Retrieved:
    """One caption and the clips each pathway ranks first for it."""

    caption: str
    true_key: str
    ranked: dict[str, list[str]] = field(default_factory=dict)  # pathway name -> top clip keys, best first


def _thumb(frames: torch.Tensor, side: int) -> np.ndarray:
    """frames uint8 [T, 3, H, W] -> the middle frame as [side, side, 3] uint8."""
    x = frames[frames.shape[0] // 2].float()[None]  # [1, 3, H, W]
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _batches(urls: Sequence[str], cfg: Any, thumbs: dict[str, np.ndarray], side: int) -> Iterator[dict[str, Any]]:
    """Eval-decoded batches of ``urls`` (the loader's :func:`~regionvlp.data.loader.batched`,
    skip counts in each batch's ``skipped``, samples without frames as ``no_frames``);
    the middle frame of every clip lands in ``thumbs``."""
    stream = iter_samples(list(urls), cfg, training=False)

    def thumbed() -> Iterator[dict[str, Any]]:
        for sample in with_frames(stream, stream.counter):
            thumbs[str(sample["__key__"])] = _thumb(sample["frames"], side)
            yield sample

    return batched(thumbed(), max(1, int(cfg.data.batch_size)), drop_last=False, counter=stream.counter,
                   tokenizer=None, max_words=int(cfg.data.max_words))


def rank_clips(loaded: Loaded, urls: Sequence[str], *, max_clips: int = 1000, side: int = 64
               ) -> tuple[Any, torch.Tensor, dict[str, np.ndarray]]:
    """(embeddings, similarity [Nv, Nt], thumbnails by key) of the first ``max_clips``
    clips of ``urls``, scored as ``regionvlp eval`` scores them."""
    thumbs: dict[str, np.ndarray] = {}
    device = next(loaded.model.parameters()).device
    emb = embed_local(loaded.model, _batches(urls, loaded.cfg, thumbs, side), Tokenize(loaded.cfg),
                      batch_transform=loaded.transform, device=device, limit=max_clips)
    if not emb.keys:
        raise UserError(f"no clip with frames to rank in {' '.join(urls)}; check them with `regionvlp shards check`")
    return emb, similarity_matrix(loaded.model, emb, device=device), thumbs


def retrieval_views(models: Mapping[str, Loaded], urls: Sequence[str], *, queries: int = 3, top: int = 5,
                    seed: int = 0, max_clips: int = 1000) -> tuple[list[Retrieved], dict[str, np.ndarray]]:
    """For ``queries`` captions (fixed by ``seed``: one per clip, the clips with the
    smallest ``sha256(seed:key)``), each model's ``top`` clips of ``urls``."""
    ranked = {name: rank_clips(m, urls, max_clips=max_clips) for name, m in models.items()}
    emb0 = next(iter(ranked.values()))[0]
    firsts = {}  # key -> its first caption
    for j, v in enumerate(emb0.text_to_video.tolist()):
        firsts.setdefault(emb0.keys[v], emb0.captions[j])
    picked = sorted(firsts, key=lambda k: _rank(seed, k))[:queries]
    items = [Retrieved(caption=firsts[k], true_key=k) for k in sorted(picked)]
    thumbs: dict[str, np.ndarray] = {}
    for name, (emb, sim, th) in ranked.items():
        texts = {(emb.keys[v], emb.captions[j]): j for j, v in enumerate(emb.text_to_video.tolist())}
        for item in items:
            j = texts.get((item.true_key, item.caption))
            if j is None:
                raise UserError(f"{models[name].source} did not see clip {item.true_key} of {' '.join(urls)}; "
                                "compare models on the same shards and data settings")
            best = sim[:, j].topk(min(top, sim.shape[0])).indices.tolist()  # [top] video rows
            item.ranked[name] = [emb.keys[i] for i in best]
        thumbs.update(th)
    return items, thumbs


def plot_retrieval(items: Sequence[Retrieved], thumbs: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Per caption one row per pathway: its top clips (middle frame), the true clip outlined."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(items[0].ranked) if items else []
    top = max((len(r) for it in items for r in it.ranked.values()), default=1)
    with figure(path, len(items) * len(names), 1 + top, (1.25, 1.35)) as axes:
        rows = iter(axes)
        for item in items:
            for i, name in enumerate(names):
                row = next(rows)
                label = f"“{textwrap.fill(item.caption, 22)}”\n\n{name}" if i == 0 else name
                row[0].text(0.0, 0.5, label, fontsize=6.5, va="center", ha="left", transform=row[0].transAxes)
                row[0].axis("off")
                for rank, ax in enumerate(row[1:]):
                    keys = item.ranked[name]
                    if rank < len(keys):
                        draw_thumb(ax, thumbs[keys[rank]], rank, keys[rank] == item.true_key)
                    else:
                        ax.axis("off")
    return path


def draw_thumb(ax: Any, thumb: np.ndarray, rank: int, true: bool) -> None:
    """One retrieved clip: its thumbnail, its rank; the true clip gets a thick green frame."""
    ax.imshow(thumb)
    _blank(ax)
    ax.set_title(f"#{rank + 1}" + (" (true)" if true else ""), fontsize=6.5, color="green" if true else "black")
    for spine in ax.spines.values():
        spine.set_edgecolor("limegreen" if true else "lightgrey")
        spine.set_linewidth(3.0 if true else 0.8)


# ------------------------------------------------------------------- report
def report_figures(run_dirs: Mapping[str, str | Path], out: str | Path, *, clips: int = 4, queries: int = 3,
                   seed: int | None = None, device: str = "cpu", urls: Sequence[str] | None = None) -> dict[str, str]:
    """``out/regions.png`` and ``out/retrieval.png`` for the ``compare`` report, on
    ``urls`` (raw frames; default: the first run's ``data.val.urls``); returns name -> path."""
    models = {name: load(d, device) for name, d in run_dirs.items()}
    first = next(iter(models.values()))
    urls = [str(u) for u in (first.cfg.data.val.urls if urls is None else urls)]
    if not urls:
        raise UserError(f"{first.source}: its config has no data.val.urls to take the clips from")
    seed = int(first.cfg.seed if seed is None else seed)
    out = Path(out)
    picked, _ = pick_clips(urls, first.cfg, clips, seed)
    regions = plot_regions(region_views(models, picked), out / "regions.png")
    items, thumbs = retrieval_views(models, urls, queries=queries, seed=seed)
    retrieval = plot_retrieval(items, thumbs, out / "retrieval.png")
    return {"regions": str(regions), "retrieval": str(retrieval)}


# ------------------------------------------------------------------ command
def show_regions(checkpoint: str | Path, urls: Sequence[str], out: str | Path, *, clips: int = 4,
                 seed: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """``regionvlp show regions CHECKPOINT URLS --out DIR``: ``DIR/regions.png`` for the
    checkpoint's pathway on ``clips`` clips of ``urls``; returns the JSON summary."""
    if not urls:
        raise UserError("show regions: give the shards to look at (URLS)")
    loaded = load(checkpoint, device)
    seed = int(loaded.cfg.seed if seed is None else seed)
    picked, skipped = pick_clips(urls, loaded.cfg, clips, seed)
    views = region_views({loaded.regions: loaded}, picked)
    path = plot_regions(views, Path(out) / "regions.png")
    return {"regions": loaded.regions, "image": str(path), "bytes": path.stat().st_size,
            "clips": [v.key for v in views], "seed": seed, "skipped": skipped}
