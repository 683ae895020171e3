"""`deeplab validate`: every problem found on real files, named by file and code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segment_deeplab.cli import main
from segment_deeplab.data.spec import resolve_dataset
from segment_deeplab.data.validate import format_report, validate_dataset

H, W = 12, 16
CAMVID = Path(__file__).resolve().parents[2] / "shared/datasets/camvid"
REPO = Path(__file__).resolve().parents[1]


def stripes(num_classes: int = 3, h: int = H, w: int = W) -> np.ndarray:
    """A mask of vertical bands 0..num_classes-1, so every class occurs. (h, w) uint8."""
    return (np.arange(w)[None, :] * num_classes // w).repeat(h, 0).astype(np.uint8)


def write_image(path: Path, h: int = H, w: int = W, exif_orientation: int | None = None) -> None:
    rng = np.random.default_rng(len(path.name))
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    img.save(path, exif=exif) if exif_orientation else img.save(path)


def make_dataset(root: Path, n: int = 4, num_classes: int = 3, spec: bool = True, **extra):
    """images/s{i}.jpg + masks/s{i}.png (stripes) + dataset.yaml; returns root."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        write_image(root / "images" / f"s{i}.jpg")
        Image.fromarray(stripes(num_classes)).save(root / "masks" / f"s{i}.png")
    if spec:
        classes = [{"id": c, "name": f"c{c}", "color": [c * 40, 0, 0]} for c in range(num_classes)]
        text = yaml.safe_dump({"ignore_index": 255, "classes": classes, **extra})
        (root / "dataset.yaml").write_text(text)
    return root


def run(root: Path):
    spec, images, masks, raw = resolve_dataset(root)
    return validate_dataset(spec, images, masks)


def codes(report) -> set[str]:
    return {p.code for p in report.problems}


def assert_problem(report, code: str, filename: str, level: str = "error") -> None:
    hits = [p for p in report.problems if p.code == code]
    assert hits, f"no {code}: {report.problems}"
    assert any(filename in p.message and filename in p.file for p in hits), hits
    assert all(p.level == level for p in hits)


def test_clean_dataset_passes_with_counts(tmp_path):
    r = run(make_dataset(tmp_path))
    assert r.ok and not r.problems, r.problems
    assert [p.stem for p in r.pairs] == ["s0", "s1", "s2", "s3"]
    assert r.class_ids == [0, 1, 2]
    assert sum(r.pixel_counts.values()) == 4 * H * W
    assert r.image_counts == {0: 4, 1: 4, 2: 4}
    assert r.size_min == r.size_max == (H, W)
    text = format_report(r)
    assert "c1" in text and "4 pairs checked" in text and "0 errors" in text


def test_pairing_problems(tmp_path):
    root = make_dataset(tmp_path)
    write_image(root / "images" / "lonely.jpg")
    Image.fromarray(stripes()).save(root / "masks" / "orphan.png")
    write_image(root / "images" / "s1.png")  # s1.jpg and s1.png share a stem
    r = run(root)
    assert_problem(r, "missing_mask", "lonely.jpg")
    assert_problem(r, "missing_image", "orphan.png")
    assert_problem(r, "duplicate_stem", "s1.")
    assert "s1" not in [p.stem for p in r.pairs]


def test_truncated_files_are_unreadable(tmp_path):
    root = make_dataset(tmp_path)
    write_image(root / "images" / "s0.jpg", h=64, w=64)
    data = (root / "images" / "s0.jpg").read_bytes()
    (root / "images" / "s0.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(stripes(3, 64, 64)).save(root / "masks" / "s1.png")
    data = (root / "masks" / "s1.png").read_bytes()
    (root / "masks" / "s1.png").write_bytes(data[: len(data) - 20])
    r = run(root)
    assert_problem(r, "unreadable", "s0.jpg")
    assert_problem(r, "unreadable", "s1.png")


def test_size_mismatch_and_exif_orientation(tmp_path):
    root = make_dataset(tmp_path)
    Image.fromarray(stripes(3, H + 2, W)).save(root / "masks" / "s0.png")
    # s1: stored W x H with orientation 6 -> shown H x W; the mask matches the stored grid
    write_image(root / "images" / "s1.jpg", exif_orientation=6)
    # s2: same rotation, mask drawn on the upright image: fine
    write_image(root / "images" / "s2.jpg", exif_orientation=8)
    Image.fromarray(stripes(3, W, H)).save(root / "masks" / "s2.png")
    r = run(root)
    hits = {Path(p.file).name: p.message for p in r.problems if p.code == "size_mismatch"}
    assert set(hits) == {"s0.jpg", "s1.jpg"}
    assert "s0.png" in hits["s0.jpg"] and "EXIF" in hits["s1.jpg"]


def test_jpeg_mask(tmp_path):
    root = make_dataset(tmp_path)
    (root / "masks" / "s0.png").unlink()
    Image.fromarray(stripes()).save(root / "masks" / "s0.jpg")
    Image.fromarray(stripes()).save(root / "masks" / "s1.png", format="JPEG")  # misnamed
    r = run(root)
    assert_problem(r, "jpeg_mask", "s0.jpg")
    assert_problem(r, "jpeg_mask", "s1.png")


def test_color_and_non_index_masks(tmp_path):
    root = make_dataset(tmp_path, n=5)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (200, 10, 10)
    Image.fromarray(rgb).save(root / "masks" / "s0.png")
    Image.fromarray(np.stack([stripes()] * 3, -1)).convert("RGBA").save(root / "masks" / "s1.png")
    Image.fromarray(stripes().astype(np.uint16) * 300).save(root / "masks" / "s2.png")  # I;16
    Image.fromarray(stripes() > 0).save(root / "masks" / "s3.png")  # mode 1
    pal = Image.fromarray(stripes()).convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])  # P mode: indices are ids
    pal.save(root / "masks" / "s4.png")
    r = run(root)
    assert_problem(r, "color_mask", "s0.png")
    assert "color_masks: true" in next(p.message for p in r.problems if p.code == "color_mask")
    assert_problem(r, "grey_rgb_mask", "s1.png", level="warning")
    assert {Path(p.file).name for p in r.problems if p.code == "not_index_mask"} == {
        "s2.png",
        "s3.png",
    }
    assert not [p for p in r.problems if "s4" in p.file]


def test_color_masks_mapped_via_class_colours(tmp_path):
    root = make_dataset(tmp_path, color_masks=True, ignore_color=[9, 9, 9])
    for i in range(4):
        ids = stripes()
        rgb = np.stack([ids * 40, ids * 0, ids * 0], -1).astype(np.uint8)
        rgb[0, 0] = (9, 9, 9)
        if i == 3:
            rgb[:4, :4] = (1, 2, 3)  # a colour of no class
        Image.fromarray(rgb).save(root / "masks" / f"s{i}.png")
    r = run(root)
    assert_problem(r, "unknown_values", "s3.png")
    assert "(1, 2, 3)" in r.problems[0].message
    assert r.pixel_counts[255] == 4 + 15  # ignore colour, plus the unknown block
    assert r.image_counts[2] == 4


def test_unknown_values_listed(tmp_path):
    root = make_dataset(tmp_path)
    m = stripes()
    m[1:6, 1:6] = 7  # solid blocks, not fringes
    m[6:11, 10:15] = 9
    Image.fromarray(m).save(root / "masks" / "s2.png")
    r = run(root)
    assert_problem(r, "unknown_values", "s2.png")
    assert "7, 9" in r.problems[0].message and "--remap" in r.problems[0].message


def test_antialiased_fringe(tmp_path):
    root = make_dataset(tmp_path)
    m = np.zeros((H, W), np.uint8)
    m[:, W // 2 :] = 1
    m[:, W // 2 - 1] = 100  # a one-pixel fringe between the two regions
    m[:, W // 2] = 160
    Image.fromarray(m).save(root / "masks" / "s3.png")
    r = run(root)
    assert_problem(r, "antialiased", "s3.png")
    assert "NEAREST" in r.problems[0].message


def test_antialiased_without_spec(tmp_path):
    root = make_dataset(tmp_path, spec=False)
    for i in range(4):
        m = np.zeros((H, W), np.uint8)
        m[:, W // 2 :] = 2
        if i == 0:
            m[:, W // 2] = 1  # only ever between 0 and 2, as bilinear resizing leaves it
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
    r = run(root)
    assert r.class_ids == [0, 2]
    assert_problem(r, "antialiased", "s0.png")


def test_thin_class_is_not_an_artefact(tmp_path):
    root = make_dataset(tmp_path, spec=False)
    for i in range(4):
        m = np.zeros((H, W), np.uint8)
        m[np.arange(H), np.arange(H) + i] = 1  # a one-pixel crack
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
    r = run(root)
    assert r.ok and r.class_ids == [0, 1] and not r.problems


def test_class_absent_is_a_warning(tmp_path):
    root = make_dataset(tmp_path, num_classes=2)
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    spec["classes"].append({"id": 2, "name": "never", "color": [1, 1, 1]})
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    r = run(root)
    assert r.ok and codes(r) == {"class_absent"}
    assert "never" in r.problems[0].message


@pytest.mark.parametrize("spec", [True, False])
def test_binary_mask_trap(tmp_path, spec):
    root = make_dataset(tmp_path, num_classes=2, spec=spec)
    for i in range(4):
        Image.fromarray(stripes(2) * 255).save(root / "masks" / f"s{i}.png")
    r = run(root)
    assert not r.ok and "binary_mask_trap" in codes(r)
    msg = next(p.message for p in r.problems if p.code == "binary_mask_trap")
    assert "--remap 255:1" in msg


@pytest.mark.parametrize("ignored_cols, trap", [(4, True), (1, False)])
def test_trap_with_absent_class_needs_many_ignored_pixels(tmp_path, ignored_cols, trap):
    root = make_dataset(tmp_path)  # declares 0, 1, 2; masks will hold 0, 1 and 255
    for i in range(4):
        m = (stripes(3) > 0).astype(np.uint8)
        m[:, :ignored_cols] = 255  # 25% of pixels (trap) or 6% (void like VOC's: fine)
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
    r = run(root)
    assert ("binary_mask_trap" in codes(r)) == trap
    assert ("class_absent" in codes(r)) != trap
    if trap:
        assert "--remap 255:2" in r.problems[0].message


def test_without_spec_uses_ids_found(tmp_path):
    root = make_dataset(tmp_path, spec=False)
    for i in range(4):
        m = np.array([0, 2, 5], np.uint8)[stripes()]
        Image.fromarray(m).save(root / "masks" / f"s{i}.png")
    r = run(root)
    assert not r.declared and r.class_ids == [0, 2, 5]
    assert "noncontiguous_ids" in codes(r) and "--remap 2:1 5:2" in r.problems[0].message
    assert "ids found in the masks" in format_report(r)


def test_pool_matches_serial(tmp_path):
    root = make_dataset(tmp_path, n=60)
    Image.fromarray(stripes(3, H + 1, W)).save(root / "masks" / "s7.png")
    spec, images, masks, _ = resolve_dataset(root)
    a = validate_dataset(spec, images, masks, workers=1)
    b = validate_dataset(spec, images, masks, workers=2)
    assert a.problems == b.problems and a.pixel_counts == b.pixel_counts
    assert a.to_dict()["hash"] == b.to_dict()["hash"]


def test_cli_exit_codes_and_json(tmp_path, capsys):
    root = make_dataset(tmp_path / "ok")
    assert main(["validate", str(root)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = make_dataset(tmp_path / "bad")
    (bad / "masks" / "s0.png").unlink()
    assert main(["validate", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)  # stdout holds the JSON object only
    assert out["ok"] is False and out["problems"][0]["code"] == "missing_mask"
    assert main(["validate", str(tmp_path / "nowhere")]) == 2


def test_cli_images_masks_and_spec_flags(tmp_path, capsys):
    root = make_dataset(tmp_path / "d")
    spec = tmp_path / "elsewhere.yaml"
    (root / "dataset.yaml").rename(spec)
    argv = ["validate", "--images", str(root / "images"), "--masks", str(root / "masks")]
    assert main([*argv, "--spec", str(spec), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["declared"] is True


@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid copy not present")
def test_camvid_passes(capsys):
    assert main(["validate", str(CAMVID), "--spec", str(REPO / "datasets/camvid.yaml")]) == 0
    out = capsys.readouterr().out
    assert "468 pairs checked" in out and "bicyclist" in out
