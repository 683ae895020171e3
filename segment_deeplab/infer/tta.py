"""Class probabilities for whole images: multi-scale and flip TTA, sliding windows.

Shared by `evaluate` and `predict`. TF DeepLab's `eval_scales` and
`add_flipped_images` become `scales` and `flip`: softmax probabilities from every
scale (and its mirror) are resized to the original size and averaged. Images larger
than `window` are cut into overlapping tiles whose probabilities are averaged, so a
full-resolution photo never needs one giant forward pass.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from segment_deeplab.data.transforms import MEAN_RGB

# Most window tiles (times images) in one forward pass of the sliding-window mode.
TILE_BATCH = 8

T = TypeVar("T")
R = TypeVar("R")


def cpu_streams(device: torch.device | str, model: nn.Module | None = None) -> int:
    """How many images to predict at once, each in its own thread, on `device`.

    On a CPU with at least two intra-op threads: two, each forward on half of the
    threads. One image per core beats one image spread over both cores by about 25% on a
    2-core CPU (no per-operation hand-off between threads), and decoding, the argmax and
    the metrics of one image overlap with the other's forward. Elsewhere (GPUs, a single
    thread, a build without OpenMP, whose thread count is not per thread, a model that
    runs on threads of its own such as an ONNX export): one.
    """
    if torch.device(device).type != "cpu" or not torch.backends.openmp.is_available():
        return 1
    if getattr(model, "own_threads", False):
        return 1
    return 2 if torch.get_num_threads() >= 2 else 1


def in_streams(fn: Callable[[T], R], items: Sequence[T], streams: int) -> Iterator[R]:
    """`fn` over `items` in `streams` threads sharing the intra-op threads; results in
    order. An exception from `fn` is raised here, and no further item starts.

    Each stream gets `torch.get_num_threads() // streams` intra-op threads (OpenMP's
    count is per thread); the process-wide setting is restored afterwards. Grad mode,
    inference mode and autocast are per thread too: `fn` sets what it needs. A single
    item runs here, on all the threads.
    """
    if streams <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    before = torch.get_num_threads()
    each = max(1, before // streams)
    pending: deque[Future[R]] = deque()
    try:
        with ThreadPoolExecutor(
            streams, initializer=torch.set_num_threads, initargs=(each,)
        ) as pool:
            try:
                for item in items:
                    pending.append(pool.submit(fn, item))
                    if len(pending) > streams:  # one queued per stream: no idle core
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # on an error or an early stop, start nothing more
                for f in pending:
                    f.cancel()
    finally:
        torch.set_num_threads(before)


def prepare_model(model: nn.Module, device: torch.device, fold_bn: bool = True) -> nn.Module:
    """The model to predict with: on `device`, in eval mode, channels_last (convolutions
    gain on CPUs and GPUs), and for the project's DeepLab models with batch norm folded
    into the convolutions (`fold_batch_norm`). All of it happens to `model` itself, so
    the weights are never held twice: pass a copy to keep training the original."""
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    if fold_bn:
        model = fold_batch_norm(model, inplace=True)  # no second copy of the weights
    return model


def fold_batch_norm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A DeepLab model in eval mode whose convolutions absorb the batch norms after them:
    the same outputs (to float rounding), about 10% less time per image. A copy, unless
    `inplace` (then the model's parts are swapped for their folded versions).

    The backbone, ASPP and decoder are each traced with torch.fx and fused. The result
    must match the model on a probe image, or that part stays as it was: a part that
    does not trace, or traces wrong (timm's hook-based feature extractors, such as
    xception's, lose their features in a trace), never changes a prediction. Other models
    come back unchanged; so does a model in training mode, whose batch norms still learn.
    """
    from torch.fx.experimental.optimization import fuse

    from segment_deeplab.models.deeplab import DeepLabV3

    if not isinstance(model, DeepLabV3) or model.training:
        return model
    # A probe image of a size that is no multiple of any stride, and the model's logits.
    probe = torch.rand(1, 3, 65, 97, generator=torch.Generator().manual_seed(0))
    probe = probe.to(_model_device(model)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(probe).float()
    folded = model if inplace else copy.deepcopy(model)
    for name in ("backbone", "aspp", "decoder"):
        part = getattr(folded, name, None)
        if part is None:
            continue
        try:
            fused = fuse(part)  # a fused copy
        except Exception:  # tracing fails on some control flow: keep batch norm there
            continue
        setattr(folded, name, fused.to(memory_format=torch.channels_last))
        if not _gives(folded, probe, want):
            setattr(folded, name, part)
    return folded


def _gives(model: nn.Module, x: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether `model(x)` gives the logits `want`, to float rounding."""
    try:
        with torch.inference_mode():
            got = model(x).float()
    except Exception:
        return False
    return got.shape == want.shape and bool(
        (got - want).abs().max() <= 1e-3 * (1 + want.abs().max())
    )


def labels(probs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) class ids. `max(1).indices` equals `argmax(1)` and is
    about 10x faster on CPUs, where the argmax kernel over channels is not vectorised."""
    return probs.max(1).indices


def _autocast(model: nn.Module, device: torch.device, amp: str):
    """bf16/fp16 autocast where the hardware gains from it (as in training); exported
    models (ONNX, TorchScript) run as they were saved."""
    from segment_deeplab.train.setup import resolve_amp
    from segment_deeplab.models.deeplab import DeepLabV3

    dtype = resolve_amp(amp, device)[0] if isinstance(model, DeepLabV3) else None
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def input_multiple(model: nn.Module) -> int:
    """What an input's height and width are padded to a multiple of before the model.

    The project's DeepLab models upsample stride-aligned (`models.deeplab.upsample`), so
    they take any size as it is; exports say what they need (`input_multiple` in their
    metadata); other models with an `output_stride` get padded to it.
    """
    from segment_deeplab.models.deeplab import DeepLabV3

    if isinstance(model, DeepLabV3):
        return 1
    multiple = getattr(model, "input_multiple", None)
    if multiple is None:
        multiple = getattr(model, "output_stride", 1)
    return int(multiple or 1)


def _pad(model: nn.Module, x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Pad bottom/right with the mean colour: after normalisation it reads as zero,
    "nothing", as TF DeepLab's mean-pixel padding and the training crops' padding do."""
    mean = getattr(model, "mean", None)
    if not isinstance(mean, torch.Tensor) or mean.numel() != 3:
        mean = torch.tensor(MEAN_RGB, dtype=torch.float32) / 255
    b, c, h, w = x.shape
    out = mean.to(x).view(1, 3, 1, 1).expand(b, c, h + ph, w + pw).clone()
    out[..., :h, :w] = x
    return out


def _logits_padded(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of (B, 3, h, w) in [0, 1], padded to `input_multiple(model)` if needed.

    For a model whose upsampling is not stride-aligned, a size that is a multiple of
    the output stride keeps the feature grid aligned with the pixels; the padding is
    cut off again before returning (B, C, h, w).
    """
    s = input_multiple(model)
    h, w = x.shape[-2:]
    ph, pw = (-h) % s, (-w) % s
    if ph or pw:
        x = _pad(model, x, ph, pw)
    logits = model(x.contiguous(memory_format=torch.channels_last))
    if isinstance(logits, dict):  # torchvision-style {"out": ...} models
        logits = logits["out"]
    return logits[..., :h, :w]


def _forward_padded(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (B, C, h, w) of `_logits_padded`, in fp32."""
    return _logits_padded(model, x).float().softmax(1)


def _starts(size: int, window: int, step: int) -> list[int]:
    """Tile origins covering 0..size, the last tile flush with the end."""
    if size <= window:
        return [0]
    n = math.ceil((size - window) / step) + 1
    return sorted({min(i * step, size - window) for i in range(n)})


def _forward_windows(
    model: nn.Module, x: torch.Tensor, window: int | None, overlap: float
) -> torch.Tensor:
    """Probabilities of (B, 3, h, w), tiled when larger than `window`."""
    b, _, h, w = x.shape
    if window is None or (h <= window and w <= window):
        return _forward_padded(model, x)
    step = max(1, int(window * (1 - overlap)))
    th, tw = min(window, h), min(window, w)  # every tile is this size: starts are clamped
    origins = [(y, x0) for y in _starts(h, window, step) for x0 in _starts(w, window, step)]
    probs: torch.Tensor | None = None
    count = torch.zeros((1, 1, h, w), device=x.device)
    # Several tiles per forward pass keep a GPU busy; TILE_BATCH bounds the memory.
    per_pass = max(1, TILE_BATCH // b)
    for k in range(0, len(origins), per_pass):
        chunk = origins[k : k + per_pass]
        tiles = torch.cat([x[..., y : y + th, x0 : x0 + tw] for y, x0 in chunk])
        p = _forward_padded(model, tiles)  # (len(chunk) * B, C, th, tw)
        if probs is None:
            probs = x.new_zeros((b, p.shape[1], h, w), dtype=torch.float32)
        for j, (y, x0) in enumerate(chunk):
            probs[..., y : y + th, x0 : x0 + tw] += p[j * b : (j + 1) * b]
            count[..., y : y + th, x0 : x0 + tw] += 1
    return probs / count


def _to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) RGB, got {tuple(images.shape)}")
    x = images.to(device, non_blocking=True)
    return x.float().div_(255.0) if not x.is_floating_point() else x.float()


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    overlap: float = 1 / 3,
    amp: str = "auto",
) -> torch.Tensor:
    """Class probabilities of images at their original size.

    Args:
        model: a segmentation model in eval mode taking (B, 3, H, W) RGB in [0, 1].
        images: uint8 (3, H, W) or (B, 3, H, W); floats are taken as already in [0, 1].
        scales: input scales whose probabilities are averaged (TF DeepLab eval_scales).
        flip: also average the left-right mirrored input (add_flipped_images).
        window: tile size for images larger than it (sliding window); None: whole image.
        overlap: fraction of a tile shared with its neighbour.
        amp: "auto" runs bf16 where it is faster (GPUs, AMX CPUs), "off" keeps fp32.

    Returns:
        (B, C, H, W) float32 probabilities on the model's device.
    """
    if not scales:
        raise ValueError("scales must hold at least one value, e.g. (1.0,)")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    x = _to_float(images, _model_device(model))
    h, w = x.shape[-2:]
    total: torch.Tensor | None = None
    passes = 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        xs = x
        if size != (h, w):
            # antialias keeps downscaled inputs free of aliasing, as PIL resizing would be.
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
        for mirrored in (False, True) if flip else (False,):
            inp = xs.flip(-1) if mirrored else xs
            with _autocast(model, x.device, amp):
                p = _forward_windows(model, inp, window, overlap)
            if mirrored:
                p = p.flip(-1)
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
            passes += 1
    return total / passes


@torch.inference_mode()
def predict_scores(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    overlap: float = 1 / 3,
    amp: str = "auto",
) -> torch.Tensor:
    """(B, C, H, W) scores whose argmax over C is the prediction (see `predict_probs`).

    A single pass (one scale of 1, no flip, no tiling) returns the logits: their argmax
    is that of the probabilities, and the softmax is skipped.
    """
    x = _to_float(images, _model_device(model))
    tiled = window is not None and max(x.shape[-2:]) > window
    if list(scales) != [1.0] or flip or tiled:
        return predict_probs(model, x, scales, flip, window, overlap, amp)
    with _autocast(model, x.device, amp):
        return _logits_padded(model, x)


def predict_labels(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    overlap: float = 1 / 3,
    amp: str = "auto",
) -> torch.Tensor:
    """(B, H, W) int64 class ids, with the options of `predict_probs`."""
    return labels(predict_scores(model, images, scales, flip, window, overlap, amp))
