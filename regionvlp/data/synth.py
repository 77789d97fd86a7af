"""A procedural video-caption world with boxes: ``regionvlp synth``.

Each clip shows 1-3 flat-coloured objects (a shape, a colour, a size) that each do one
thing (move left/right/up/down, stay still, grow, shrink) over a plain or textured
grey background. The caption names every object by its attributes and says what it
does, in varied phrasings. The sample json carries the per-frame pixel box and class
label (the shape) of every object, so a detector can be fitted and box recall measured.

Everything is a pure function of ``(seed, split, index)``: the same seed writes the
same bytes whatever the number of workers. Objects never overlap (their boxes stay
apart in every frame), every object stays inside the frame, and the saturated object
colours never occur in the background, so each box holds its own object's pixels and
nothing of another object.

``compositional=True`` holds out one colour per shape (a seeded diagonal of the
shape x colour table): train clips never contain a held-out pair, every val clip
contains at least one, so val tests recombining attributes seen apart in training.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from regionvlp.data.output import ShardSink, process_pool, shard_urls, write_sizes
from regionvlp.errors import UserError
from regionvlp.runfolder import FolderLock


# class ids: index in CLASSES; 0 is the background (torchvision detection convention)
CLASSES: list[str] = ["__background__", "circle", "square", "triangle", "diamond", "cross"]
SHAPES: list[str] = CLASSES[1:]
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 70, 235),
    "yellow": (240, 225, 30),
    "purple": (150, 50, 210),
    "cyan": (30, 215, 225),
    "orange": (250, 135, 20),
    "pink": (245, 120, 200),
}
SIZES: dict[str, float] = {"small": 0.11, "large": 0.18}  # half-extent as a fraction of the frame side
MOTIONS: list[str] = ["left", "right", "up", "down", "still", "grow", "shrink"]
BACKGROUNDS: list[str] = ["plain", "stripes", "checker", "noise"]
BG_LEVELS = (35, 95)  # background greys stay in this range; object colours are saturated

_TRAVEL = 0.30  # how far a moving object travels over the clip, fraction of the side
_GROW = (0.65, 1.25)  # scale at the start and end of "grow" ("shrink" reversed)

# caption pieces ----------------------------------------------------------------
_MOTION_PHRASES: dict[str, list[str]] = {
    "left": ["moves left", "slides to the left", "drifts left", "goes left"],
    "right": ["moves right", "slides to the right", "drifts right", "goes right"],
    "up": ["moves up", "rises", "goes up", "drifts upward"],
    "down": ["moves down", "falls", "goes down", "drifts downward"],
    "still": ["stays still", "does not move", "stays in place", "remains still"],
    "grow": ["grows", "gets bigger", "expands", "grows larger"],
    "shrink": ["shrinks", "gets smaller", "contracts", "shrinks down"],
}
_BG_PHRASES: dict[str, str] = {
    "plain": "a plain grey background",
    "stripes": "a striped background",
    "checker": "a checkered background",
    "noise": "a grainy background",
}


@dataclass
class SynthObject:
    shape: str
    color: str
    size: str
    motion: str
    label: int  # CLASSES.index(shape)
    cx: float = 0.0  # start centre, pixels
    cy: float = 0.0

    def attrs(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "motion": self.motion, "label": self.label}


@dataclass
class SynthClip:
    key: str
    objects: list[SynthObject]
    background: str
    bg_level: int
    frames: np.ndarray  # [T, H, W, 3] uint8
    ids: np.ndarray  # [T, H, W] int8: object index per pixel, -1 background
    boxes: list[list[list[float]]]  # [T][N] x1,y1,x2,y2 in pixels
    captions: list[str] = field(default_factory=list)


def held_out_pairs(seed: int) -> set[tuple[str, str]]:
    """The compositional split: one colour per shape, each colour at most once."""
    rng = np.random.default_rng([seed, 7_777])
    colors = list(COLORS)
    perm = rng.permutation(len(colors))
    return {(shape, colors[perm[i]]) for i, shape in enumerate(SHAPES)}


# ---------------------------------------------------------------------- geometry
def _trajectory(obj: SynthObject, size: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, y and half-extent r per frame; ``t`` in [0, 1]. Shapes [T]."""
    r0 = SIZES[obj.size] * size
    travel = _TRAVEL * size
    dx = {"left": -1.0, "right": 1.0}.get(obj.motion, 0.0)
    dy = {"up": -1.0, "down": 1.0}.get(obj.motion, 0.0)
    cx = obj.cx + dx * travel * t
    cy = obj.cy + dy * travel * t
    if obj.motion == "grow":
        r = r0 * (_GROW[0] + (_GROW[1] - _GROW[0]) * t)
    elif obj.motion == "shrink":
        r = r0 * (_GROW[1] + (_GROW[0] - _GROW[1]) * t)
    else:
        r = np.full_like(t, r0)
    return cx, cy, r


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's unit frame (u, v in [-1, 1] span the extent)."""
    au, av_ = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 0.85) & (av_ <= 0.85)
    if shape == "triangle":  # apex up, base at v = 0.8
        return (v <= 0.8) & (v >= -1.0 + 1.8 * au)
    if shape == "diamond":
        return au + av_ <= 1.0
    if shape == "cross":
        return ((au <= 0.34) & (av_ <= 1.0)) | ((av_ <= 0.34) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, objs: list[SynthObject], size: int, t: np.ndarray) -> bool:
    """Pick start centres so every object stays in frame and no two boxes ever meet."""
    margin = 2.0
    placed: list[np.ndarray] = []  # [T, 4] analytic boxes of placed objects
    for obj in objs:
        for _ in range(30):
            r_max = SIZES[obj.size] * size * (_GROW[1] if obj.motion in ("grow", "shrink") else 1.0)
            travel = _TRAVEL * size
            lo_x, hi_x = r_max + margin, size - r_max - margin
            lo_y, hi_y = lo_x, hi_x
            if obj.motion == "left":
                lo_x += travel
            elif obj.motion == "right":
                hi_x -= travel
            elif obj.motion == "up":
                lo_y += travel
            elif obj.motion == "down":
                hi_y -= travel
            if lo_x > hi_x or lo_y > hi_y:
                return False
            obj.cx, obj.cy = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            cx, cy, r = _trajectory(obj, size, t)
            box = np.stack([cx - r, cy - r, cx + r, cy + r], axis=1)  # [T, 4]
            clash = any(
                np.any((box[:, 0] < other[:, 2] + margin) & (other[:, 0] < box[:, 2] + margin)
                       & (box[:, 1] < other[:, 3] + margin) & (other[:, 1] < box[:, 3] + margin))
                for other in placed
            )
            if not clash:
                placed.append(box)
                break
        else:
            return False
    return True


def _background(rng: np.random.Generator, kind: str, level: int, size: int) -> np.ndarray:
    """[H, W, 3] uint8 greys in BG_LEVELS."""
    lo, hi = BG_LEVELS
    if kind == "plain":
        g = np.full((size, size), level, np.float32)
    elif kind == "stripes":
        period = rng.integers(6, 16)
        yy, xx = np.mgrid[0:size, 0:size]
        axis = xx if rng.random() < 0.5 else yy
        g = level + 12.0 * ((axis // (period // 2)) % 2 * 2 - 1)
    elif kind == "checker":
        period = rng.integers(8, 20)
        yy, xx = np.mgrid[0:size, 0:size]
        g = level + 12.0 * (((xx // period) + (yy // period)) % 2 * 2 - 1)
    else:  # noise, smoothed so it compresses
        coarse = rng.normal(0.0, 10.0, (size // 8 + 1, size // 8 + 1))
        g = level + np.kron(coarse, np.ones((8, 8)))[:size, :size]
    g = np.clip(g, lo, hi).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


# ----------------------------------------------------------------------- sampling
def _sample_objects(rng: np.random.Generator, n: int, allowed, need_held: set | None) -> list[SynthObject]:
    """``allowed(shape, color)`` filters pairs; ``need_held``: one object must use such a pair."""
    objs: list[SynthObject] = []
    used: set[tuple[str, str]] = set()
    colors = list(COLORS)
    for i in range(n):
        for _ in range(100):
            if i == 0 and need_held:
                shape, color = sorted(need_held)[rng.integers(len(need_held))]
            else:
                shape = SHAPES[rng.integers(len(SHAPES))]
                color = colors[rng.integers(len(colors))]
            if (shape, color) in used or not allowed(shape, color):
                continue
            used.add((shape, color))
            size_name = list(SIZES)[rng.integers(len(SIZES))]
            motion = MOTIONS[rng.integers(len(MOTIONS))]
            objs.append(SynthObject(shape, color, size_name, motion, CLASSES.index(shape)))
            break
    return objs


def _object_phrase(rng: np.random.Generator, obj: SynthObject) -> str:
    style = rng.integers(3)
    if style == 0:
        return f"a {obj.size} {obj.color} {obj.shape}"
    if style == 1:
        return f"a {obj.color} {obj.shape} that is {obj.size}"
    return f"a {obj.size} {obj.shape} colored {obj.color}"


def make_captions(rng: np.random.Generator, objs: list[SynthObject], background: str, n: int = 5) -> list[str]:
    """``n`` different phrasings naming every object and what it does; the first is plain."""
    captions: list[str] = []
    for k in range(n * 4):
        if len(captions) == n:
            break
        parts = []
        for obj in objs:
            phrases = _MOTION_PHRASES[obj.motion]
            if k == 0:
                parts.append(f"a {obj.size} {obj.color} {obj.shape} {phrases[0]}")
            else:
                parts.append(f"{_object_phrase(rng, obj)} {phrases[rng.integers(len(phrases))]}")
        order = list(range(len(parts))) if k == 0 else list(rng.permutation(len(parts)))
        parts = [parts[i] for i in order]
        if len(parts) == 1:
            body = parts[0]
        elif len(parts) == 2:
            joiner = [" while ", " and ", "; meanwhile "][0 if k == 0 else rng.integers(3)]
            body = parts[0] + joiner + parts[1]
        else:
            body = ", ".join(parts[:-1]) + [" and ", " while "][0 if k == 0 else rng.integers(2)] + parts[-1]
        if k > 0 and rng.random() < 0.4:
            body = f"{body} on {_BG_PHRASES[background]}"
        if k > 0 and rng.random() < 0.3:
            body = ["in this clip ", "here ", "we see that "][rng.integers(3)] + body
        if body not in captions:
            captions.append(body)
    return captions


def render_clip(seed: int, split: str, index: int, *, size: int = 128, frames: int = 16,
                compositional: bool = False) -> SynthClip:
    """The clip ``index`` of ``split``: a pure function of its arguments."""
    split_id = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([seed, split_id, index])
    held = held_out_pairs(seed) if compositional else set()
    if compositional and split == "train":
        allowed, need = (lambda s, c: (s, c) not in held), None
    else:
        allowed, need = (lambda s, c: True), (held if compositional else None)
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    for _ in range(50):
        n = int(rng.integers(1, 4))
        objs = _sample_objects(rng, n, allowed, need)
        if len(objs) == n and _place(rng, objs, size, t):
            break
    else:  # a single object always fits
        objs = _sample_objects(rng, 1, allowed, need)
        objs[0].motion = "still"
        objs[0].cx = objs[0].cy = size / 2
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    level = int(rng.integers(BG_LEVELS[0] + 10, BG_LEVELS[1] - 10))
    bg = _background(rng, background, level, size)

    video = np.broadcast_to(bg, (frames, size, size, 3)).copy()  # [T, H, W, 3]
    ids = np.full((frames, size, size), -1, np.int8)  # [T, H, W]
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    boxes = [[None] * len(objs) for _ in range(frames)]
    for j, obj in enumerate(objs):
        cx, cy, r = _trajectory(obj, size, t)  # [T] each
        # draw inside the window the object sweeps over the clip, not the whole frame
        x0, x1 = max(int(np.floor((cx - r).min())) - 1, 0), min(int(np.ceil((cx + r).max())) + 1, size)
        y0, y1 = max(int(np.floor((cy - r).min())) - 1, 0), min(int(np.ceil((cy + r).max())) + 1, size)
        u = (grid[None, None, x0:x1] - cx[:, None, None]) / r[:, None, None]  # [T, 1, w]
        v = (grid[None, y0:y1, None] - cy[:, None, None]) / r[:, None, None]  # [T, h, 1]
        mask = _shape_mask(obj.shape, u, v)  # [T, h, w]
        video[:, y0:y1, x0:x1][mask] = COLORS[obj.color]
        ids[:, y0:y1, x0:x1][mask] = j
        cols, rows = mask.any(axis=1), mask.any(axis=2)  # [T, w], [T, h]
        for f in range(frames):
            xs, ys = np.flatnonzero(cols[f]), np.flatnonzero(rows[f])
            if len(xs) == 0:  # degenerate (cannot happen at sane sizes): analytic box
                boxes[f][j] = [float(cx[f] - r[f]), float(cy[f] - r[f]), float(cx[f] + r[f]), float(cy[f] + r[f])]
            else:
                boxes[f][j] = [float(x0 + xs[0]), float(y0 + ys[0]), float(x0 + xs[-1] + 1), float(y0 + ys[-1] + 1)]
    key = f"synth_{split}_{index:07d}"
    captions = make_captions(rng, objs, background)
    return SynthClip(key, objs, background, level, video, ids, boxes, captions)


# ----------------------------------------------------------------------- encoding
def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = 18, gop: int = 8) -> bytes:
    """H.264 (yuv420p) MP4 bytes of ``frames`` [T, H, W, 3] uint8 (H, W even)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # one thread: parallelism is across clips; x264 is then bit-exact per input
        stream.options = {"preset": "superfast", "crf": str(crf), "g": str(gop), "threads": "1",
                          "bframes": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ------------------------------------------------------------------------ video QA
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_DIRECTIONS = ("left", "right", "up", "down")


def make_qa(seed: int, split: str, index: int, objs: list[SynthObject]) -> list[dict[str, str]]:
    """Questions the clip answers, at most one of each kind: the colour of a named shape
    (what), which shape has a colour (other), where an object moves (where), how many
    objects (how). A question is only asked when its answer is unique in the clip. Drawn
    from their own seeded stream, so captions and pixels do not change with ``--qa``."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], index, 4242])
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    pairs: list[dict[str, str]] = []
    unique_shape = [o for o in objs if shapes.count(o.shape) == 1]
    if unique_shape:
        o = unique_shape[rng.integers(len(unique_shape))]
        pairs.append({"question": f"what color is the {o.shape}?", "answer": o.color})
    unique_color = [o for o in objs if colors.count(o.color) == 1]
    if unique_color:
        o = unique_color[rng.integers(len(unique_color))]
        pairs.append({"question": f"which shape is {o.color}?", "answer": o.shape})
    moving = [o for o in objs if o.motion in _DIRECTIONS]
    if moving:
        o = moving[rng.integers(len(moving))]
        pairs.append({"question": f"where does the {o.color} {o.shape} move?", "answer": o.motion})
    pairs.append({"question": "how many objects are there?", "answer": _COUNT_WORDS[len(objs)]})
    return pairs


def clip_sample(clip: SynthClip, fps: int, qa: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The webdataset sample: mp4 + txt + json as the agreed interface states."""
    frames, height, width = clip.frames.shape[:3]
    meta = {
        "status": "success",
        "caption": clip.captions[0],
        "captions": clip.captions,
        "width": width,
        "height": height,
        "num_frames": frames,
        "fps": fps,
        "objects": [o.attrs() for o in clip.objects],
        "boxes": clip.boxes,
        "labels": [o.label for o in clip.objects],
        "background": clip.background,
    }
    if qa is not None:
        meta["qa"] = qa
    return {"__key__": clip.key, "mp4": encode_mp4(clip.frames, fps),
            "txt": clip.captions[0].encode(), "json": json.dumps(meta).encode()}


# --------------------------------------------------------------------- the command
@dataclass
class SynthSpec:
    seed: int = 0
    size: int = 128
    frames: int = 16
    fps: int = 8
    compositional: bool = False
    qa: bool = False


def _make(args: tuple[SynthSpec, str, int]) -> dict[str, Any] | tuple[str, str]:
    spec, split, index = args
    try:
        clip = render_clip(spec.seed, split, index, size=spec.size, frames=spec.frames,
                           compositional=spec.compositional)
        qa = make_qa(spec.seed, split, index, clip.objects) if spec.qa else None
        return clip_sample(clip, spec.fps, qa)
    except Exception as err:  # an encoder failure is counted, not fatal
        return (f"synth_{split}_{index:07d}", f"{type(err).__name__}: {err}")


def _samples(spec: SynthSpec, split: str, n: int, pool) -> Iterator[dict[str, Any] | tuple[str, str]]:
    jobs = ((spec, split, i) for i in range(n))
    if pool is None:
        return map(_make, jobs)
    return pool.imap(_make, jobs, chunksize=4)


def synth(out: str | Path, *, videos: int, seed: int = 0, val_videos: int | None = None,
          size: int = 128, frames: int = 16, fps: int = 8, shard_size: int = 100, workers: int = 1,
          compositional: bool = False, qa: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write ``out/train/*.tar`` and ``out/val/*.tar`` (+ ``sizes.json`` each, ``world.json``);
    ``qa``: every clip's json also holds ``qa`` question/answer pairs (:func:`make_qa`)."""
    if videos < 1:
        raise UserError("synth: --videos must be at least 1")
    if size < 32 or size % 2:
        raise UserError(f"synth: --size must be an even number >= 32 (H.264 yuv420p), got {size}")
    if frames < 1 or fps < 1 or shard_size < 1:
        raise UserError("synth: --frames, --fps and --shard-size must be >= 1")
    if val_videos is None:
        val_videos = max(1, videos // 10)
    if val_videos < 0:
        raise UserError("synth: --val-videos must be >= 0")
    out = Path(out)
    spec = SynthSpec(seed=seed, size=size, frames=frames, fps=fps, compositional=compositional, qa=qa)
    start = time.perf_counter()
    summary: dict[str, Any] = {"out": str(out), "samples": 0, "skipped": {}, "shards": 0,
                               "shard_size": shard_size}
    failed: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "synth OUT"):  # a second synth into OUT would clear the splits this one writes
        pool = process_pool(workers)
        try:
            for split, n in (("train", videos), ("val", val_videos)):
                _write_split(out / split, _samples(spec, split, n, pool), n, split, summary, failed, progress)
            if pool is not None:
                pool.close()  # finished: let the workers exit on their own
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    world = {"classes": CLASSES, "colors": list(COLORS), "sizes": list(SIZES), "motions": MOTIONS,
             "backgrounds": BACKGROUNDS, "spec": asdict(spec),
             "held_out_pairs": sorted(map(list, held_out_pairs(seed))) if compositional else []}
    (out / "world.json").write_text(json.dumps(world, indent=1) + "\n")
    seconds = time.perf_counter() - start
    summary.update(seconds=round(seconds, 3), clips_per_s=round((videos + val_videos) / seconds, 2),
                   failed_keys=failed, classes=CLASSES, compositional=compositional, qa=qa)
    return summary


def _write_split(split_dir: Path, samples, n: int, split: str, summary: dict[str, Any],
                 failed: list[str], progress: bool) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(split_dir.glob("*.tar")) + list(split_dir.glob("*.tar*.tmp")):
        stale.unlink()  # a re-run replaces the whole split
    sink = ShardSink(split_dir, summary["shard_size"])
    bar = tqdm(total=n, desc=f"synth {split}", unit="clip", file=sys.stderr, disable=not progress)
    try:
        for item in samples:
            if isinstance(item, tuple):
                failed.append(item[0])
                summary["skipped"]["encode_error"] = summary["skipped"].get("encode_error", 0) + 1
                print(f"synth: skipped {item[0]}: {item[1]}", file=sys.stderr)
            else:
                sink.write(item)
            bar.update(1)
        sink.finish_shard()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    write_sizes(split_dir, sink.sizes)
    done = sum(sink.sizes.values())
    summary[split] = {"samples": done, "shards": len(sink.sizes), "urls": shard_urls(split_dir, len(sink.sizes))}
    summary["samples"] += done
    summary["shards"] += len(sink.sizes)

