"""Evaluation runs: a model (in memory, a training run or an export) on a val/test
shard set → the eval JSON.

Distributed: every rank embeds the samples its loader gives it (the loader visits every
sample exactly once across ranks × workers, last partial batch kept), then embeddings
are gathered with their padding removed, so the metrics over N samples are the same for
any world size. Each rank scores a slice of the text columns and the slices are gathered.
Similarities come from ``DualEncoder.similarity`` (global + λ·local).

Library use::

    from regionvlp.evaluation import evaluate_model
    metrics = evaluate_model(model, cfg, split="val", batch_transform=None, device="cpu")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from regionvlp import dist
from regionvlp.checkpoint import find_checkpoint, load_model, load_run_model
from regionvlp.remote_run import local_weights
from regionvlp.config import load_config, to_container
from regionvlp.data import build_loader
from regionvlp.errors import UserError
from regionvlp.evaluation.embed import EvalEmbeddings, Tokenize, embed_local, gather_embeddings, similarity_matrix
from regionvlp.evaluation.metrics import RESCORE, dual_softmax, mc_accuracy, retrieval_metrics
from regionvlp.evaluation.protocol import checkpoint_stamp, eval_protocol
from regionvlp.qa.evaluate import evaluate_qa
from regionvlp.runtime import local_device

log = logging.getLogger(__name__)


def metrics_from_embeddings(model: Any, emb: EvalEmbeddings, *, device: torch.device | str = "cpu",
                            rescore: str = "none", rescore_temperature: float = 0.01) -> dict[str, Any]:
    """The eval JSON: retrieval metrics, ``num_videos``/``num_texts``, ``mc_accuracy`` +
    ``mc_questions`` when the set has multiple-choice questions, ``skipped``. ``rescore``:
    ``none`` or ``dual_softmax`` (at ``rescore_temperature``) before ranking."""
    if not emb.keys:
        raise UserError("the eval set has no usable samples: check data.val.urls (see `regionvlp shards check`)")
    if rescore not in RESCORE:
        raise UserError(f"eval.rescore is {rescore!r}; choose one of {', '.join(RESCORE)}")
    sim = similarity_matrix(model, emb, device=device)  # [Nv, Nt]
    if rescore == "dual_softmax":
        t2v, v2t = dual_softmax(sim, rescore_temperature)  # [Nv, Nt] each
        out: dict[str, Any] = retrieval_metrics(t2v, emb.text_to_video, v2t)
    else:
        out = retrieval_metrics(sim, emb.text_to_video)
    if emb.mc_answers:
        out["mc_accuracy"] = mc_accuracy(emb.mc_scores, emb.mc_answers)
        out["mc_questions"] = len(emb.mc_answers)
    out["skipped"] = dict(emb.skipped)
    return out


# ------------------------------------------------------------------- entry point
def cache_fingerprint(cfg: Any, split: str, tag: str = "") -> str:
    """What the cached embeddings depend on: the model and eval-data config, the split's
    shards, and ``tag`` (the checkpoint's identity, e.g. its path and step)."""
    c = to_container(cfg)
    d = c["data"]
    keyed = {"model": c["model"], "split": split, "urls": d[split]["urls"], "num_frames": d["num_frames"],
             "size": d["size"], "eval_sampling": d["eval_sampling"], "max_words": d["max_words"],
             "tokenizer": d["tokenizer"], "backend": d["backend"], "tag": tag,
             "clips_per_video": c["eval"]["clips_per_video"], "captions": c["eval"]["captions"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unwrap(model: Any) -> Any:
    """The DualEncoder inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and not hasattr(model, "encode_video"):
        model = model.module
    return model


def evaluate_model(model: Any, cfg: Any, split: str = "val", batch_transform: Any = None,
                   device: torch.device | str | None = None, *, loader: Iterable[Mapping[str, Any]] | None = None,
                   tokenizer: Any = None, tokenize: Any = None, cache_dir: str | os.PathLike | None = None, cache_tag: str = "",
                   limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Retrieval (+ multiple-choice) metrics of ``model`` on ``cfg.data.<split>``.

    Call on every rank under torch.distributed (all ranks return the same dict).
    ``loader`` overrides ``regionvlp.data.build_loader(cfg, split, training=False)``;
    ``tokenize(captions) -> (input_ids, attention_mask)`` overrides the pipeline's
    tokenizer (``tokenizer``, or the one ``cfg.data.tokenizer``/``cfg.model.text.name`` names).
    With ``cache_dir`` the gathered embeddings are saved there (rank 0) and reused by a
    later call with the same config, shards and ``cache_tag``.
    Returns the DESIGN.md eval keys plus ``num_videos``, ``num_texts``, ``skipped``."""
    model = _unwrap(model)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    if split not in ("train", "val", "test"):
        raise UserError(f"eval split must be 'train', 'val' or 'test', got {split!r}")
    if cfg.data.eval_sampling == "random_segment":
        log.warning("data.eval_sampling=random_segment: eval frames are not deterministic; use uniform")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"embeddings-{split}-{cache_fingerprint(cfg, split, cache_tag)}.safetensors"
    was_training = model.training
    model.eval()
    try:
        if cache_file is not None and cache_file.is_file():
            log.info("eval: reusing cached embeddings %s", cache_file)
            emb = EvalEmbeddings.load(cache_file)
            cached = True
        else:
            tok = tokenize if tokenize is not None else Tokenize(cfg, tokenizer)
            if loader is None:
                if not list(getattr(cfg.data, split).urls):
                    raise UserError(f"data.{split}.urls is empty: set it to the eval shards (data.{split}.urls=[...])")
                clips = int(cfg.eval.clips_per_video)
                loader = build_loader(cfg, split, training=False, tokenizer=getattr(tok, "tokenizer", None),
                                      num_frames=int(cfg.data.num_frames) * clips)
            local = embed_local(model, loader, tok, batch_transform=batch_transform, device=device, limit=limit,
                                progress=progress, clips_per_video=int(cfg.eval.clips_per_video),
                                first_caption=cfg.eval.captions == "first")
            emb = gather_embeddings(local)
            cached = False
            if cache_file is not None and dist.is_main():
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(".tmp")
                emb.save(tmp)
                os.replace(tmp, cache_file)
        out = metrics_from_embeddings(model, emb, device=device, rescore=str(cfg.eval.rescore),
                                      rescore_temperature=float(cfg.eval.rescore_temperature))
        out["cached"] = cached
        lam = getattr(getattr(model, "loss", None), "local_weight", cfg.loss.local_weight)  # the model's own λ
        out["protocol"] = eval_protocol(cfg, split, local_weight=float(lam), clips=out["num_videos"],
                                        texts=out["num_texts"])
        return out
    finally:
        model.train(was_training)


# ------------------------------------------------------------------- checkpoints
def load_eval_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Any, Any, Any, str]:
    """``(model, batch_transform, checkpoint_cfg, tag)`` from an export folder
    (``model.safetensors``, via :func:`regionvlp.checkpoint.load_model`), a training run
    directory (its newest complete checkpoint), its ``checkpoints/`` folder or one
    ``checkpoints/stepNNNNNNNN`` tag folder. ``tag`` names what was loaded (cache key)."""
    path = local_weights(str(checkpoint), "--checkpoint")  # a bucket URL: downloaded first
    if not path.exists():
        raise UserError(f"--checkpoint {path}: no such folder; pass a `regionvlp train` run dir or a `regionvlp export` dir")
    device = torch.device(device)
    if (path / "model.safetensors").is_file():
        model = load_model(path, device)
        stamp = (path / "model.safetensors").stat().st_mtime_ns
        return model, model.batch_transform, model.config, f"export:{path.resolve()}:{stamp}"
    model, tag_dir = load_run_model(path, device)
    stamp = tag_dir.stat().st_mtime_ns
    return model, model.batch_transform, model.config, f"run:{tag_dir.resolve()}:{stamp}"


def loaded_weights(path: Path) -> Path:
    """The file or checkpoint folder :func:`load_eval_model` reads for ``path``."""
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    ckpt_dir, tag = find_checkpoint(path, None)
    return ckpt_dir / tag


def run_eval(config: str | os.PathLike | None, checkpoint: str | os.PathLike, overrides: Sequence[str] = (), *,
             split: str = "val", cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> dict[str, Any] | None:
    """``regionvlp eval CONFIG --checkpoint DIR [k=v …]``: the architecture (``model.*``)
    comes from the checkpoint's config, data and eval settings from CONFIG + overrides.
    Returns the metrics on rank 0, ``None`` on other ranks."""
    cfg = load_config(config, overrides)
    started = dist.init_launched_group()
    try:
        device = local_device(str(cfg.run.device))
        model, transform, ckpt_cfg, tag = load_eval_model(checkpoint, device)
        log.info("eval: a %s model from %s", ckpt_cfg.model.regions, checkpoint)
        cfg.model = ckpt_cfg.model  # the architecture the weights were trained with
        if ckpt_cfg.qa.enabled:  # a QA model: answer the questions of the QA shards
            cfg.qa = ckpt_cfg.qa
            cfg.qa.vocab = str(model.__dict__["qa_vocab_file"])
            out = evaluate_qa(model, cfg, split, batch_transform=transform, device=device, limit=limit)
            out["protocol"] = eval_protocol(cfg, split, local_weight=None, clips=out["num_videos"],
                                            texts=out["num_questions"], qa=True)
        else:
            out = evaluate_model(model, cfg, split, batch_transform=transform, device=device,
                                 cache_dir=cache_dir, cache_tag=tag, limit=limit, progress=True)
        if dist.is_main():
            out["protocol"].update(checkpoint_stamp(str(checkpoint), loaded_weights(Path(checkpoint))))
        out = {"checkpoint": str(checkpoint), "regions": str(cfg.model.regions), "split": split, **out}
        return out if dist.is_main() else None
    finally:
        if started:
            dist.destroy_group()
