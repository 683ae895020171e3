"""`deeplab prepare`: splits, statistics, hash, remapped masks, refusal on errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segment_deeplab.cli import main
from segment_deeplab.data.prepare import make_split, parse_remap, prepare_dataset
from segment_deeplab.data.spec import DatasetError, open_dataset

H, W = 8, 12
CAMVID = Path(__file__).resolve().parents[2] / "shared/datasets/camvid"
REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, n: int = 10, values=(0, 1, 2), spec: bool = True) -> Path:
    """images/ + masks/ with bands of `values`, and a dataset.yaml when `spec`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    band = np.array(values, np.uint8)[np.arange(W) * len(values) // W]
    for i in range(n):
        img = np.full((H, W, 3), i * 20, np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.png")
        Image.fromarray(np.tile(band, (H, 1))).save(root / "masks" / f"im{i:02d}.png")
    if spec:
        classes = [{"id": c, "name": f"k{c}", "color": [0, c, 0]} for c in range(3)]
        (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": classes}))
    return root


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_split_is_seeded_and_respects_fraction():
    stems = [f"s{i}" for i in range(50)]
    train, val = make_split(stems, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == sorted(stems) and train == sorted(train) and val == sorted(val)
    assert make_split(stems, 0.2, seed=0) == (train, val)
    assert make_split(stems, 0.2, seed=1)[1] != val
    assert len(make_split(stems[:3], 0.01, 0)[1]) == 1  # at least one val pair
    with pytest.raises(DatasetError):
        make_split(stems, 1.0, 0)


def test_parse_remap():
    assert parse_remap(["255:1", "3:255"]) == {255: 1, 3: 255}
    for bad in (["255"], ["1:256"], ["a:b"], ["1:2", "1:3"]):
        with pytest.raises(DatasetError):
            parse_remap(bad)


def test_prepare_writes_splits_stats_and_hash(tmp_path):
    root = make_dataset(tmp_path / "d")
    res = prepare_dataset(root, val_fraction=0.3, seed=3)
    assert res.spec_path == root / "dataset.yaml" and not res.placeholders
    ds = open_dataset(root)
    assert ds.read_split("val") == res.val and len(res.val) == 3
    assert sorted(ds.read_split("train") + res.val) == [f"im{i:02d}" for i in range(10)]
    raw = yaml.safe_load((root / "dataset.yaml").read_text())
    assert raw["images"] == "images" and raw["splits"]["train"] == "splits/train.txt"
    stats = raw["stats"]
    assert stats["pairs"] == 10 and stats["image_size_hw"] == {"min": [H, W], "max": [H, W]}
    assert [c["images"] for c in stats["classes"]] == [10, 10, 10]
    assert stats["class_pixels"] == [c["pixels"] for c in stats["classes"]]
    assert sum(stats["class_pixels"]) == 10 * H * W
    assert stats["classes"][1]["name"] == "k1" and stats["ignore_share"] == 0
    assert raw["hash"].startswith("sha256:")
    again = prepare_dataset(root, val_fraction=0.3, seed=3)
    assert again.spec.hash == res.spec.hash and again.val == res.val
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / "im00.png")
    assert prepare_dataset(root, val_fraction=0.3, seed=3).spec.hash != res.spec.hash


def test_prepare_refuses_on_errors(tmp_path, capsys):
    root = make_dataset(tmp_path / "d")
    (root / "masks" / "im03.png").unlink()
    assert main(["prepare", str(root)]) == 1
    captured = capsys.readouterr()
    assert "missing_mask" in captured.out and "im03.png" in captured.out
    assert "nothing was written" in captured.err
    assert not (root / "splits").exists() and "splits" not in (root / "dataset.yaml").read_text()


def test_prepare_without_spec_writes_placeholders(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", spec=False)
    assert main(["prepare", str(root)]) == 0
    out = capsys.readouterr().out
    assert "placeholder" in out and "8 train / 2 val" in out
    ds = open_dataset(root)
    assert ds.class_names == ["class_0", "class_1", "class_2"]


def test_prepare_guides_to_remap_for_gaps(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", values=(0, 2, 5), spec=False)
    assert main(["prepare", str(root)]) == 2
    assert "--remap 2:1 5:2" in capsys.readouterr().err
    assert main(["prepare", str(root), "--remap", "2:1", "5:2"]) == 0
    assert open_dataset(root).num_classes == 3


def test_remap_fixes_binary_trap_without_touching_originals(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", values=(0, 255))
    spec = {"classes": [{"id": 0, "name": "bg"}, {"id": 1, "name": "lesion"}]}
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    before = snapshot(root / "masks")
    assert main(["prepare", str(root)]) == 1
    assert "binary_mask_trap" in capsys.readouterr().out
    out = tmp_path / "out"
    argv = ["prepare", str(root), "--output", str(out), "--remap", "255:1", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["converted_masks"] and res["train"] + res["val"] == 10
    assert snapshot(root / "masks") == before  # bytes and mtimes unchanged
    ds = open_dataset(out)
    assert ds.mask_dir == out / "masks_prepared" and ds.image_dir == root / "images"
    new = np.array(Image.open(ds.mask_dir / "im00.png"))
    assert Image.open(ds.mask_dir / "im00.png").mode == "L" and set(np.unique(new)) == {0, 1}
    raw = yaml.safe_load((out / "dataset.yaml").read_text())
    assert raw["images"] == str((root / "images").resolve())  # outside --output: absolute
    assert raw["masks"] == "masks_prepared"


def test_color_masks_converted(tmp_path):
    root = make_dataset(tmp_path / "d")
    colors = {0: (0, 0, 0), 1: (250, 0, 0), 2: (0, 0, 250)}
    for p in (root / "masks").iterdir():
        ids = np.array(Image.open(p))
        rgb = np.zeros((*ids.shape, 3), np.uint8)
        for cid, col in colors.items():
            rgb[ids == cid] = col
        Image.fromarray(rgb).save(p)
    classes = [{"name": f"k{i}", "color": list(c)} for i, c in colors.items()]
    spec = {"color_masks": True, "classes": classes}
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    res = prepare_dataset(root, output=tmp_path / "out")
    assert res.converted_masks == tmp_path / "out" / "masks_prepared"
    assert not res.spec.color_masks
    ids = np.array(Image.open(res.converted_masks / "im01.png"))
    assert sorted(np.unique(ids)) == [0, 1, 2]
    assert res.spec.stats["classes"][2]["images"] == 10


def test_spec_elsewhere_and_output_keep_data_folder_untouched(tmp_path, capsys):
    root = make_dataset(tmp_path / "d")
    spec = tmp_path / "desc.yaml"
    (root / "dataset.yaml").rename(spec)
    before = {p.name for p in root.rglob("*")}
    out = tmp_path / "prepared"
    assert main(["prepare", str(root), "--spec", str(spec), "--output", str(out)]) == 0
    assert f"wrote {out / 'dataset.yaml'}" in capsys.readouterr().out
    assert {p.name for p in root.rglob("*")} == before
    assert open_dataset(out).class_names == ["k0", "k1", "k2"]


def test_read_only_dataset_needs_output(tmp_path, capsys):
    root = make_dataset(tmp_path / "d")
    root.chmod(0o555)
    try:
        assert main(["prepare", str(root)]) == 2
        assert "--output" in capsys.readouterr().err
        assert main(["prepare", str(root), "--output", str(tmp_path / "o")]) == 0
    finally:
        root.chmod(0o755)
    assert not (root / "splits").exists()


@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid copy not present")
def test_camvid_prepare(tmp_path):
    res = prepare_dataset(CAMVID, spec=REPO / "datasets/camvid.yaml", output=tmp_path)
    assert (len(res.train), len(res.val)) == (374, 94)
    assert res.spec.stats["classes"][10]["name"] == "bicyclist"
    assert open_dataset(tmp_path).image_dir.resolve() == (CAMVID / "images").resolve()


def test_group_by_keeps_every_group_on_one_side():
    import re

    # Three "sequences" of unequal length, as CamVid's 0001TP / 0006R0 / 0016E5.
    stems = [f"{seq}_{i:05d}" for seq, n in (("A", 12), ("B", 20), ("C", 60)) for i in range(n)]
    pattern = re.compile("^([^_]+)_")
    for seed in range(6):
        train, val = make_split(stems, 0.2, seed, pattern)
        assert sorted(train + val) == sorted(stems)
        train_groups = {s.split("_")[0] for s in train}
        val_groups = {s.split("_")[0] for s in val}
        assert train_groups and val_groups and not train_groups & val_groups
        # 20% of 92 is 18.4: B (20) or A (12) come closest, never C (60) or all of them.
        assert val_groups in ({"A"}, {"B"}), (seed, val_groups)
        assert make_split(stems, 0.2, seed, pattern) == (train, val)  # reproducible
    # Without a capture group the whole match names the group.
    train, val = make_split(["x1_a", "x1_b", "y2_a", "y2_b"], 0.5, 0, re.compile("^[a-z]+\\d"))
    assert {s[:2] for s in train}.isdisjoint({s[:2] for s in val})


def test_group_by_refusals_name_the_pattern_and_the_files(tmp_path, capsys):
    root = tmp_path / "ds"
    assert main(["synth", str(root), "--num", "6", "--size", "32", "40"]) == 0
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert main(["prepare", str(root), "--group-by", "seq("]) == 2
    assert "--group-by 'seq(' is no regular expression" in capsys.readouterr().err
    assert main(["prepare", str(root), "--group-by", "^zz_"]) == 2
    err = capsys.readouterr().err
    assert "does not name a group in 6 file names" in err and "0000" in err
    assert main(["prepare", str(root), "--group-by", "^()"]) == 2  # every group empty
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # a refused prepare writes nothing


def test_group_by_on_file_names_of_video_frames(tmp_path, capsys):
    root = tmp_path / "ds"
    assert main(["synth", str(root), "--num", "12", "--size", "32", "40"]) == 0
    # Rename the pairs as frames of three videos, as CamVid names them.
    for i, img in enumerate(sorted((root / "images").iterdir())):
        seq = ("0001TP", "0006R0", "0016E5")[i % 3]
        img.rename(img.with_name(f"{seq}_{i:05d}{img.suffix}"))
        mask = root / "masks" / f"{img.stem}.png"
        mask.rename(mask.with_name(f"{seq}_{i:05d}.png"))
    capsys.readouterr()
    assert main(["prepare", str(root), "--group-by", "^([^_]+)_", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["groups"]["val"]) == 1 and len(res["groups"]["train"]) == 2
    val = (root / "splits" / "val.txt").read_text().split()
    assert {s.split("_")[0] for s in val} == set(res["groups"]["val"])
    spec = yaml.safe_load((root / "dataset.yaml").read_text())
    assert spec["stats"]["split"]["group_by"] == "^([^_]+)_"
