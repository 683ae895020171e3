"""Prediction: image files, folders and globs in; index PNGs and overlays out.

For each input `<stem>.jpg` the output folder gets `<stem>.png` (a P-mode class-id
mask at the original size, coloured with the checkpoint's class colours),
`<stem>_overlay.jpg` (the image with the classes blended in and a legend) and, if
asked, `<stem>_probs.npy` (float16 C x H x W probabilities). An unreadable input is
reported and skipped; the rest are still written.

`predict_groups` is the one prediction loop: `deeplab predict` and `Segmenter` both
run images through it, so they decode and batch images alike.
"""

from __future__ import annotations

import glob
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from segment_deeplab.data.spec import IMAGE_EXTS, ClassInfo
from segment_deeplab.data.dataset import read_image
from segment_deeplab.infer.tta import (
    _model_device,
    cpu_streams,
    in_streams,
    labels,
    predict_probs,
    prepare_model,
)
from segment_deeplab.classes import colorize, overlay

# EXIF orientations that turn the picture by 90 degrees (width and height swap).
_TRANSPOSED = (5, 6, 7, 8)


@dataclass
class PredictResult:
    """Masks written (one per image) and inputs that failed, with the reason."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"wrote {len(self.written)}, failed {len(self.failed)}"
        if self.failed:
            text += ": " + "; ".join(f"{name} ({why})" for name, why in self.failed)
        return text


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (their jpg/jpeg/png files) and globs, in order, once each.

    Returns:
        (image paths, [(input, reason)] for inputs that name nothing)
    """
    paths: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in map(str, inputs):
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                missing.append((item, f"no {'/'.join(IMAGE_EXTS)} files in this folder"))
        elif p.is_file():
            found = [p]
        elif any(ch in item for ch in "*?["):
            found = [Path(f) for f in sorted(glob.glob(item, recursive=True))]
            found = [f for f in found if f.is_file() and f.suffix.lower() in IMAGE_EXTS]
            if not found:
                missing.append((item, "no image files match"))
        else:
            missing.append((item, "not found"))
            found = []
        paths.extend(found)
    seen: set[Path] = set()
    unique = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique, missing


def output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique (`a`, `a_2`, ...) so two inputs never share outputs."""
    counts: dict[str, int] = {}
    stems = []
    for p in paths:
        n = counts.get(p.stem, 0) + 1
        counts[p.stem] = n
        stems.append(p.stem if n == 1 else f"{p.stem}_{n}")
    return stems


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) after EXIF orientation, read from the header without decoding pixels."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in _TRANSPOSED:
            w, h = h, w
    return h, w


def load_image(path: Path) -> torch.Tensor:
    """Decode to uint8 (3, H, W) RGB, with the EXIF orientation applied."""
    return read_image(path, hint="")


def _groups(items: list[tuple[int, tuple[int, int]]], batch_size: int) -> Iterator[list[int]]:
    """Indices of same-size images, in chunks of at most `batch_size`."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in items:
        by_size.setdefault(size, []).append(i)
    for idx in by_size.values():
        for k in range(0, len(idx), batch_size):
            yield idx[k : k + batch_size]


def predict_groups(
    model: nn.Module,
    sources: Sequence[Path | torch.Tensor],
    batch_size: int = 1,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    on_error: Callable[[int, Exception], None] | None = None,
    amp: str = "auto",
    streams: int | None = None,
    then: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
) -> Iterator[Any]:
    """Probabilities of images, those of the same size predicted together.

    Args:
        model: in eval mode on its device (see `prepare_model`).
        sources: image files, decoded one batch at a time (a long list never sits in
            memory whole), or uint8 (3, H, W) tensors.
        batch_size: most images per forward pass.
        scales, flip, window, amp: TTA and precision, see `predict_probs`.
        on_error: called with (index, exception) for a source that cannot be read,
            which is then skipped; None: the exception propagates.
        streams: batches decoded and predicted at once, each in its own thread
            (`inference.in_streams`); None: `inference.cpu_streams`.
        then: called in the stream with (index, image, probabilities) of each image
            (e.g. to write files while the other stream predicts); what it returns is
            yielded instead of the tuple.

    Yields:
        (index into `sources`, image uint8 (3, H, W), probabilities (C, H, W)), or what
        `then` makes of them, grouped by size rather than in input order.
    """

    def failed(i: int, e: Exception) -> None:
        if on_error is None:
            raise e
        on_error(i, e)

    def run(group: list[int]) -> list[Any]:
        loaded: list[tuple[int, torch.Tensor]] = []
        for i in group:
            src = sources[i]
            try:
                loaded.append((i, src if torch.is_tensor(src) else load_image(src)))
            except Exception as e:  # corrupt pixel data behind a valid header
                failed(i, e)
        out = []
        # Decoded sizes match the headers; a mismatch still must not break the batch.
        for shape in dict.fromkeys(t.shape for _, t in loaded):
            batch = [(i, t) for i, t in loaded if t.shape == shape]
            images = torch.stack([t for _, t in batch])
            probs = predict_probs(model, images, scales, flip, window, amp=amp)
            for (i, image), p in zip(batch, probs, strict=True):
                out.append((i, image, p) if then is None else then(i, image, p))
        return out

    sized: list[tuple[int, tuple[int, int]]] = []
    for i, src in enumerate(sources):
        try:
            sized.append((i, tuple(src.shape[-2:]) if torch.is_tensor(src) else image_size(src)))
        except Exception as e:  # unreadable header: not an image, truncated, no access
            failed(i, e)
    if streams is None:
        streams = cpu_streams(_model_device(model), model)
    for done in in_streams(run, list(_groups(sized, max(1, batch_size))), streams):
        yield from done


def _write(
    out: Path,
    stem: str,
    image: torch.Tensor,
    probs: torch.Tensor,
    classes: Sequence[ClassInfo],
    ignore_index: int,
    save_probs: bool,
) -> Path:
    pred = labels(probs[None])[0].to(torch.uint8).cpu().numpy()  # (H, W)
    mask_path = out / f"{stem}.png"
    colorize(pred, classes, ignore_index).save(mask_path)
    overlay(image, pred, classes, ignore_index=ignore_index).save(
        out / f"{stem}_overlay.jpg", quality=90
    )
    if save_probs:
        np.save(out / f"{stem}_probs.npy", probs.to(torch.float16).cpu().numpy())
    return mask_path


def predict(
    model: nn.Module,
    inputs: Sequence[str | Path],
    output: str | Path,
    classes: Sequence[ClassInfo],
    ignore_index: int = 255,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    batch_size: int = 1,
    save_probs: bool = False,
    progress: bool = True,
    amp: str = "auto",
    streams: int | None = None,
) -> PredictResult:
    """Predict every input image and write its mask, overlay (and probabilities).

    Args:
        model: in eval mode on its device (see `prepare_model`).
        inputs: files, folders and glob patterns.
        classes: the checkpoint's classes (colours, names for the legend).
        batch_size: images of the same size are predicted together.
        streams: batches predicted and written at once (see `predict_groups`).
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths, failed = collect_inputs(inputs)
    result = PredictResult(failed=list(failed))
    stems = output_stems(paths)
    bar = tqdm(total=len(paths), desc="predict", file=sys.stderr, disable=not progress)

    lock = threading.Lock()  # `skip` runs in the streams, the loop below in this thread

    def skip(i: int, e: Exception) -> None:
        with lock:
            result.failed.append((paths[i].name, _reason(e)))
            bar.update(1)

    def write(i: int, image: torch.Tensor, p: torch.Tensor) -> tuple[int, Path | str]:
        """In the stream that predicted it: the mask path, or why it could not be written."""
        try:
            return i, _write(out, stems[i], image, p, classes, ignore_index, save_probs)
        except OSError as e:  # disk full, permissions: report, keep going
            return i, _reason(e)

    options = {"scales": scales, "flip": flip, "window": window, "amp": amp, "streams": streams}
    for i, written in predict_groups(
        model, paths, batch_size, **options, on_error=skip, then=write
    ):
        with lock:
            if isinstance(written, Path):
                result.written.append(written)
            else:
                result.failed.append((paths[i].name, written))
            bar.update(1)
    bar.close()
    return result


def run_predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    output: str | Path,
    device: str = "auto",
    **options,
) -> PredictResult:
    """Load a model (run folder, checkpoint or export) and `predict` with its classes."""
    from segment_deeplab.device import pick_device
    from segment_deeplab.export.parity import load_for_inference

    dev = pick_device(device)
    model, classes, ignore = load_for_inference(checkpoint, dev)
    return predict(prepare_model(model, dev), inputs, output, classes, ignore, **options)
