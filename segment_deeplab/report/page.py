"""The whole report: a summary header, the sections, one self-contained HTML file."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from html import escape
from pathlib import Path

from segment_deeplab import __version__
from segment_deeplab.atomic import write_text
from segment_deeplab.report import sections
from segment_deeplab.report.gallery import GalleryMissing, build_gallery
from segment_deeplab.report.runfolder import RunData, read_run
from segment_deeplab.report.style import CSS
from segment_deeplab.train.schedule import parse_duration


@dataclass
class Report:
    html: str
    missing: list[str]  # what the report could not show, one line each

    def save(self, path: str | Path) -> Path:
        """Write the HTML (atomically: a reader never sees half a page)."""
        return write_text(path, self.html)


def _tile(key: str, value: str, detail: str = "") -> str:
    d = f'<div class="d">{escape(detail)}</div>' if detail else ""
    kv = f'<div class="k">{escape(key)}</div><div class="v">{escape(value)}</div>'
    return f'<div class="tile">{kv}{d}</div>'


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _progress(data: RunData) -> tuple[str, str, str | None]:
    """(steps trained, time trained, a note when the run is short of its planned length)."""
    last = data.checkpoints.get("last.pt") or next(iter(data.checkpoints.values()), {})
    step = last.get("step") or (data.train[-1]["step"] if data.train else None)
    if step is None:
        return "none", "no checkpoint yet", None
    tc = data.config.get("train") or {}
    elapsed = last.get("elapsed_s") or (data.train[-1].get("elapsed_s") if data.train else None)
    detail = f"{_duration(elapsed)} of training"
    planned = tc.get("steps")
    try:
        budget = parse_duration(tc.get("time")) if not planned else None
    except ValueError:
        budget = None
    note = None
    if (planned and step < planned) or (budget and elapsed is not None and elapsed < 0.98 * budget):
        detail += "; stopped early"
        note = (
            f"training is at step {step:,}, short of its planned end (stopped, or still "
            f"running); continue a stopped run with `deeplab train --resume {data.run_dir}`"
        )
    return f"{step:,}" + (f" / {planned:,}" if planned else ""), detail, note


def summary(data: RunData) -> str:
    model = data.config.get("model") or {}
    variant = model.get("model_variant", "?")
    arch = "DeepLab v3+" if model.get("decoder_output_stride") else "DeepLab v3"
    steps, progress, stopped = _progress(data)
    best = (data.checkpoints.get("best.pt") or {}).get("best_miou")
    vals = [r for r in data.val if r.get("miou") is not None]
    best_val = max(vals, key=lambda r: r["miou"]) if vals else None
    tiles = [
        _tile("model", variant, f"{arch}, output stride {model.get('output_stride', '?')}"),
        _tile("steps", steps, progress),
    ]
    if best_val is not None:
        value = f"{100 * best_val['miou']:.1f}%"
        tiles.append(_tile("best val mIoU", value, f"at step {best_val['step']:,}"))
    elif best is not None:
        tiles.append(_tile("best val mIoU", f"{100 * best:.1f}%"))
    else:
        tiles.append(_tile("best val mIoU", "n/a", "no validation yet"))
    m = data.eval_metrics or {}
    if m.get("miou") is not None:
        detail = f"{m.get('split', '?')}, {m.get('images', '?')} images"
        tiles.append(_tile("eval mIoU", f"{100 * m['miou']:.1f}%", detail))
        if m.get("pixel_accuracy") is not None:
            tiles.append(_tile("pixel accuracy", f"{100 * m['pixel_accuracy']:.1f}%", detail))
    tiles.append(_tile("classes", str(len(data.classes)), f"ignore index {data.ignore_index}"))
    notes = [stopped] if stopped else []
    notes += [v for k, v in data.notes.items() if k in ("dataset", "eval")]
    note_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return (
        f'<section id="summary"><h2>Summary</h2><div class="tiles">{"".join(tiles)}</div>'
        + (f'<ul class="notes">{note_html}</ul>' if notes else "")
        + "</section>"
    )


def build_report(
    run_dir: str | Path,
    eval_dir: str | Path | None = None,
    gallery: int = 4,
    device: str = "auto",
) -> Report:
    """The report's HTML and the list of what it could not show (see `write_report`)."""
    data = read_run(run_dir, eval_dir)
    shown = None
    if gallery > 0:
        try:
            shown = build_gallery(data, gallery, device)
        except GalleryMissing as e:
            shown = e
        except (RuntimeError, OSError, ValueError) as e:  # e.g. out of memory, unreadable image
            shown = GalleryMissing(f"the gallery: {type(e).__name__}: {e}")
    body = "".join(
        [
            summary(data),
            sections.curves(data),
            _pair(sections.class_iou(data), sections.confusion(data)),
            sections.gallery(data, shown),
            _pair(sections.class_table(data), sections.config(data)),
        ]
    )
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    run = Path(run_dir)
    html = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(str(run))} - segment-deeplab report</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<header><h1>Run report: {escape(str(run))}</h1>"
        f'<p class="sub">{escape(str(run.resolve()))} &middot; written {now}</p></header>'
        f"{body}<footer>segment-deeplab {__version__} &middot; deeplab report RUN_DIR</footer>"
        "</main></body></html>\n"
    )
    return Report(html, data.missing)


def _pair(left: str, right: str) -> str:
    """Two sections side by side (stacked on narrow screens)."""
    return f'<div class="pair">{left}{right}</div>'


def write_report(
    run_dir: str | Path,
    output: str | Path | None = None,
    eval_dir: str | Path | None = None,
    gallery: int = 4,
    device: str = "auto",
) -> Path:
    """Write one self-contained HTML report of a run (charts and images embedded).

    Reads only the run folder (metrics.jsonl, config.yaml, best.pt/last.pt), its
    evaluation output and the dataset its checkpoint records; whatever is missing
    (no validation yet, no evaluation, a moved dataset) is named in the report.

    Args:
        run_dir: a `deeplab train` run folder, finished or not.
        output: the HTML file; default `<run_dir>/report.html`.
        eval_dir: a `deeplab eval` output; default `<run_dir>/eval_val` or another
            folder beside the run whose metrics.json names this run.
        gallery: how many best and how many worst val images to show (0: none).
        device: where the gallery's predictions run ("auto": CUDA when present).

    Returns:
        The path of the written file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    report = build_report(run, eval_dir, gallery, device)
    return report.save(output if output is not None else run / "report.html")
