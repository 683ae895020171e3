"""Run files and model files: the one reader and writer of checkpoints and exports.

A checkpoint is a plain dict saved with `torch.save` (atomically) and read back with
`weights_only=True`, so a file from a stranger cannot run code:

    format: "segment-deeplab/1"
    model: state dict          config: resolved Config as a dict
    classes: [{id, name, color}]   ignore_index: int   dataset_hash: str | None
    step: int   (training state, when saved by `train`: optimizer, scaler, rng, ...)

`load_any` opens every model file the CLI takes (a run folder, a checkpoint, or an
ONNX, TorchScript or safetensors export) as a model taking RGB in [0, 1].
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

from segment_deeplab.atomic import torch_save
from segment_deeplab.classes import ClassInfo, from_dicts, to_dicts
from segment_deeplab.config import Config, ModelConfig
from segment_deeplab.data.spec import DatasetSpec
from segment_deeplab.device import unwrap
from segment_deeplab.export import tensorrt as tensorrt_export
from segment_deeplab.export.runtime import (
    METADATA_FILE,
    ExportedModel,
    ExportError,
    onnx_runner,
    openvino_metadata,
    openvino_runner,
    quiet,
    sidecar_path,
    torchscript_module,
)
from segment_deeplab.models import ModelError, build_model
from segment_deeplab.models.init import InitSummary, load_state_dict_loose, unwrap_state_dict

FORMAT = "segment-deeplab/1"
RUN_FILES = ("best.pt", "last.pt")  # what a run folder stands for, in this order
TRAINING_KEYS = ("optimizer", "scheduler", "rng", "scaler")
TF_SUFFIXES = (".ckpt", ".index", ".meta", ".pb", ".h5")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message says why."""


# ----------------------------------------------------------------------------- writing
def training_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    spec: DatasetSpec,
    step: int,
    elapsed: float,
    best: float | None,
) -> dict[str, Any]:
    """Everything `--resume` needs to continue exactly, and eval/export to rebuild."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "step": step,
        "elapsed_s": elapsed,
        "best_miou": best,
        "config": cfg.to_dict(),
        "classes": to_dicts(spec.classes),
        "ignore_index": spec.ignore_index,
        "dataset_hash": spec.hash,
        # absolute: report and resume find it from any working folder
        "dataset_path": str(spec.path.resolve()) if spec.path else None,
    }


def without_training_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint minus optimizer, scaler and RNG state (best.pt: eval and export)."""
    return {k: v for k, v in ckpt.items() if k not in TRAINING_KEYS}


def save(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint atomically: an interrupted write never leaves half a file."""
    return torch_save(ckpt, path)


# ----------------------------------------------------------------------------- reading
def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a `.pt/.pth/.bin` (weights only) or `.safetensors` file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors_file(str(path), device=str(map_location))
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(
                f"cannot read {path} as safetensors ({e}); is it complete?"
            ) from e
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


def run_file(path: str | Path) -> Path:
    """A run folder's best.pt (else last.pt); a file stays itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in RUN_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} holds no best.pt or last.pt checkpoint")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a segment-deeplab checkpoint (or a run folder's best/last) and check its format."""
    path = run_file(path)
    obj = load_file(path, map_location)
    if not is_project_checkpoint(obj):
        raise CheckpointError(
            f"{path} is not a segment-deeplab checkpoint (no 'format: {FORMAT}'); a backbone "
            "state dict goes to `model.init_checkpoint` for training instead"
        )
    return obj


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's entries other than weights and training state, for reports: read
    memory-mapped, so the weights are never read from disk."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors, truncated files, code-carrying pickles
        raise CheckpointError(f"cannot read {path} ({type(e).__name__})") from e
    if not isinstance(obj, dict) or "classes" not in obj:
        raise CheckpointError(f"{path} is not a segment-deeplab checkpoint")
    keep = ("step", "elapsed_s", "best_miou", "config", "classes", "ignore_index")
    return {k: obj.get(k) for k in (*keep, "dataset_path", "dataset_hash")}


def checkpoint_classes(ckpt: dict[str, Any]) -> list[ClassInfo]:
    return from_dicts(ckpt["classes"])


def rebuild(config: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[nn.Module, Config]:
    """The model a saved config describes, with `state` loaded, in eval mode.

    Never downloads or reads init files: the weights are all in `state`.
    """
    cfg = Config.from_dict(config)
    cfg.model.pretrained, cfg.model.init_checkpoint = False, None
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return model.eval(), cfg


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint (no network access, no pretrained download).

    Returns:
        (model in eval mode, resolved Config, the checkpoint dict without weights)
    """
    ckpt = read_checkpoint(path, map_location)
    model, cfg = rebuild(ckpt["config"], ckpt.pop("model"))
    return model, cfg, without_training_state(ckpt)


def load_init_checkpoint(model: nn.Module, path: str | Path, verbose: bool = False) -> InitSummary:
    """Initialise `model` from a local weights file: a segment-deeplab checkpoint, or a
    timm or torchvision state dict (.pt/.pth/.bin/.safetensors; see `models.init`)."""
    from segment_deeplab.models.tf_import import init_from_tf, is_tf_checkpoint, summary

    path = Path(path)
    if is_tf_checkpoint(path) or ".data-" in path.name:  # TF DeepLab's model zoo, ...
        report = init_from_tf(model, path.with_name(path.name.split(".data-")[0]))
        return f"init from {path} (TensorFlow): {summary(report)}"
    if path.suffix in TF_SUFFIXES:
        raise ModelError(
            f"{path} looks like a TensorFlow/Keras file that is no V2 checkpoint (a frozen "
            ".pb, .h5, or a .meta graph); give the checkpoint's PREFIX.index, use "
            "model.pretrained=true (timm's ports of the ImageNet weights) or a PyTorch file"
        )
    try:
        obj = load_file(path)
    except CheckpointError as e:
        raise ModelError(f"model.init_checkpoint: {e}") from e
    source = unwrap_state_dict(obj)
    if not source:
        raise ModelError(f"{path} holds no tensors (keys: {list(obj)[:5]})")
    return load_state_dict_loose(model, source, path.name, verbose)


def build_initialised(cfg: ModelConfig, verbose: bool = False) -> nn.Module:
    """`build_model(cfg)`, then the weights of `cfg.init_checkpoint` if set, with the
    one-line summary of what was loaded printed (names too when `verbose`)."""
    model = build_model(cfg, verbose=verbose)
    if cfg.init_checkpoint:
        print(load_init_checkpoint(model, cfg.init_checkpoint, verbose))
    return model


# ----------------------------------------------------------------------------- exports
# First bytes of files users hand over by mistake, for the error message.
_NOT_MODELS = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image"}
MODEL_FILES = (
    "a run folder, a .pt checkpoint, or an export (.onnx, OpenVINO .xml with its .bin, "
    "TorchScript .pt, .safetensors with its .json, TensorRT .engine with its .json)"
)


def sniff_format(path: str | Path) -> str:
    """onnx, openvino, torchscript, safetensors or checkpoint, from the file's first bytes
    (any name).

    Raises:
        CheckpointError: the file is none of them (empty, an image, a damaged archive).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if head[:2] == b"PK":  # a zip archive: TorchScript holds code/, torch.save files do not
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(
                f"{path} is a damaged zip archive (a .pt file cut off while copying?): {e}"
            ) from e
        script = any("/code/" in n or n.endswith(f"extra/{METADATA_FILE}") for n in names)
        return "torchscript" if script else "checkpoint"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: header length, then JSON
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle: a legacy (non-zip) torch.save file
        return "checkpoint"
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version): an ONNX ModelProto
        return "onnx"
    if head.startswith((b"<?xml", b"<net")):  # OpenVINO IR: XML whose root is <net>
        with path.open("rb") as f:
            if b"<net" in f.read(4096):
                return "openvino"
    if tensorrt_export.is_engine(path):  # binary of TensorRT's own; its JSON says so
        return "tensorrt"
    if path.suffix in tensorrt_export.SUFFIXES:
        raise CheckpointError(
            f"{path} is read as a TensorRT engine only with the {path.with_suffix('.json').name} "
            "that deeplab export wrote beside it (classes, normalisation, shapes); copy it along"
        )
    what = next((v for k, v in _NOT_MODELS.items() if head.startswith(k)), None)
    what = what or ("empty" if not head else "not a model file segment-deeplab knows")
    raise CheckpointError(f"{path} is {what}; give {MODEL_FILES}")


def _opened(fmt: str, path: Path, load):
    """`load()`, with a damaged or foreign file reported by name, not as a traceback."""
    try:
        return load()
    except (CheckpointError, ExportError, ModelError):
        raise
    except Exception as e:  # protobuf, zip, safetensors and torch.jit errors differ
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read {path} as {fmt} ({first[:200]}); is it complete? Give {MODEL_FILES}"
        ) from e


def read_metadata(path: str | Path, sidecar: str | Path | None = None) -> dict[str, Any]:
    """The metadata of an exported .onnx, TorchScript, .safetensors or TensorRT file.

    For safetensors it is the JSON beside the weights (`sidecar_path`, or `sidecar`),
    which is what loading reads; the header holds a copy.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    fmt = sniff_format(path)
    if fmt == "onnx":
        props = onnx.load(str(path), load_external_data=False).metadata_props
        return {p.key: json.loads(p.value) for p in props}
    if fmt in ("safetensors", "tensorrt"):
        side = Path(sidecar) if sidecar is not None else sidecar_path(path)
        if not side.is_file():
            raise ExportError(
                f"{side} not found: a .safetensors export keeps its config, classes and "
                f"normalisation in that file; copy it along with {path.name}"
            )
        return json.loads(side.read_text())
    if fmt == "checkpoint":
        raise ExportError(f"{path} is a training checkpoint, not an exported model")
    if fmt == "openvino":
        weights = sidecar_path(path, fmt)
        if not weights.is_file():
            raise ExportError(
                f"{weights} not found: an OpenVINO export keeps its weights in that file; "
                f"copy it along with {path.name}"
            )
        return openvino_metadata(path)
    files = {METADATA_FILE: ""}
    with quiet():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[METADATA_FILE] or "{}")


def load_safetensors(
    path: str | Path, sidecar: str | Path | None = None
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the model of a .safetensors export and its JSON: (eval-mode model, Config, meta).

    Nothing is unpickled: the weights are raw tensors and the rest is JSON.
    """
    meta = read_metadata(path, sidecar)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ExportError(f"{sidecar_path(path)} was not written by segment-deeplab (no config)")
    model, cfg = rebuild(meta["config"], load_safetensors_file(str(path)))
    return model, cfg, meta


def _ours(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Metadata of an export written by `deeplab export`, or a CheckpointError."""
    if not all(k in meta for k in ("classes", "input", "output", "mean")):
        raise CheckpointError(
            f"{path} was not exported by segment-deeplab (its metadata has no class list "
            "and input description); export the model with `deeplab export`"
        )
    return meta


@dataclass
class Loaded:
    """A model file opened for prediction."""

    model: nn.Module  # takes (B, 3, H, W) RGB in [0, 1], returns (B, C, H, W) scores
    classes: list[ClassInfo]
    ignore_index: int
    format: str  # checkpoint, safetensors, onnx or torchscript
    path: Path  # the file read (a run folder's best.pt or last.pt)


def load_any(path: str | Path, device: torch.device | str = "cpu") -> Loaded:
    """Any model file, as `deeplab predict`, `eval --checkpoint` and `Segmenter` take it.

    Args:
        path: run folder (best.pt, then last.pt), checkpoint, or a `deeplab export` file:
            .onnx (run by onnxruntime), TorchScript or .safetensors (with its JSON).
        device: where an ONNX or TorchScript export runs (checkpoints load on the CPU).
    """
    device = torch.device(device)
    path = run_file(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}; give {MODEL_FILES}")
    fmt = sniff_format(path)
    if fmt == "checkpoint":
        model, _, ckpt = _opened(fmt, path, lambda: load_model(path))
        return Loaded(
            model, checkpoint_classes(ckpt), int(ckpt.get("ignore_index", 255)), fmt, path
        )
    if fmt == "safetensors":
        model, _, meta = _opened(fmt, path, lambda: load_safetensors(path))
    elif fmt == "onnx":
        meta = _ours(_opened(fmt, path, lambda: read_metadata(path)), path)
        model = _opened(fmt, path, lambda: ExportedModel(onnx_runner(path, device), meta))
    elif fmt == "openvino":
        meta = _ours(_opened(fmt, path, lambda: read_metadata(path)), path)
        model = _opened(fmt, path, lambda: ExportedModel(openvino_runner(path, device), meta))
    elif fmt == "tensorrt":
        meta = _ours(_opened(fmt, path, lambda: read_metadata(path)), path)
        run = _opened(fmt, path, lambda: tensorrt_export.tensorrt_runner(path, device, meta))
        model = ExportedModel(run, meta)
    else:
        meta = _ours(_opened(fmt, path, lambda: read_metadata(path)), path)
        model = _opened(fmt, path, lambda: ExportedModel(torchscript_module(path, device), meta))
    return Loaded(model, from_dicts(meta["classes"]), int(meta.get("ignore_index", 255)), fmt, path)
