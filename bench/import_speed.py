"""`deeplab import coco` speed on a 500-image COCO export made from CamVid.

The export: CamVid's 468 frames (and 32 of them again under other names, for 500),
one compressed-RLE annotation per class present in a frame (as COCO-Stuff stores its
regions), written with pycocotools. Measured: `run_import` (read, rasterise, write
masks, link images) without and with the validation pass that follows it, against a
hand-written converter of the kind users write today (pycocotools' annToMask per
annotation, painted in order, saved as PNG; no checks, no validation).

    python bench/import_speed.py [--images 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CAMVID_SOURCE, machine  # noqa: E402


def make_export(root: Path, n: int) -> Path:
    from pycocotools import mask as mask_utils

    src = Path(CAMVID_SOURCE)
    frames = sorted((src / "images").glob("*.jpg"))
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        frame = frames[i % len(frames)]
        name = frame.name if i < len(frames) else f"again_{i:04d}_{frame.name}"
        (root / "images" / name).symlink_to(frame.resolve())
        ids = np.array(Image.open(src / "masks" / f"{frame.stem}.png"))
        h, w = ids.shape
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for c in np.unique(ids):
            if c == 255:
                continue
            rle = mask_utils.encode(np.asfortranarray((ids == c).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                 "segmentation": rle, "iscrowd": 0}
            )  # fmt: skip
    cats = [{"id": c + 1, "name": f"camvid_{c}"} for c in range(11)]
    path = root / "annotations" / "instances_default.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def hand_written(path: Path, out: Path) -> None:
    """What a user writes without the tool: annToMask, paint, save."""
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    (out / "masks").mkdir(parents=True)
    for img in coco.loadImgs(coco.getImgIds()):
        ids = np.zeros((img["height"], img["width"]), np.uint8)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            ids[coco.annToMask(a).astype(bool)] = a["category_id"]
        Image.fromarray(ids).save(out / "masks" / f"{Path(img['file_name']).stem}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    args = ap.parse_args()
    from segment_deeplab.data.import_common import ImportOptions
    from segment_deeplab.data.importers import run_import

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = make_export(tmp / "export", args.images)
        n = args.images
        t0 = time.perf_counter()
        hand_written(path, tmp / "hand")
        hand = time.perf_counter() - t0
        res = run_import("coco", [path], tmp / "ds", ImportOptions(command="bench"))
        total = res.seconds + res.report.seconds
        shutil.rmtree(tmp / "ds")
        print(f"{machine()}; {n} images 480x360, {res.counts['annotations']} RLE annotations")
        print()
        print("| converter | seconds | images/s |")
        print("|---|---:|---:|")
        print(f"| hand-written (annToMask, PNG save; no checks) | {hand:.1f} | {n / hand:.0f} |")
        print(f"| `deeplab import coco` (checks, masks, links) | {res.seconds:.1f} | "
              f"{n / res.seconds:.0f} |")  # fmt: skip
        print(f"| `deeplab import coco` + its validation pass | {total:.1f} | {n / total:.0f} |")


if __name__ == "__main__":
    main()
