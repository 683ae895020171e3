"""What `deeplab eval` writes and prints: metrics.json, the confusion matrix as CSV
and heat map, per_image.csv, and the per-class table."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from segment_deeplab.atomic import staged, write_text
from segment_deeplab.classes import heat_color, load_font


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A readable per-class table (percentages) followed by the summary metrics."""
    names = result["class_names"]
    w = max([5] + [len(n) for n in names])
    head = "".join(f"{c:>10}" for c in ("IoU", "recall", "precision", "Dice"))
    lines = [f"{'class':<{w}}  {head}{'GT px':>13}{'pred px':>13}"]
    rule = "-" * len(lines[0])
    lines.append(rule)
    for i, name in enumerate(names):
        vals = "".join(f"{_fmt(result[k][i]):>10}" for k in ("iou", "recall", "precision", "dice"))
        px = f"{result['gt_pixels'][i]:>13,}{result['pred_pixels'][i]:>13,}"
        lines.append(f"{name:<{w}}  {vals}{px}")
    lines.append(rule)
    summary = [("mIoU", result["miou"])]
    if result.get("background") is not None:
        summary.append(("mIoU (foreground)", result["miou_foreground"]))
    summary += [
        ("pixel accuracy", result["pixel_accuracy"]),
        ("mean recall", result["mean_recall"]),
        ("fwIoU", result["fwiou"]),
    ]
    lines += [f"{k:<18} {_fmt(v)}" for k, v in summary]
    lines.append(f"{result.get('images', '?')} images, {result['pixels']:,} labelled pixels")
    return "\n".join(lines)


def confusion_png(mat: np.ndarray, names: Sequence[str]) -> Image.Image:
    """Row-normalised heat map (rows: ground truth, columns: prediction), drawn with PIL."""
    mat = np.asarray(mat, dtype=np.float64)
    n = len(names)
    rows = mat.sum(1, keepdims=True)
    frac = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
    cell = int(np.clip(640 // max(n, 1), 10, 48))
    font = load_font(max(10, min(14, cell // 2 + 2)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = max(int(probe.textlength(s, font=font)) for s in names) + 8
    title = 22
    left, top = title + label, title + label
    img = Image.new("RGB", (left + n * cell + 8, top + n * cell + 8), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    # Column labels: drawn horizontally on their own strip, then turned upright.
    strip = Image.new("RGB", (label, n * cell), (255, 255, 255))
    sdraw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        draw.text((left - 4, top + i * cell + cell / 2), name, fill=0, font=font, anchor="rm")
        sdraw.text((4, i * cell + cell / 2), name, fill=0, font=font, anchor="lm")
    img.paste(strip.transpose(Image.Transpose.ROTATE_90), (left, title))
    draw.text((left + n * cell / 2, 4), "prediction", fill=0, font=font, anchor="mt")
    axis = Image.new("RGB", (n * cell, title), (255, 255, 255))
    ImageDraw.Draw(axis).text((n * cell / 2, 4), "ground truth", fill=0, font=font, anchor="mt")
    img.paste(axis.transpose(Image.Transpose.ROTATE_90), (0, top))
    for r in range(n):
        for c in range(n):
            x0, y0 = left + c * cell, top + r * cell
            v = frac[r, c]
            # White to dark blue; a row without ground truth is grey ("n/a").
            color = (225, 225, 225) if rows[r, 0] == 0 else heat_color(v)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color)
            if cell >= 28 and rows[r, 0] > 0 and v > 0:
                ink = (255, 255, 255) if v > 0.5 else (0, 0, 0)
                mid = (x0 + cell / 2, y0 + cell / 2)
                draw.text(mid, f"{100 * v:.0f}", fill=ink, font=font, anchor="mm")
    draw.rectangle([left - 1, top - 1, left + n * cell, top + n * cell], outline=(0, 0, 0))
    return img


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, confusion_matrix.csv/.png and per_image.csv into `out_dir`."""
    out = Path(out_dir)
    names = result["class_names"]
    mat = np.asarray(result["confusion_matrix"], dtype=np.int64)
    paths = {
        "metrics": out / "metrics.json",
        "confusion_csv": out / "confusion_matrix.csv",
        "confusion_png": out / "confusion_matrix.png",
        "per_image": out / "per_image.csv",
    }
    # The matrix and per-image rows have their own CSVs; the JSON stays readable.
    summary = {k: v for k, v in result.items() if k not in ("confusion_matrix", "per_image")}
    write_text(paths["metrics"], json.dumps(summary, indent=2) + "\n")
    with staged(paths["confusion_csv"]) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ground_truth \\ prediction", *names])
        for name, row in zip(names, mat.tolist(), strict=True):
            w.writerow([name, *row])
    with staged(paths["confusion_png"]) as tmp:
        confusion_png(mat, names).save(tmp, format="PNG")
    with staged(paths["per_image"]) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stem", "miou"])
        for rec in result.get("per_image", []):
            w.writerow([rec["stem"], "" if rec["miou"] is None else f"{rec['miou']:.6f}"])
    return paths
