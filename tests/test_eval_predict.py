"""Inference TTA and tiling, evaluate(), predict() and the eval/predict commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segment_deeplab import checkpoint as ckpt_mod
from segment_deeplab import cli
from segment_deeplab.classes import ClassInfo
from segment_deeplab.config import Config
from segment_deeplab.infer.eval_outputs import write_outputs
from segment_deeplab.infer.evaluate import check_classes, evaluate
from segment_deeplab.infer.predict import predict
from segment_deeplab.infer.tta import TTA, _starts, predict_probs
from segment_deeplab.metrics import metrics_from_matrix

CLASSES = [
    ClassInfo(0, "background", (0, 0, 0)),
    ClassInfo(1, "red", (200, 30, 30)),
    ClassInfo(2, "green", (30, 200, 30)),
]


class PixelModel(nn.Module):
    """A 1x1 conv: every output pixel sees only its own input pixel."""

    def __init__(self, num_classes: int = 3, output_stride: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 5


class SymmetricModel(nn.Module):
    """A 3x3 conv whose kernel is its own left-right mirror: flip-equivariant."""

    output_stride = 1

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 5


class ChannelModel(nn.Module):
    """Predicts the class whose channel is brightest (0: red, 1: green, 2: blue)."""

    output_stride = 4

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), np.uint8))


def test_probs_shape_and_sum() -> None:
    p = predict_probs(PixelModel(), _image(21, 30), TTA(scales=(0.5, 1.0, 1.75), flip=True))
    assert p.shape == (1, 3, 21, 30)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 21, 30))


def test_flip_on_symmetric_model_changes_nothing() -> None:
    model, x = SymmetricModel().eval(), _image(19, 26, seed=3)
    torch.testing.assert_close(predict_probs(model, x, TTA(flip=True)), predict_probs(model, x))


@pytest.mark.parametrize("window,overlap", [(16, 1 / 3), (24, 0.5), (40, 0.0)])
def test_sliding_window_equals_whole_image_for_pixel_model(window: int, overlap: float) -> None:
    model, x = PixelModel().eval(), _image(45, 70, seed=4).unsqueeze(0).repeat(2, 1, 1, 1)
    full = predict_probs(model, x)
    tiled = predict_probs(model, x, TTA(window=window, overlap=overlap))
    torch.testing.assert_close(tiled, full)


def test_tile_starts_cover_the_image() -> None:
    assert _starts(10, 16, 8) == [0]
    assert _starts(40, 16, 10) == [0, 10, 20, 24]
    for size, win, step in [(45, 16, 10), (513, 513, 342), (1000, 513, 342)]:
        covered = np.zeros(size, bool)
        for s in _starts(size, win, step):
            covered[s : s + win] = True
        assert covered.all()


def test_evaluate_matches_known_predictions(tmp_path) -> None:
    rng = np.random.default_rng(0)
    items, mat = [], np.zeros((3, 3), np.int64)
    for i, (h, w) in enumerate([(12, 16), (12, 16), (9, 13), (12, 16)]):
        pred = rng.integers(0, 3, (h, w))
        # Channel `pred` brightest, so ChannelModel predicts exactly `pred`.
        image = np.full((3, h, w), 40, np.uint8)
        np.put_along_axis(image, pred[None], 220, axis=0)
        mask = np.where(rng.random((h, w)) < 0.7, pred, rng.integers(0, 3, (h, w)))
        if i != 1:
            mask[0, :] = 255
        keep = mask != 255
        np.add.at(mat, (mask[keep], pred[keep]), 1)
        items.append((torch.from_numpy(image), torch.from_numpy(mask)))
    names = [c.name for c in CLASSES]
    got = evaluate(
        ChannelModel(),
        items,
        3,
        255,
        "cpu",
        progress=False,
        class_names=names,
        background=0,
        batch_size=2,
    )
    want = metrics_from_matrix(mat, names, background=0)
    assert got["confusion_matrix"] == mat.tolist()
    assert got["miou"] == pytest.approx(want["miou"])
    assert got["miou_foreground"] == pytest.approx(want["miou_foreground"])
    assert [r["stem"] for r in got["per_image"]] == ["0", "1", "2", "3"]
    paths = write_outputs(got, tmp_path)
    saved = json.loads(paths["metrics"].read_text())
    assert saved["class_names"] == names and "confusion_matrix" not in saved
    header = paths["confusion_csv"].read_text().splitlines()[0]
    assert header.endswith("background,red,green")
    assert Image.open(paths["confusion_png"]).mode == "RGB"


class BrokenItems(torch.utils.data.Dataset):
    """Two good items, then a read error, as a corrupt file gives."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i == 2:
            raise OSError("cannot decode images/0002.jpg")
        return torch.full((3, 8, 8), 200, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.long)


def test_evaluate_reports_errors_from_reading_and_scoring() -> None:
    """A file that cannot be read, or a model predicting classes that do not exist, stops
    evaluate() with the message that names it."""
    with pytest.raises(OSError, match="images/0002.jpg"):
        evaluate(ChannelModel(), BrokenItems(), 3, 255, "cpu", progress=False)
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    image[2] = 200  # ChannelModel predicts class 2
    bad = [(image, torch.zeros(4, 4, dtype=torch.long))] * 3
    with pytest.raises(ValueError, match="predictions must lie in 0..1"):
        evaluate(ChannelModel(), bad, 2, 255, "cpu", progress=False)  # 3 channels, 2 classes


def test_evaluate_with_a_loader_worker_equals_in_process() -> None:
    """A DeepLab model evaluated with a DataLoader worker decoding ahead gives what the
    in-process path gives, image for image and in dataset order; an unreadable file
    still stops it with its name."""
    from segment_deeplab.infer.fold import for_inference
    from segment_deeplab.models import build_model

    cfg = Config()
    cfg.model.model_variant, cfg.model.num_classes = "resnet_18", 3
    cfg.model.aspp_channels = cfg.model.decoder_channels = 16
    cfg.model.low_level_channels = 8
    torch.manual_seed(0)
    model = for_inference(build_model(cfg.model), torch.device("cpu"))
    rng = np.random.default_rng(5)
    items = [
        (_image(h, w, seed=i), torch.from_numpy(rng.integers(0, 3, (h, w))))
        for i, (h, w) in enumerate([(40, 56)] * 5 + [(33, 47)] * 2)
    ]
    here = evaluate(model, items, 3, 255, progress=False, batch_size=2)
    ahead = evaluate(model, items, 3, 255, progress=False, batch_size=2, workers=1)
    a, b = np.array(here["confusion_matrix"]), np.array(ahead["confusion_matrix"])
    assert a.sum() == sum(m.numel() for _, m in items) and np.array_equal(a, b)
    assert [r["stem"] for r in ahead["per_image"]] == [str(i) for i in range(7)]
    assert ahead["per_image"] == here["per_image"]
    with pytest.raises(OSError, match="images/0002.jpg"):
        evaluate(ChannelModel(), BrokenItems(), 3, 255, progress=False, batch_size=2)


def test_class_mismatch_names_both() -> None:
    check_classes([{"name": "background"}, {"name": "red"}], ["background", "red"])
    with pytest.raises(ckpt_mod.CheckpointError, match=r"2 classes.*3 classes"):
        check_classes([{"name": "background"}, {"name": "red"}], ["background", "red", "x"])


def _write_images(folder, sizes) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        arr = _image(h, w, seed=i).permute(1, 2, 0).numpy()
        ext = "png" if i % 2 else "jpg"
        paths.append(folder / f"img{i}.{ext}")
        Image.fromarray(arr).save(paths[-1])
    return paths


def test_predict_writes_palette_masks_at_input_size(tmp_path) -> None:
    sizes = [(20, 30), (20, 30), (17, 11), (20, 30)]
    paths = _write_images(tmp_path / "in", sizes)
    out = tmp_path / "out"
    result = predict(
        PixelModel(), [tmp_path / "in"], out, CLASSES, batch_size=2, save_probs=True, progress=False
    )
    assert not result.failed and len(result.written) == 4
    want_palette = [v for c in CLASSES for v in c.color]
    for p, (h, w) in zip(paths, sizes, strict=True):
        mask = Image.open(out / f"{p.stem}.png")
        assert mask.mode == "P" and mask.size == (w, h)
        assert mask.getpalette()[: len(want_palette)] == want_palette
        assert np.asarray(mask).max() < len(CLASSES)
        over = Image.open(out / f"{p.stem}_overlay.jpg")  # legend panel on the right
        assert over.mode == "RGB" and over.width > w and over.height >= h
        probs = np.load(out / f"{p.stem}_probs.npy")
        assert probs.dtype == np.float16 and probs.shape == (3, h, w)


def test_predict_groups_batches_sizes_and_reports_unreadable_files(tmp_path) -> None:
    """Same-size images predicted together give what one at a time gives, for every
    image; an unreadable file among them is reported and the others still come out."""
    from segment_deeplab.infer.predict import predict_groups

    paths = _write_images(tmp_path / "in", [(20, 30), (17, 11), (20, 30), (20, 30), (9, 9)])
    paths[3].write_bytes(paths[3].read_bytes()[:60])  # truncated: header fine, pixels not
    runs = {}
    for batch in (1, 2):
        got = list(predict_groups(PixelModel().eval(), paths, batch))
        bad = [p.index for p in got if p.error is not None]
        runs[batch] = ({p.index: p.probs for p in got if p.error is None}, bad)
    (one, bad_one), (two, bad_two) = runs[1], runs[2]
    assert sorted(one) == sorted(two) == [0, 1, 2, 4] and bad_one == bad_two == [3]
    for i in one:
        torch.testing.assert_close(two[i], one[i])


def test_predict_applies_exif_orientation(tmp_path) -> None:
    img = Image.fromarray(_image(10, 24).permute(1, 2, 0).numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown as 24 high, 10 wide
    img.save(tmp_path / "rot.jpg", exif=exif)
    predict(PixelModel(), [tmp_path / "rot.jpg"], tmp_path / "out", CLASSES, progress=False)
    assert Image.open(tmp_path / "out" / "rot.png").size == (10, 24)


@pytest.fixture
def fake_checkpoint(monkeypatch, tmp_path):
    """`load_model` returning a PixelModel, so the commands run without real models; a
    checkpoint file `x.pt` to name (in the test's folder, made the working folder)."""
    ckpt = {"classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in CLASSES]}
    ckpt["ignore_index"] = 255

    def load_model(path, map_location="cpu"):
        return PixelModel().eval(), Config(), dict(ckpt)

    monkeypatch.setattr(ckpt_mod, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    torch.save({"format": ckpt_mod.FORMAT}, tmp_path / "x.pt")
    return ckpt


def test_predict_cli_skips_corrupt_file(tmp_path, capsys, fake_checkpoint) -> None:
    _write_images(tmp_path / "in", [(16, 16), (16, 16)])
    (tmp_path / "in" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = Image.fromarray(_image(16, 16).permute(1, 2, 0).numpy())
    good.save(tmp_path / "in" / "cut.png")
    data = (tmp_path / "in" / "cut.png").read_bytes()
    (tmp_path / "in" / "cut.png").write_bytes(data[: len(data) // 2])  # truncated pixels
    args = ["predict", str(tmp_path / "in" / "*.*"), "--checkpoint", "x.pt"]
    rc = cli.main([*args, "--output", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "wrote 2, failed 2" in out and "bad.jpg (" in out and "cut.png (" in out
    assert (tmp_path / "out" / "img0.png").is_file() and (tmp_path / "out" / "img1.png").is_file()


def test_predict_cli_missing_input(tmp_path, capsys, fake_checkpoint) -> None:
    rc = cli.main(
        [
            "predict",
            str(tmp_path / "nope.jpg"),
            "--checkpoint",
            "x.pt",
            "--output",
            str(tmp_path / "out"),
            "--json",
            "--no-progress",
        ]
    )
    assert rc == 1
    assert json.loads(capsys.readouterr().out)["failed"][0]["reason"] == "not found"


def _synthetic(tmp_path):
    synthetic = pytest.importorskip("segment_deeplab.data.synthetic")
    pytest.importorskip("segment_deeplab.data.dataset")
    return synthetic.generate(tmp_path / "data", num=8, seed=0, size=(32, 40), num_classes=3)


def test_eval_cli_with_stand_in_model(tmp_path, capsys, fake_checkpoint) -> None:
    spec = _synthetic(tmp_path)
    for c, name in zip(
        fake_checkpoint["classes"], ["background", "circle", "rectangle"], strict=True
    ):
        c["name"] = name  # the synthetic dataset's classes
    rc = cli.main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "x.pt"),
            "--data",
            str(spec),
            "--output",
            str(tmp_path / "ev"),
            "--flip",
            "--scales",
            "0.75",
            "1.0",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "mIoU" in out and "fwIoU" in out
    for name in ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png"):
        assert (tmp_path / "ev" / name).is_file()


def test_eval_cli_end_to_end_on_saved_checkpoint(tmp_path, capsys) -> None:
    models = pytest.importorskip("segment_deeplab.models")
    if not hasattr(models, "build_model"):
        pytest.skip("segment_deeplab.models has no build_model yet")
    spec = _synthetic(tmp_path)
    cfg = Config()
    cfg.model.model_variant, cfg.model.num_classes = "resnet_18", 3
    cfg.model.aspp_channels = cfg.model.decoder_channels = 16
    cfg.model.low_level_channels = 8
    model = models.build_model(cfg.model)
    ckpt = {
        "format": ckpt_mod.FORMAT,
        "model": model.state_dict(),
        "config": cfg.to_dict(),
        "classes": [
            {"id": c.id, "name": n, "color": [0, 0, 0]}
            for c, n in zip(CLASSES, ["background", "circle", "rectangle"], strict=True)
        ],
        "ignore_index": 255,
        "dataset_hash": None,
        "step": 0,
    }
    ckpt_mod.save(ckpt, tmp_path / "run" / "best.pt")
    rc = cli.main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "run"),
            "--data",
            str(spec),
            "--json",
            "--window",
            "24",
            "--no-progress",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["images"] == 2 and len(result["iou"]) == 3
    assert (tmp_path / "run" / "eval_val" / "metrics.json").is_file()
    # --amp off: an fp32 forward pass, recorded in the result
    base = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(spec), "--json"]
    assert cli.main([*base, "--amp", "off", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["forward_dtype"] == "float32"
    assert cli.main([*base, "--amp", "fp16", "--device", "cpu"]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    # A checkpoint for other classes is refused with both class lists named.
    ckpt["classes"] = ckpt["classes"][:2]
    ckpt_mod.save(ckpt, tmp_path / "run" / "best.pt")
    rc = cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(spec)])
    assert rc == 2 and "differ from the dataset" in capsys.readouterr().err
