"""Large images (GeoTIFFs, huge JPEGs) predicted window by window: the same mask as the
sliding-window prediction of the whole image, the georeferencing kept, flat memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_run
from PIL import Image

from segment_deeplab.atomic import OutputError
from segment_deeplab.checkpoint import load_any
from segment_deeplab.data.decode import read_image
from segment_deeplab.data.spec import DatasetError
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.tta import TTA, predict_probs

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")

from segment_deeplab.infer.large import is_large, predict_large  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = [
    {"id": i, "name": f"class_{i}", "color": c}
    for i, c in enumerate([[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200]])
]
GEO = [  # UTM 33N, 0.5 m pixels, as GDAL writes them
    (33550, 12, 3, (0.5, 0.5, 0.0), True),
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 5400000.0, 0.0), True),
    (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
    (34737, 2, None, "WGS 84 / UTM zone 33N|", True),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), CLASSES)


@pytest.fixture(scope="module")
def loaded(run):
    loaded = load_any(run)
    loaded.model = for_inference(loaded.model, torch.device("cpu"))
    return loaded


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: gradients (regions of several classes) plus noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1) // 2
    noise = np.random.default_rng(seed).integers(0, 128, (h, w, 3))
    return (base + noise).astype(np.uint8)


def _sliding(loaded, rgb: np.ndarray, tta: TTA) -> np.ndarray:
    """The reference: `predict_probs` of the whole image with the same window."""
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    return predict_probs(loaded.model, image, tta).max(1).indices[0].numpy()


def test_geotiff_mask_equals_sliding_window_and_keeps_georeferencing(tmp_path, loaded) -> None:
    rgb = _picture(1280, 1536)
    rgb[:200, :300] = 0  # no data, as GDAL_NODATA says below
    src = tmp_path / "scene.tif"
    nodata = (42113, 2, None, "0", True)
    tifffile.imwrite(src, rgb, tile=(256, 256), compression="zlib", extratags=[*GEO, nodata])
    tta = TTA(window=512)
    res = predict_large(
        loaded.model, src, tmp_path / "mask.tif", loaded.classes, tta=tta, progress=False
    )
    want = _sliding(loaded, rgb, tta)
    want[:200, :300] = 255  # nodata pixels get the ignore index
    with tifffile.TiffFile(res.written) as tif:
        page = tif.pages[0]
        got = page.asarray()
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert tuple(page.colormap[:, 1] // 257) == (200, 30, 30)
        for code, _, _, value, _ in GEO:
            assert page.tags[code].value == value
        assert page.tags[42113].value == "255"
    assert got.dtype == np.uint8 and got.shape == (1280, 1536)
    assert np.array_equal(got, want), f"{(got != want).sum()} pixels differ"
    assert len(set(np.unique(got)) - {255}) >= 3  # the comparison is not trivial
    assert res.windows == 20 and any("ModelTiepointTag" in n for n in res.notes)


def test_wide_image_in_strips_equals_sliding_window(tmp_path, loaded) -> None:
    """A band budget too small for the image's width: strips of columns, the straddling
    windows predicted for both, and still predict_probs's mask (flip and nodata too)."""
    rgb = _picture(700, 2100, seed=3)
    rgb[100:300, 700:900] = 7  # nodata across the first strip edge
    src = tmp_path / "wide.tif"
    tifffile.imwrite(
        src, rgb, tile=(256, 256), compression="zlib", extratags=[(42113, 2, None, "7", True)]
    )  # fmt: skip
    tta = TTA(window=256, flip=True)
    band = len(CLASSES) * 256 * 4 * 2 * 1000  # sums for 1000 columns: strips of 768
    res = predict_large(
        loaded.model, src, tmp_path / "mask.tif", loaded.classes, tta=tta, progress=False,
        band_bytes=band,
    )  # fmt: skip
    want = _sliding(loaded, rgb, tta)
    want[100:300, 700:900] = 255
    got = tifffile.imread(res.written)
    assert np.array_equal(got, want), f"{(got != want).sum()} pixels differ"
    assert any("3 strips" in n for n in res.notes), res.notes  # 0..768..1536..2100
    whole = predict_large(
        loaded.model, src, tmp_path / "whole.tif", loaded.classes, tta=tta, progress=False
    )
    assert res.windows > whole.windows  # the straddling windows, twice
    assert np.array_equal(tifffile.imread(whole.written), want)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no spill left


def test_striped_uint16_bands_scaled_and_flipped(tmp_path, loaded) -> None:
    bands = np.random.default_rng(1).integers(0, 4096, (4, 520, 600), dtype=np.uint16)
    src = tmp_path / "multispectral.tif"
    top = (281, 3, 4, (4095,) * 4, False)  # MaxSampleValue: 12-bit data
    tifffile.imwrite(
        src, bands, photometric="minisblack", planarconfig="separate", rowsperstrip=64,
        extratags=[top],
    )  # fmt: skip
    tta = TTA(window=256, flip=True)
    res = predict_large(
        loaded.model, src, tmp_path / "mask.tif", loaded.classes, tta=tta, progress=False
    )
    rgb = ((bands[:3].astype(np.uint32) * 255 + 2047) // 4095).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(tifffile.imread(res.written), _sliding(loaded, rgb, tta))
    assert any("first 3" in n for n in res.notes) and any("255/4095" in n for n in res.notes)


def test_jpeg_over_the_limit(tmp_path, loaded) -> None:
    src = tmp_path / "photo.jpg"
    # Lower than the window: windows of 200 x 256, as predict_probs cuts them.
    Image.fromarray(_picture(200, 900, seed=2)).save(src, quality=90)
    assert is_large(src, max_pixels=100_000) and not is_large(src, max_pixels=10**9)
    assert is_large(tmp_path / "any.tif", max_pixels=10**9)  # TIFFs always take this path
    tta = TTA(window=256)
    res = predict_large(
        loaded.model, src, tmp_path / "photo.tif", loaded.classes, tta=tta, progress=False
    )
    rgb = read_image(src).permute(1, 2, 0).numpy()
    assert np.array_equal(tifffile.imread(res.written), _sliding(loaded, rgb, tta))


def test_unreadable_inputs_are_named_and_leave_no_mask(tmp_path, loaded) -> None:
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 20)
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, _picture(300, 400), tile=(256, 256), compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    for bad in (junk, cut, tmp_path / "missing.tif"):
        out = tmp_path / f"{bad.stem}_mask.tif"
        with pytest.raises(DatasetError, match=bad.name):
            predict_large(loaded.model, bad, out, loaded.classes, progress=False)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
    with pytest.raises(OutputError, match="over the input"):
        predict_large(loaded.model, whole, whole, loaded.classes, progress=False)
    with pytest.raises(ValueError, match="scale 1"):
        predict_large(
            loaded.model, whole, tmp_path / "m.tif", loaded.classes, tta=TTA(scales=(0.5, 1))
        )


CHILD = """
import json, resource, sys, torch
from segment_deeplab.checkpoint import load_any
from segment_deeplab.infer.fold import for_inference
from segment_deeplab.infer.large import predict_large
from segment_deeplab.infer.tta import TTA

def peak_mib():  # VmHWM: ru_maxrss would start from the parent's size at the fork
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

torch.set_num_threads(2)
loaded = load_any(sys.argv[1])
model = for_inference(loaded.model, torch.device("cpu"))
loaded_mib = peak_mib()  # torch, the project's modules, the model
res = predict_large(model, sys.argv[2], sys.argv[3], loaded.classes, tta=TTA(window=512),
                    progress=False)
print(json.dumps({"peak_mib": peak_mib(), "loaded_mib": loaded_mib, "seconds": res.seconds}))
"""


def write_streamed(path: Path, h: int, w: int, extratags=()) -> None:
    """A tiled GeoTIFF of (h, w) written tile by tile, never whole in memory."""

    def tiles():
        for y in range(0, h, 256):
            for x in range(0, w, 256):
                t = _picture(256, 256, seed=(y // 256) * 1000 + x // 256)
                yield t[: min(256, h - y), : min(256, w - x)]

    with tifffile.TiffWriter(path, bigtiff=h * w * 3 > 2**31) as tif:
        tif.write(
            tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(256, 256), compression="zlib",
            photometric="rgb", extratags=list(extratags),
        )  # fmt: skip


@pytest.mark.slow
@pytest.mark.ci_only  # a minute and a half: CI runs it, `make test` keeps under 10 minutes
def test_12k_geotiff_in_flat_memory(tmp_path, run) -> None:
    size = 12_000
    src, out = tmp_path / "big.tif", tmp_path / "big_mask.tif"
    write_streamed(src, size, size, GEO)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(run), str(src), str(out)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    print(stats)  # shown by pytest -rP
    full_probs_mib = len(CLASSES) * size * size * 4 / 2**20  # predict_probs holds: 2.1 GiB
    # What predicting took on top of torch and the model (measured: 0.55 GiB peak over
    # 0.75 GiB loaded): 8 windows' activations in one forward pass (as predict_probs
    # batches them, 0.3 GiB), one window-high band of probability sums (4 x 512 x 12000
    # floats, 94 MiB) and of the image. None of it grows with the image's height.
    assert stats["peak_mib"] - stats["loaded_mib"] < full_probs_mib / 3, stats
    assert stats["peak_mib"] < full_probs_mib * 0.75, stats
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.shape == (size, size) and page.is_tiled
        assert page.tags[33922].value == GEO[1][3]


def test_predict_command_writes_a_tiled_mask_for_a_geotiff(tmp_path, run, loaded) -> None:
    """`deeplab predict scan.tif`: the window-by-window path, from the command line."""
    from segment_deeplab.cli import main

    rgb = _picture(600, 700, seed=3)
    src = tmp_path / "scan.tif"
    tifffile.imwrite(src, rgb, tile=(256, 256), photometric="rgb")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(run), str(src), "--output", str(out)]
    assert main([*argv, "--window", "256", "--amp", "off", "--no-progress"]) == 0
    with tifffile.TiffFile(out / "scan.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.shape == (600, 700)
        mask = page.asarray()
    np.testing.assert_array_equal(mask, _sliding(loaded, rgb, TTA(window=256)))
