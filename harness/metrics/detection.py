"""Detection and localisation metrics: image / pixel AUROC, AP, F1-max, AUPRO, classification accuracy.

Everything is exact (no score binning): a curve has one point per distinct score. Scores and labels may be
large (every pixel of every test image), so the curves are computed from one stable sort in NumPy.

- AUROC: trapezoidal area under the ROC curve through (0, 0) (as scikit-learn's `roc_auc_score`).
- AP: step-wise average precision, sum over thresholds of (R_k - R_{k-1}) P_k (as `average_precision_score`).
- F1-max: the largest F1 over every threshold of the precision-recall curve.
- AUPRO: the per-region overlap (mean over connected ground-truth regions, 8-connectivity, of the fraction of the
  region above the threshold) against the false positive rate on normal pixels, integrated up to FPR 0.3 and
  divided by 0.3 (Bergmann et al., MVTec AD). Exact: every pixel of a region adds 1 / (|region| x #regions) to
  the overlap once the threshold passes it, every normal pixel adds 1 / #normal to the FPR.

The published evaluation (`*_compat` metrics): what AnomalyDiffusion's and DualAnoDiff's test-localization.py
compute, their quirks included (read from their code; transcribed independently in the tests):
- image score = max of the 21 x 21 average-pooled map with the zero padding counted (torch's default
  count_include_pad=True), so a defect at the border scores lower than ours (padding excluded);
- ground truth: the mask resized to the evaluation size as uint8 with bilinear interpolation (cv2), then
  truncated to integers after dividing by 255, so only fully covered pixels (255) are defect pixels for AUROC,
  AP and F1; AUPRO's regions are every non-zero pixel, and its normal pixels those that are exactly zero;
- pixel F1-max over the 21 thresholds np.arange(0, 1.001, 0.05) applied to the raw map with `>`, precision and
  recall with an epsilon of 1e-8;
- AUPRO as MVTec 3D-AD's calculate_au_pro: 100 thresholds at evenly spaced ranks of the sorted normal-pixel
  scores, overlap = share of a region's scores strictly above the threshold, (1, 1) added, trapezoid to FPR 0.3
  with interpolation there, divided by 0.3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

COMPAT_THRESHOLDS = np.arange(0.0, 1.0 + 1e-3, 0.05)  # as printed in their code: 0.15000000000000002, ...
COMPAT_AUPRO_THRESHOLDS = 100
AUPRO_FPR_LIMIT = 0.3


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.size}) and scores ({scores.size}) differ in size")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if labels.all() or not labels.any():
        raise ValueError("labels hold only one class; AUROC, AP and F1 need both normal and anomalous samples")
    return labels, scores


@dataclass(frozen=True)
class Curve:
    """Cumulative true / false positives at each distinct score, highest score first."""

    tps: np.ndarray
    fps: np.ndarray
    thresholds: np.ndarray

    @property
    def positives(self) -> int:
        return int(self.tps[-1])

    @property
    def negatives(self) -> int:
        return int(self.fps[-1])


def curve(labels: np.ndarray, scores: np.ndarray) -> Curve:
    labels, scores = _check(labels, scores)
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels, dtype=np.int64)[last_of_value]
    fps = (last_of_value + 1) - tps
    return Curve(tps, fps, scores[last_of_value])


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    c = curve(labels, scores)
    tpr = np.r_[0.0, c.tps / c.positives]
    fpr = np.r_[0.0, c.fps / c.negatives]
    return float(np.trapezoid(tpr, fpr))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    c = curve(labels, scores)
    precision = c.tps / (c.tps + c.fps)
    recall = c.tps / c.positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    c = curve(labels, scores)
    precision = c.tps / (c.tps + c.fps)
    recall = c.tps / c.positives
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def f1_max_compat(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray = COMPAT_THRESHOLDS) -> float:
    """The published pixel F1-max: the largest F1 over fixed thresholds applied with `>` to the raw scores,
    precision = TP / (P + 1e-8), recall = TP / (T + 1e-8), F1 = 2PR / (P + R + 1e-8)."""
    labels, scores = _check(labels, scores)
    positives = np.count_nonzero(labels)
    best = -math.inf
    for t in thresholds:
        predicted = scores > t
        tp = np.count_nonzero(predicted & labels)
        precision = tp / (np.count_nonzero(predicted) + 1e-8)
        recall = tp / (positives + 1e-8)
        best = max(best, 2 * precision * recall / (precision + recall + 1e-8))
    return float(best)


def region_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions (8-connectivity), numbered across all images: (labels, count)."""
    out = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    structure = np.ones((3, 3), dtype=bool)
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=structure)
        out[i] = np.where(labelled > 0, labelled + count, 0)
        count += n
    return out, count


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`. masks: (N, H, W) bool; maps: (N, H, W) scores."""
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    _check(masks, maps)
    regions, n_regions = region_labels(masks)
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1).astype(np.float64)
    flat_regions = regions.ravel()
    weights = np.where(flat_regions > 0, 1.0 / (sizes[flat_regions] * n_regions), 0.0)
    normal = ~masks.ravel()
    scores = maps.ravel()
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    pro = np.r_[0.0, np.cumsum(weights[order])[last_of_value]]
    fpr = np.r_[0.0, np.cumsum(normal[order])[last_of_value] / normal.sum()]
    return partial_area(fpr, pro, fpr_limit) / fpr_limit


def partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under y(x) for x in [0, limit], interpolating y linearly at the limit."""
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs[-1] < limit and inside.sum() < x.size:
        j = int(np.argmax(~inside))  # first point beyond the limit
        y_limit = y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1])
        xs, ys = np.r_[xs, limit], np.r_[ys, y_limit]
    return float(np.trapezoid(ys, xs))


def aupro_compat(levels: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT,
                 num_thresholds: int = COMPAT_AUPRO_THRESHOLDS) -> float:
    """The published AUPRO (MVTec 3D-AD's calculate_au_pro): levels (N, H, W) ground truth, any non-zero value a
    defect pixel; maps (N, H, W). Thresholds at evenly spaced ranks of the sorted normal-pixel scores."""
    levels, maps = np.asarray(levels), np.asarray(maps, dtype=np.float64)
    regions, n_regions = region_labels(levels != 0)
    flat, scores = regions.ravel(), maps.ravel()
    normal = np.sort(scores[flat == 0])
    if n_regions == 0 or normal.size == 0:
        raise ValueError("AUPRO needs defect regions and normal pixels")
    order = np.lexsort((scores, flat))  # by region, then by score: each region's scores sorted, in one pass
    bounds = np.cumsum(np.bincount(flat, minlength=n_regions + 1))
    region_scores = [scores[order[bounds[r - 1]:bounds[r]]] for r in range(1, n_regions + 1)]
    ranks = np.linspace(0, normal.size - 1, num=num_thresholds, dtype=int)
    fpr, pro = [1.0], [1.0]
    for rank in ranks:
        threshold = normal[rank]
        fpr.append(1.0 - (rank + 1) / normal.size)
        pro.append(float(np.mean([1.0 - np.searchsorted(s, threshold, side="right") / s.size for s in region_scores])))
    fpr, pro = np.array(fpr[::-1]), np.array(pro[::-1])
    finite = np.isfinite(fpr) & np.isfinite(pro)
    return partial_area(fpr[finite], pro[finite], fpr_limit) / fpr_limit


def image_scores_from_maps(maps: np.ndarray, kernel: int = 21, count_include_pad: bool = False) -> np.ndarray:
    """Image score = max of the kernel x kernel average-pooled map (DRAEM's rule). Ours leaves the zero padding
    out of the border windows' means; count_include_pad=True is the published code (torch's default)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
    pooled = F.avg_pool2d(tensor, kernel, stride=1, padding=kernel // 2, count_include_pad=count_include_pad)
    return pooled.amax(dim=(1, 2, 3)).numpy().astype(np.float64)


def detection_metrics(image_labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray,
                      maps: np.ndarray) -> dict[str, float]:
    """Every image- and pixel-level metric of one test set (masks, maps: (N, H, W))."""
    out = {"image_auroc": auroc(image_labels, image_scores), "image_ap": average_precision(image_labels, image_scores),
           "image_f1max": f1_max(image_labels, image_scores)}
    out.update({"pixel_auroc": auroc(masks, maps), "pixel_ap": average_precision(masks, maps),
                "pixel_f1max": f1_max(masks, maps), "pixel_aupro": aupro(masks, maps)})
    return out


def compat_metrics(image_labels: np.ndarray, image_scores: np.ndarray, levels: np.ndarray | None,
                   maps: np.ndarray) -> dict[str, float]:
    """The published evaluation's metrics (see the module docstring): `image_scores` as the published code makes
    them, `levels` the uint8 (N, H, W) ground truth resized as the published loader does (None: image level only)."""
    out = {"image_auroc_compat": auroc(image_labels, image_scores),
           "image_ap_compat": average_precision(image_labels, image_scores),
           "image_f1max_compat": f1_max(image_labels, image_scores)}
    if levels is not None:
        full = levels == 255
        out.update({"pixel_auroc_compat": auroc(full, maps), "pixel_ap_compat": average_precision(full, maps),
                    "pixel_f1max_compat": f1_max_compat(full, maps), "pixel_aupro_compat": aupro_compat(levels, maps)})
    return out


def accuracy(true: list[str] | np.ndarray, predicted: list[str] | np.ndarray) -> tuple[float, dict[str, float]]:
    """Accuracy over the whole set, and per true class."""
    true, predicted = np.asarray(true), np.asarray(predicted)
    if true.shape != predicted.shape or true.size == 0:
        raise ValueError(f"need as many predictions as labels, and at least one (got {predicted.size}, {true.size})")
    correct = true == predicted
    per_class = {str(c): float(correct[true == c].mean()) for c in sorted(set(true.tolist()))}
    return float(correct.mean()), per_class
