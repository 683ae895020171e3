"""Prediction for videos: frames decoded with PyAV, predicted in batches, written as videos.

For an input `<stem>.mp4` (any of VIDEO_EXTS) the output folder gets

- `<stem>_mask.mkv`: the class ids, one grey 8-bit frame per video frame, in FFV1
  (lossless) in Matroska, so every pixel value decodes back to its class id exactly
  (`frame.to_ndarray()` is the (H, W) id map). The class list is in the file's
  `SEGMENT_DEEPLAB` tag (JSON).
- `<stem>_overlay.mp4`: the frames with the classes blended in and a legend of all
  classes, in H.264 (libx264, yuv420p: what browsers and players show), else MPEG-4 Part 2.
- with `frames=True`, `<stem>_frames/000000.png ...`: the masks as `deeplab predict`
  writes them (P-mode PNGs in the class colours), numbered as the mask video's frames.

Both videos keep the source's frame rate and time stamps. A packet that does not
decode is skipped and counted; the rest of the video goes on. Frames are predicted by
`predict.predict_groups`, the loop `deeplab predict` runs images through, so TTA,
autocast and the chosen runtime apply alike. PyAV is optional: `pip install
'segment-deeplab[video]'`.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from segment_deeplab.atomic import check_writable_dir, staged
from segment_deeplab.classes import ClassInfo, colorize, legend, overlay, to_dicts
from segment_deeplab.data.spec import DatasetError
from segment_deeplab.infer.predict import PREDICTIONS_MARK, Predicted, _reason, predict_groups
from segment_deeplab.infer.tta import PLAIN, TTA, labels

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
INSTALL_HINT = "pip install 'segment-deeplab[video]'"
# H.264 where the PyAV build has it (its wheels do); MPEG-4 Part 2 is in every FFmpeg.
OVERLAY_CODECS = ("libx264", "mpeg4")
OVERLAY_OPTIONS = {"libx264": {"crf": "20", "preset": "veryfast"}, "mpeg4": {"qscale": "3"}}
# Level 3 with slice CRCs: a damaged mask frame is reported, not decoded wrong; g=1
# makes every frame a key frame, so a player seeks anywhere and damage stays in one frame.
MASK_OPTIONS = {"level": "3", "slicecrc": "1", "g": "1"}
DEFAULT_FPS = Fraction(25)  # for a stream that states no frame rate
MAX_PROBLEMS = 10  # reasons kept in the result; the count covers the rest


def is_video(path: str | Path) -> bool:
    """Whether `predict` should hand `path` to `predict_video` (by its extension)."""
    return Path(path).suffix.lower() in VIDEO_EXTS


def video_output_files(out: Path, stem: str, frames: bool = False) -> list[Path]:
    """What `predict_video` writes for one video: mask, overlay (and the frames folder)."""
    names = [f"{stem}_mask.mkv", f"{stem}_overlay.mp4"] + ([f"{stem}_frames"] if frames else [])
    return [out / n for n in names]


@dataclass
class VideoResult:
    """One video's outcome: frames written and skipped, and where they went."""

    source: Path
    mask: Path  # the class-id video
    overlay: Path
    frames_dir: Path | None = None  # the P-mode PNGs, with `frames=True`
    written: int = 0  # frames in each output
    skipped: int = 0  # packets that did not decode (one frame each, as a rule)
    expected: int | None = None  # frames the container says it holds, when it says
    fps: float = 0.0  # the source's average frame rate
    seconds: float = 0.0  # wall time of decoding, predicting and writing
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS reasons

    @property
    def outputs(self) -> list[Path]:
        return [self.mask, self.overlay] + ([self.frames_dir] if self.frames_dir else [])

    def summary(self) -> str:
        text = f"{self.source.name}: wrote {self.written} frames at {self.fps:.3g} fps"
        if self.skipped:
            text += f", skipped {self.skipped} that did not decode ({self.problems[0]})"
        missing = (self.expected or 0) - self.written - self.skipped
        if missing > 0:
            text += f", {missing} of the {self.expected} the file announces never arrived"
        rate = self.written / self.seconds if self.seconds else 0.0
        return text + f" in {self.seconds:.1f} s ({rate:.1f} frames/s)"


def require_av() -> Any:
    """The `av` module, or an ImportError that says how to install it (`predict` calls
    it before any work when videos are among its inputs)."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"predicting videos needs PyAV: {INSTALL_HINT}") from e
    return av


def _check_outputs(out: Path, planned: list[Path], source: Path, overwrite: bool) -> None:
    from segment_deeplab.infer.predict import check_outputs

    check_outputs(out, planned, [source], overwrite)


def _open_source(av: Any, path: Path) -> tuple[Any, Any]:
    """(container, first video stream) of `path`; DatasetError when it is no video."""
    if not path.is_file():
        raise DatasetError(f"video not found: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"{path} is not a video FFmpeg can read ({_av_reason(e)}); give a video file "
            f"({', '.join(VIDEO_EXTS)})"
        ) from e
    if not container.streams.video:
        container.close()
        raise DatasetError(f"{path} holds no video stream (only audio or data?)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threads: decoding keeps up with the model
    return container, stream


def _frame_rate(stream: Any) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else DEFAULT_FPS


def _decoded(av: Any, container: Any, stream: Any, result: VideoResult) -> Iterator[Any]:
    """The stream's frames in order; a packet that fails to decode is counted in
    `result` and skipped. A container that breaks off ends the video there."""
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as e:  # damaged container: nothing after this can be found
            _problem(result, f"container: {_av_reason(e)}")
            return
        try:
            yield from packet.decode()  # the last, empty packet flushes the decoder
        except av.FFmpegError as e:  # InvalidDataError and kin: this packet only
            _problem(result, f"frame near {_seconds(packet)}: {_av_reason(e)}")


def _av_reason(e: Exception) -> str:
    """FFmpeg's words for an error, without PyAV's errno and call name."""
    return f"{type(e).__name__}: {e.strerror}" if getattr(e, "strerror", None) else _reason(e)


def _problem(result: VideoResult, why: str) -> None:
    result.skipped += 1
    if len(result.problems) < MAX_PROBLEMS:
        result.problems.append(why)


def _seconds(packet: Any) -> str:
    t = packet.pts if packet.pts is not None else packet.dts
    return f"{float(t * packet.time_base):.2f} s" if t is not None and packet.time_base else "?"


def _batches(frames: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(itertools.islice(frames, size)):
        yield batch


def _to_tensor(frame: Any) -> torch.Tensor:
    """A decoded frame as uint8 (3, H, W) RGB, as `read_image` gives images."""
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def _overlay_codec(av: Any) -> str:
    for name in OVERLAY_CODECS:
        try:
            return av.Codec(name, "w").name
        except ValueError:  # UnknownCodecError: not in this FFmpeg build
            continue
    raise ImportError(f"this PyAV build has none of the encoders {OVERLAY_CODECS}")


class _Writer:
    """One output video: frames in, packets muxed, time stamps those of the source."""

    def __init__(self, av: Any, path: Path, fmt: str, codec: str, src: Any, size, pix_fmt: str):
        opts = {"movflags": "+faststart"} if fmt == "mp4" else {}
        self.container = av.open(str(path), "w", format=fmt, options=opts)
        rate = _frame_rate(src)
        options = OVERLAY_OPTIONS.get(codec, MASK_OPTIONS if codec == "ffv1" else {})
        self.stream = self.container.add_stream(codec, rate=rate, options=options)
        self.size = size  # (W, H)
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = pix_fmt
        # The source's time base keeps its time stamps as they are; MPEG-4 Part 2
        # allows no denominator above 2**16 - 1, so it counts frames instead.
        self.src_tb = src.time_base
        tb = self.src_tb or 1 / rate
        if codec == "mpeg4" and tb.denominator > 65535:
            tb = 1 / rate
        self.time_base, self.step = tb, max(1, round(1 / (rate * tb)))
        self.stream.codec_context.time_base = tb
        self.last: int | None = None

    def write(self, frame: Any, pts: int | None) -> None:
        """`frame` at `pts` (the source frame's, in the source's time base; None: next)."""
        if pts is not None and self.time_base != self.src_tb:
            pts = round(pts * self.src_tb / self.time_base) if self.src_tb else None
        # Encoders refuse time stamps that do not increase: a repeated or missing one
        # (broken files) becomes the frame after the last.
        if pts is None or (self.last is not None and pts <= self.last):
            pts = 0 if self.last is None else self.last + self.step
        frame.pts, frame.time_base, self.last = pts, self.time_base, pts
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode())  # flush the encoder's delayed frames
        self.container.close()


def _legend_panel(classes: Sequence[ClassInfo], height: int) -> Image.Image | None:
    """The legend of all classes (one panel for every frame, so the size never changes),
    at `overlay`'s text size; None when it does not fit beside the frame."""
    panel = legend(classes, height=height, font_size=max(12, min(48, height // 40)))
    return panel if panel.height <= height else None


def _overlay_frame(image, pred, classes, ignore_index, panel) -> Image.Image:
    """`overlay` without its per-image legend, the fixed panel beside it, padded to
    even sides (yuv420p halves both)."""
    blend = overlay(image, pred, classes, ignore_index=ignore_index, show_legend=False)
    w = blend.width + (panel.width if panel else 0)
    canvas = Image.new("RGB", (w + w % 2, blend.height + blend.height % 2), (255, 255, 255))
    canvas.paste(blend, (0, 0))
    if panel:
        canvas.paste(panel, (blend.width, 0))
    return canvas


def _write_png(path: Path, pred: np.ndarray, classes, ignore_index: int) -> None:
    with staged(path) as tmp:
        colorize(pred, classes, ignore_index).save(tmp, format="PNG")


def predict_video(
    model: nn.Module,
    path: str | Path,
    output: str | Path,
    classes: Sequence[ClassInfo],
    ignore_index: int = 255,
    *,
    tta: TTA = PLAIN,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    frames: bool = False,
    stem: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> VideoResult:
    """Predict every frame of a video; write the mask and overlay videos (and PNGs).

    Args:
        model: in eval mode on its device (`fold.for_inference`), or the engine
            `runtimes.choose_runtime` picked, as `predict.predict` takes it.
        path: the video (any container and codec FFmpeg decodes).
        output: folder for the results (made if missing).
        classes, ignore_index: the checkpoint's classes and ignore value.
        tta, dtype: test-time options and the forward pass's autocast dtype.
        batch_size: frames per forward pass.
        frames: also write `<stem>_frames/NNNNNN.png`, the mask of each written frame.
        stem: the outputs' name (default: the video's stem; `predict.output_stems`
            makes them unique among several inputs).
        progress: a progress bar in frames on stderr.
        overwrite: replace the outputs of an earlier prediction (never the input).

    Returns:
        Frames written and skipped, the source's fps, the time taken, the paths.

    Raises:
        ImportError: PyAV is not installed (the message says how to install it).
        ValueError: more than 256 classes (the mask video is 8-bit).
        DatasetError: `path` is no video, or not one frame of it decodes.
        OutputError: an output would replace the input or, without `overwrite`, an
            earlier prediction. Nothing is written then.
    """
    av = require_av()
    if len(classes) > 256:
        raise ValueError(f"the mask video holds 8-bit class ids; {len(classes)} classes do not fit")
    path, out = Path(path), check_writable_dir(output)
    stem = stem or path.stem
    planned = video_output_files(out, stem, frames)
    _check_outputs(out, planned, path, overwrite)
    container, src = _open_source(av, path)
    start = time.perf_counter()
    result = VideoResult(path, planned[0], planned[1], planned[2] if frames else None)
    result.fps, result.expected = float(_frame_rate(src)), src.frames or None
    out.mkdir(parents=True, exist_ok=True)
    (out / PREDICTIONS_MARK).touch()
    bar = tqdm(
        total=result.expected, desc=path.name, unit="frame", file=sys.stderr, disable=not progress
    )
    try:
        predicted = _predictions(av, model, container, src, result, tta, dtype, batch_size, bar)
        # Written beside their names and renamed when whole: a failure leaves no half video.
        with staged(result.mask) as mask_tmp, staged(result.overlay) as overlay_tmp:
            _write(av, predicted, (mask_tmp, overlay_tmp), src, result, classes, ignore_index)
    finally:
        bar.close()
        container.close()
    if frames:  # an earlier, longer prediction's frames would outlast this one's
        for old in planned[2].glob("[0-9]" * 6 + ".png"):
            if int(old.stem) >= result.written:
                old.unlink()
    result.seconds = time.perf_counter() - start
    return result


def _predictions(av, model, container, src, result, tta, dtype, batch_size, bar):
    """(source pts, uint8 (3, H, W) frame, uint8 (H, W) class ids) of every frame that
    decodes, in order; frames the model could not take (out of memory) are counted."""
    batch_size = max(1, batch_size)
    for batch in _batches(_decoded(av, container, src, result), batch_size):
        images = [_to_tensor(f) for f in batch]
        # In order (`predict_groups` groups by size, and a stream may change size).
        done = sorted(predict_groups(model, images, batch_size, tta, dtype, False), key=_index)
        for p in done:
            if p.error is not None:
                _problem(result, f"frame {result.written + result.skipped}: {_reason(p.error)}")
                continue
            yield (
                batch[p.index].pts,
                p.image,
                labels(p.probs[None])[0].to(torch.uint8).cpu().numpy(),
            )
        bar.update(len(batch))


def _index(p: Predicted) -> int:
    return p.index


def _write(av, predicted, tmps, src, result, classes, ignore_index) -> None:
    """Mask and overlay videos into the (temporary) files `tmps`, and the PNGs."""
    panel = None
    meta = json.dumps({"classes": to_dicts(classes), "ignore_index": ignore_index})
    writers: list[_Writer] = []
    try:
        for pts, image, pred in predicted:
            if writers and pred.shape[::-1] != writers[0].size:  # a video's size is fixed
                _problem(result, f"frame {result.written + result.skipped}: size changed")
                continue
            if not writers:  # the sizes are known with the first frame
                panel = _legend_panel(classes, pred.shape[0])
            picture = _overlay_frame(image, pred, classes, ignore_index, panel)
            if not writers:
                writers = _open_writers(av, tmps, src, pred.shape, picture.size, meta)
            writers[0].write(av.VideoFrame.from_ndarray(pred, format="gray"), pts)
            writers[1].write(av.VideoFrame.from_image(picture), pts)
            if result.frames_dir is not None:
                png = result.frames_dir / f"{result.written:06d}.png"
                _write_png(png, pred, classes, ignore_index)
            result.written += 1
        if not result.written:
            why = f": {result.problems[0]}" if result.problems else ""
            raise DatasetError(f"{result.source}: not one frame could be decoded{why}")
    finally:
        for w in writers:
            w.close()


def _open_writers(av, tmps, src, mask_size, overlay_size, meta) -> list[_Writer]:
    h, w = mask_size
    mask = _Writer(av, tmps[0], "matroska", "ffv1", src, (w, h), "gray")
    mask.container.metadata["SEGMENT_DEEPLAB"] = meta
    codec = _overlay_codec(av)
    return [mask, _Writer(av, tmps[1], "mp4", codec, src, overlay_size, "yuv420p")]
