"""`Segmenter`: a trained or exported model as a few lines of Python.

    from segment_deeplab import Segmenter

    seg = Segmenter.from_checkpoint("runs/exp1")  # run folder, .pt, .safetensors, .onnx
    mask = seg.predict("photo.jpg")               # (H, W) uint8 class ids
    seg.colorize(mask).save("photo_mask.png")     # P-mode PNG in the class colours

Loading and prediction are those of `deeplab predict` (`checkpoint.load_any`,
`infer.predict.predict_groups`), so the TTA knobs (scales, flip, sliding window) work
here too, for exported files as well.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from segment_deeplab.checkpoint import load_any, sniff_format
from segment_deeplab.classes import ClassInfo, colorize, overlay
from segment_deeplab.data.decode import read_image
from segment_deeplab.device import pick_device
from segment_deeplab.export.runtime import ExportError
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.predict import predict_groups
from segment_deeplab.infer.runtimes import RUNTIMES, Choice, choose_runtime, probe_size
from segment_deeplab.infer.tta import TTA, forward_dtype, labels

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
BATCH_SIZE = 4  # same-size images per forward pass in `predict_batch`


def to_image_tensor(image: ImageLike) -> torch.Tensor:
    """A path, PIL image, (H, W[, 3|4]) uint8 array or (3, H, W) tensor as uint8 (3, H, W)."""
    if isinstance(image, (str, Path)):
        return read_image(_existing(image))
    if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(
            "expected an image: a file path, a PIL image, an (H, W, 3) uint8 array or a "
            f"(3, H, W) uint8 tensor; got {type(image).__name__}"
        )
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.uint8:
            if image.shape[1] == 0 or image.shape[2] == 0:
                raise ValueError(f"the image is empty: shape {tuple(image.shape)}")
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
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"the image is empty: shape {arr.shape}")
    # copy(): PIL's arrays are read-only, and torch wants to own writable memory.
    return torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1)


def _existing(path: str | Path) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return Path(path)


class Segmenter:
    """Class-id maps and probabilities for images, from a checkpoint or an exported file.

    Attributes:
        model: the nn.Module behind it (an `ExportedModel` for .onnx/TorchScript files).
        classes: the class list (id, name, colour); ids are 0..C-1.
        ignore_index: the mask value that marks unlabelled pixels.
        tta: scales, flip and window, as `deeplab predict --scales/--flip/--window`.
        dtype: the autocast dtype of the forward pass (None: fp32).
        runtime: the engine of the forward pass (PyTorch, onnxruntime, OpenVINO).

    `Segmenter(model, ...)` prepares `model` for inference in place (eval mode, batch
    norm folded into the convolutions, `fold.for_inference`): pass a copy of a model
    you mean to train further. `amp` is "auto" (bf16 on GPUs and AMX CPUs for the
    project's models, as training chooses), "off", "bf16" or "fp16".
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
        amp: str = "auto",
        runtime: str = "auto",
    ) -> None:
        self.device = pick_device(device)
        self.model = for_inference(model, self.device)
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self.tta = TTA(tuple(scales), flip, window)
        self.dtype = forward_dtype(self.model, amp, self.device)
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime '{runtime}'; use one of {', '.join(RUNTIMES)}")
        self._runtime = runtime
        self.choice: Choice | None = None  # made at the first prediction

    @property
    def runtime(self) -> str:
        """The engine that runs the forward pass (chosen at the first prediction when
        `runtime="auto"`; see `infer.runtimes`)."""
        return self.choice.runtime if self.choice else self._runtime

    def _engine(self, first: torch.Tensor | Path) -> tuple[nn.Module, torch.dtype | None]:
        if self.choice is None:
            size = probe_size(first)
            self.choice = choose_runtime(self.model, self.device, self.dtype, self._runtime, size)
            self.model = self.choice.model
            if not self.choice.dtype_applies:
                self.dtype = None
        return self.model, self.dtype

    @property
    def scales(self) -> tuple[float, ...]:
        return self.tta.scales

    @property
    def flip(self) -> bool:
        return self.tta.flip

    @property
    def window(self) -> int | None:
        return self.tta.window

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        window: int | None = None,
        amp: str = "auto",
        runtime: str = "auto",
    ) -> Segmenter:
        """Load a run folder, a checkpoint, or a file written by `deeplab export`.

        Args:
            path: run folder (best.pt, then last.pt), .pt checkpoint, or an exported
                .onnx (run by onnxruntime), TorchScript or .safetensors file (with the
                .json beside it).
            device: auto, cpu, cuda or cuda:N.
            scales, flip, window: TTA settings, see `infer.tta.TTA`.
            amp: precision of the forward pass (exported files always run as saved).
            runtime: auto, torch, onnxruntime or openvino, for a checkpoint on the CPU
                (auto: the fastest that agrees with PyTorch here, see `infer.runtimes`).
        """
        dev = pick_device(device)
        loaded = load_any(path, dev)
        return cls(
            loaded.model, loaded.classes, loaded.ignore_index, dev, scales, flip, window, amp,
            runtime,
        )  # fmt: skip

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "auto", **tta: Any) -> Segmenter:
        """Run an ONNX file written by `deeplab export` (any flags) with onnxruntime.

        Args:
            path: the .onnx file; other formats are refused (they go to `from_checkpoint`).
            device: auto, cpu, cuda or cuda:N; CUDA needs onnxruntime-gpu, else the CPU runs it.
            **tta: scales, flip, window, as for `from_checkpoint`.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        fmt = sniff_format(path)
        if fmt != "onnx":
            raise ExportError(
                f"{path} is not an ONNX file but {fmt}; use Segmenter.from_checkpoint"
            )
        return cls.from_checkpoint(path, device, **tta)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def _probs(
        self, images: Sequence[ImageLike], batch_size: int, probabilities: bool = True
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, (C, H, W) probabilities) per image, same-size images batched together;
        without `probabilities`, scores whose argmax is the class (no softmax)."""
        # Paths stay paths: `predict_groups` decodes them one batch at a time.
        sources = [
            _existing(im) if isinstance(im, (str, Path)) else to_image_tensor(im) for im in images
        ]
        if not sources:
            return
        model, dtype = self._engine(sources[0])
        for p in predict_groups(model, sources, batch_size, self.tta, dtype, probabilities):
            if p.error is not None:
                raise p.error
            yield p.index, p.probs

    def _ids(self, probs: torch.Tensor) -> np.ndarray:
        ids = labels(probs[None])[0].cpu().numpy()
        return ids.astype(np.uint8 if len(self.classes) <= 256 else np.int64)

    def predict_batch(
        self, images: Sequence[ImageLike], batch_size: int = BATCH_SIZE
    ) -> list[np.ndarray]:
        """Class ids of several images: same-size images share a forward pass.

        Args:
            images: paths, PIL images, (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors,
                in any mix of sizes.
            batch_size: most images per forward pass.

        Returns:
            One (H, W) map per image, in input order (see `predict`).
        """
        out: list[np.ndarray] = [np.empty(0)] * len(images)
        for i, p in self._probs(images, batch_size, probabilities=False):
            out[i] = self._ids(p)
        return out

    def predict(self, image: ImageLike | Sequence[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """Class ids, (H, W) uint8 (int64 past 256 classes), at the image's size.

        Args:
            image: a path, PIL image, (H, W, 3) uint8 RGB array or (3, H, W) uint8
                tensor; or a list of them, which goes to `predict_batch`.
        """
        if isinstance(image, (list, tuple)):
            return self.predict_batch(image)
        return self.predict_batch([image], batch_size=1)[0]

    def predict_probs(
        self, image: ImageLike | Sequence[ImageLike], batch_size: int = BATCH_SIZE
    ) -> np.ndarray | list[np.ndarray]:
        """Class probabilities, float32 (C, H, W) at the image's size (a list for a list)."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        out: list[np.ndarray] = [np.empty(0)] * len(images)
        for i, p in self._probs(images, batch_size):
            out[i] = p.cpu().numpy()
        return out if isinstance(image, (list, tuple)) else out[0]

    def colorize(self, mask: np.ndarray | torch.Tensor) -> Image.Image:
        """A class-id map as a P-mode image in the class colours (save it as PNG)."""
        return colorize(mask, self.classes, self.ignore_index)

    def overlay(self, image: ImageLike, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
        """The image with the class colours blended in and a legend beside it."""
        img = to_image_tensor(image)
        return overlay(img, mask, self.classes, alpha=alpha, ignore_index=self.ignore_index)
