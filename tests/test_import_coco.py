"""`deeplab import coco`: masks equal pycocotools' own rasterisation, pixel for pixel.

The fixtures are COCO instances files as COCO defines them
(https://cocodataset.org/#format-data: images / annotations / categories, polygons as
flat [x1, y1, ...] lists, RLE as {size: [h, w], counts}), their RLEs written by
pycocotools' `mask.encode`. The expected masks come from `COCO.annToMask`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import read_masks, tree_hash
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segment_deeplab.cli import main

H, W = 40, 50
# COCO category ids are not contiguous; the dataset's classes are.
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}, {"id": 12, "name": "tree"}]
CLASS_OF = {3: 1, 7: 2, 12: 3}


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    # Uncompressed RLE: column-major runs, starting with a run of zeros.
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [H, W], "counts": np.diff(np.concatenate([[0], change])).tolist()}


def _annotations() -> list[dict]:
    big = np.zeros((H, W), bool)
    big[4:36, 4:46] = True
    small = np.zeros((H, W), bool)
    small[10:16, 10:20] = True
    crowd = np.zeros((H, W), bool)
    crowd[30:40, 0:10] = True
    return [
        # image 1: a small person on a big tree listed after it (smaller on top)
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": _rle(small), "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 12, "segmentation": _rle(big, False), "iscrowd": 0},
        # image 2: a polygon car and a crowd of people
        {
            "id": 3,
            "image_id": 2,
            "category_id": 3,
            "segmentation": [[5.5, 5.0, 30.0, 5.0, 30.0, 25.5, 18.0, 33.0, 5.5, 25.0]],
            "iscrowd": 0,
        },
        {"id": 4, "image_id": 2, "category_id": 7, "segmentation": _rle(crowd), "iscrowd": 1},
        # image 3: two polygons of one car (an occluded object in two parts)
        {
            "id": 5,
            "image_id": 3,
            "category_id": 3,
            "segmentation": [
                [0, 0, 10, 0, 10, 10, 0, 10],
                [20, 20, 49.5, 20, 49.5, 39.5, 20, 39.5],
            ],
            "iscrowd": 0,
        },
    ]  # image 4 has no annotations


def write_coco(root: Path, name: str, image_ids=(1, 2, 3, 4), anns=None, seed=0) -> Path:
    """A COCO export: root/<name>.json and root/images/*.jpg."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for i in image_ids:
        fname = f"frame_{i:03d}.jpg"
        pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / fname, quality=90)
        images.append({"id": i, "file_name": fname, "height": H, "width": W})
    anns = _annotations() if anns is None else anns
    anns = [a for a in anns if a["image_id"] in image_ids]
    data = {"images": images, "annotations": anns, "categories": CATEGORIES}
    path = root / "annotations" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def expected_masks(path: Path, overlap="smaller", crowd="class") -> dict[str, np.ndarray]:
    """Per stem, the id mask from pycocotools' annToMask, painted by the rule."""
    coco = COCO(str(path))
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        anns = [a for a in anns if not (a["iscrowd"] and crowd == "skip")]
        masks = [(coco.annToMask(a).astype(bool), a) for a in anns]
        if overlap == "smaller":
            masks.sort(key=lambda m: -m[0].sum())  # stable: ties keep file order
        ids = np.zeros((img["height"], img["width"]), np.uint8)
        for m, a in masks:
            ids[m] = 255 if a["iscrowd"] and crowd == "ignore" else CLASS_OF[a["category_id"]]
        out[Path(img["file_name"]).stem] = ids
    return out


def make_coco_export(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A COCO export and the masks `deeplab import coco` must make of it."""
    path = write_coco(root, "instances_default")
    return path, expected_masks(path)


def test_masks_equal_pycocotools_and_the_source_is_untouched(tmp_path):
    src, expected = make_coco_export(tmp_path / "export")
    before = tree_hash(tmp_path / "export")
    out = tmp_path / "ds"
    assert main(["import", "coco", str(src), "--output", str(out)]) == 0
    assert tree_hash(tmp_path / "export") == before
    got = read_masks(out)
    assert got.keys() == expected.keys()
    for stem in expected:
        np.testing.assert_array_equal(got[stem], expected[stem], err_msg=stem)
    # the small person stays on top of the big tree listed after it
    assert got["frame_001"][12, 12] == CLASS_OF[7]
    assert (got["frame_004"] == 0).all()  # kept as all background
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "car", "person", "tree"]
    assert spec["imported_from"]["category_ids"] == {"car": [3], "person": [7], "tree": [12]}
    # images are the same files (hard links), not re-encoded copies
    for p in (tmp_path / "export" / "images").iterdir():
        assert (out / "images" / p.name).read_bytes() == p.read_bytes()
        assert (out / "images" / p.name).stat().st_ino == p.stat().st_ino
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize(
    "flags, overlap, crowd",
    [
        (["--overlap", "later"], "later", "class"),
        (["--crowd", "ignore"], "smaller", "ignore"),
        (["--crowd", "skip"], "smaller", "skip"),
    ],
)
def test_overlap_and_crowd_rules(tmp_path, flags, overlap, crowd):
    src = write_coco(tmp_path / "export", "instances_default")
    out = tmp_path / "ds"
    assert main(["import", "coco", str(src), "--output", str(out), *flags]) == 0
    got, expected = read_masks(out), expected_masks(src, overlap, crowd)
    for stem in expected:
        np.testing.assert_array_equal(got[stem], expected[stem], err_msg=stem)
    crowd_px = got["frame_002"][35, 5]
    assert crowd_px == {"class": CLASS_OF[7], "ignore": 255, "skip": 0}[crowd]
    if overlap == "later":  # the big tree, listed later, covers the person
        assert got["frame_001"][12, 12] == CLASS_OF[12]


def test_two_files_are_two_splits_and_empty_images_can_be_left_out(tmp_path, capsys):
    root = tmp_path / "export"
    train = write_coco(root, "instances_train2017", image_ids=(1, 2, 4))
    val = write_coco(root, "instances_val2017", image_ids=(3,), seed=1)
    out = tmp_path / "ds"
    argv = ["import", "coco", str(train), str(val), "--output", str(out), "--copy"]
    assert main([*argv, "--empty", "skip"]) == 0
    assert "next: deeplab train" in capsys.readouterr().out
    assert (out / "splits" / "train.txt").read_text().split() == ["frame_001", "frame_002"]
    assert (out / "splits" / "val.txt").read_text().split() == ["frame_003"]
    assert not (out / "images" / "frame_004.jpg").exists()
    image = out / "images" / "frame_001.jpg"  # --copy: a file of its own, same bytes
    assert image.stat().st_ino != (root / "images" / "frame_001.jpg").stat().st_ino
    assert image.read_bytes() == (root / "images" / "frame_001.jpg").read_bytes()


def test_labels_set_the_class_order(tmp_path):
    src = write_coco(tmp_path / "export", "instances_default")
    out = tmp_path / "ds"
    assert (
        main(["import", "coco", str(src), "--output", str(out), "--labels", "tree,car,person"]) == 0
    )
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "tree", "car", "person"]
    assert read_masks(out)["frame_001"][30, 30] == 1  # tree


def _broken(kind: str, data: dict, root: Path) -> str:
    """Break a COCO export in one way; returns what the error must name."""
    anns = data["annotations"]
    if kind == "missing_image_id":
        anns[0]["image_id"] = 99
        return "annotation 1"
    if kind == "missing_file":
        (root / "images" / "frame_002.jpg").unlink()
        return "frame_002.jpg"
    if kind == "two_points":
        anns[2]["segmentation"] = [[1, 1, 5, 5]]
        return "annotation 3"
    if kind == "outside":
        anns[2]["segmentation"] = [[1, 1, 80, 1, 80, 20]]
        return "annotation 3"
    if kind == "unknown_category":
        anns[2]["category_id"] = 5
        return "annotation 3"
    if kind == "size":
        data["images"][1]["width"] = 64
        return "frame_002.jpg"
    if kind == "rle_size":
        anns[0]["segmentation"]["size"] = [20, 20]
        return "annotation 1"
    if kind == "rle_length":
        anns[1]["segmentation"]["counts"][-1] += 5
        return "annotation 2"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing_image_id",
        "missing_file",
        "two_points",
        "outside",
        "unknown_category",
        "size",
        "rle_size",
        "rle_length",
    ],
)
def test_bad_exports_name_the_file_and_annotation_and_write_nothing(tmp_path, capsys, kind):
    root = tmp_path / "export"
    src = write_coco(root, "instances_default")
    data = json.loads(src.read_text())
    must_name = _broken(kind, data, root)
    src.write_text(json.dumps(data))
    out = tmp_path / "ds"
    assert main(["import", "coco", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert must_name in err and str(src) in err
    assert not out.exists() and not list(tmp_path.glob(".ds*"))


def test_a_folder_that_is_not_empty_is_never_written_into(tmp_path, capsys):
    src = write_coco(tmp_path / "export", "instances_default")
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["import", "coco", str(src), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_not_coco_json_and_unknown_format(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert main(["import", "coco", str(bad), "--output", str(tmp_path / "a")]) == 2
    assert "x.json" in capsys.readouterr().err
    bad.write_text(json.dumps({"shapes": []}))
    assert main(["import", "coco", str(bad), "--output", str(tmp_path / "a")]) == 2
    assert "not a COCO instances file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_folder_stands_for_its_instances_files(tmp_path):
    root = tmp_path / "export"
    write_coco(root, "instances_train", image_ids=(1, 2))
    write_coco(root, "instances_val", image_ids=(3, 4), seed=1)
    out = tmp_path / "ds"
    assert main(["import", "coco", str(root), "--output", str(out)]) == 0
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["train.txt", "val.txt"]
