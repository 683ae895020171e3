"""Metrics from the confusion matrix, against hand-computed and numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segment_deeplab.metrics import (
    ConfusionMatrix,
    background_index,
    image_miou,
    metrics_from_matrix,
)


def _reference(target: np.ndarray, pred: np.ndarray, n: int, ignore: int) -> dict:
    """Per-class metrics by counting pixels directly, without any confusion matrix."""
    keep = target != ignore
    t, p = target[keep], pred[keep]
    out: dict = {"iou": [], "recall": [], "precision": [], "dice": []}
    for c in range(n):
        tp = int(np.sum((t == c) & (p == c)))
        gt, pr = int(np.sum(t == c)), int(np.sum(p == c))
        out["iou"].append(tp / (gt + pr - tp) if gt + pr else None)
        out["recall"].append(tp / gt if gt else None)
        out["precision"].append(tp / pr if pr else None)
        out["dice"].append(2 * tp / (gt + pr) if gt + pr else None)
    kept = [v for v in out["iou"] if v is not None]
    out["miou"] = sum(kept) / len(kept)
    out["pixel_accuracy"] = float(np.mean(t == p))
    out["fwiou"] = sum(np.sum(t == c) / t.size * (out["iou"][c] or 0.0) for c in range(n))
    return out


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) < 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_on_random_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, ignore = 6, 255
    # Classes 0..3 only, so 4 and 5 are absent from both; sprinkle ignore pixels.
    target = rng.integers(0, 4, size=(3, 17, 23))
    pred = rng.integers(0, 4, size=(3, 17, 23))
    target[rng.random(target.shape) < 0.1] = ignore
    cm = ConfusionMatrix(n, ignore)
    for t, p in zip(target, pred, strict=True):  # several updates accumulate
        cm.update(torch.from_numpy(t), torch.from_numpy(p))
    got = cm.compute()
    ref = _reference(target, pred, n, ignore)
    for key in ("iou", "recall", "precision", "dice"):
        assert all(_close(a, b) for a, b in zip(got[key], ref[key], strict=True)), key
    for key in ("miou", "pixel_accuracy", "fwiou"):
        assert _close(got[key], ref[key]), key
    assert got["iou"][4] is None and got["iou"][5] is None
    assert got["pixels"] == int(np.sum(target != ignore))


def test_hand_computed_case() -> None:
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    cm = ConfusionMatrix(4, 255)
    cm.update(target, pred)
    assert cm.numpy().tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    m = cm.compute(["background", "a", "b", "c"])
    # class 0: tp 1, gt 2, pred 1 -> IoU 1/2; class 1: tp 2, gt 2, pred 4 -> 2/4;
    # class 2: tp 0, gt 1, pred 0 -> 0; class 3: absent everywhere -> None.
    assert m["iou"] == [0.5, 0.5, 0.0, None]
    assert m["recall"] == [0.5, 1.0, 0.0, None]
    assert m["precision"] == [1.0, 0.5, None, None]
    assert m["dice"] == pytest.approx([2 / 3, 2 / 3, 0.0, None])
    assert m["miou"] == pytest.approx(1 / 3)  # (0.5 + 0.5 + 0) / 3: class 3 skipped
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["fwiou"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 1 * 0.0) / 5)
    assert m["gt_pixels"] == [2, 2, 1, 0] and m["pred_pixels"] == [1, 4, 0, 0]
    m_fg = cm.compute(["background", "a", "b", "c"], background=0)
    assert m_fg["miou_foreground"] == pytest.approx(0.25)  # (0.5 + 0) / 2


def test_empty_matrix_gives_none_not_nan() -> None:
    cm = ConfusionMatrix(3, 255)
    cm.update(torch.full((4, 4), 255), torch.zeros(4, 4, dtype=torch.long))
    m = cm.compute()
    assert m["miou"] is None and m["pixel_accuracy"] is None and m["fwiou"] is None
    assert m["iou"] == [None, None, None]
    assert ConfusionMatrix(2).compute()["miou"] is None


def test_class_only_predicted_counts_as_zero() -> None:
    # Predicted but never in ground truth: IoU 0 (a false positive), not "n/a".
    m = metrics_from_matrix(np.array([[3, 1], [0, 0]]))
    assert m["iou"] == [0.75, 0.0] and m["recall"] == [0.75, None]
    assert m["miou"] == pytest.approx(0.375)


def test_out_of_range_prediction_is_an_error() -> None:
    cm = ConfusionMatrix(2, 255)
    with pytest.raises(ValueError, match="0..1"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 2]))


def test_reduce_without_distributed_is_a_noop() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.reduce_from_all_processes()
    assert cm.numpy().tolist() == [[1, 0], [0, 1]]


def test_image_miou_and_background() -> None:
    t = torch.tensor([[0, 1], [1, 255]])
    assert image_miou(t, torch.tensor([[0, 1], [0, 0]]), 3) == pytest.approx((0.5 + 0.5) / 2)
    assert image_miou(torch.full((2, 2), 255), torch.zeros(2, 2, dtype=torch.long), 3) is None
    assert background_index(["Background", "x"]) == 0
    assert background_index(["sky", "road"]) is None
    assert background_index(["sky", "road"], flag=1) == 1


@pytest.mark.parametrize(
    ("ignore", "dtype"),
    [(255, torch.uint8), (255, torch.int64), (0, torch.int64), (-1, torch.int32)],
)
def test_count_matches_direct_counting_on_odd_labels(ignore: int, dtype: torch.dtype) -> None:
    """Ignore pixels, labels outside the classes (negative or large) and stray
    predictions on such pixels count nowhere; the inputs are left as they were."""
    rng = np.random.default_rng(3)
    n = 5
    target = rng.integers(0, n, size=(31, 29))
    pred = rng.integers(0, n, size=(31, 29))
    odd = rng.random(target.shape)
    target[odd < 0.1] = ignore
    target[(odd >= 0.1) & (odd < 0.15)] = 7  # not a class
    if dtype != torch.uint8:
        target[(odd >= 0.15) & (odd < 0.2)] = -3
    pred[odd < 0.05] = n + 2  # out of range, but only where there is no ground truth
    t, p = torch.from_numpy(target).to(dtype), torch.from_numpy(pred)
    t_before, p_before = t.clone(), p.clone()
    got = ConfusionMatrix(n, ignore).count(t, p).numpy()
    want = np.zeros((n, n), np.int64)
    for a, b in zip(target.ravel(), pred.ravel(), strict=True):
        if 0 <= a < n and a != ignore:
            want[a, b] += 1
    assert (got == want).all()
    assert torch.equal(t, t_before) and torch.equal(p, p_before)
