"""`deeplab prepare --shards N | --shard-size SIZE`: WebDataset and TFRecord shards and
their manifest, read back with webdataset's reader and `deeplab import tfrecord`."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

from segment_deeplab.cli import main
from segment_deeplab.data import shard_write
from segment_deeplab.data.prepare import prepare_dataset
from segment_deeplab.data.shard_write import parse_size, shard_counts, write_shards
from segment_deeplab.data.shards import MANIFEST, MASK_EXT, decode_key, parse_manifest
from segment_deeplab.data.spec import DatasetError
from segment_deeplab.data.tfrecord import decode_example, iter_records

H, W = 8, 12
BUILD_DATA_KEYS = {
    "image/encoded", "image/filename", "image/format", "image/height", "image/width",
    "image/channels", "image/segmentation/class/encoded", "image/segmentation/class/format",
}  # fmt: skip


def stem_of(i: int) -> str:
    # a dot and a '%' in stems: what the key encoding is for
    return {3: "scene.03", 4: "50%off"}.get(i, f"im{i:02d}")


def make_dataset(root: Path, n: int = 13) -> Path:
    """images/ (.jpg, .jpeg and .png) + masks/ (mode L; one P, one grey RGB), dataset.yaml."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        stem, ext = stem_of(i), (".jpg", ".jpeg", ".png")[i % 3]
        img = rng.integers(0, 255, (H, W, 3), np.uint8)
        Image.fromarray(img).save(root / "images" / f"{stem}{ext}")
        ids = np.zeros((H, W), np.uint8)
        ids[:, i % W :] = 1 + i % 2
        ids[0, 0] = 255
        mask = Image.fromarray(ids)
        if i == 1:
            mask.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255] * 759)  # mode P
        if i == 2:
            mask = mask.convert("RGB")  # grey: read as ids, written as mode L
        mask.save(root / "masks" / f"{stem}.png")
    classes = [{"id": c, "name": f"k{c}", "color": [0, c, 0]} for c in range(3)]
    (root / "dataset.yaml").write_text(yaml.safe_dump({"classes": classes}))
    return root


def ids_of(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    return np.asarray(img if img.mode in ("L", "P") else img.convert("L"))


def file_of(folder: Path, stem: str) -> Path:
    (found,) = [p for p in folder.iterdir() if p.name.rsplit(".", 1)[0] == stem]
    return found


def load_manifest(folder: Path):
    path = folder / "shards" / MANIFEST
    return parse_manifest(path.read_text(), str(path))


def check_manifest_files(manifest) -> None:
    for shards in manifest.splits.values():
        for s in shards:
            data = Path(manifest.url(s)).read_bytes()
            assert s.bytes == len(data) and s.sha256 == hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shards") / "d")


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30 and parse_size("1 kib") == 1024
    assert parse_size("1.5KB") == 1500 and parse_size("123") == 123 and parse_size("2TB") == 2e12
    for bad in ("", "GB", "1XB", "-1GB", "0", "1.2.3MB"):
        with pytest.raises(DatasetError, match="--shard-size"):
            parse_size(bad)
    assert shard_counts(10, 3) == [4, 3, 3] and shard_counts(2, 5) == [1, 1]
    assert shard_counts(0, 2) == []


def test_webdataset_shards_read_back(data, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["prepare", str(data), "--output", str(out), "--val-fraction", "0.25", "--seed", "3"]
    assert main([*args, "--shards", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    m = load_manifest(out)
    assert res["shards"]["manifest"] == str(out / "shards" / MANIFEST)
    assert res["shards"]["splits"]["train"]["shards"] == 3
    assert m.format == "webdataset" and [c.name for c in m.classes] == ["k0", "k1", "k2"]
    assert m.ignore_index == 255 and m.hash == res["hash"] and m.stats == res["stats"]
    assert m.created_by.startswith("deeplab prepare ") and "--shards 3" in m.created_by
    train, val = m.shards("train"), m.shards("val")
    assert [s.samples for s in train] == [4, 3, 3] and len(val) == 1 and val[0].samples == 3
    assert [s.url for s in train] == [f"train-{i:06d}.tar" for i in range(3)]
    assert m.samples("train") == res["train"] == 10
    check_manifest_files(m)
    stems = [s for shard in train for s in shard.keys]
    assert stems != sorted(stems), "train is a seeded mix across shards, not sorted"
    split = (out / "splits" / "train.txt").read_text().split()
    assert sorted(stems) == sorted(split)
    seen = []
    for shard in [*train, *val]:
        got = list(wds.WebDataset([m.url(shard)], shardshuffle=False))
        assert [decode_key(s["__key__"]) for s in got] == shard.keys
        for sample in got:
            stem = decode_key(sample["__key__"])
            seen.append(stem)
            image = file_of(data / "images", stem)
            ext = "png" if image.suffix == ".png" else "jpg"
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {ext, MASK_EXT}
            assert sample[ext] == image.read_bytes()
            mask = (data / "masks" / f"{stem}.png").read_bytes()
            if stem == stem_of(2):  # grey RGB: its ids as a mode-L PNG
                assert Image.open(io.BytesIO(sample[MASK_EXT])).mode == "L"
                assert (ids_of(sample[MASK_EXT]) == ids_of(mask)).all()
            else:
                assert sample[MASK_EXT] == mask
    assert sorted(seen) == sorted(stem_of(i) for i in range(13))
    assert {"scene.03", "50%off"} <= set(seen)
    assert not (out / shard_write.STAGING).exists()


def test_shard_size_limits_bytes(data, tmp_path, capsys):
    for fmt, size, limit in (("webdataset", "20KB", 20_000), ("tfrecord", "2KiB", 2048)):
        out = tmp_path / fmt
        argv = ["prepare", str(data), "--output", str(out), "--shard-size", size]
        assert main([*argv, "--shard-format", fmt]) == 0
        assert "train: " in capsys.readouterr().out
        m = load_manifest(out)
        check_manifest_files(m)
        shards = [s for split in m.splits.values() for s in split]
        assert len(m.shards("train")) > 1 and all(s.bytes <= limit for s in shards)
        assert sum(s.samples for s in shards) == 13
    # TFRecord sizes are exact: each shard is as full as the limit lets it be
    train = m.shards("train")
    for shard, after in zip(train[:-1], train[1:], strict=True):
        first = next(iter_records(m.url(after)))
        assert shard.bytes + len(first.data) + 16 > 2048
    # a size under one sample's: one sample per shard
    assert main(["prepare", str(data), "--output", str(tmp_path / "one"), "--shard-size", "1"]) == 0
    m = load_manifest(tmp_path / "one")
    assert all(s.samples == 1 for split in m.splits.values() for s in split)


def test_tfrecord_shards_import_back(data, tmp_path):
    out = tmp_path / "o"
    argv = ["prepare", str(data), "--output", str(out), "--shards", "2"]
    assert main([*argv, "--shard-format", "tfrecord"]) == 0
    m = load_manifest(out)
    assert m.format == "tfrecord"
    assert [s.url for s in m.shards("train")] == [
        f"train-{i:05d}-of-00002.tfrecord" for i in (0, 1)
    ]
    check_manifest_files(m)
    for shard in [s for split in m.splits.values() for s in split]:
        recs = [decode_example(r.data) for r in iter_records(m.url(shard))]
        assert [r["image/filename"][0].decode() for r in recs] == shard.keys
        for r in recs:
            assert set(r) == BUILD_DATA_KEYS
            image = file_of(data / "images", r["image/filename"][0].decode())
            assert r["image/encoded"][0] == image.read_bytes()
            assert r["image/format"] == [b"png" if image.suffix == ".png" else b"jpeg"]
            assert (r["image/height"], r["image/width"], r["image/channels"]) == ([H], [W], [3])
            assert r["image/segmentation/class/format"] == [b"png"]
            seg = Image.open(io.BytesIO(r["image/segmentation/class/encoded"][0]))
            assert seg.mode == "L"  # TF decodes a palette PNG to colours, not ids
    back = tmp_path / "back"
    assert main(["import", "tfrecord", str(out / "shards"), "--output", str(back)]) == 0
    for i in range(13):
        stem = stem_of(i)
        got = np.asarray(Image.open(back / "masks" / f"{stem}.png"))
        assert (got == ids_of((data / "masks" / f"{stem}.png").read_bytes())).all(), stem
        assert (
            file_of(back / "images", stem).read_bytes()
            == file_of(data / "images", stem).read_bytes()
        )


def test_remapped_masks_are_the_prepared_files(tmp_path):
    root = make_dataset(tmp_path / "d", n=4)
    argv = ["prepare", str(root), "--remap", "2:1", "--shards", "1", "--val-fraction", "0"]
    assert main(argv) == 0
    m = load_manifest(root)
    assert m.samples("train") == 4 and m.shards("val") == []
    for sample in wds.WebDataset([m.url(m.shards("train")[0])], shardshuffle=False):
        stem = decode_key(sample["__key__"])
        assert sample[MASK_EXT] == (root / "masks_prepared" / f"{stem}.png").read_bytes()


def test_existing_shards_are_refused_before_any_work(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", n=4)
    (root / "shards").mkdir()
    (root / "shards" / "mine.txt").write_text("keep me")
    assert main(["prepare", str(root), "--shards", "2"]) == 2
    err = capsys.readouterr().err
    assert str(root / "shards") in err and "remove it or give --output DIR" in err
    assert [p.name for p in (root / "shards").iterdir()] == ["mine.txt"]
    assert (root / "shards" / "mine.txt").read_text() == "keep me"
    assert not (root / "splits").exists(), "refused before prepare's pass"
    assert not (root / shard_write.STAGING).exists()


def test_bad_flags_exit_2(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", n=4)
    assert main(["prepare", str(root), "--shard-size", "lots"]) == 2
    assert "--shard-size 'lots'" in capsys.readouterr().err
    assert main(["prepare", str(root), "--shards", "0"]) == 2
    assert "--shards 0" in capsys.readouterr().err
    assert main(["prepare", str(root), "--shard-format", "tfrecord"]) == 2
    assert "--shards N or --shard-size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["prepare", str(root), "--shards", "2", "--shard-size", "1GB"])
    assert e.value.code == 2
    assert not (root / "splits").exists() and not (root / "shards").exists()


def test_failed_write_leaves_no_shards(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", n=6)
    res = prepare_dataset(root, val_fraction=0.25)
    calls = {"n": 0}
    real = shard_write._TFRecord.encode

    def fail_at_fourth(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(*a)

    monkeypatch.setattr(shard_write._TFRecord, "encode", staticmethod(fail_at_fourth))
    with pytest.raises(OSError):
        write_shards(res, root, 2, None, "tfrecord", False)
    assert not (root / "shards").exists() and not (root / shard_write.STAGING).exists()
    monkeypatch.undo()
    m = write_shards(res, root, None, 10**9, "tfrecord", False)
    assert m.location == str(root / "shards" / MANIFEST) and len(m.shards("train")) == 1
