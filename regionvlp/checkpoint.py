"""Export a training checkpoint to a self-contained folder, and load it back.

``regionvlp export RUN_DIR OUT`` writes::

    OUT/model.safetensors      consolidated fp32 weights of the dual encoder (all ZeRO stages)
    OUT/config.yaml            the run's resolved config, model.text.name -> OUT/text
    OUT/text/                  the trained text encoder + tokenizer (transformers format)
    OUT/extractor.safetensors  the frozen detector's weights, only when they were random
                               (detector weights: none) and so cannot be named
    OUT/qa_vocab.json          the answer vocabulary, only for a QA model (qa.enabled)
    OUT/export.json            step, source checkpoint, parameter count

``regionvlp.load_model(OUT)`` rebuilds the :class:`~regionvlp.model.DualEncoder` from
the config, loads the weights strictly and attaches the frozen extractor (detector
pathway) as ``model.batch_transform`` (``None`` for the learned pathway).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from regionvlp import dist, remote
from regionvlp.config import load_config, to_yaml
from regionvlp.data.qa import VOCAB_FILE, load_vocab
from regionvlp.detector.weights import WEIGHTS_FILE, load_extractor_weights
from regionvlp.errors import UserError
from regionvlp.runtime import file_sha256, load_state_strict
from regionvlp.model import DualEncoder, build_batch_transform, build_model


# The only non-tensor, non-container types DeepSpeed's checkpoint files hold (its ZeRO
# optimizer states: the loss scaler, the stage enum, fragment addresses). Model states
# (mp_rank_00_model_states.pt) need none beyond torch's own weights-only set.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _deepspeed_globals() -> list[Any]:
    found = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # an older/newer DeepSpeed without it: not allowed then
            continue
    return found


def load_torch_file(path: str | Path, *, deepspeed_types: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` without pickle code: tensors, plain containers and (with
    ``deepspeed_types``) :data:`DEEPSPEED_SAFE_GLOBALS` only. Anything else (a pickled
    callable, a class that could run code) is a :class:`UserError`; nothing runs."""
    path = Path(path)
    allowed = _deepspeed_globals() if deepspeed_types else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise UserError(f"{path}: refused to load: it holds {found.group(1) if found else 'pickled objects'} besides "
                        "tensors, which could "
                        "run code; load only checkpoints you trust, or ask for a safetensors export "
                        "(`regionvlp export`)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"{path}: not a readable torch checkpoint ({' '.join(str(err).split())[:200]})") from None


def verify_checkpoint_files(tag_dir: Path) -> None:
    """Load every DeepSpeed ``*_states.pt`` of a checkpoint the safe way (memory-mapped)
    before DeepSpeed's own loader, which unpickles freely, is allowed near it."""
    for file in sorted(tag_dir.glob("*_states.pt")):
        load_torch_file(file, deepspeed_types=True, mmap=True)


# ------------------------------------------------------------------ resume manifest
MANIFEST = "manifest.json"
_UNLISTED = (MANIFEST, "client_state.done")  # written after the manifest / the manifest itself


def file_listing(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of the files in checkpoint folder ``tag_dir``."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name not in _UNLISTED}


def write_manifest(tag_dir: Path, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Record every file of a checkpoint this run just wrote (size + sha256), so a resume
    can tell the run's own checkpoint from one dropped in or altered afterwards. ``files``:
    the listing of every node's part of the tag (default: this folder's files)."""
    files = file_listing(tag_dir) if files is None else files
    tmp = tag_dir / (MANIFEST + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"regionvlp_manifest": 1, "files": files}, indent=1))
    tmp.replace(tag_dir / MANIFEST)


def check_manifest(tag_dir: Path, run_ckpt_dir: Path) -> None:
    """Resuming unpickles DeepSpeed's files, so it is only allowed from a
    checkpoint of this run (under ``run.out_dir/checkpoints``) whose files still match the
    manifest the run wrote. Anything else is a :class:`UserError`; weights from elsewhere
    go through ``train.init_from`` (weights only, no pickle)."""
    tag_dir = Path(tag_dir)
    if tag_dir.resolve().parent != Path(run_ckpt_dir).resolve():
        raise UserError(f"train.resume: {tag_dir} is not a checkpoint of this run ({run_ckpt_dir}); resuming loads "
                        "pickled state, so only a run's own checkpoints resume; start from other weights with "
                        "train.init_from=PATH")
    try:
        listed = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"train.resume: {tag_dir} has no valid {MANIFEST} (written by regionvlp train after each "
                        "checkpoint); it cannot be resumed, use train.init_from=PATH for its weights") from None
    present = {p.name for p in tag_dir.iterdir() if p.is_file() and p.name not in _UNLISTED}
    changed = sorted(present ^ set(listed))
    changed += [n for n in sorted(present & set(listed)) if (tag_dir / n).stat().st_size != listed[n].get("bytes")
                or file_sha256(tag_dir / n) != listed[n].get("sha256")]
    if changed:
        raise UserError(f"train.resume: {tag_dir} changed since this run wrote it ({', '.join(changed[:5])}); "
                        "refusing to unpickle it; resume an earlier checkpoint or use train.init_from=PATH")


TAG_PATTERN = re.compile(r"^step(\d+)$")


# ------------------------------------------------------------------- tag folders
def tag_for(step: int) -> str:
    """The checkpoint folder name of optimizer step ``step``."""
    return f"step{step:08d}"


def list_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints (those DeepSpeed finished writing), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)
            and (p / "client_state.done").exists()]
    return sorted(tags, key=lambda t: int(TAG_PATTERN.match(t).group(1)))


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """``none`` → None; ``auto`` → the newest complete checkpoint in the run (or None);
    ``PATH`` → a tag folder (…/step00000100) or a checkpoint folder holding ``latest``."""
    if resume in ("", "none", None):
        return None
    if resume == "auto":
        tags = list_tags(ckpt_dir)
        return (ckpt_dir, tags[-1]) if tags else None
    path = Path(resume).expanduser()
    if (path / "latest").is_file() and not list(path.glob("*model_states.pt")):
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and list(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise UserError(f"train.resume={resume}: not a checkpoint (expected a folder with 'latest' or "
                    f"*_model_states.pt); use auto, none or a path under RUN_DIR/checkpoints")


def find_checkpoint(run_dir: Path, tag: str | None) -> tuple[Path, str]:
    """``(checkpoints folder, tag)`` of a run dir (newest complete tag unless ``tag``), a
    checkpoints folder or one tag folder."""
    if (run_dir / "checkpoints").is_dir():
        ckpt_dir = run_dir / "checkpoints"
        if tag is None:
            tags = list_tags(ckpt_dir)
            if not tags:
                raise UserError(f"{ckpt_dir}: no complete checkpoint; train longer or check train.ckpt_every")
            tag = tags[-1]
        if not (ckpt_dir / tag).is_dir():
            raise UserError(f"{ckpt_dir}: no checkpoint '{tag}' (have: {', '.join(list_tags(ckpt_dir))})")
        return ckpt_dir, tag
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder; pass a run directory (run.out_dir) written by `regionvlp train`")
    try:
        found = resolve_resume(str(run_dir), run_dir)  # a tag folder or a checkpoints folder
    except UserError:
        raise UserError(f"{run_dir}: no checkpoints/ folder and not a checkpoint itself; pass a run directory "
                        "(run.out_dir) written by `regionvlp train`") from None
    assert found is not None
    return found


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint: ZeRO 1-3 through DeepSpeed's own
    ``zero_to_fp32`` (the fp32 master copy), ZeRO 0 from the module state."""
    tag_dir = ckpt_dir / tag
    if list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        dist.setup_accelerator_env()
        verify_checkpoint_files(tag_dir)  # zero_to_fp32 unpickles these files
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        file = tag_dir / "mp_rank_00_model_states.pt"
        if not file.exists():
            raise UserError(f"{tag_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
        state = load_torch_file(file)
        if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
            raise UserError(f"{file}: no 'module' weights; not a DeepSpeed checkpoint written by `regionvlp train`")
        state = state["module"]
    return {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}


def read_config(path: Path):
    """The run/export config at ``path``, with a clear error when it is missing."""
    if not path.is_file():
        raise UserError(f"{path} not found; pass a run directory written by `regionvlp train`")
    return load_config(path)


def attach_extractor(model: DualEncoder, cfg: Any, weights_dir: Path, device: str | torch.device) -> DualEncoder:
    """``model.config`` and ``model.batch_transform`` (the frozen extractor on ``device``
    with the weights file of ``weights_dir`` when there is one, or None) as plain
    attributes: never child modules, never in the state dict."""
    transform = build_batch_transform(cfg)
    if transform is not None:
        load_extractor_weights(transform, weights_dir)
        transform.to(device)
    model.__dict__["batch_transform"] = transform
    model.__dict__["config"] = cfg
    return model


def load_run_model(path: str | Path, device: str | torch.device = "cpu", tag: str | None = None, *,
                   extractor: bool = True) -> tuple[DualEncoder, Path]:
    """A training run dir (newest complete checkpoint unless ``tag``), its checkpoints
    folder or one tag folder → ``(model in eval mode on device, tag folder)``; the model
    carries ``.config`` and ``.batch_transform`` like :func:`load_model`'s (the frozen
    extractor is built only when ``extractor``; else ``.batch_transform`` is None)."""
    ckpt_dir, tag = find_checkpoint(Path(path), tag)
    run_dir = ckpt_dir.parent
    cfg = read_config(run_dir / "config.yaml")
    state = consolidated_state_dict(ckpt_dir, tag)  # refuses an unsafe file before any model is built
    model = build_model(cfg)
    load_state_strict(model, state, f"checkpoint {ckpt_dir / tag} does not match {run_dir / 'config.yaml'}")
    model.to(device).eval()
    attach_qa_vocab(model, run_dir)
    if not extractor:
        model.__dict__.update(batch_transform=None, config=cfg)
        return model, ckpt_dir / tag
    return attach_extractor(model, cfg, run_dir, device), ckpt_dir / tag


def export(run_dir: str | Path, out: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Consolidate the newest (or ``tag``) checkpoint of ``run_dir`` into ``out`` (a folder,
    or ``s3://`` / ``gs://``: written locally, then uploaded, ``export.json`` last)."""
    if remote.is_remote(out):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            info = export(run_dir, tmp, tag)
            remote.put_folder(Path(tmp), str(out), last="export.json")
        return {**info, "out": str(out)}
    run_dir, out = Path(run_dir), Path(out)
    model, tag_dir = load_run_model(run_dir, "cpu", tag, extractor=False)
    ckpt_dir, tag, cfg = tag_dir.parent, tag_dir.name, model.config
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; every tensor gets its own copy
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    text = getattr(model, "text_tower", None)
    if text is not None and hasattr(text, "encoder"):
        text.encoder.save_pretrained(str(out / "text"))
        if getattr(text, "tokenizer", None) is not None:
            text.tokenizer.save_pretrained(str(out / "text"))
        cfg.model.text.name = "text"  # relative to OUT; load_model resolves it
    if (ckpt_dir.parent / WEIGHTS_FILE).exists():
        shutil.copyfile(ckpt_dir.parent / WEIGHTS_FILE, out / WEIGHTS_FILE)
    if cfg.qa.enabled:  # the answer vocabulary travels with a QA model
        shutil.copyfile(qa_vocab_file(ckpt_dir.parent), out / VOCAB_FILE)
        cfg.qa.vocab = VOCAB_FILE  # relative to OUT; load_model resolves it
    cfg.train.resume = "none"
    (out / "config.yaml").write_text(to_yaml(cfg))
    info = {"out": str(out), "source": str(ckpt_dir / tag), "step": step_of(ckpt_dir, tag),
            "parameters": sum(v.numel() for v in model.state_dict().values()), "regions": str(cfg.model.regions),
            "dtype": "float32"}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info


def step_of(ckpt_dir: Path, tag: str) -> int | None:
    done = ckpt_dir / tag / "client_state.done"
    return int(done.read_text()) if done.exists() else None


def qa_vocab_file(folder: Path) -> Path:
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        raise UserError(f"{folder}: a QA model without {VOCAB_FILE}; it is written at the start of QA training "
                        "and copied by `regionvlp export`")
    return path


def attach_qa_vocab(model: torch.nn.Module, folder: Path) -> None:
    """A QA model (``qa_head``) gets its answer vocabulary from ``folder/qa_vocab.json``."""
    if hasattr(model, "qa_head"):
        path = qa_vocab_file(folder)
        model.answers = load_vocab(path).answers
        model.__dict__["qa_vocab_file"] = path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DualEncoder:
    """An exported folder → a ready :class:`~regionvlp.model.DualEncoder` in eval mode,
    with ``.config`` and ``.batch_transform`` (the frozen extractor or ``None``). A QA
    export gives a :class:`~regionvlp.model.QAModel` with its vocabulary:
    ``model.answer(batch) -> list[str]``."""
    path = remote.local_copy(str(path), "load_model")  # an export in a bucket: downloaded first
    if not (path / "model.safetensors").is_file():
        raise UserError(f"{path}: no model.safetensors; create it with `regionvlp export RUN_DIR {path}`")
    cfg = read_config(path / "config.yaml")
    if not Path(str(cfg.model.text.name)).is_absolute() and (path / str(cfg.model.text.name)).is_dir():
        cfg.model.text.name = str(path / str(cfg.model.text.name))
    if cfg.qa.enabled:
        cfg.qa.vocab = str(path / VOCAB_FILE)
    model = build_model(cfg)
    load_state_strict(model, load_file(str(path / "model.safetensors")),
                      f"{path / 'model.safetensors'} does not match {path / 'config.yaml'}")
    model.to(device).eval()
    attach_qa_vocab(model, path)
    return attach_extractor(model, cfg, path, device)
