"""The report's sections as HTML strings, each from a `RunData`.

Every section renders: a piece the run lacks becomes a "missing: ..." note that says
which command adds it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape

import numpy as np

from segment_deeplab.classes import heat_color
from segment_deeplab.report import svg
from segment_deeplab.report.gallery import Gallery, GalleryMissing, Row
from segment_deeplab.report.runfolder import RunData

# More classes than this: the confusion matrix is eval's picture, not an HTML table.
TABLE_CLASSES = 30


def section(sid: str, title: str, body: str, source: str = "") -> str:
    src = f'<p class="src">{escape(source)}</p>' if source else ""
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{src}{body}</section>'


def missing(data: RunData, what: str, command: str | None = None) -> str:
    """A "missing: ..." note; its text also goes to `data.missing` (the CLI prints it)."""
    data.missing.append(f"{what} (run `{command}` to add it)" if command else what)
    fix = f" (run <code>{escape(command)}</code> to add it)" if command else ""
    return f'<p class="missing">missing: {escape(what)}{fix}</p>'


def eval_command(data: RunData) -> str:
    # A dataset that cannot be opened (moved) is no help in the command.
    dataset = data.dataset_ref if data.spec is not None else None
    return f"deeplab eval --checkpoint {data.run_dir} --data {dataset or 'DATASET'} --report"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def curves(data: RunData) -> str:
    charts, notes = [], []
    if data.train:
        steps = [r["step"] for r in data.train]
        loss = svg.Series("loss", steps, [r.get("loss") for r in data.train])
        charts.append(svg.line_chart([loss], "training loss", y_range=(0, None)))
        lr = svg.Series("lr", steps, [r.get("lr") for r in data.train], svg.LINE_COLORS[1])
        charts.append(svg.line_chart([lr], "learning rate", y_range=(0, None)))
    else:
        notes.append(missing(data, "training loss and learning rate: no training step logged yet"))
    if data.val:
        steps = [r["step"] for r in data.val]
        series = [svg.Series("mIoU", steps, [r.get("miou") for r in data.val], svg.LINE_COLORS[2])]
        if any(r.get("miou_foreground") is not None for r in data.val):
            fg = [r.get("miou_foreground") for r in data.val]
            series.append(svg.Series("fg mIoU", steps, fg, svg.LINE_COLORS[4]))
        acc = [r.get("pixel_accuracy") for r in data.val]
        series.append(svg.Series("pixel acc.", steps, acc, svg.LINE_COLORS[0]))
        charts.append(svg.line_chart(series, "validation", svg.percent, (None, 1)))
        if data.classes and len(data.classes) <= 20:
            charts.append(_class_curves(data, steps))
    else:
        every = (data.config.get("train") or {}).get("val_every", "train.val_every")
        notes.append(
            missing(
                data,
                f"validation curves: no validation yet (it runs every {every} steps and at "
                "the end of training, on the dataset's val split)",
            )
        )
    source = "from metrics.jsonl" + (f"; {data.notes['log']}" if "log" in data.notes else "")
    body = f'<div class="charts">{"".join(charts)}</div>' + "".join(notes)
    return section("curves", "Training curves", body, source)


def _line_color(rgb: Sequence[int]) -> str:
    # Class colours are picked for masks; a near-white one would vanish on the page.
    r, g, b = (int(v * 0.7) if sum(rgb) > 600 else int(v) for v in rgb)
    return f"rgb({r},{g},{b})"


def _class_curves(data: RunData, steps: list[int]) -> str:
    series = []
    for c in data.classes:
        ys = [r["iou"][c.id] if c.id < len(r.get("iou") or []) else None for r in data.val]
        series.append(svg.Series(c.name, steps, ys, _line_color(c.color)))
    return svg.line_chart(series, "validation IoU per class", svg.percent, (None, 1))


def _shares(data: RunData) -> tuple[list[float | None] | None, str]:
    m = data.eval_metrics or {}
    if m.get("gt_pixels"):
        total = sum(m["gt_pixels"]) or 1
        return [p / total for p in m["gt_pixels"]], "grey: share of the evaluated pixels"
    stats = (data.spec.stats if data.spec else {}).get("classes")
    if stats:
        by_id = {c["id"]: c.get("share") for c in stats}
        return [by_id.get(c.id) for c in data.classes], "grey: share of the dataset's pixels"
    return None, ""


def class_iou(data: RunData) -> str:
    m = data.eval_metrics or {}
    if m.get("iou"):
        iou, names = m["iou"], m.get("class_names") or [c.name for c in data.classes]
        source = f"evaluation of {m.get('split', '?')} ({m.get('images', '?')} images) in "
        source += str(data.eval_dir)
    elif data.val and data.val[-1].get("iou"):
        last = data.val[-1]
        iou, names = last["iou"], last.get("class_names") or [c.name for c in data.classes]
        source = f"validation at step {last['step']} (metrics.jsonl)"
    else:
        body = missing(data, "per-class IoU: no validation or evaluation yet", eval_command(data))
        return section("class-iou", "Per-class IoU", body)
    shares, share_src = _shares(data)
    colors = {c.name: c.color for c in data.classes}
    chart = svg.class_bars(names, [colors.get(n, (200, 200, 200)) for n in names], iou, shares)
    if share_src:
        source += f"; blue: IoU, {share_src}"
    return section("class-iou", "Per-class IoU", chart, source)


def _heat(v: float) -> tuple[str, str]:
    r, g, b = heat_color(v)
    return f"rgb({r},{g},{b})", "#fff" if v > 0.5 else "#1d2430"


def confusion(data: RunData) -> str:
    if data.confusion is None:
        body = missing(data, "the confusion matrix: no evaluation output", eval_command(data))
        return section("confusion", "Confusion matrix", body)
    names, mat = data.confusion
    png = data.eval_dir / "confusion_matrix.png"
    if len(names) > TABLE_CLASSES and png.is_file():  # a table this wide helps nobody
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        body = f'<img class="cmimg" src="{uri}" alt="confusion matrix">'
        return section("confusion", "Confusion matrix", body, f"{png}, rows are ground truth")
    rows = mat.sum(1, keepdims=True)
    frac = np.divide(mat, rows, out=np.zeros(mat.shape), where=rows > 0)
    head = "".join(f'<th class="col"><span>{escape(n)}</span></th>' for n in names)
    lines = [f'<tr><th class="row axis">truth \\ prediction</th>{head}</tr>']
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            if rows[i, 0] == 0:
                cells.append('<td style="background:#e1e1e1" title="no ground truth">n/a</td>')
                continue
            bg, ink = _heat(frac[i, j])
            tip = f"{name} -> {names[j]}: {mat[i, j]:,} px"
            text = f"{100 * frac[i, j]:.0f}" if mat[i, j] else ""
            cells.append(
                f'<td style="background:{bg};color:{ink}" title="{escape(tip)}">{text}</td>'
            )
        lines.append(f'<tr><th class="row">{escape(name)}</th>{"".join(cells)}</tr>')
    source = (
        f"{data.eval_dir / 'confusion_matrix.csv'}: rows are ground truth, in % of the row's "
        "pixels; hover a cell for its pixel count"
    )
    body = f'<table class="cm">{"".join(lines)}</table>'
    return section("confusion", "Confusion matrix", body, source)


def class_table(data: RunData) -> str:
    if not data.classes:
        return section(
            "classes", "Classes", missing(data, "the class list: no checkpoint or dataset")
        )
    stats = {c["id"]: c for c in ((data.spec.stats if data.spec else {}).get("classes") or [])}
    iou = (data.eval_metrics or {}).get("iou") or (data.val[-1].get("iou") if data.val else None)
    head = ["id", "", "class", "colour", "pixel share", "images", "IoU"]
    lines = ["<tr>" + "".join(f"<th{_num(h)}>{h}</th>" for h in head) + "</tr>"]
    for c in data.classes:
        r, g, b = c.color
        st = stats.get(c.id, {})
        share = _pct(st["share"]) if "share" in st else "?"
        images = f"{st['images']:,}" if "images" in st else "?"
        v = _pct(iou[c.id]) if iou and c.id < len(iou) else "?"
        lines.append(
            f'<tr><td class="num">{c.id}</td><td><span class="sw" style="background:'
            f'rgb({r},{g},{b})"></span></td><td>{escape(c.name)}</td>'
            f"<td>#{r:02x}{g:02x}{b:02x}</td><td class=num>{share}</td>"
            f"<td class=num>{images}</td><td class=num>{v}</td></tr>"
        )
    source = f"ignore index {data.ignore_index}"
    if data.spec is not None:
        source = f"{data.spec.path}; {source}"
        ign = data.spec.stats.get("ignore_share")
        source += f" ({_pct(ign)} of pixels)" if ign is not None else ""
    body = f'<table class="classes">{"".join(lines)}</table>'
    if not stats:
        body += missing(
            data, "class statistics", f"deeplab prepare {data.dataset_ref or 'DATASET'}"
        )
    return section("classes", "Classes", body, source)


def _num(h: str) -> str:
    return ' class="num"' if h in ("id", "pixel share", "images", "IoU") else ""


def config(data: RunData) -> str:
    if not data.config_text:
        return section(
            "config", "Config", missing(data, "the run's config: no config.yaml, no checkpoint")
        )
    source = "config.yaml of the run" if (data.run_dir / "config.yaml").is_file() else "checkpoint"
    return section("config", "Config", f"<pre>{escape(data.config_text)}</pre>", source)


def _rows(rows: Sequence[Row]) -> str:
    out = []
    for r in rows:
        score = f'<div class="score">mIoU {_pct(r.miou)}</div>'
        out.append(f'<div><div class="stem">{escape(r.stem)}</div>{score}</div>')
        pictures = (
            (r.image, "photo", "image"),
            (r.truth, "mask", "ground truth"),
            (r.pred, "mask", "prediction"),
            (r.error, "mask", "error map"),
        )
        for uri, cls, alt in pictures:
            out.append(f'<img class="{cls}" src="{uri}" alt="{escape(r.stem)} {alt}">')
    return "".join(out)


def gallery(data: RunData, result: Gallery | GalleryMissing | None) -> str:
    if result is None:
        return section(
            "gallery",
            "Best and worst validation images",
            missing(data, "the gallery: turned off (--gallery 0)"),
        )
    if isinstance(result, GalleryMissing):
        body = missing(data, str(result), eval_command(data))
        return section("gallery", "Best and worst validation images", body)
    head = "".join(
        f'<div class="h">{h}</div>'
        for h in ("", "image", "ground truth", "prediction", "error map")
    )
    body = ""
    for title, rows in (("Worst", result.worst), ("Best", result.best)):
        if rows:
            body += f'<h3>{title} {len(rows)}</h3><div class="gallery">{head}{_rows(rows)}</div>'
    body += (
        '<p class="legend">error map:<i style="background:#dc143c"></i>wrong'
        '<i style="background:#787878"></i>ignored<i style="background:#d9d9d9"></i>correct</p>'
    )
    return section("gallery", "Best and worst validation images", body, result.source)
