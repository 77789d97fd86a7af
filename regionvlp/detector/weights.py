"""The frozen detector's own weight file beside a run or an export.

A detector built with random weights (``model.detector.weights: none``) cannot be named
later, so the trainer saves it once as ``extractor.safetensors`` in the run folder;
resume, export, evaluation and ``load_model`` load it back from there. Named weights
(torchvision enums, local files) are rebuilt from the config instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from regionvlp.runtime import load_state_strict


WEIGHTS_FILE = "extractor.safetensors"


def save_extractor_weights(extractor: Any, folder: Path) -> None:
    """Write the detector's weights to ``folder/extractor.safetensors`` once, only when
    they are random (``weights: none``)."""
    if str(getattr(extractor, "weights", "")).lower() != "none":
        return
    path = Path(folder) / WEIGHTS_FILE
    if not path.exists():
        state = {k: v.detach().cpu().contiguous() for k, v in extractor.detector.state_dict().items()}
        save_file(state, str(path))


def load_extractor_weights(extractor: Any, folder: Path) -> None:
    """Load ``folder/extractor.safetensors`` into the detector when the file exists."""
    path = Path(folder) / WEIGHTS_FILE
    if path.exists():
        load_state_strict(extractor.detector, load_file(str(path)), f"{path} does not fit model.detector.arch")
