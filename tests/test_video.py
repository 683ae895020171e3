"""Video prediction: mask video ids exact, frame count and rate kept, PNG frames, a
damaged packet skipped, clear errors for non-videos, outputs never replaced silently."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_run
from PIL import Image

from segment_deeplab.atomic import OutputError
from segment_deeplab.checkpoint import load_any
from segment_deeplab.data.spec import DatasetError
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.tta import PLAIN, TTA, labels, predict_probs
from segment_deeplab.infer.video import is_video, predict_video, video_output_files

av = pytest.importorskip("av", reason="PyAV is not installed: pip install 'segment-deeplab[video]'")

CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0]},
    {"id": 1, "name": "cat", "color": [255, 0, 0]},
    {"id": 2, "name": "dog", "color": [0, 255, 0]},
]
N, H, W, FPS = 24, 64, 80, 12

pytestmark = pytest.mark.usefixtures("one_thread")


def write_source(path: Path) -> Path:
    """24 moving gradients, 64x80 at 12 fps, MPEG-4 in MP4 (in every FFmpeg build)."""
    yy, xx = np.mgrid[0:H, 0:W]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(N):
            rgb = np.stack([(xx * 3 + i * 9) % 256, (yy * 4 + i * 3) % 256, (xx + yy) * 2 % 256])
            frame = av.VideoFrame.from_ndarray(rgb.transpose(1, 2, 0).astype(np.uint8), "rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def decoded(path: Path, fmt: str | None = None) -> tuple[list[np.ndarray], list[float], float]:
    """(frames as arrays, their times in seconds, the stream's average rate)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        rate = float(s.average_rate)
    return [f.to_ndarray(format=fmt) for f in frames], [float(f.time) for f in frames], rate


def expected_ids(model, frames: list[np.ndarray], tta: TTA = PLAIN) -> list[np.ndarray]:
    """Each decoded RGB frame predicted alone, by `predict`'s forward path."""
    out = []
    for rgb in frames:
        probs = predict_probs(model, torch.from_numpy(rgb).permute(2, 0, 1)[None], tta)
        out.append(labels(probs)[0].to(torch.uint8).numpy())
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"), CLASSES)
    got = load_any(run)
    return for_inference(got.model, torch.device("cpu")), got.classes


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("videos") / "clip.mp4")


@pytest.fixture(scope="module")
def want(loaded, source) -> list[np.ndarray]:
    return expected_ids(loaded[0], decoded(source, "rgb24")[0])


@pytest.fixture(scope="module")
def result(loaded, source, tmp_path_factory):
    model, classes = loaded
    out = tmp_path_factory.mktemp("out")
    # 5 frames per pass: 24 frames end on a short batch.
    return predict_video(model, source, out, classes, batch_size=5, frames=True, progress=False)


def test_mask_video_holds_the_exact_ids_frame_count_and_rate(result, source, want):
    masks, times, rate = decoded(result.mask)
    assert result.mask.name == "clip_mask.mkv" and result.written == N and result.skipped == 0
    assert len(masks) == N and rate == FPS == result.fps
    assert all(m.dtype == np.uint8 and m.shape == (H, W) for m in masks)
    assert all(np.array_equal(m, w) for m, w in zip(masks, want, strict=True))
    assert len({m.tobytes() for m in masks}) > 1  # the frames differ: no frame repeated
    # Matroska keeps time in milliseconds: the source's times to the nearest one.
    assert np.allclose(times, decoded(source)[1], atol=1e-3)
    with av.open(str(result.mask)) as c:
        assert "classes" in c.metadata["SEGMENT_DEEPLAB"]


def test_overlay_video_keeps_frames_rate_and_times(result, source):
    frames, times, rate = decoded(result.overlay, "rgb24")
    assert result.overlay.name == "clip_overlay.mp4"
    assert len(frames) == N and rate == FPS and times == decoded(source)[1]
    h, w, _ = frames[0].shape
    assert h == H and w > W and w % 2 == 0  # the legend beside, even sides for yuv420p


def test_frames_are_p_mode_pngs_equal_to_the_predictions(result, want):
    pngs = sorted(result.frames_dir.iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(N)]
    for png, w in zip(pngs, want, strict=True):
        with Image.open(png) as im:
            assert im.mode == "P" and np.array_equal(np.asarray(im), w)
            assert im.getpalette()[3:6] == [255, 0, 0]  # class 1's colour


def test_tta_goes_through_the_same_forward_path(loaded, source, tmp_path):
    model, classes = loaded
    tta = TTA(flip=True)
    got = predict_video(model, source, tmp_path, classes, tta=tta, batch_size=8, progress=False)
    masks = decoded(got.mask)[0]
    want = expected_ids(model, decoded(source, "rgb24")[0], tta)
    assert all(np.array_equal(m, w) for m, w in zip(masks, want, strict=True))


def test_a_damaged_packet_is_skipped_and_the_rest_written(loaded, source, tmp_path):
    """Observed (PyAV 18, FFmpeg 8): the middle packet's bytes inverted make its decode
    fail with InvalidDataError; that frame is counted, the other 23 are written."""
    with av.open(str(source)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[len(packets) // 2]
    data = bytearray(source.read_bytes())
    data[pos : pos + size] = bytes(b ^ 0xFF for b in data[pos : pos + size])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    model, classes = loaded
    got = predict_video(model, bad, tmp_path / "out", classes, progress=False)
    assert got.skipped >= 1 and got.written + got.skipped == N, got.summary()
    assert "skipped" in got.summary() and got.problems
    assert len(decoded(got.mask)[0]) == len(decoded(got.overlay)[0]) == got.written


def test_a_file_that_is_no_video_is_named(loaded, tmp_path):
    model, classes = loaded
    fake = tmp_path / "notes.mp4"
    fake.write_text("no video here")
    with pytest.raises(DatasetError, match="notes.mp4 is not a video"):
        predict_video(model, fake, tmp_path / "out", classes, progress=False)
    with pytest.raises(DatasetError, match="video not found: .*gone.mp4"):
        predict_video(model, tmp_path / "gone.mp4", tmp_path / "out", classes, progress=False)
    assert not any((tmp_path / "out").glob("*.m*"))


def test_outputs_are_not_replaced_without_overwrite(loaded, source, tmp_path):
    model, classes = loaded
    first = predict_video(model, source, tmp_path, classes, progress=False)
    stamp = first.mask.stat().st_mtime_ns
    with pytest.raises(OutputError, match="clip_mask.mkv already exists"):
        predict_video(model, source, tmp_path, classes, progress=False)
    assert first.mask.stat().st_mtime_ns == stamp
    again = predict_video(model, source, tmp_path, classes, progress=False, overwrite=True)
    assert again.written == N


def test_inputs_and_foreign_files_are_never_written_over(loaded, source, tmp_path):
    model, classes = loaded
    clip = shutil.copy(source, tmp_path / "clip_overlay.mp4")
    with pytest.raises(OutputError, match="over the input"):
        predict_video(model, clip, tmp_path, classes, stem="clip", overwrite=True, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "clip_mask.mkv").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="not a folder `deeplab predict` wrote"):
        predict_video(model, source, other, classes, overwrite=True, progress=False)
    assert (other / "clip_mask.mkv").read_bytes() == b"someone else's"


def test_is_video_and_output_names():
    assert all(is_video(f"a{ext}") for ext in (".mp4", ".MOV", ".mkv", ".avi", ".webm", ".m4v"))
    assert not is_video("a.png") and not is_video("a.jpg")
    names = [p.name for p in video_output_files(Path("o"), "a", frames=True)]
    assert names == ["a_mask.mkv", "a_overlay.mp4", "a_frames"]


def test_missing_pyav_says_how_to_install(loaded, source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'segment-deeplab\[video\]'"):
        predict_video(loaded[0], source, tmp_path, loaded[1], progress=False)


def test_predict_command_takes_videos_among_images(source, want, tmp_path, capsys):
    """`deeplab predict` with a video and an image in one folder: masks for both."""
    import json
    import shutil

    from PIL import Image

    from segment_deeplab.cli import main

    run = make_run(tmp_path / "run", CLASSES)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(source, inputs / "clip.mp4")
    Image.fromarray(decoded(source, "rgb24")[0][0]).save(inputs / "still.png")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(run), str(inputs), "--output", str(out)]
    assert main([*argv, "--frames", "--no-progress", "--amp", "off", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["videos"][0]["frames"] == len(want)
    assert (out / "still.png").is_file() and (out / "clip_overlay.mp4").is_file()
    frames = sorted((out / "clip_frames").glob("*.png"))
    assert len(frames) == len(want)
    for png, ids in zip(frames, want, strict=True):
        np.testing.assert_array_equal(np.array(Image.open(png)), ids)
