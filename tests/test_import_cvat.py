"""`deeplab import cvat` and `deeplab import cvat-mask` on exports laid out as CVAT writes
them, checked pixel for pixel against masks computed here without the importer."""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import XMLGenerator

import numpy as np
import pytest
import yaml
from helpers import read_masks, tree_hash
from PIL import Image
from pycocotools import mask as mask_utils

from segment_deeplab.cli import main

H, W = 40, 50
COLORS = {"car": "#fa3253", "road": "#33ddff", "person": "#b83df5"}
IDS = {"car": 1, "road": 2, "person": 3}  # the order of the export's labels


# ------------------------------------------------------------------ reference geometry


def cvat_rle(tight: np.ndarray) -> str:
    """CVAT's mask RLE, from its definition: run lengths of the box's pixels in row-major
    order, alternating 0s and 1s and starting with (a possibly empty) run of 0s, written
    as "0, 5, 3" (cvat/apps/dataset_manager/formats/transformations.py
    MaskConverter.rle, and formats/cvat.py, which writes str(list)[1:-1])."""
    flat = tight.reshape(-1).astype(np.uint8)
    runs, value, n = [], 0, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            runs.append(n)
            value, n = v, 1
    runs.append(n)
    return ", ".join(str(r) for r in runs)


def coco_polygon(points: list[tuple[float, float]], h: int = H, w: int = W) -> np.ndarray:
    """A polygon's pixels as pycocotools draws them, which CVAT's mask export uses
    (datumaro's polygons_to_masks)."""
    flat = [float(v) for xy in points for v in xy]
    return mask_utils.decode(mask_utils.frPyObjects([flat], h, w))[:, :, 0].astype(bool)


def numpy_box(x0, y0, x1, y1, h: int = H, w: int = W) -> np.ndarray:
    """A box as CVAT's mask export fills it: [round(xtl), round(xbr)) x
    [round(ytl), round(ybr)) (datumaro's boxes_to_masks rasterises it as a polygon)."""
    out = np.zeros((h, w), bool)
    out[round(y0) : round(y1), round(x0) : round(x1)] = True
    return out


def _points(points) -> str:
    return ";".join(f"{x:.2f},{y:.2f}" for x, y in points)


# Shapes as CVAT's dump_as_cvat_annotation writes them: coordinates with "{:.2f}", a
# mask's RLE with its box (left, top, width, height), and a z_order on each.


def box(label: str, x0, y0, x1, y1, z=0, **extra) -> tuple[str, dict]:
    names, values = ("xtl", "ytl", "xbr", "ybr"), (x0, y0, x1, y1)
    coords = {k: f"{v:.2f}" for k, v in zip(names, values, strict=True)}
    return "box", {"label": label, **coords, **extra, "z_order": str(z)}


def polygon(label: str, points, z=0, tag="polygon") -> tuple[str, dict]:
    return tag, {"label": label, "points": _points(points), "z_order": str(z)}


def mask(label: str, tight: np.ndarray | str, left: int, top: int, z=0, hw=None):
    h, w = hw or tight.shape
    rle = tight if isinstance(tight, str) else cvat_rle(tight)
    box_ = {"left": str(left), "top": str(top), "width": str(w), "height": str(h)}
    return "mask", {"label": label, "rle": rle, **box_, "z_order": str(z)}


def _image_file(path: Path, seed: int, hw=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


class _Dumper:
    """CVAT's XmlAnnotationWriter in short: xml.sax's XMLGenerator, each element on its
    own line indented by two spaces a level (cvat/apps/dataset_manager/formats/cvat.py,
    create_xml_dumper)."""

    def __init__(self, f) -> None:
        self.x, self.level = XMLGenerator(f, "utf-8"), 0
        self.x.startDocument()

    def open(self, tag: str, attrs: dict | None = None) -> None:
        self.x.ignorableWhitespace("\n" + "  " * self.level)
        self.x.startElement(tag, attrs or {})
        self.level += 1

    def close(self, tag: str) -> None:
        self.level -= 1
        self.x.ignorableWhitespace("\n" + "  " * self.level)
        self.x.endElement(tag)

    def text(self, tag: str, text: str) -> None:
        self.x.ignorableWhitespace("\n" + "  " * self.level)
        self.x.startElement(tag, {})
        self.x.characters(text)
        self.x.endElement(tag)


def write_cvat_xml(path: Path, owner: str, images: list[dict], labels=COLORS) -> None:
    """annotations.xml as CVAT writes it: <version>, <meta> with the task's (or project's)
    labels and their colours, then one <image> per frame holding its shapes; layout from
    https://docs.cvat.ai/docs/other/xml_format/ and cvat/apps/dataset_manager/formats/cvat.py
    (dump_as_cvat_annotation)."""
    with open(path, "w", encoding="utf-8") as f:
        d = _Dumper(f)
        d.open("annotations")
        d.text("version", "1.1")
        d.open("meta")
        d.open(owner)
        d.text("name", "fixture")
        d.open("labels")
        for name, color in labels.items():
            d.open("label")
            d.text("name", name)
            d.text("color", color)
            d.text("type", "any")
            d.open("attributes")
            d.close("attributes")
            d.close("label")
        d.close("labels")
        d.close(owner)
        d.text("dumped", "2024-01-01 00:00:00.000000+00:00")
        d.close("meta")
        for im in images:
            d.open("image", im["attrs"])
            for tag, attrs in im["shapes"]:
                d.open(tag, {"source": "manual", "occluded": "0", **attrs})
                d.close(tag)
            d.close("image")
        d.close("annotations")
        d.x.endDocument()


def _image_attrs(i: int, name: str, subset: str | None = None, hw=(H, W)) -> dict:
    attrs = {"id": str(i), "name": name}
    if subset:
        attrs.update(subset=subset, task_id="1")
    attrs.update(width=str(hw[1]), height=str(hw[0]))
    return attrs


# ------------------------------------------------------------------------ the fixtures


def make_cvat_xml_export(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A 'CVAT for images 1.1' project export with images, unzipped: annotations.xml and
    images/<subset>/<name> (https://docs.cvat.ai/docs/dataset_management/formats/format-cvat/,
    cvat/apps/dataset_manager/formats/cvat.py::_export_project, dump_media_files).
    Four 50x40 images in subsets Train (2) and Validation (2); returns the export folder
    and the expected class-id mask of each dataset stem."""
    src = root / "cvat_project_export"
    src.mkdir(parents=True)
    expected, images = {}, []

    # frame_000: a road polygon below a car box below a person mask; the box comes first in
    # the file, so only z_order puts it above the road.
    road = [(0, 20), (49, 20), (49, 39), (0, 39)]
    tight = np.zeros((6, 8), bool)
    tight[1:5, 2:6] = True
    tight[0, 3:5] = tight[5, 3:5] = True
    person = np.zeros((H, W), bool)
    person[5:11, 20:28] = tight
    images.append({
        "attrs": _image_attrs(0, "frame_000.png", "Train"),
        "shapes": [
            box("car", 5, 10, 30, 25, z=1),
            polygon("road", road, z=0),
            mask("person", tight, left=20, top=5, z=2),
            polygon("road", [(1, 1), (10, 1)], z=3, tag="polyline"),
            polygon("person", [(3, 3)], z=3, tag="points"),
        ],
    })  # fmt: skip
    ids = np.zeros((H, W), np.uint8)
    ids[coco_polygon(road)] = IDS["road"]
    ids[numpy_box(5, 10, 30, 25)] = IDS["car"]
    ids[person] = IDS["person"]
    expected["frame_000"] = ids

    # sub/frame_001: same z_order, so the later polygon covers the earlier one; a box with
    # fractional corners.
    square, triangle = [(10, 10), (40, 10), (40, 35), (10, 35)], [(20, 5), (45, 30), (5, 30)]
    images.append({
        "attrs": _image_attrs(1, "sub/frame_001.jpg", "Train"),
        "shapes": [
            box("person", 2.3, 3.7, 12.6, 15.2),
            polygon("road", square),
            polygon("car", triangle),
        ],
    })  # fmt: skip
    ids = np.zeros((H, W), np.uint8)
    ids[numpy_box(2.3, 3.7, 12.6, 15.2)] = IDS["person"]
    ids[coco_polygon(square)] = IDS["road"]
    ids[coco_polygon(triangle)] = IDS["car"]
    expected["sub__frame_001"] = ids

    # frame_002: a car mask reaching the image's right edge, under a person triangle.
    blob = np.zeros((12, 10), bool)
    blob[2:10, 1:10] = True
    blob[0:2, 4:7] = True
    blob[0, 0] = True  # a mask starting with its pixel set: its RLE starts with "0, 1"
    tri = [(30, 0), (49, 15), (25, 20)]
    images.append({
        "attrs": _image_attrs(2, "frame_002.png", "Validation"),
        "shapes": [
            polygon("person", tri, z=1),
            mask("car", blob, left=40, top=3, z=0),
        ],
    })  # fmt: skip
    ids = np.zeros((H, W), np.uint8)
    ids[3:15, 40:50][blob] = IDS["car"]
    ids[coco_polygon(tri)] = IDS["person"]
    expected["frame_002"] = ids

    # frame_003: no shapes, all background.
    images.append({"attrs": _image_attrs(3, "frame_003.png", "Validation"), "shapes": []})
    expected["frame_003"] = np.zeros((H, W), np.uint8)

    for i, im in enumerate(images):
        _image_file(src / "images" / im["attrs"]["subset"] / im["attrs"]["name"], seed=i)
    write_cvat_xml(src / "annotations.xml", "project", images)
    return src, expected


LABELMAP = {  # CVAT's make_colormap: background (black) first, then the labels' colours
    "background": (0, 0, 0),
    "car": (250, 50, 83),
    "road": (51, 221, 255),
    "person": (184, 61, 245),
}


def make_cvat_mask_export(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A 'Segmentation mask 1.1' export with images, unzipped: labelmap.txt,
    SegmentationClass/ (colour masks), SegmentationObject/, JPEGImages/ and
    ImageSets/Segmentation/<subset>.txt (https://docs.cvat.ai/docs/dataset_management/formats/format-smask/,
    cvat/apps/dataset_manager/formats/mask.py, datumaro's voc_segmentation exporter).
    Three 50x40 images in subsets Train (2) and Validation (1); returns the export
    folder and the expected class-id mask of each stem."""
    src = root / "cvat_mask_export"
    lines = "".join(f"{n}:{r},{g},{b}::\n" for n, (r, g, b) in LABELMAP.items())
    (src / "ImageSets" / "Segmentation").mkdir(parents=True)
    (src / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + lines)
    palette = np.array(list(LABELMAP.values()), np.uint8)
    expected = {}
    for i, stem in enumerate(["img_a", "img_b", "img_c"]):
        ids = np.zeros((H, W), np.uint8)
        ids[5 + i : 20, 3 : 25 + i] = 1
        ids[25:, :] = 2
        ids[10 : 30 - i, 30 + i : 45] = 3
        expected[stem] = ids
        for sub in ("SegmentationClass", "SegmentationObject"):
            (src / sub).mkdir(exist_ok=True)
            Image.fromarray(palette[ids]).save(src / sub / f"{stem}.png")
        _image_file(src / "JPEGImages" / f"{stem}.jpg", seed=10 + i)
    (src / "ImageSets/Segmentation/Train.txt").write_text("img_a\nimg_b\n")
    (src / "ImageSets/Segmentation/Validation.txt").write_text("img_c\n")
    return src, expected


# ---------------------------------------------------------------------------- helpers


def _spec(out: Path) -> dict:
    return yaml.safe_load((out / "dataset.yaml").read_text())


def _split(out: Path, name: str) -> list[str]:
    return (out / "splits" / f"{name}.txt").read_text().split()


def _assert_masks(out: Path, expected: dict[str, np.ndarray]) -> None:
    got = read_masks(out)
    assert sorted(got) == sorted(expected)
    for stem, ids in expected.items():
        assert Image.open(out / "masks" / f"{stem}.png").mode == "P"
        np.testing.assert_array_equal(got[stem], ids, err_msg=stem)


def _hex_rgb(h: str) -> list[int]:
    return [int(h[i : i + 2], 16) for i in (1, 3, 5)]


# ------------------------------------------------------------------ CVAT for images 1.1


def test_cvat_xml_project_export(tmp_path):
    src, expected = make_cvat_xml_export(tmp_path)
    before = tree_hash(src)
    out = tmp_path / "ds"
    assert main(["import", "cvat", str(src), "--output", str(out)]) == 0
    _assert_masks(out, expected)
    # the z_order case: the car box (z 1, first in the file) covers the road (z 0)
    assert expected["frame_000"][22, 10] == IDS["car"]
    spec = _spec(out)
    assert [(c["id"], c["name"]) for c in spec["classes"]] == [
        (0, "background"), (1, "car"), (2, "road"), (3, "person")
    ]  # fmt: skip
    assert {c["name"]: c["color"] for c in spec["classes"][1:]} == {
        n: _hex_rgb(h) for n, h in COLORS.items()
    }
    assert _split(out, "train") == ["frame_000", "sub__frame_001"]
    assert _split(out, "val") == ["frame_002", "frame_003"]
    assert spec["imported_from"]["format"] == "cvat"
    assert spec["imported_from"]["label_colors"] == COLORS
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "frame_000.png", "frame_002.png", "frame_003.png", "sub__frame_001.jpg"
    ]  # fmt: skip
    assert tree_hash(src) == before


def test_cvat_xml_task_export(tmp_path, capsys):
    """A task export without images (found with --images), no subsets (so no splits),
    the XML file itself as SOURCE; an ellipse, a rotated box and CVAT's documented mask
    example."""
    src = tmp_path / "task"
    # https://docs.cvat.ai/docs/other/xml_format/ (the <mask> of its example)
    doc_rle = (
        "3, 5, 7, 7, 5, 9, 3, 11, 2, 11, 2, 12, 1, 12, 1, 26, 1, 12, 1, 12, 2, 11, 3, 9, 5, "
        "7, 7, 5, 3"
    )
    ellipse = {"label": "road", "cx": "20.00", "cy": "30.00", "rx": "10.00", "ry": "6.00"}
    shapes = [
        ("ellipse", {**ellipse, "z_order": "0"}),
        box("car", 30, 2, 40, 22, rotation="90.00"),
        mask("person", doc_rle, left=1, top=1, hw=(15, 13)),
        ("skeleton", {"label": "person", "z_order": "0"}),
    ]
    images = [{"attrs": _image_attrs(0, "a.png"), "shapes": shapes}]
    _image_file(tmp_path / "pictures" / "a.png", seed=0)
    src.mkdir()
    write_cvat_xml(src / "annotations.xml", "task", images)
    out = tmp_path / "ds"
    capsys.readouterr()
    args = ["--images", str(tmp_path / "pictures"), "--output", str(out), "--json"]
    assert main(["import", "cvat", str(src / "annotations.xml"), *args]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 1 and res["shapes"] == 3
    assert res["skipped_shapes"] == {"skeleton": 1}
    assert not (out / "splits").exists()
    ids = read_masks(out)["a"]
    road = ids == IDS["road"]
    ys, xs = np.nonzero(road)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 30, 24, 36)  # centre +- radii
    assert abs(road.sum() - np.pi * 10 * 6) < 0.1 * np.pi * 10 * 6
    # turned by 90 degrees about its centre (35, 12): 20 wide, 10 high
    np.testing.assert_array_equal(ids[7:17, 25:45], IDS["car"])
    assert (ids == IDS["car"]).sum() == 200
    # the documentation's mask: 13x15 at (1, 1), its first row 3 off, 5 on, 5 off
    person = ids[1:16, 1:14] == IDS["person"]
    assert person.sum() == sum(int(v) for v in doc_rle.split(",")[1::2])
    assert person[0].tolist() == [False] * 3 + [True] * 5 + [False] * 5
    assert (ids == IDS["person"]).sum() == person.sum()


def test_cvat_xml_labels_flag_reorders(tmp_path):
    src, expected = make_cvat_xml_export(tmp_path)
    out = tmp_path / "ds"
    args = ["import", "cvat", str(src), "--output", str(out), "--labels", "person,road,car"]
    assert main(args) == 0
    assert [c["name"] for c in _spec(out)["classes"]] == ["background", "person", "road", "car"]
    remap = np.array([0, 3, 2, 1], np.uint8)  # car 1 -> 3, person 3 -> 1
    _assert_masks(out, {k: remap[v] for k, v in expected.items()})


def _one_image_export(tmp_path: Path, shapes, hw=(H, W), attrs_hw=(H, W)) -> Path:
    src = tmp_path / "bad"
    _image_file(src / "images" / "x.png", seed=0, hw=hw)
    write_cvat_xml(src / "annotations.xml", "task", [
        {"attrs": _image_attrs(0, "x.png", hw=attrs_hw), "shapes": shapes}
    ])  # fmt: skip
    return src


TRIANGLE = [(1, 1), (20, 1), (10, 15)]
BAD_XML = {
    "missing image": ([polygon("car", TRIANGLE)], "x.png", "not in"),
    "two points": ([polygon("car", [(1, 1), (5, 5)])], "<polygon> #1", "at least 3 points"),
    "outside": ([polygon("car", [(1, 1), (80, 1), (10, 15)])], "<polygon> #1", "outside"),
    "unknown label": (
        [box("tree", 1, 1, 5, 5)], "<box> #1 (label 'tree')",
        "not one of the export's labels (car, road, person)",
    ),
    "size": ([], "x.png", "the export says 60x40"),
    "rle sum": (
        [mask("car", "0, 5, 3", left=1, top=1, hw=(3, 3))], "<mask> #1",
        "sum to 8, not the 9 pixels",
    ),
    "malformed": ([], "annotations.xml", "mismatched tag: line {line},"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_XML))
def test_cvat_xml_bad_input(tmp_path, capsys, case):
    shapes, where, what = BAD_XML[case]
    src = _one_image_export(tmp_path, shapes, attrs_hw=(H, 60) if case == "size" else (H, W))
    if case == "missing image":
        (src / "images" / "x.png").unlink()
    if case == "malformed":
        xml = src / "annotations.xml"
        lines = xml.read_text().replace("</image>", "</imag>").splitlines()
        xml.write_text("\n".join(lines))
        what = what.format(line=1 + next(i for i, ln in enumerate(lines) if "</imag>" in ln))
    out = tmp_path / "ds"
    capsys.readouterr()
    assert main(["import", "cvat", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(src / "annotations.xml") in err and where in err and what in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".ds*"))


# ---------------------------------------------------------------- Segmentation mask 1.1


def test_cvat_mask_export(tmp_path):
    src, expected = make_cvat_mask_export(tmp_path)
    before = tree_hash(src)
    out = tmp_path / "ds"
    assert main(["import", "cvat-mask", str(src), "--output", str(out)]) == 0
    _assert_masks(out, expected)
    spec = _spec(out)
    assert [(c["id"], c["name"], tuple(c["color"])) for c in spec["classes"]] == [
        (i, n, rgb) for i, (n, rgb) in enumerate(LABELMAP.items())
    ]
    assert spec["imported_from"]["format"] == "cvat-mask"
    assert _split(out, "train") == ["img_a", "img_b"]
    assert _split(out, "val") == ["img_c"]
    assert tree_hash(src) == before


def test_cvat_mask_single_default_subset_is_no_split(tmp_path):
    src, expected = make_cvat_mask_export(tmp_path)
    for f in (src / "ImageSets" / "Segmentation").iterdir():
        f.unlink()
    (src / "ImageSets/Segmentation/default.txt").write_text("img_a\nimg_b\nimg_c\n")
    out = tmp_path / "ds"
    assert main(["import", "cvat-mask", str(src / "labelmap.txt"), "--output", str(out)]) == 0
    _assert_masks(out, expected)
    assert not (out / "splits").exists()


def test_cvat_mask_one_channel(tmp_path):
    """One-channel masks hold labelmap line numbers (datumaro reads them so)."""
    src, expected = make_cvat_mask_export(tmp_path)
    for stem, ids in expected.items():
        Image.fromarray(ids, mode="L").save(src / "SegmentationClass" / f"{stem}.png")
    out = tmp_path / "ds"
    assert main(["import", "cvat-mask", str(src), "--output", str(out)]) == 0
    _assert_masks(out, expected)


def _unknown_colour(src: Path) -> None:
    png = src / "SegmentationClass" / "img_b.png"
    rgb = np.array(Image.open(png))
    rgb[0:2, 0:3] = (1, 2, 3)
    Image.fromarray(rgb).save(png)


def _other_size(src: Path) -> None:
    _image_file(src / "JPEGImages" / "img_b.jpg", seed=0, hw=(H, W + 1))


BAD_MASK = {
    "unknown colour": (_unknown_colour, "img_b.png", "(1, 2, 3) in 6 pixels"),
    "size": (_other_size, "img_b.png", "the image is 51x40 but the export says 50x40"),
    "missing image": (
        lambda s: (s / "JPEGImages" / "img_c.jpg").unlink(),
        "img_c.png",
        "is missing",
    ),
    "missing labelmap": (lambda s: (s / "labelmap.txt").unlink(), None, "no labelmap.txt"),
}


@pytest.mark.parametrize("case", list(BAD_MASK))
def test_cvat_mask_bad_input(tmp_path, capsys, case):
    src, _ = make_cvat_mask_export(tmp_path)
    spoil, where, what = BAD_MASK[case]
    spoil(src)
    out = tmp_path / "ds"
    capsys.readouterr()
    assert main(["import", "cvat-mask", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and what in err, err
    assert where is None or where in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".ds*"))
