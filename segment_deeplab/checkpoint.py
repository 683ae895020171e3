"""Checkpoints: atomic writes, safe loads, and rebuilding a model from the file alone.

A checkpoint is a plain dict saved with `torch.save` and read back with
`weights_only=True`, so a file from a stranger cannot run code:

    format: "segment-deeplab/1"
    model: state dict          config: resolved Config as a dict
    classes: [{id, name, color}]   ignore_index: int   dataset_hash: str | None
    step: int   (training state, when saved by `train`: optimizer, scheduler, rng, ...)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from segment_deeplab.config import Config
from segment_deeplab.data.spec import ClassInfo

FORMAT = "segment-deeplab/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message says why."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename over `path`.

    An interrupted write never leaves a half-written checkpoint under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a `.pt/.pth/.bin` (weights only) or `.safetensors` file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as st_load

        return st_load(str(path), device=str(map_location))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, code-carrying pickles
        raise CheckpointError(
            f"cannot read {path} as a weights-only checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Files that need code to load are "
            "refused; re-save the state dict with torch.save(model.state_dict(), ...) "
            "or as .safetensors"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def is_project_checkpoint(obj: dict[str, Any]) -> bool:
    return obj.get("format") == FORMAT


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a segment-deeplab checkpoint (or a run folder's best/last) and check its format."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path} holds no best.pt or last.pt checkpoint")
    obj = load_file(path, map_location)
    if not is_project_checkpoint(obj):
        raise CheckpointError(
            f"{path} is not a segment-deeplab checkpoint (no 'format: {FORMAT}'); a backbone "
            "state dict goes to `model.init_checkpoint` for training instead"
        )
    return obj


def checkpoint_classes(ckpt: dict[str, Any]) -> list[ClassInfo]:
    return [ClassInfo(c["id"], c["name"], tuple(c["color"])) for c in ckpt["classes"]]


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint (no network access, no pretrained download).

    Returns:
        (model in eval mode, resolved Config, the checkpoint dict without weights)
    """
    from segment_deeplab.models import build_model

    ckpt = read_checkpoint(path, map_location)
    cfg = Config.from_dict(ckpt["config"])
    cfg.model.pretrained = False
    cfg.model.init_checkpoint = None
    model = build_model(cfg.model)
    model.load_state_dict(ckpt.pop("model"))
    model.eval()
    for key in ("optimizer", "scheduler", "rng", "scaler"):
        ckpt.pop(key, None)
    return model, cfg, ckpt
