"""`deeplab import labelstudio`: a JSON export laid out as Label Studio writes it, imported
to masks that match, pixel for pixel, what its regions mean."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import import_fails, read_masks, tree_hash
from label_studio_converter.brush import encode_rle
from PIL import Image
from pycocotools import mask as mask_utils

from segment_deeplab.cli import main

H, W = 40, 50
# Class ids: the labels in name order after background.
IDS = {"car": 1, "person": 2, "road": 3, "tree": 4}


def _write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _pct(xy) -> list[list[float]]:
    """Pixel points -> Label Studio's percent of width/height."""
    return [[x / W * 100, y / H * 100] for x, y in xy]


def _coco_polygon(xy) -> np.ndarray:
    """The mask COCO's own API draws for a pixel polygon (what LS's COCO export means)."""
    flat = [float(v) for p in xy for v in p]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([flat], H, W))).astype(bool)


def _disk(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of a mask: the RGBA canvas (label colour where painted,
    alpha 255 there, all 0 elsewhere) flattened and encoded by LS's own encoder."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (250, 50, 83, 255)
    return encode_rle(rgba.ravel())


def _result(kind: str, label: str, value: dict, rid: str) -> dict:
    """One region of an annotation's result list, as the JSON export writes it:
    https://labelstud.io/guide/export#Label-Studio-JSON-format-of-annotated-tasks"""
    return {
        "id": rid,
        "type": kind,
        "from_name": "label",
        "to_name": "image",
        "origin": "manual",
        "image_rotation": 0,
        "original_width": W,
        "original_height": H,
        "value": {**value, kind: [label]},
    }


def _annotation(aid: int, when: str, results: list[dict], cancelled=False) -> dict:
    return {
        "id": aid,
        "completed_by": 1,
        "result": results,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": when,
        "updated_at": when,
        "lead_time": 12.5,
        "prediction": {},
        "result_count": 0,
        "task": aid // 100,
        "project": 1,
    }


def _street() -> list[tuple[str, np.ndarray, dict]]:
    """The regions of the street image in drawing order: (label, mask, result)."""
    road_xy = [(0, 18), (50, 24), (50, 40), (0, 40)]
    # x, y, width, height in percent land on pixel edges: columns 10..29, rows 10..29
    car = np.zeros((H, W), bool)
    car[10:30, 10:30] = True
    person = _disk(25, 22, 6)
    return [
        ("road", _coco_polygon(road_xy),
         _result("polygonlabels", "road", {"points": _pct(road_xy), "closed": True}, "r1")),
        ("car", car,
         _result("rectanglelabels", "car", {"x": 20, "y": 25, "width": 40, "height": 50,
                                            "rotation": 0}, "r2")),
        ("person", person,
         _result("brushlabels", "person", {"format": "rle", "rle": _rle(person)}, "r3")),
    ]  # fmt: skip


def _field() -> list[tuple[str, np.ndarray, dict]]:
    """A rectangle rotated 30 degrees about its top-left corner (clockwise on screen, as
    Label Studio's editor turns it), then a tree polygon."""
    x, y, w, h, a = 8.0, 4.0, 15.0, 8.0, math.radians(30)
    corners = [(x, y), (x + w * math.cos(a), y + w * math.sin(a)),
               (x + w * math.cos(a) - h * math.sin(a), y + w * math.sin(a) + h * math.cos(a)),
               (x - h * math.sin(a), y + h * math.cos(a))]  # fmt: skip
    tree_xy = [(35, 5), (47, 30), (30.5, 33.25)]
    rect = {"x": x / W * 100, "y": y / H * 100, "width": w / W * 100, "height": h / H * 100}
    return [
        ("car", _coco_polygon(corners),
         _result("rectanglelabels", "car", {**rect, "rotation": 30}, "f1")),
        ("tree", _coco_polygon(tree_xy),
         _result("polygonlabels", "tree", {"points": _pct(tree_xy)}, "f2")),
    ]  # fmt: skip


def _paint(regions) -> np.ndarray:
    out = np.zeros((H, W), np.uint8)
    for label, mask, _ in regions:
        out[mask] = IDS[label]
    return out


def _choices() -> dict:
    return {"id": "c1", "type": "choices", "from_name": "weather", "to_name": "image",
            "origin": "manual", "value": {"choices": ["sunny"]}}  # fmt: skip


def make_labelstudio_export(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A Label Studio project's JSON export beside its images; returns the export and
    the id mask each dataset stem should get.

    Layout of https://labelstud.io/guide/export (JSON: a list of tasks, regions in
    percent, brush masks as `rle` from label_studio_converter/brush.py `encode_rle`):
    task 11 is an upload (`/data/upload/1/<8 hex>-street.png`) whose image lies beside
    the export under its own name, with an older annotation and a newer cancelled one
    that must both be passed over; task 12 is served from local files (`?d=photos/...`);
    task 13 has only a model prediction and no image at all."""
    root.mkdir(parents=True, exist_ok=True)
    _write_image(root / "street.png", 1)
    _write_image(root / "photos" / "field.png", 2)
    older = [_result("polygonlabels", "road", {"points": [[0, 0], [100, 0], [0, 100]]}, "o1")]
    street, field = _street(), _field()
    tasks = [
        {"id": 11, "data": {"image": "/data/upload/1/3f2a9c1e-street.png"},
         "annotations": [
             _annotation(1101, "2024-05-01T09:00:00.000000Z", older),
             _annotation(1102, "2024-05-02T09:00:00.000000Z",
                         [r for *_, r in street] + [_choices()]),
             _annotation(1103, "2024-05-03T09:00:00.000000Z", older, cancelled=True),
         ],
         "predictions": [], "meta": {}, "created_at": "2024-05-01T08:00:00Z", "project": 1},
        {"id": 12, "data": {"image": "/data/local-files/?d=photos/field.png"},
         "annotations": [_annotation(1201, "2024-05-02T10:00:00Z", [r for *_, r in field])],
         "predictions": [], "meta": {}, "project": 1},
        {"id": 13, "data": {"image": "/data/upload/1/9a8b7c6d-unlabeled.png"},
         "annotations": [],
         "predictions": [{"id": 5, "model_version": "v1", "score": 0.5, "result": older}],
         "meta": {}, "project": 1},
    ]  # fmt: skip
    export = root / "project-1-at-2024-05-03-10-00-1a2b3c4d.json"
    export.write_text(json.dumps(tasks, indent=2))
    return export, {"street": _paint(street), "photos__field": _paint(field)}


def _edit(export: Path, fn) -> None:
    tasks = json.loads(export.read_text())
    fn(tasks)
    export.write_text(json.dumps(tasks))


def test_import_matches_the_regions(tmp_path, capsys):
    export, expected = make_labelstudio_export(tmp_path / "ls")
    before = tree_hash(tmp_path / "ls")
    out = tmp_path / "data"
    assert main(["import", "labelstudio", str(export), "--output", str(out)]) == 0
    assert "imported 2 images" in capsys.readouterr().out
    masks = read_masks(out)
    assert masks.keys() == expected.keys()
    for stem, want in expected.items():
        np.testing.assert_array_equal(masks[stem], want, err_msg=stem)
        assert len(np.unique(want)) >= 3  # overlaps and every kind of region are in play
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "car", "person", "road", "tree"]
    assert (out / "images" / "street.png").read_bytes() == (
        export.parent / "street.png"
    ).read_bytes()
    assert tree_hash(tmp_path / "ls") == before, "the export was modified"


def test_later_regions_cover_earlier_ones(tmp_path):
    export, _ = make_labelstudio_export(tmp_path / "ls")
    _edit(export, lambda t: t[0]["annotations"][1]["result"].reverse())
    out = tmp_path / "data"
    assert main(["import", "labelstudio", str(export), "--output", str(out)]) == 0
    want = _paint(_street()[::-1])  # person first, road last: road covers the car's foot
    assert (want == IDS["road"]).sum() > (_paint(_street()) == IDS["road"]).sum()
    np.testing.assert_array_equal(read_masks(out)["street"], want)


def test_overlap_ignore_marks_clashes(tmp_path):
    export, _ = make_labelstudio_export(tmp_path / "ls")
    out = tmp_path / "data"
    args = ["import", "labelstudio", str(export), "--output", str(out), "--overlap", "ignore"]
    assert main(args) == 0
    (_, road, _), (_, car, _), (_, person, _) = _street()
    got = read_masks(out)["street"]
    assert (got[car & person] == 255).all() and (got[road & car] == 255).all()
    alone = person & ~car & ~road
    assert alone.any() and (got[alone] == IDS["person"]).all()


def test_labels_order_and_images_flag(tmp_path):
    export, expected = make_labelstudio_export(tmp_path / "ls")
    moved = tmp_path / "pictures"
    moved.mkdir()
    (export.parent / "photos").rename(moved / "photos")
    (export.parent / "street.png").rename(moved / "street.png")
    out = tmp_path / "data"
    args = ["import", "labelstudio", str(export), "--output", str(out), "--images", str(moved)]
    assert main([*args, "--labels", "tree,road,person,car"]) == 0
    remap = np.array([0, 4, 3, 2, 1], np.uint8)  # car<->tree, person<->road
    np.testing.assert_array_equal(read_masks(out)["street"], remap[expected["street"]])


def test_unknown_label_with_labels(tmp_path, capsys):
    export, _ = make_labelstudio_export(tmp_path / "ls")
    out = tmp_path / "data"
    args = ["import", "labelstudio", str(export), "--output", str(out), "--labels", "road,car"]
    import_fails(capsys, args, out, export.name, "task 11", "'person'", "task 12", "'tree'")


def test_missing_image_names_the_task(tmp_path, capsys):
    export, _ = make_labelstudio_export(tmp_path / "ls")
    (export.parent / "street.png").unlink()
    out = tmp_path / "data"
    args = ["import", "labelstudio", str(export), "--output", str(out)]
    import_fails(capsys, args, out, export.name, "task 11", "3f2a9c1e-street.png", "--images")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r[0]["value"].update(points=[[0, 0], [50, 50]]), "at least 3 points"),
        (lambda r: r[0]["value"]["points"].append([150, 50]), "outside the 50x40 image"),
        (lambda r: r[1].update(original_width=60), "export says 60x40"),
        (lambda r: r[2]["value"].update(rle=_rle(np.ones((H, W - 2), bool))), "7680 values"),
        (lambda r: r[2]["value"].update(rle=[1, 2, 3]), "does not decode"),
    ],
    ids=["two-points", "outside", "size", "rle-size", "rle-garbage"],
)
def test_bad_regions_are_named(tmp_path, capsys, change, words):
    export, _ = make_labelstudio_export(tmp_path / "ls")
    _edit(export, lambda t: change(t[0]["annotations"][1]["result"]))
    out = tmp_path / "data"
    args = ["import", "labelstudio", str(export), "--output", str(out)]
    import_fails(capsys, args, out, export.name, "task 11", words)


def test_bad_json(tmp_path, capsys):
    bad = tmp_path / "export.json"
    bad.write_text('[{"id": 1, "data": ')
    out = tmp_path / "data"
    import_fails(capsys, ["import", "labelstudio", str(bad), "--output", str(out)], out, str(bad))
    bad.write_text(json.dumps({"images": [], "annotations": []}))  # a COCO file
    import_fails(capsys, ["import", "labelstudio", str(bad), "--output", str(out)], out, "'JSON'")


def test_brush_without_the_converter(tmp_path, capsys, monkeypatch):
    export, _ = make_labelstudio_export(tmp_path / "ls")
    for name in ("label_studio_converter", "label_studio_converter.brush", "label_studio_sdk",
                 "label_studio_sdk.converter", "label_studio_sdk.converter.brush"):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    out = tmp_path / "data"
    args = ["import", "labelstudio", str(export), "--output", str(out)]
    import_fails(capsys, args, out, "pip install 'segment-deeplab[labelstudio]'")
    # polygons and rectangles need nothing more
    _edit(export, lambda t: t[0]["annotations"][1]["result"].pop(2))
    assert main(args) == 0


def test_empty_skip_and_copy(tmp_path):
    export, _ = make_labelstudio_export(tmp_path / "ls")
    _edit(export, lambda t: t[1]["annotations"][0].update(result=[]))
    out = tmp_path / "data"
    args = ["import", "labelstudio", str(export), "--output", str(out), "--copy"]
    assert main([*args, "--empty", "skip"]) == 0
    assert sorted(read_masks(out)) == ["street"]
    assert (out / "images" / "street.png").stat().st_ino != (
        export.parent / "street.png"
    ).stat().st_ino
