"""Every import format gives a dataset that `prepare` splits and `train` trains on.

The exports come from each format's own test module (made the way the tool writes
them); here they go the rest of the way a user's would: import, prepare, a few steps of
training, and the trained model's classes are the export's.
"""

from __future__ import annotations

import importlib

import pytest
import yaml
from helpers import TINY

from segment_deeplab.checkpoint import load_file
from segment_deeplab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# format -> (test module, builder)
EXPORTS = {
    "coco": ("test_import_coco", "make_coco_export"),
    "cvat": ("test_import_cvat", "make_cvat_xml_export"),
    "cvat-mask": ("test_import_cvat", "make_cvat_mask_export"),
    "labelstudio": ("test_import_labelstudio", "make_labelstudio_export"),
    "labelme": ("test_import_labelme", "make_labelme_export"),
    "tfrecord": ("test_import_tfrecord", "make_tfrecord_export"),
}


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_imported_dataset_trains(tmp_path, fmt):
    module, builder = EXPORTS[fmt]
    src, expected = getattr(importlib.import_module(module), builder)(tmp_path / "export")
    data = tmp_path / "ds"
    assert main(["import", fmt, str(src), "--output", str(data)]) == 0
    spec = yaml.safe_load((data / "dataset.yaml").read_text())
    if "splits" not in spec or not {"train", "val"} <= set(spec["splits"]):
        assert main(["prepare", str(data), "--val-fraction", "0.25"]) == 0
    spec = yaml.safe_load((data / "dataset.yaml").read_text())
    n_train = len((data / spec["splits"]["train"]).read_text().split())
    # a batch of one trains with frozen batch norm (the small exports have 1 training image)
    batch = ["data.batch_size=2"] if n_train >= 2 else ["data.batch_size=1", "train.freeze_bn=true"]
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--output", str(run), "--no-progress", "--steps", "2"]
    assert main([*argv, *TINY, *batch, "data.crop_size=[32,32]"]) == 0
    ck = load_file(run / "last.pt")
    assert ck["step"] == 2
    assert [c["name"] for c in ck["classes"]] == [c["name"] for c in spec["classes"]]
    assert len(expected) >= 2
