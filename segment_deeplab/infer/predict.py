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

import dataclasses
import glob
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from segment_deeplab.atomic import OutputError, check_writable_dir, refuse_inputs, staged
from segment_deeplab.checkpoint import load_any
from segment_deeplab.classes import ClassInfo, colorize, overlay
from segment_deeplab.data.decode import image_size, read_image
from segment_deeplab.data.spec import IMAGE_EXTS, DatasetError
from segment_deeplab.device import model_device, pick_device
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.runtimes import choose_runtime, probe_size
from segment_deeplab.infer.tta import (
    PLAIN,
    TTA,
    forward_dtype,
    labels,
    predict_probs,
    predict_scores,
)

# Images above this many pixels are predicted in tiles of AUTO_WINDOW (as --window
# does), so a scan or an aerial photo does not need one giant forward pass.
AUTO_TILE_PIXELS = 4096 * 4096
AUTO_WINDOW = 1024
# Left in every output folder: `--overwrite` replaces files only where it finds it.
PREDICTIONS_MARK = ".deeplab-predictions"
# Images whose files are still being written while the next ones are predicted.
WRITES_AHEAD = 2


@dataclass
class Predicted:
    """One source's outcome: its image and probabilities, or why it could not be read."""

    index: int  # into the sources
    image: torch.Tensor | None = None  # uint8 (3, H, W)
    # float32 (C, H, W) probabilities, or scores whose argmax is the class (see
    # `predict_groups`' `probabilities`)
    probs: torch.Tensor | None = None
    error: Exception | None = None


@dataclass
class PredictResult:
    """Masks written (one per image) and inputs that failed, with the reason."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    runtime: str = "torch"  # the engine that ran the forward passes (`runtimes.Choice`)
    runtime_note: str = ""  # why it, and how fast each was on a probe image
    videos: list = field(default_factory=list)  # infer.video.VideoResult per video
    large: list = field(default_factory=list)  # infer.large.LargeResult per large image

    def summary(self) -> str:
        text = "".join(f"{v.summary()}\n" for v in [*self.videos, *self.large])
        text += f"wrote {len(self.written)}, failed {len(self.failed)}"
        if self.failed:
            text += ": " + "; ".join(f"{name} ({why})" for name, why in self.failed)
        return text


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (their images and videos) and globs, in order, once each.

    Returns:
        (image paths, [(input, reason)] for inputs that name nothing)
    """
    from segment_deeplab.infer.large import TIFF_EXTS
    from segment_deeplab.infer.video import VIDEO_EXTS

    exts = (*IMAGE_EXTS, *VIDEO_EXTS, *TIFF_EXTS)
    paths: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in map(str, inputs):
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in exts)
            if not found:
                missing.append((item, f"no {'/'.join(exts)} files in this folder"))
        elif p.is_file():
            found = [p]
        elif any(ch in item for ch in "*?["):
            found = [Path(f) for f in sorted(glob.glob(item, recursive=True))]
            found = [f for f in found if f.is_file() and f.suffix.lower() in exts]
            if not found:
                missing.append((item, "no image or video files match"))
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


def _groups(sources: Sequence[Path | torch.Tensor], batch_size: int) -> Iterator[list[int]]:
    """Indices of same-size sources in chunks of at most `batch_size`; a source whose
    header cannot be read comes alone, to fail when it is decoded."""
    by_size: dict[object, list[int]] = {}
    for i, src in enumerate(sources):
        try:
            size = tuple(src.shape[-2:]) if torch.is_tensor(src) else image_size(src)
        except Exception:  # unreadable header: not an image, truncated, no access
            size = ("unreadable", i)
        by_size.setdefault(size, []).append(i)
    for idx in by_size.values():
        for k in range(0, len(idx), batch_size):
            yield idx[k : k + batch_size]


def _predict_group(
    model: nn.Module,
    sources: Sequence[Path | torch.Tensor],
    group: list[int],
    tta: TTA,
    dtype: torch.dtype | None,
    probabilities: bool = True,
) -> list[Predicted]:
    """Decode a group of sources and predict those of one size in one pass."""
    forward = predict_probs if probabilities else predict_scores
    out: list[Predicted] = []
    loaded: list[Predicted] = []
    for i in group:
        try:
            src = sources[i]
            loaded.append(Predicted(i, src if torch.is_tensor(src) else read_image(src)))
        except Exception as e:  # corrupt pixel data behind a valid header
            out.append(Predicted(i, error=e))
    # Decoded sizes match the headers; a mismatch still must not break the batch.
    for shape in dict.fromkeys(p.image.shape for p in loaded):
        batch = [p for p in loaded if p.image.shape == shape]
        try:
            stack = torch.stack([p.image for p in batch])
            probs = forward(model, stack, _fit(tta, shape), dtype)
        except (RuntimeError, MemoryError) as e:  # out of memory: these fail, the rest go on
            if not _out_of_memory(e):
                raise
            h, w = shape[-2:]
            e = RuntimeError(f"{w}x{h} did not fit in memory ({e}); try --window 513")
            out += [Predicted(p.index, error=e) for p in batch]
            continue
        for p, prob in zip(batch, probs, strict=True):
            p.probs = prob
            out.append(p)
    return out


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return (
        isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "alloc" in text or "memory" in text
    )


def _fit(tta: TTA, shape: torch.Size) -> TTA:
    """`tta`, tiled by AUTO_WINDOW when an image is too large for one pass."""
    if tta.window is None and shape[-2] * shape[-1] > AUTO_TILE_PIXELS:
        return dataclasses.replace(tta, window=AUTO_WINDOW)
    return tta


def predict_groups(
    model: nn.Module,
    sources: Sequence[Path | torch.Tensor],
    batch_size: int = 1,
    tta: TTA = PLAIN,
    dtype: torch.dtype | None = None,
    probabilities: bool = True,
) -> Iterator[Predicted]:
    """Probabilities of images, those of the same size predicted together.

    Args:
        model: in eval mode on its device (see `fold.for_inference`).
        sources: image files, decoded one batch at a time (a long list never sits in
            memory whole), or uint8 (3, H, W) tensors.
        batch_size: most images per forward pass.
        tta, dtype: test-time options and the forward pass's autocast dtype.
        probabilities: False when only the classes are wanted: `probs` then holds
            scores whose argmax is the class (`tta.predict_scores`: a single pass skips
            the softmax over the full-size logits).

    Yields:
        One `Predicted` per source (with `error` set for one that cannot be read),
        grouped by size rather than in input order.
    """
    for group in _groups(sources, max(1, batch_size)):
        yield from _predict_group(model, sources, group, tta, dtype, probabilities)


def output_files(out: Path, stem: str, save_probs: bool) -> list[Path]:
    """The files `write_prediction` writes for one image."""
    names = [f"{stem}.png", f"{stem}_overlay.jpg"] + ([f"{stem}_probs.npy"] if save_probs else [])
    return [out / n for n in names]


def check_outputs(out: Path, planned: list[Path], paths: list[Path], overwrite: bool) -> None:
    """Inputs are never written over; earlier outputs only when asked to (`overwrite`),
    and only in a folder `deeplab predict` wrote."""
    refuse_inputs(planned, paths)
    there = [f for f in planned if f.exists()]
    if there and overwrite and not (out / PREDICTIONS_MARK).is_file():
        raise OutputError(
            f"{there[0]} exists, and {out} is not a folder `deeplab predict` wrote (no "
            f"{PREDICTIONS_MARK}): --overwrite replaces earlier predictions only"
        )
    if there and not overwrite:
        raise OutputError(
            f"{there[0]} already exists{f' (and {len(there) - 1} more)' if len(there) > 1 else ''}"
            ": an earlier prediction is never replaced silently; give another --output, or "
            "--overwrite to replace earlier predictions"
        )


def _split_inputs(paths: list[Path]) -> tuple[list[int], list[int], list[int]]:
    """(indices of images, of videos, of large images: TIFFs, and JPEG/PNG over
    AUTO_TILE_PIXELS, predicted window by window into a tiled TIFF) among the inputs."""
    from segment_deeplab.infer.large import is_large
    from segment_deeplab.infer.video import is_video

    videos = [i for i, p in enumerate(paths) if is_video(p)]
    large = [i for i, p in enumerate(paths) if i not in set(videos) and is_large(p)]
    other = set(videos) | set(large)
    return [i for i in range(len(paths)) if i not in other], videos, large


def write_prediction(
    out: Path,
    stem: str,
    image: torch.Tensor,
    pred: np.ndarray,
    probs: torch.Tensor | None,
    classes: Sequence[ClassInfo],
    ignore_index: int,
) -> Path:
    """`<stem>.png` and `<stem>_overlay.jpg` of the (H, W) uint8 class map `pred` in
    `out`, and `<stem>_probs.npy` when `probs` is given."""
    mask_path = out / f"{stem}.png"
    with staged(mask_path) as tmp:
        colorize(pred, classes, ignore_index).save(tmp, format="PNG")
    with staged(out / f"{stem}_overlay.jpg") as tmp:
        overlay(image, pred, classes, ignore_index=ignore_index).save(
            tmp, format="JPEG", quality=90
        )
    if probs is not None:
        with staged(out / f"{stem}_probs.npy") as tmp, tmp.open("wb") as f:
            np.save(f, probs.to(torch.float16).cpu().numpy())
    return mask_path


def predict(
    model: nn.Module,
    inputs: Sequence[str | Path],
    output: str | Path,
    classes: Sequence[ClassInfo],
    ignore_index: int = 255,
    tta: TTA = PLAIN,
    batch_size: int = 1,
    save_probs: bool = False,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    runtime: str = "auto",
    frames: bool = False,
) -> PredictResult:
    """Predict every input image and video and write its mask, overlay (and
    probabilities); a video gets a mask video and an overlay video (`infer.video`).

    Args:
        model: in eval mode on its device (see `fold.for_inference`).
        inputs: files, folders and glob patterns.
        classes: the checkpoint's classes (colours, names for the legend).
        batch_size: images of the same size are predicted together.
        dtype: the forward pass's autocast dtype (see `tta.forward_dtype`).
        overwrite: replace files an earlier prediction left in `output` (an input is
            never written over, whatever this says).
        runtime: the engine for a checkpoint's forward pass on the CPU: auto (the fastest
            that agrees with PyTorch on this machine, see `infer.runtimes`), torch,
            onnxruntime or openvino.
        frames: for videos, also a P-mode PNG mask per frame.

    Raises:
        OutputError: `output` cannot be written, or would be written over an input or,
            without `overwrite`, over an earlier prediction. Nothing is written then.
    """
    from segment_deeplab.infer import video

    out = check_writable_dir(output)
    paths, failed = collect_inputs(inputs)
    stems = output_stems(paths)
    images, videos, large = _split_inputs(paths)
    if videos:
        try:
            video.require_av()
        except ImportError as e:
            raise OutputError(f"{paths[videos[0]]}: {e}") from None
    planned = [f for i in images for f in output_files(out, stems[i], save_probs)]
    planned += [f for i in videos for f in video.video_output_files(out, stems[i], frames)]
    planned += [out / f"{stems[i]}.tif" for i in large]
    check_outputs(out, planned, paths, overwrite)
    # Before anything is written: a runtime that cannot be had is refused with no trace.
    probe = probe_size(paths[images[0]]) if images else None
    choice = choose_runtime(model, model_device(model), dtype, runtime, probe, len(paths), progress)
    model, dtype = choice.model, dtype if choice.dtype_applies else None
    out.mkdir(parents=True, exist_ok=True)
    (out / PREDICTIONS_MARK).touch()
    result = PredictResult(
        failed=list(failed), runtime=choice.runtime, runtime_note=choice.describe()
    )
    bar = tqdm(total=len(images), desc="predict", file=sys.stderr, disable=not progress)
    image_paths = [paths[i] for i in images]

    def finish(name: str, written: Future) -> None:
        try:
            result.written.append(written.result())
        except OSError as e:  # disk full, permissions: report, keep going
            result.failed.append((name, _reason(e)))
        bar.update(1)

    # PNG and JPEG encoding run in C without the GIL: one thread writes an image's
    # files while the next one is decoded and predicted.
    pending: deque[tuple[str, Future]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-write") as writer:
        for p in predict_groups(model, image_paths, batch_size, tta, dtype, save_probs):
            i = images[p.index]
            if p.error is not None:
                result.failed.append((paths[i].name, _reason(p.error)))
                bar.update(1)
                continue
            pred = labels(p.probs[None])[0].to(torch.uint8).cpu().numpy()
            probs = p.probs if save_probs else None
            args = (out, stems[i], p.image, pred, probs, classes, ignore_index)
            pending.append((paths[i].name, writer.submit(write_prediction, *args)))
            while len(pending) > WRITES_AHEAD:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    bar.close()
    for i in videos:
        try:
            done = video.predict_video(
                model, paths[i], out, classes, ignore_index, tta=tta, dtype=dtype,
                batch_size=max(batch_size, 8), frames=frames, stem=stems[i],
                progress=progress, overwrite=overwrite,
            )  # fmt: skip
        except (DatasetError, OSError) as e:
            result.failed.append((paths[i].name, _reason(e)))
            continue
        result.videos.append(done)
        result.written.append(done.mask)
    _predict_large(model, paths, stems, large, out, classes, ignore_index, tta, dtype, progress,
                   result)  # fmt: skip
    return result


def _predict_large(model, paths, stems, large, out, classes, ignore_index, tta, dtype,
                   progress, result) -> None:  # fmt: skip
    """Large images window by window (`infer.large`), each into `<stem>.tif` (a tiled,
    compressed TIFF of class ids; a GeoTIFF's georeferencing kept)."""
    from segment_deeplab.infer.large import predict_large

    for i in large:
        try:
            done = predict_large(
                model, paths[i], out / f"{stems[i]}.tif", classes, ignore_index, tta=tta,
                dtype=dtype, overwrite=True, progress=progress,
            )  # fmt: skip
        except (DatasetError, OSError, ValueError) as e:
            result.failed.append((paths[i].name, _reason(e)))
            continue
        result.large.append(done)
        result.written.append(done.written)


def run_predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    output: str | Path,
    device: str = "auto",
    amp: str = "auto",
    **options,
) -> PredictResult:
    """Load a model (run folder, checkpoint or export) and `predict` with its classes."""
    check_writable_dir(output)
    dev = pick_device(device)
    loaded = load_any(checkpoint, dev)
    model = for_inference(loaded.model, dev)
    dtype = forward_dtype(model, amp, dev)
    return predict(
        model, inputs, output, loaded.classes, loaded.ignore_index, dtype=dtype, **options
    )
