"""Colour pictures of class maps: P-mode masks and overlays with a legend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segment_deeplab.classes import ClassInfo, colorize, overlay

CLASSES = [
    ClassInfo(0, "background", (0, 0, 0)),
    ClassInfo(1, "road", (128, 64, 128)),
    ClassInfo(2, "sky", (70, 130, 180)),
    ClassInfo(3, "pole", (250, 250, 0)),
]


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_overlay_blends_class_colours_only_where_there_is_a_class(dtype) -> None:
    rng = np.random.default_rng(0)
    h, w = 23, 31
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    m = rng.integers(0, 3, (h, w)).astype(dtype)  # pole (3) never appears
    m[:4] = 255  # ignore
    if dtype == np.int64:
        m[4:6] = -1  # outside the classes
    out = np.asarray(overlay(torch.from_numpy(rgb).permute(2, 0, 1), m, CLASSES))
    blend = out[:h, :w].astype(int)  # the legend may be taller than a small image
    colors = np.array([c.color for c in CLASSES])
    want = rgb.astype(int)
    for c in (1, 2):  # background is black: it would only darken the photo
        at = m == c
        want[at] = np.floor(rgb[at] * 0.5 + colors[c] * 0.5 + 0.5)
    assert np.abs(blend - want).max() <= 1
    assert (blend[m == 255] == rgb[m == 255]).all() and (blend[m == 0] == rgb[m == 0]).all()
    legend = out[:, w:]
    assert legend.shape[1] > 0
    # Legend swatches: the colours of the classes present, not of pole.
    swatches = {tuple(px) for px in legend.reshape(-1, 3)}
    assert tuple(CLASSES[2].color) in swatches and tuple(CLASSES[1].color) in swatches
    assert tuple(CLASSES[3].color) not in swatches


def test_overlay_without_legend_keeps_the_size_and_checks_it() -> None:
    rgb = np.zeros((5, 7, 3), np.uint8)
    assert overlay(rgb, np.ones((5, 7), np.uint8), CLASSES, show_legend=False).size == (7, 5)
    with pytest.raises(ValueError, match="sizes differ"):
        overlay(rgb, np.ones((5, 6), np.uint8), CLASSES)


def test_colorize_keeps_ids_and_colours() -> None:
    m = np.array([[0, 1], [3, 255]], np.uint8)
    img = colorize(m, CLASSES)
    assert img.mode == "P" and (np.asarray(img) == m).all()
    rgb = np.asarray(img.convert("RGB"))
    assert tuple(rgb[1, 0]) == CLASSES[3].color and tuple(rgb[1, 1]) == (0, 0, 0)
    with pytest.raises(ValueError, match="outside 0..3"):
        colorize(np.array([[4]]), CLASSES)
    assert isinstance(img, Image.Image)
