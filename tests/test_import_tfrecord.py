"""`deeplab import tfrecord`: TF DeepLab shards read without TensorFlow, pixel for pixel.

The fixtures are written the way TF DeepLab writes them: each record built exactly as
research/deeplab/datasets/build_data.py's `image_seg_to_tfexample` builds it (image/encoded,
image/filename, image/format, image/height, image/width, image/channels,
image/segmentation/class/encoded, image/segmentation/class/format), into shards named
`%s-%05d-of-%05d.tfrecord` by `tf.io.TFRecordWriter`. One more fixture is written by the
`tfrecord` package's `TFRecordWriter`, so the importer is tested where TensorFlow
cannot be installed too.

TensorFlow runs in a subprocess, once for the module: it and the `tfrecord` package
register the same protobuf message names (tensorflow.Example, ...), and whichever comes
second into a process fails, so TensorFlow cannot be imported beside the importer.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import read_masks, tree_hash
from PIL import Image

from segment_deeplab.classes import default_palette
from segment_deeplab.cli import main
from segment_deeplab.data.tfrecord import (
    decode_example,
    encode_example,
    iter_records,
    write_records,
)

NO_TF = (
    "tensorflow-cpu is not installed (`pip install -e .[tf-tests]`; no wheel for this platform?)"
)

# build_data.py's image_seg_to_tfexample and _*_list_feature as they are, but for Python 3
# (collections.abc; str encoded as UTF-8) and with FLAGS.image_format and
# FLAGS.label_format passed in; then the jobs.
_TF_SCRIPT = r"""
import collections.abc, pickle, sys
from pathlib import Path

import tensorflow as tf


def _int64_list_feature(values):
    if not isinstance(values, collections.abc.Iterable):
        values = [values]
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _bytes_list_feature(values):
    if isinstance(values, str):  # Python 2's str was bytes; today's protobuf wants bytes
        values = values.encode()
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[values]))


def image_seg_to_tfexample(image_data, filename, height, width, seg_data, image_format):
    return tf.train.Example(features=tf.train.Features(feature={
        'image/encoded': _bytes_list_feature(image_data),
        'image/filename': _bytes_list_feature(filename),
        'image/format': _bytes_list_feature(image_format),
        'image/height': _int64_list_feature(height),
        'image/width': _int64_list_feature(width),
        'image/channels': _int64_list_feature(3),
        'image/segmentation/class/encoded': _bytes_list_feature(seg_data),
        'image/segmentation/class/format': _bytes_list_feature('png'),
    }))


work = Path(sys.argv[1])
jobs = pickle.loads((work / "jobs.pkl").read_bytes())
written, read = {}, {}
for path, compression, records in jobs["write"]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    written[path] = []
    with tf.io.TFRecordWriter(path, options=compression or None) as w:
        for r in records:
            ex = image_seg_to_tfexample(
                r["image"], r["filename"], r["height"], r["width"], r["seg"], r["format"]
            )
            w.write(ex.SerializeToString())
            written[path].append(ex.SerializeToString())
for path, compression in jobs["read"]:
    read[path] = [t.numpy() for t in tf.data.TFRecordDataset(path, compression_type=compression)]
# our decoder in a process that holds TensorFlow (it takes TensorFlow's message class then)
from segment_deeplab.data.tfrecord import decode_example

decoded = decode_example(next(iter(written.values()))[0])
result = {"written": written, "read": read, "decoded": decoded}
(work / "result.pkl").write_bytes(pickle.dumps(result))
"""


def _png(ids: np.ndarray, palette: bool = False) -> bytes:
    img = Image.fromarray(ids)  # mode L: the values are the ids
    if palette:  # a VOC-coloured palette PNG: the indices are the ids, not the colours
        img = img.convert("P")
        img.putpalette([v for c in default_palette(256) for v in c])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image(rng, h: int, w: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _ids(rng, h: int, w: int, top: int) -> np.ndarray:
    ids = np.zeros((h, w), np.uint8)
    for cid in range(1, top + 1):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        ids[y : y + 8, x : x + 8] = cid
    ids[0, :] = 255  # an ignored edge, as VOC's object borders
    return ids


def _record(rng, i: int, fmt: str = "JPEG", palette: bool = False, top: int = 3) -> dict:
    """One image/mask pair as build_data.py takes it; VOC-like names without extension."""
    h, w = 24 + 2 * i, 32 + 3 * i
    ids = _ids(rng, h, w, top)
    return {
        "filename": f"2007_{i:06d}",
        "format": {"JPEG": "jpeg", "PNG": "png"}[fmt],
        "height": h,
        "width": w,
        "image": _image(rng, h, w, fmt),
        "seg": _png(ids, palette),
        "ids": ids,
    }


@functools.cache
def _export_records() -> dict[str, list[dict]]:
    """Shard name -> its records: train in two shards, val in one; JPEG and PNG images,
    one palette mask."""
    rng = np.random.default_rng(0)
    r = [_record(rng, i, "PNG" if i in (1, 4) else "JPEG", palette=i == 2) for i in range(6)]
    return {
        "train-00000-of-00002.tfrecord": r[0:2],
        "train-00001-of-00002.tfrecord": r[2:4],
        "val-00000-of-00001.tfrecord": r[4:6],
    }


def _example(r: dict) -> bytes:
    """`image_seg_to_tfexample`'s record, serialized without TensorFlow."""
    return encode_example({
        "image/encoded": r["image"],
        "image/filename": r["filename"],
        "image/format": r["format"],
        "image/height": r["height"],
        "image/width": r["width"],
        "image/channels": 3,
        "image/segmentation/class/encoded": r["seg"],
        "image/segmentation/class/format": "png",
    })  # fmt: skip


_TFRECORD_PACKAGE_SCRIPT = """
import pickle, sys
from pathlib import Path
from tfrecord.writer import TFRecordWriter

folder, shards = Path(sys.argv[1]), pickle.loads(Path(sys.argv[2]).read_bytes())
for name, records in shards.items():
    w = TFRecordWriter(str(folder / name))
    for r in records:
        w.write({
            "image/encoded": (r["image"], "byte"),
            "image/filename": (r["filename"].encode(), "byte"),
            "image/format": (r["format"].encode(), "byte"),
            "image/height": (r["height"], "int"),
            "image/width": (r["width"], "int"),
            "image/channels": (3, "int"),
            "image/segmentation/class/encoded": (r["seg"], "byte"),
            "image/segmentation/class/format": (b"png", "byte"),
        })
    w.close()
"""


def _write_with_tfrecord_package(folder: Path, shards: dict[str, list[dict]]) -> None:
    """The `tfrecord` package's writer, in a process of its own: its Example message
    goes into protobuf's default pool, where TensorFlow's (loaded in this process by
    tensorboard when it is installed) already is."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder.parent / f".{folder.name}.records.pkl"
    data.write_bytes(pickle.dumps({k: [{**r, "ids": None} for r in v] for k, v in shards.items()}))
    try:
        cmd = [sys.executable, "-c", _TFRECORD_PACKAGE_SCRIPT, str(folder), str(data)]
        subprocess.run(cmd, check=True, timeout=120)
    finally:
        data.unlink()


def _tf_installed() -> bool:
    # Not pytest.importorskip: importing TensorFlow here would break the importer (see
    # the module docstring); whether it is installed is enough to know.
    return importlib.util.find_spec("tensorflow") is not None


@functools.cache
def _tf_work() -> Path:
    """One TensorFlow subprocess for the module: it writes the export (and a GZIP and a
    ZLIB copy of one shard) and reads back files our writer wrote. Returns its folder."""
    work = Path(tempfile.mkdtemp(prefix="tf-fixtures-"))
    atexit.register(shutil.rmtree, work, True)
    shards = _export_records()
    first = next(iter(shards))
    ours = [_example(r) for r in shards[first]]
    write_records(work / "ours.tfrecord", ours)
    write_records(work / "ours.tfrecord.gz", ours, "GZIP")
    write = [(str(work / "export" / n), "", rs) for n, rs in shards.items()]
    write += [(str(work / f"{c.lower()}" / first), c, shards[first]) for c in ("GZIP", "ZLIB")]
    jobs = {
        "write": [(p, c, [{k: v for k, v in r.items() if k != "ids"} for r in rs])
                  for p, c, rs in write],
        "read": [(str(work / "ours.tfrecord"), ""), (str(work / "ours.tfrecord.gz"), "GZIP")],
    }  # fmt: skip
    (work / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", _TF_SCRIPT, str(work)], check=True, env=env, timeout=600)
    return work


def _tf_result() -> dict:
    return pickle.loads((_tf_work() / "result.pkl").read_bytes())


def make_tfrecord_export(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A TF DeepLab TFRecord folder at `root` (train in two shards, val in one) and the
    id mask `deeplab import tfrecord` must make of each stem.

    Written by TensorFlow's own writer where it is installed, else by the `tfrecord`
    package's."""
    shards = _export_records()
    if _tf_installed():
        shutil.copytree(_tf_work() / "export", root, dirs_exist_ok=True)
    else:
        _write_with_tfrecord_package(root, shards)
    return root, {r["filename"]: r["ids"] for rs in shards.values() for r in rs}


def _images() -> dict[str, bytes]:
    return {r["filename"]: r["image"] for rs in _export_records().values() for r in rs}


def _check_import(out: Path, expected: dict[str, np.ndarray]) -> None:
    """Masks equal the ones written, images the records' bytes; train and val splits."""
    got = read_masks(out)
    assert got.keys() == expected.keys()
    for stem, ids in expected.items():
        np.testing.assert_array_equal(got[stem], ids, err_msg=stem)
    images = _images()
    for p in (out / "images").iterdir():
        assert p.read_bytes() == images[p.stem], p.name  # never re-encoded
    assert {p.suffix for p in (out / "images").iterdir()} == {".jpg", ".png"}
    assert (out / "splits" / "train.txt").read_text().split() == [f"2007_{i:06d}" for i in range(4)]
    assert (out / "splits" / "val.txt").read_text().split() == ["2007_000004", "2007_000005"]
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "class_1", "class_2", "class_3"]


def test_tensorflow_shards_import_pixel_for_pixel_and_the_source_is_untouched(tmp_path, capsys):
    if not _tf_installed():
        pytest.skip(NO_TF)
    src, expected = make_tfrecord_export(tmp_path / "tfrecord")
    before = tree_hash(src)
    out = tmp_path / "ds"
    assert main(["import", "tfrecord", str(src), "--output", str(out)]) == 0
    assert "splits: train 4, val 2" in capsys.readouterr().out
    assert tree_hash(src) == before
    _check_import(out, expected)
    palette = _export_records()["train-00001-of-00002.tfrecord"][0]  # 2007_000002
    assert Image.open(io.BytesIO(palette["seg"])).mode == "P"  # its indices are the ids
    assert {3, 255} <= set(np.unique(expected["2007_000002"]))
    assert main(["validate", str(out)]) == 0


def test_tfrecord_package_shards_with_cvdata_names(tmp_path):
    """cvdata_mask's valid-* shards are the val split; given as files, not a folder."""
    shards = _export_records()
    names = {n.replace("val-", "valid-"): rs for n, rs in shards.items()}
    _write_with_tfrecord_package(tmp_path / "tfrecord", names)
    files = [str(tmp_path / "tfrecord" / n) for n in names]
    out = tmp_path / "ds"
    assert main(["import", "tfrecord", *files, "--output", str(out), "--copy"]) == 0
    _check_import(out, {r["filename"]: r["ids"] for rs in shards.values() for r in rs})


def test_gzip_shards_and_labels(tmp_path):
    src = tmp_path / "tfrecord"
    for name, records in _export_records().items():
        write_records(src / f"{name}.gz", [_example(r) for r in records], "GZIP")
    out = tmp_path / "ds"
    argv = ["import", "tfrecord", str(src), "--output", str(out), "--labels", "road,car,tree"]
    assert main(argv) == 0
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert [c["name"] for c in spec["classes"]] == ["background", "road", "car", "tree"]
    assert len(read_masks(out)) == 6 and set((out / "splits").iterdir()) == {
        out / "splits" / "train.txt",
        out / "splits" / "val.txt",
    }


def _offsets(path: Path) -> list[int]:
    return [r.offset for r in iter_records(path)]


@pytest.mark.parametrize(
    "damage, says",
    [
        ("data", "the checksum of its data does not match; left out"),
        ("length", "the checksum of its length does not match"),
        ("truncate", "the file ends 30 bytes into its"),
    ],
)
def test_a_damaged_record_is_reported_and_the_others_imported(tmp_path, capsys, damage, says):
    src, expected = make_tfrecord_export(tmp_path / "tfrecord")
    shard = src / "train-00000-of-00002.tfrecord"
    data = bytearray(shard.read_bytes())
    at = _offsets(shard)[1]  # the second record of the shard (2007_000001)
    if damage == "data":
        data[at + 12 + 40] ^= 0x10  # one bit inside its Example
    elif damage == "length":
        data[at + 1] ^= 0x01
    else:
        data = data[: at + 12 + 30]
    shard.write_bytes(bytes(data))
    out = tmp_path / "ds"
    assert main(["import", "tfrecord", str(src), "--output", str(out), "--json"]) == 0
    cap = capsys.readouterr()
    counts = json.loads(cap.out)
    assert f"warning: {shard} record 1 at byte {at}: {says}" in cap.err
    assert counts["corrupt_records"] == 1 and counts["images"] == 5
    got = read_masks(out)
    assert "2007_000001" not in got and len(got) == 5
    np.testing.assert_array_equal(got["2007_000000"], expected["2007_000000"])


def test_the_rest_of_a_shard_is_read_after_a_bad_record(tmp_path, capsys):
    src, expected = make_tfrecord_export(tmp_path / "tfrecord")
    shard = src / "val-00000-of-00001.tfrecord"
    data = bytearray(shard.read_bytes())
    at = _offsets(shard)[0]
    data[at + 12 + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "ds"
    assert main(["import", "tfrecord", str(src), "--output", str(out)]) == 0
    cap = capsys.readouterr()
    assert f"{shard} record 0 at byte {at}: the checksum of its data does not match" in cap.err
    assert "1 corrupt record" in cap.err and "1 corrupt records skipped" in cap.out
    got = read_masks(out)
    assert "2007_000004" not in got
    np.testing.assert_array_equal(got["2007_000005"], expected["2007_000005"])


def test_a_truncated_shard_ends_there(tmp_path, capsys):
    src, expected = make_tfrecord_export(tmp_path / "tfrecord")
    shard = src / "train-00001-of-00002.tfrecord"
    at = _offsets(shard)[1]
    shard.write_bytes(shard.read_bytes()[: at + 7])  # inside the second record's header
    out = tmp_path / "ds"
    assert main(["import", "tfrecord", str(src), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{shard} record 1 at byte {at}: the file ends 7 bytes into its header" in err
    got = read_masks(out)
    assert "2007_000003" not in got and len(got) == 5
    np.testing.assert_array_equal(got["2007_000002"], expected["2007_000002"])


def test_reader_round_trips_its_writer(tmp_path):
    records = [
        b"",
        b"x",
        os.urandom(100_000),
        _example(_export_records()["val-00000-of-00001.tfrecord"][0]),
    ]
    for compression in ("", "GZIP"):
        path = tmp_path / f"r{compression}.tfrecord"
        assert write_records(path, records, compression) == 4
        got = list(iter_records(path))
        assert [r.data for r in got] == records and not any(r.error for r in got)
        assert [r.offset for r in got] == [0, 16, 33, 100_049]


def test_reader_and_tensorflow_agree(tmp_path):
    """TensorFlow's files read back as TensorFlow wrote them (plain, GZIP, ZLIB), and
    TensorFlow reads what our writer wrote."""
    if not _tf_installed():
        pytest.skip(NO_TF)
    work, result = _tf_work(), _tf_result()
    first = next(iter(_export_records()))
    for folder in ("export", "gzip", "zlib"):
        path = work / folder / first
        assert [r.data for r in iter_records(path)] == result["written"][str(path)], folder
    ours = [_example(r) for r in _export_records()[first]]
    assert result["read"][str(work / "ours.tfrecord")] == ours
    assert result["decoded"] == decode_example(result["written"][str(work / "export" / first)][0])
    assert result["read"][str(work / "ours.tfrecord.gz")] == ours


def _write(folder: Path, name: str, records: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_records(folder / name, records)
    return folder / name


def _broken(kind: str, src: Path) -> str:
    """A TFRecord folder broken in one way; returns what the error must name."""
    rng = np.random.default_rng(3)
    r = _record(rng, 0)
    if kind == "not_tfrecord":
        (src / "train-00000-of-00001.tfrecord").write_bytes(r["image"])
        return "train-00000-of-00001.tfrecord"
    if kind == "declared_size":
        path = _write(src, "train-00000-of-00001.tfrecord", [_example({**r, "width": 99})])
        return f"{path} record 0 at byte 0 (2007_000000)"
    if kind == "mask_size":
        seg = _png(np.zeros((10, 10), np.uint8))
        path = _write(src, "train-00000-of-00001.tfrecord", [_example({**r, "seg": seg})])
        return f"{path} record 0 at byte 0"
    if kind == "no_mask":
        data = encode_example({"image/encoded": r["image"], "image/filename": "a"})
        path = _write(src, "test-00000-of-00001.tfrecord", [data])
        return f"{path} record 0"
    if kind == "duplicate":
        _write(src, "train-00000-of-00001.tfrecord", [_example(r)])
        path = _write(src, "val-00000-of-00001.tfrecord", [_example(r)])
        return (
            f"{path} record 0 at byte 0 (2007_000000) and {src / 'train-00000-of-00001.tfrecord'}"
        )
    if kind == "labels":
        path = _write(src, "train-00000-of-00001.tfrecord", [_example(r)])
        return f"{path} record 0 at byte 0 (2007_000000): its mask holds class id 3"
    if kind == "empty_folder":
        (src / "README.txt").write_text("no shards here")
        return f"{src} holds no TFRecord shards"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "not_tfrecord",
        "declared_size",
        "mask_size",
        "no_mask",
        "duplicate",
        "labels",
        "empty_folder",
    ],
)
def test_bad_exports_exit_2_naming_the_file_and_write_nothing(tmp_path, capsys, kind):
    src = tmp_path / "tfrecord"
    src.mkdir()
    must_name = _broken(kind, src)
    out = tmp_path / "ds"
    labels = ["--labels", "road,car"] if kind == "labels" else []
    assert main(["import", "tfrecord", str(src), "--output", str(out), *labels]) == 2
    err = capsys.readouterr().err
    assert must_name in err
    assert not out.exists() and not list(tmp_path.glob(".ds*"))


def test_trainval_is_left_out_beside_train_and_val(tmp_path, capsys):
    rng = np.random.default_rng(5)
    r = [_example(_record(rng, i)) for i in range(3)]
    src = tmp_path / "tfrecord"
    _write(src, "train-00000-of-00001.tfrecord", r[:2])
    _write(src, "val-00000-of-00001.tfrecord", r[2:])
    _write(src, "trainval-00000-of-00001.tfrecord", r)
    out = tmp_path / "ds"
    assert main(["import", "tfrecord", str(src), "--output", str(out)]) == 0
    assert "leaving out the 1 trainval shard" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "splits").iterdir()) == ["train.txt", "val.txt"]


def test_importing_does_not_load_tensorflow(tmp_path):
    shard = _write(
        tmp_path, "train-00000-of-00001.tfrecord", [_example(_record(np.random.default_rng(1), 0))]
    )
    code = (
        "import sys\n"
        "import segment_deeplab.data.import_tfrecord as m\n"
        "from segment_deeplab.data.tfrecord import decode_example, iter_records\n"
        f"feats = decode_example(next(iter_records({str(shard)!r})).data)\n"
        "assert feats['image/height'] == [24], feats['image/height']\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
