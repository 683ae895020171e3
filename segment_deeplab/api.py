"""`Segmenter`: a trained or exported model as a few lines of Python.

    from segment_deeplab import Segmenter

    seg = Segmenter.from_checkpoint("runs/exp1")  # run folder, .pt, .safetensors, .onnx
    mask = seg.predict("photo.jpg")               # (H, W) uint8 class ids
    seg.colorize(mask).save("photo_mask.png")     # P-mode PNG in the class colours

Prediction goes through `engine.inference.predict_probs`, so the TTA knobs of
`deeplab predict` (scales, flip, sliding window) work here too, for exported files as well.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segment_deeplab.checkpoint import checkpoint_classes, load_model
from segment_deeplab.data.dataset_spec import ClassInfo
from segment_deeplab.engine.distributed import pick_device
from segment_deeplab.engine.exported import (
    METADATA_FILE,
    load_safetensors,
    quiet,
    read_metadata,
    sniff_format,
)
from segment_deeplab.engine.inference import predict_probs, prepare_model
from segment_deeplab.palette import colorize, overlay

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor

# Scores given to the class an argmax-baked export picked: their softmax is one-hot to
# float precision, so averaging over TTA passes becomes a vote.
_ONE_HOT_SCORE = 50.0


class ExportedModel(nn.Module):
    """An ONNX or TorchScript export behind the PyTorch model's contract.

    Takes (B, 3, H, W) RGB in [0, 1] and returns (B, C, H, W) scores, whatever steps
    were baked into the export, so `predict_probs` can run it with TTA.
    """

    def __init__(self, run: Callable[[torch.Tensor], Any], meta: dict[str, Any]) -> None:
        super().__init__()
        self.run = run  # a TorchScript module registers as a submodule: device follows it
        self.uint8_input = meta["input"]["dtype"] == "uint8"
        self.labels_output = meta["output"]["name"] == "labels"
        self.num_classes = len(meta["classes"])
        self.output_stride = int(meta.get("output_stride", 1))
        self.register_buffer("mean", torch.tensor(meta["mean"]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:  # x came from uint8 / 255: rounding restores it exactly
            x = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        y = torch.as_tensor(self.run(x.contiguous()))
        if self.labels_output:
            y = F.one_hot(y.long(), self.num_classes).permute(0, 3, 1, 2).float()
            y = y * _ONE_HOT_SCORE
        return y


def _onnx_runner(path: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(str(path), providers=providers)
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.cpu().numpy()})[0])


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds code/; a torch.save checkpoint does not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith(f"extra/{METADATA_FILE}") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def to_image_tensor(image: ImageLike) -> torch.Tensor:
    """A path, PIL image, (H, W[, 3|4]) uint8 array or (3, H, W) tensor as uint8 (3, H, W)."""
    if isinstance(image, (str, Path)):
        from segment_deeplab.engine.predict import load_image

        if not Path(image).is_file():
            raise FileNotFoundError(f"image not found: {image}")
        return load_image(Path(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.uint8:
            return image
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image, got {arr.dtype}; for floats in [0, 1] pass "
            "(image * 255).round().astype(np.uint8)"
        )
    if arr.ndim == 2:  # grey
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {arr.shape}")
    # copy(): PIL's arrays are read-only, and torch wants to own writable memory.
    return torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1)


class Segmenter:
    """Class-id maps and probabilities for images, from a checkpoint or an exported file.

    Attributes:
        model: the nn.Module behind it (an `ExportedModel` for .onnx/TorchScript files).
        classes: the class list (id, name, colour); ids are 0..C-1.
        ignore_index: the mask value that marks unlabelled pixels.
        scales, flip, window: TTA, as `deeplab predict --scales/--flip/--window`.
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[ClassInfo],
        ignore_index: int = 255,
        device: str | torch.device = "cpu",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        window: int | None = None,
    ) -> None:
        self.device = torch.device(device) if not isinstance(device, str) else pick_device(device)
        self.model = prepare_model(model, self.device)
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self.scales, self.flip, self.window = tuple(scales), flip, window

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        window: int | None = None,
    ) -> Segmenter:
        """Load a run folder, a checkpoint, or a file written by `deeplab export`.

        Args:
            path: run folder (best.pt, then last.pt), .pt checkpoint, or an exported
                .onnx (run by onnxruntime), TorchScript or .safetensors file.
            device: auto, cpu, cuda or cuda:N.
            scales, flip, window: TTA settings, see `engine.inference.predict_probs`.
        """
        path, dev = Path(path), pick_device(device)
        tta = {"scales": scales, "flip": flip, "window": window}
        fmt = sniff_format(path) if path.is_file() else "checkpoint"
        if fmt == "torchscript" and not _is_torchscript(path):
            fmt = "checkpoint"
        if fmt == "checkpoint":
            model, _, ckpt = load_model(path)
            classes, ignore = checkpoint_classes(ckpt), int(ckpt.get("ignore_index", 255))
            return cls(model, classes, ignore, dev, **tta)
        if fmt == "safetensors":
            model, _, meta = load_safetensors(path)
        elif fmt == "onnx":
            meta = read_metadata(path)
            model = ExportedModel(_onnx_runner(path, dev), meta)
        else:
            meta = read_metadata(path)
            with quiet():  # torch.jit's deprecation notice
                model = ExportedModel(torch.jit.load(str(path), map_location=dev), meta)
        classes = [ClassInfo(c["id"], c["name"], tuple(c["color"])) for c in meta["classes"]]
        return cls(model, classes, int(meta.get("ignore_index", 255)), dev, **tta)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def _probs(self, image: ImageLike) -> torch.Tensor:
        x = to_image_tensor(image)
        p = predict_probs(
            self.model, x, scales=self.scales, flip=self.flip, window=self.window
        )  # (1, C, H, W)
        return p[0]

    def predict_probs(self, image: ImageLike | list[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """Class probabilities, float32 (C, H, W) at the image's size (a list for a list)."""
        if isinstance(image, list):
            return [self.predict_probs(im) for im in image]
        return self._probs(image).cpu().numpy()

    def predict(self, image: ImageLike | list[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """Class ids, (H, W) uint8 (int64 past 256 classes), at the image's size.

        Args:
            image: a path, PIL image, (H, W, 3) uint8 RGB array or (3, H, W) uint8
                tensor; or a list of them, which gives a list of maps.
        """
        if isinstance(image, list):
            return [self.predict(im) for im in image]
        ids = self._probs(image).argmax(0).cpu().numpy()
        return ids.astype(np.uint8 if len(self.classes) <= 256 else np.int64)

    def colorize(self, mask: np.ndarray | torch.Tensor) -> Image.Image:
        """A class-id map as a P-mode image in the class colours (save it as PNG)."""
        return colorize(mask, self.classes, self.ignore_index)

    def overlay(self, image: ImageLike, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
        """The image with the class colours blended in and a legend beside it."""
        img = to_image_tensor(image)
        return overlay(img, mask, self.classes, alpha=alpha, ignore_index=self.ignore_index)
