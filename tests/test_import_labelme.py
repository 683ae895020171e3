"""`deeplab import labelme`: a folder of labelme JSON files imported to the masks labelme's
own shape_to_mask / shapes_to_label would draw, pixel for pixel."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import import_fails, read_masks, tree_hash
from PIL import Image, ImageDraw

from segment_deeplab.cli import main

H, W = 40, 50
# Class ids: the area labels in name order after background ("lane" is only a line).
IDS = {"ball": 1, "car": 2, "grass": 3}


def _image_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _shape(label: str, points, shape_type: str | None, mask: str | None = None) -> dict:
    """A shape as labelme 5.x saves it (labelme/_label_file.py, LabelFile.save)."""
    return {
        "label": label,
        "points": [[float(x), float(y)] for x, y in points],
        "group_id": None,
        "description": "",
        "shape_type": shape_type,
        "flags": {},
        "mask": mask,
    }


def _label_file(shapes, image_path: str, image_data: bytes | None = None) -> dict:
    """A labelme JSON file (https://github.com/wkentaro/labelme, examples/tutorial/
    apc2016_obj3.json layout; imageData is the base64 of the image file's bytes)."""
    return {
        "version": "5.5.0",
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path,
        "imageData": None if image_data is None else base64.b64encode(image_data).decode(),
        "imageHeight": H,
        "imageWidth": W,
    }


def _draw(fn) -> np.ndarray:
    """What a PIL drawing call with outline=1, fill=1 fills (labelme's shape_to_mask)."""
    img = Image.new("L", (W, H), 0)
    fn(ImageDraw.Draw(img))
    return np.array(img).astype(bool)


def _png_b64(mask: np.ndarray) -> str:
    """labelme's utils.img_arr_to_b64 of a bool mask: a 0/1 PNG in base64."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _street():
    """(shapes, expected ids) of a.json: each kind of area, drawn in file order."""
    grass = [(0, 20.5), (49, 15.2), (49, 39), (0, 39)]
    hole = [(2, 30), (8, 30), (5, 36)]
    shapes = [
        _shape("grass", grass, "polygon"),
        _shape("car", [(30, 25), (10, 12)], "rectangle"),  # corners in either order
        _shape("ball", [(28, 14), (32, 17)], "circle"),  # centre, then a point on it
        _shape("lane", [(0, 2), (49, 6)], "line"),  # no area: skipped
        _shape("_background_", hole, None),  # no shape_type: a polygon
        _shape("grass", [(40, 2), (44, 2), (44, 6), (40, 6)], None),
        _shape("__ignore__", [(45, 30), (49, 30), (49, 34)], "polygon"),
    ]
    want = np.zeros((H, W), np.uint8)
    want[_draw(lambda d: d.polygon(grass, outline=1, fill=1))] = IDS["grass"]
    want[_draw(lambda d: d.rectangle(((10, 12), (30, 25)), outline=1, fill=1))] = IDS["car"]
    want[_draw(lambda d: d.ellipse(((23, 9), (33, 19)), outline=1, fill=1))] = IDS["ball"]
    want[_draw(lambda d: d.polygon(hole, outline=1, fill=1))] = 0
    want[_draw(lambda d: d.polygon([(40, 2), (44, 2), (44, 6), (40, 6)], outline=1, fill=1))] = IDS[
        "grass"
    ]
    want[_draw(lambda d: d.polygon([(45, 30), (49, 30), (49, 34)], outline=1, fill=1))] = 255
    return shapes, want


def _field():
    """(shapes, expected ids) of b.json: a mask shape (labelme >= 5.3) over a polygon."""
    patch = np.zeros((10, 12), bool)
    patch[2:9, 1:11] = True
    patch[4:6, 4:8] = False  # a hole a polygon could not make
    poly = [(5, 5), (45, 8), (20, 35)]
    shapes = [
        _shape("grass", poly, "polygon"),
        _shape("car", [(14, 6), (25, 15)], "mask", _png_b64(patch)),  # bbox of the patch
    ]
    want = np.zeros((H, W), np.uint8)
    want[_draw(lambda d: d.polygon(poly, outline=1, fill=1))] = IDS["grass"]
    want[6:16, 14:26][patch] = IDS["car"]
    return shapes, want


def make_labelme_export(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A labelme annotation folder; returns it and the id mask each stem should get.

    As labelme saves it (labelme/_label_file.py): a.json beside a.png with imageData
    null; b.json with the JPEG embedded as imageData and an imagePath that no longer
    exists (labelme loads imageData first); c.json without shapes. Shape geometry as
    labelme/utils/shape.py draws it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.png").write_bytes(_image_bytes(1, "PNG"))
    (street, want_a), (field, want_b) = _street(), _field()
    files = {
        "a.json": _label_file(street, "a.png"),
        "b.json": _label_file(field, "..\\moved\\b.jpg", _image_bytes(2, "JPEG")),
        "c.json": _label_file([], "c.png"),
    }
    (root / "c.png").write_bytes(_image_bytes(3, "PNG"))
    for name, data in files.items():
        (root / name).write_text(json.dumps(data, indent=2))
    return root, {"a": want_a, "b": want_b, "c": np.zeros((H, W), np.uint8)}


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_import_matches_labelme(tmp_path, capsys):
    src, expected = make_labelme_export(tmp_path / "ann")
    before = tree_hash(src)
    out = tmp_path / "data"
    assert main(["import", "labelme", str(src), "--output", str(out)]) == 0
    assert "imported 3 images" in capsys.readouterr().out
    masks = read_masks(out)
    assert masks.keys() == expected.keys()
    for stem, want in expected.items():
        np.testing.assert_array_equal(masks[stem], want, err_msg=stem)
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "ball", "car", "grass"]
    embedded = base64.b64decode(json.loads((src / "b.json").read_text())["imageData"])
    assert (out / "images" / "b.jpg").read_bytes() == embedded  # never re-encoded
    assert (out / "images" / "a.png").read_bytes() == (src / "a.png").read_bytes()
    assert tree_hash(src) == before, "the export was modified"


def test_files_as_source_and_labels_file(tmp_path):
    src, expected = make_labelme_export(tmp_path / "ann")
    labels = tmp_path / "labels.txt"  # labelme2voc.py's convention
    labels.write_text("__ignore__\n_background_\ngrass\ncar\nball\n")
    out = tmp_path / "data"
    args = ["import", "labelme", str(src / "a.json"), str(src / "b.json"), "--output", str(out)]
    assert main([*args, "--labels", str(labels)]) == 0
    remap = np.arange(256, dtype=np.uint8)
    remap[[1, 2, 3]] = [3, 2, 1]  # ball<->grass
    masks = read_masks(out)
    assert sorted(masks) == ["a", "b"]
    np.testing.assert_array_equal(masks["a"], remap[expected["a"]])
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "grass", "car", "ball"]


def test_shape_order_decides_overlaps(tmp_path):
    src, _ = make_labelme_export(tmp_path / "ann")
    _edit(src / "a.json", lambda d: d["shapes"].insert(0, d["shapes"].pop(1)))  # car first
    out = tmp_path / "data"
    assert main(["import", "labelme", str(src), "--output", str(out)]) == 0
    car = _draw(lambda d: d.rectangle(((10, 12), (30, 25)), outline=1, fill=1))
    grass = _draw(lambda d: d.polygon([(0, 20.5), (49, 15.2), (49, 39), (0, 39)], 1, 1))
    got = read_masks(out)["a"]
    assert (car & grass).any() and (got[car & grass & (got != 1)] == IDS["grass"]).all()


def test_empty_skip(tmp_path):
    src, _ = make_labelme_export(tmp_path / "ann")
    out = tmp_path / "data"
    assert main(["import", "labelme", str(src), "--output", str(out), "--empty", "skip"]) == 0
    assert sorted(read_masks(out)) == ["a", "b"]


def test_missing_image(tmp_path, capsys):
    src, _ = make_labelme_export(tmp_path / "ann")
    (src / "a.png").unlink()
    out = tmp_path / "data"
    import_fails(
        capsys, ["import", "labelme", str(src), "--output", str(out)], out, "a.json", "a.png"
    )


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d["shapes"][0].update(points=[[0, 0], [9, 9]]), "at least 3 points"),
        (lambda d: d["shapes"][0]["points"].append([80, 10]), "outside the 50x40 image"),
        (lambda d: d["shapes"][1]["points"].pop(), "a rectangle needs 2 points"),
        (lambda d: d.update(imageWidth=64), "export says 64x40"),
        (lambda d: d["shapes"][0].update(shape_type="cuboid"), "unknown shape_type 'cuboid'"),
    ],
    ids=["two-points", "outside", "rectangle", "size", "type"],
)
def test_bad_shapes_are_named(tmp_path, capsys, change, words):
    src, _ = make_labelme_export(tmp_path / "ann")
    _edit(src / "a.json", change)
    out = tmp_path / "data"
    import_fails(
        capsys, ["import", "labelme", str(src), "--output", str(out)], out, "a.json", words
    )


def test_unknown_label_with_labels(tmp_path, capsys):
    src, _ = make_labelme_export(tmp_path / "ann")
    out = tmp_path / "data"
    args = ["import", "labelme", str(src), "--output", str(out), "--labels", "grass,car"]
    import_fails(capsys, args, out, "a.json shape 2", "'ball'")


def test_bad_json_and_bad_image_data(tmp_path, capsys):
    src, _ = make_labelme_export(tmp_path / "ann")
    out = tmp_path / "data"
    args = ["import", "labelme", str(src), "--output", str(out)]
    _edit(src / "b.json", lambda d: d.update(imageData="not base64!"))
    import_fails(capsys, args, out, "b.json", "imageData")
    (src / "c.json").write_text('{"shapes": [')
    import_fails(capsys, args, out, "c.json", "not a readable labelme JSON")
