"""Detection metrics against independent references: scikit-learn, brute force, anomalib's AUPRO, hand cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from harness.metrics import detection as det


def _data(seed: int, n: int = 4000, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores, 1)
    return labels, scores


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_ap_f1_match_sklearn(seed, ties):
    labels, scores = _data(seed, ties=ties)
    assert det.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert det.average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    assert det.f1_max(labels, scores) == pytest.approx(f1.max(), abs=1e-12)


def test_hand_computed_case():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert det.auroc(labels, scores) == pytest.approx(0.75)
    # thresholds 0.8: P=1 R=.5; 0.4: P=.5 R=.5; 0.35: P=2/3 R=1 -> AP = .5*1 + .5*2/3
    assert det.average_precision(labels, scores) == pytest.approx(0.5 + 1 / 3)
    assert det.f1_max(labels, scores) == pytest.approx(0.8)  # P=2/3, R=1



def _masks_maps(seed: int, n: int = 6, size: int = 32):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, 8, 2)
            masks[i, y:y + h, x:x + w] = True
    maps = rng.random((n, size, size)) + 0.8 * ndimage.gaussian_filter(masks.astype(float), 1.5)
    return masks, np.round(maps, 3)


def _aupro_brute_force(masks, maps, limit=0.3):
    """Threshold by threshold: per-region overlap averaged over regions, FPR over normal pixels."""
    structure = np.ones((3, 3), dtype=bool)
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=structure)
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & normal).sum() / normal.sum()
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    keep = fpr <= limit
    j = np.argmax(~keep)
    x = np.r_[fpr[keep], limit]
    y = np.r_[pro[keep], pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])]
    return np.trapezoid(y, x) / limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed):
    masks, maps = _masks_maps(seed)
    assert det.aupro(masks, maps) == pytest.approx(_aupro_brute_force(masks, maps), abs=1e-10)


def test_aupro_agrees_with_anomalib():
    from anomalib.metrics.aupro import _AUPRO

    masks, maps = _masks_maps(3, n=8, size=48)
    reference = _AUPRO(fpr_limit=0.3)
    reference.update(torch.as_tensor(maps, dtype=torch.float32), torch.as_tensor(masks.astype(np.int64)))
    assert det.aupro(masks, maps) == pytest.approx(float(reference.compute()), abs=2e-3)


def test_aupro_perfect_and_region_weighting():
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, 2:4, 2:4] = True  # a small region (4 px)
    masks[0, 8:16, 8:16] = True  # a large one (64 px)
    perfect = masks.astype(float)
    assert det.aupro(masks, perfect) == pytest.approx(1.0)
    # only the large region found: PRO is 1/2 at FPR 0 however many pixels it has, then rises linearly to
    # (FPR 1, PRO 1) at the next threshold: area to 0.3 = 0.3 * (0.5 + 0.65) / 2, normalised 0.575
    only_large = np.zeros_like(perfect)
    only_large[0, 8:16, 8:16] = 1.0
    assert det.aupro(masks, only_large) == pytest.approx(0.575)


def test_image_score_is_max_of_pooled_map():
    maps = np.zeros((2, 64, 64))
    maps[0, 30, 30] = 441.0  # one hot pixel: the 21x21 mean around it is 1
    maps[1, 10:40, 10:40] = 0.5
    scores = det.image_scores_from_maps(maps)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(0.5)


def test_accuracy_overall_and_per_class():
    overall, per_class = det.accuracy(["a", "a", "b", "c"], ["a", "b", "b", "b"])
    assert overall == pytest.approx(0.5)
    assert per_class == {"a": 0.5, "b": 1.0, "c": 0.0}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one class"):
        det.auroc(np.zeros(5), np.arange(5))
    with pytest.raises(ValueError, match="differ in size"):
        det.auroc(np.array([0, 1]), np.arange(3))
    with pytest.raises(ValueError, match="NaN"):
        det.average_precision(np.array([0, 1]), np.array([0.0, np.nan]))
