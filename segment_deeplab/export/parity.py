"""Exported files read back (format, metadata, model) and compared with PyTorch.

`load_for_inference` opens any model file, checkpoint or export, for `deeplab predict`
and `Segmenter` alike.

The parity check runs the PyTorch model and the reloaded export on the same images, at
sizes other than the one the export was traced at, so a graph that froze its example
size fails here. It reports the max logit difference and the argmax agreement.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segment_deeplab.checkpoint import FORMAT
from segment_deeplab.config import Config
from segment_deeplab.data.spec import ClassInfo

SYNTHETIC_BATCHES = ((2, 97, 131), (1, 160, 224))  # (B, H, W): an odd and an aligned size
MIN_AGREEMENT = 0.999  # argmax pixel agreement
LOGIT_RTOL = 1e-3  # max |logit diff| allowed, relative to the largest |logit| (at least 1)
MAX_SIDE = 512  # parity images are shrunk to this: a full photo adds time, not evidence
METADATA_FILE = "segment_deeplab.json"  # TorchScript extra file with the metadata


class ExportError(ValueError):
    """An export that cannot be made or read as asked; the message says how to fix it."""


class ParityError(ExportError):
    """The export cannot be compared at all: it fails to run, or gives another shape."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    # Tracer and deprecation chatter tells users nothing they can act on; the parity
    # check at other sizes is what shows whether the exported graph is right.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sniff_format(path: str | Path) -> str:
    """onnx, torchscript, safetensors or checkpoint, from the file's first bytes (any name)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":  # a zip archive: TorchScript holds code/, torch.save files do not
        with zipfile.ZipFile(path) as z:
            script = any(
                "/code/" in n or n.endswith(f"extra/{METADATA_FILE}") for n in z.namelist()
            )
        return "torchscript" if script else "checkpoint"
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle: a legacy (non-zip) torch.save file
        return "checkpoint"
    return "onnx"


def sidecar_path(path: str | Path) -> Path:
    """The JSON beside a .safetensors export: model.safetensors -> model.json."""
    return Path(path).with_suffix(".json")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported .onnx, TorchScript or .safetensors file.

    For safetensors it is the JSON beside the weights (`sidecar_path`), which is what
    loading reads; the header holds a copy.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported model not found: {path}")
    fmt = sniff_format(path)
    if fmt == "onnx":
        import onnx

        props = onnx.load(str(path), load_external_data=False).metadata_props
        return {p.key: json.loads(p.value) for p in props}
    if fmt == "safetensors":
        side = sidecar_path(path)
        if not side.is_file():
            raise ExportError(
                f"{side} not found: a .safetensors export keeps its config, classes and "
                f"normalisation in that file; copy it along with {path.name}"
            )
        return json.loads(side.read_text())
    if fmt == "checkpoint":
        raise ExportError(f"{path} is a training checkpoint, not an exported model")
    files = {METADATA_FILE: ""}
    with quiet():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return json.loads(files[METADATA_FILE] or "{}")


def load_safetensors(path: str | Path) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild the model of a .safetensors export and its JSON: (eval-mode model, Config, meta).

    Nothing is unpickled: the weights are raw tensors and the rest is JSON.
    """
    from safetensors.torch import load_file

    from segment_deeplab.models import build_model

    meta = read_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ExportError(f"{sidecar_path(path)} was not written by segment-deeplab (no config)")
    cfg = Config.from_dict(meta["config"])
    cfg.model.pretrained, cfg.model.init_checkpoint = False, None
    model = build_model(cfg.model)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), cfg, meta


class ExportedModel(nn.Module):
    """An ONNX or TorchScript export behind the PyTorch model's contract.

    Takes (B, 3, H, W) RGB in [0, 1] and returns (B, C, H, W) scores, whatever steps
    were baked into the export, so `predict_probs` can run it with TTA.
    """

    def __init__(self, run: Callable[[torch.Tensor], Any], meta: dict[str, Any]) -> None:
        super().__init__()
        self.run = run  # a TorchScript module registers as a submodule: device follows it
        # onnxruntime runs on threads of its own, which `inference.in_streams` cannot share.
        self.own_threads = not isinstance(run, nn.Module)
        self.uint8_input = meta["input"]["dtype"] == "uint8"
        self.labels_output = meta["output"]["name"] == "labels"
        self.num_classes = len(meta["classes"])
        self.output_stride = int(meta.get("output_stride", 1))
        # Exports of models that needed their input padded to the stride lack the key.
        self.input_multiple = int(meta.get("input_multiple", self.output_stride))
        self.register_buffer("mean", torch.tensor(meta["mean"]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uint8_input:  # x came from uint8 / 255: rounding restores it exactly
            x = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        y = torch.as_tensor(self.run(x.contiguous())).to(x.device)
        if self.labels_output:
            # Scores whose softmax is one-hot to float precision: TTA averaging becomes a vote.
            y = F.one_hot(y.long(), self.num_classes).permute(0, 3, 1, 2).float() * 50.0
        return y


def onnx_runner(path: str | Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """An onnxruntime session as a function of tensors (CUDA when asked and available)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(str(path), providers=providers)
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.cpu().numpy()})[0])


def load_for_inference(
    path: str | Path, device: torch.device
) -> tuple[nn.Module, list[ClassInfo], int]:
    """Any model file, as `deeplab predict` and `Segmenter` take it.

    Args:
        path: run folder (best.pt, then last.pt), checkpoint, or a `deeplab export` file:
            .onnx (run by onnxruntime), TorchScript or .safetensors (with its JSON).

    Returns:
        (model taking (B, 3, H, W) RGB in [0, 1], classes, ignore index)
    """
    from segment_deeplab.checkpoint import checkpoint_classes, load_model

    path = Path(path)
    fmt = sniff_format(path) if path.is_file() else "checkpoint"
    if fmt == "checkpoint":
        model, _, ckpt = load_model(path)
        return model, checkpoint_classes(ckpt), int(ckpt.get("ignore_index", 255))
    if fmt == "safetensors":
        model, _, meta = load_safetensors(path)
    elif fmt == "onnx":
        meta = read_metadata(path)
        model = ExportedModel(onnx_runner(path, device), meta)
    else:
        meta = read_metadata(path)
        with quiet():  # torch.jit's deprecation notice
            model = ExportedModel(torch.jit.load(str(path), map_location=device), meta)
    classes = [ClassInfo(c["id"], c["name"], tuple(c["color"])) for c in meta["classes"]]
    return model, classes, int(meta.get("ignore_index", 255))


@dataclass
class Parity:
    """Exported model vs PyTorch on the same inputs."""

    max_abs_diff: float | None  # None when the output is class ids
    tolerance: float | None
    agreement: float  # fraction of pixels with the same argmax
    pixels: int
    images: int
    sizes: list[list[int]]  # (H, W) of each batch
    source: str  # "synthetic", or the image folder and "synthetic"

    @property
    def passed(self) -> bool:
        logits_ok = self.max_abs_diff is None or self.max_abs_diff <= (self.tolerance or 0.0)
        return logits_ok and self.agreement >= MIN_AGREEMENT

    def summary(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        diff = ""
        if self.max_abs_diff is not None:
            diff = f"max |logit diff| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.2e}), "
        return (
            f"parity {'ok' if self.passed else 'FAILED'}: {diff}argmax agreement "
            f"{100 * self.agreement:.3f}% (need {100 * MIN_AGREEMENT:.1f}%) over "
            f"{self.images} images ({self.source}; {sizes})"
        )


def synthetic_images(b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """uint8 (b, 3, h, w): smooth colour regions plus noise, closer to photos than noise."""
    coarse = torch.rand(b, 3, max(1, h // 16), max(1, w // 16), generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(b, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _shrink(img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[-2:]
    if max(h, w) <= MAX_SIDE:
        return img
    size = (max(1, round(h * MAX_SIDE / max(h, w))), max(1, round(w * MAX_SIDE / max(h, w))))
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def parity_images(
    data: str | Path | None, spec: str | Path | None = None, count: int = 3
) -> tuple[list[torch.Tensor], str]:
    """uint8 (B, 3, H, W) batches to compare on, and where they came from.

    Args:
        data: a dataset (the first images of its val split, else train) or a plain
            image folder; None: synthetic images only. Synthetic images at an odd
            size and batch 2 always come too: real images may all have the traced size.
        spec: a dataset.yaml kept elsewhere.
        count: how many images to take from `data`.
    """
    g = torch.Generator().manual_seed(0)
    synthetic = [synthetic_images(b, h, w, g) for b, h, w in SYNTHETIC_BATCHES]
    if data is None:
        return synthetic, "synthetic"
    from segment_deeplab.data.spec import IMAGE_EXTS, SPEC_NAME, DatasetError, open_dataset
    from segment_deeplab.data.dataset import read_image

    root = Path(data)
    if root.is_dir() and not (root / SPEC_NAME).is_file() and not (root / "images").is_dir():
        folder, stems = root, None  # a plain folder of images
    else:
        ds = open_dataset(root, spec=spec)
        folder = ds.image_dir
        split = next((s for s in ("val", "train") if s in ds.splits), None)
        stems = set(ds.split_stems(split)) if split else None
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    files = [f for f in files if stems is None or f.stem in stems][:count]
    if not files:
        raise DatasetError(
            f"no images for the parity check in {folder}; drop --data to use synthetic ones"
        )
    real = [_shrink(read_image(f))[None] for f in files]
    return real + synthetic[:1], f"{folder} and synthetic"


def as_input(images: torch.Tensor, preprocessing: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) as an exported model takes it."""
    if preprocessing:
        return images.permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3) uint8
    return images.float() / 255.0


@torch.no_grad()
def check_parity(
    module: nn.Module, runner: Callable, batches: list[torch.Tensor], source: str
) -> Parity:
    """Run `module` (PyTorch, a DeployModel) and `runner` (the reloaded export) alike.

    Raises:
        ParityError: the export fails to run at a size, or gives another output shape.
    """
    diff, scale, same, pixels, sizes = 0.0, 0.0, 0, 0, []
    for images in batches:
        x = as_input(images, module.preprocessing)
        ref = module(x)
        size = "x".join(map(str, images.shape[-2:]))
        try:
            out = torch.as_tensor(runner(x))
        except Exception as e:  # e.g. a graph that froze the example size
            raise ParityError(f"the export fails on {len(images)} image(s) of {size}: {e}") from e
        if out.shape != ref.shape:
            raise ParityError(
                f"the export gives shape {tuple(out.shape)} at {size}, PyTorch {tuple(ref.shape)}"
            )
        if not module.argmax:
            diff = max(diff, (out.float() - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            ref, out = ref.argmax(1), out.argmax(1)
        same += (ref == out).sum().item()
        pixels += ref.numel()
        sizes.append(list(images.shape[-2:]))
    logits = not module.argmax
    return Parity(
        max_abs_diff=diff if logits else None,
        tolerance=LOGIT_RTOL * max(1.0, scale) if logits else None,
        agreement=same / max(1, pixels),
        pixels=pixels,
        images=sum(len(b) for b in batches),
        sizes=sizes,
        source=source,
    )
