"""`deeplab import FORMAT SOURCE --output DATASET`: the formats, looked up by name.

Each format's module turns an export into a dataset folder through
`import_common.DatasetWriter`; `run_import` then validates the result as `deeplab
validate` would, so the user sees the class table and any problem at once.
"""

from __future__ import annotations

import difflib
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept light: `deeplab --help` reads FORMATS without torch
    from segment_deeplab.data.import_common import ImportOptions
    from segment_deeplab.data.spec import DatasetSpec
    from segment_deeplab.data.validate import ValidationReport

# format -> (module, function, what SOURCE is)
FORMATS: dict[str, tuple[str, str, str]] = {
    "coco": ("import_coco", "import_coco", "instances JSON file(s), one per split"),
    "cvat": ("import_cvat", "import_cvat_xml", "'CVAT for images 1.1' XML or its folder"),
    "cvat-mask": ("import_cvat_mask", "import_cvat_masks", "'Segmentation mask 1.1' export folder"),
    "labelstudio": ("import_labelstudio", "import_labelstudio", "Label Studio JSON export"),
    "labelme": ("import_labelme", "import_labelme", "folder of labelme JSON files (or the files)"),
    "tfrecord": ("import_tfrecord", "import_tfrecord", "TF DeepLab / cvdata shards or folder"),
}  # fmt: skip


@dataclass
class ImportResult:
    spec: DatasetSpec
    counts: dict[str, Any]
    report: ValidationReport
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.report.ok,
            "dataset_yaml": str(self.spec.path),
            "classes": [c.to_dict() for c in self.spec.classes],
            "splits": {k: str(v) for k, v in self.spec.splits.items()},
            "seconds": round(self.seconds, 3),
            **self.counts,
            "validation": self.report.to_dict(),
        }


def importer(fmt: str):
    """The import function of a format name; an unknown name lists the valid ones."""
    from segment_deeplab.data.spec import DatasetError

    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DatasetError(f"unknown import format {fmt!r}{hint}; formats: {', '.join(FORMATS)}")
    module, fn, _ = FORMATS[fmt]
    return getattr(importlib.import_module(f"segment_deeplab.data.{module}"), fn)


def run_import(
    fmt: str, sources: list[str | Path], output: str | Path, opts: ImportOptions
) -> ImportResult:
    """Import `sources` (never modified) into a new dataset folder `output`, then
    validate it."""
    from segment_deeplab.data.spec import DatasetError
    from segment_deeplab.data.validate import validate_dataset

    fn = importer(fmt)
    paths = [Path(s) for s in sources]
    for p in paths:
        if not p.exists():
            raise DatasetError(f"{p} does not exist; give the {FORMATS[fmt][2]}")
    t0 = time.perf_counter()
    spec, counts = fn(paths, Path(output), opts)
    seconds = time.perf_counter() - t0
    report = validate_dataset(spec, spec.image_dir, spec.mask_dir, progress=opts.progress)
    if report.ok:
        _add_stats(spec, report)
    return ImportResult(spec, counts, report, seconds)


def _add_stats(spec: DatasetSpec, report: ValidationReport) -> None:
    """The class statistics and content hash `prepare` would write, into the new
    dataset.yaml: an export that brings its own train/val split trains as it is."""
    import yaml

    from segment_deeplab.atomic import write_text
    from segment_deeplab.data.pairs import dataset_hash
    from segment_deeplab.data.prepare import class_stats

    text = spec.path.read_text()
    head = "".join(ln for ln in text.splitlines(keepends=True) if ln.startswith("#"))
    d = yaml.safe_load(text)
    spec.stats = d["stats"] = class_stats(report)
    spec.hash = d["hash"] = dataset_hash(report.file_hashes)
    write_text(spec.path, head + yaml.safe_dump(d, sort_keys=False, default_flow_style=None))
