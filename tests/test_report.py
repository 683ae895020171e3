"""The HTML report: a real tiny run opened in headless Chromium; runs with pieces missing."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import TINY, stop_at
from PIL import Image

from segment_deeplab.cli import main
from segment_deeplab.config import load_config, save_config
from segment_deeplab.data.spec import open_dataset
from segment_deeplab.report import build_report, write_report
from segment_deeplab.report.svg import Series, class_bars, line_chart, nice_ticks
from segment_deeplab.train.loop import fit

SECTIONS = ("summary", "curves", "class-iou", "confusion", "classes", "gallery", "config")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluated_run(dataset, tmp_path_factory):
    """A finished run with validation, evaluated with `eval --report`."""
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = load_config(None, [*TINY, "train.steps=4", "train.val_every=2"])
    fit(cfg, open_dataset(dataset), run, progress=False, device="cpu")
    argv = ["eval", "--checkpoint", str(run), "--data", str(dataset), "--report"]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    return run


def _data_uris(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/\w+;base64,([^"]+)"', html)]


def _chromium(html_path, tmp_path) -> tuple[str, str, np.ndarray]:
    """(rendered DOM, Chromium's log, screenshot) of a page opened headless, offline."""
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
        "--enable-logging=stderr", "--v=0", "--dump-dom", f"--screenshot={shot}",
        "--window-size=1280,4000", html_path.resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shot.is_file(), proc.stderr[-3000:]
    return proc.stdout, proc.stderr, np.asarray(Image.open(shot).convert("RGB"))


def test_report_of_an_evaluated_run_renders_every_section_in_chromium(evaluated_run, tmp_path):
    page = evaluated_run / "report.html"  # written by `eval --report`
    html = page.read_text()
    # Self-contained: nothing is fetched, every picture is embedded and decodes.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    pictures = _data_uris(html)
    assert len(pictures) == 4 * 4  # 4 val images x (photo, truth, prediction, error map)
    for data in pictures:
        Image.open(io.BytesIO(data)).load()
    assert "missing:" not in html, re.findall(r"missing: [^<]*", html)
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium")
    dom, log, shot = _chromium(page, tmp_path)
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom, sid
    assert dom.count("<svg") >= 4 and dom.count("<img") == 16
    errors = [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not errors, errors
    assert shot.shape[:2] == (4000, 1280)
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert shot.std() > 10 and len(colours) > 200  # text, charts and pictures, not blank


def test_interrupted_run_without_validation_says_what_is_missing(
    dataset, tmp_path, monkeypatch, capsys
):
    data = shutil.copytree(dataset, tmp_path / "data")
    cfg = load_config(None, [*TINY, "train.steps=50", "train.val_every=1000"])
    stop_at(monkeypatch, 2)
    run = tmp_path / "run"
    assert fit(cfg, open_dataset(data), run, progress=False, device="cpu").interrupted
    monkeypatch.undo()
    assert not (run / "best.pt").exists()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # killed in the middle of a line

    assert main(["report", str(run), "--device", "cpu", "--gallery", "1"]) == 0
    err = capsys.readouterr().err
    html = (run / "report.html").read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in html, sid
    assert "missing: validation curves" in html
    assert "missing: the confusion matrix" in html and "deeplab eval --checkpoint" in html
    assert "missing: per-class IoU" in err
    assert "stopped early" in html and "1 unreadable line" in html
    assert len(_data_uris(html)) == 2 * 4  # ranked with last.pt on the val split

    shutil.move(data, tmp_path / "moved")
    report = build_report(run, gallery=1, device="cpu")
    assert any("was it moved?" in m for m in report.missing), report.missing
    assert "circle" in report.html  # classes still come from the checkpoint


def test_a_run_folder_with_only_a_config_still_gets_a_report(tmp_path):
    save_config(load_config(None, TINY), tmp_path / "config.yaml")
    html = write_report(tmp_path).read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in html, sid
    assert html.count('class="missing"') >= 5 and "resnet_18" in html


def test_charts_cope_with_single_points_gaps_and_missing_values():
    assert nice_ticks(0, 1, 4) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0.91, 0.98, 4)[0] <= 0.91 and nice_ticks(0.91, 0.98, 4)[-1] >= 0.98
    one = line_chart([Series("mIoU", [5], [0.5])], "one point")
    assert one.count("<circle") == 1
    gaps = line_chart([Series("a", [1, 2, 3], [None, float("nan"), 2.0]), Series("b", [], [])], "t")
    assert gaps.startswith("<svg") and gaps.endswith("</svg>")
    assert "no data" in line_chart([Series("a", [1], [None])], "empty")
    bars = class_bars(["bg", "x<y"], [(0, 0, 0), (255, 0, 0)], [0.9, None], [0.8, None])
    assert "n/a" in bars and "x&lt;y" in bars


def test_eval_report_of_a_checkpoint_outside_a_run_lands_beside_the_metrics(
    evaluated_run, dataset, tmp_path
):
    lone = tmp_path / "model.pt"
    shutil.copy(evaluated_run / "best.pt", lone)
    argv = ["eval", "--checkpoint", str(lone), "--data", str(dataset), "--output"]
    assert main([*argv, str(tmp_path / "ev"), "--report", "--no-progress", "--device", "cpu"]) == 0
    html = (tmp_path / "ev" / "report.html").read_text()
    assert 'id="confusion"' in html and "missing: the confusion matrix" not in html
    assert "resnet_18" in html and html.count("<img") == 16  # config and model from the file
