"""MVTec LOCO AD's localisation metric: sPRO (saturated per-region overlap) and its area up to an FPR limit.

As MVTec's evaluation code for MVTec LOCO AD computes it (read from the code it distributes; facts only, nothing
copied):
- a region is one ground-truth mask file of a test image (not a connected component); its defect type's entry in
  the category's `defects_config.json` (matched by the mask's pixel value) gives its saturation area:
  `saturation_threshold` pixels, at most the region's area, or with `relative_saturation` int(threshold x area);
- at a threshold t a region's sPRO is min(#region pixels scoring above t / saturation area, 1); the curve's y is
  the mean over every region of the images, its x the false positive rate over every pixel outside the union of its
  image's regions (defect-free images whole), pooled over the images;
- AU-sPRO: the trapezoid under the curve from FPR 0 to the limit (interpolated there), divided by the limit;
  0.05 is the limit MVTec LOCO's results report (their code also gives 0.01, 0.1, 0.3, 1);
- per category logical and structural anomalies are evaluated separately (each with every defect-free test
  image) and the category's value is the mean of the two.

Exact here: one curve point per distinct score (the official code starts from 50 thresholds and refines them until
neighbouring points lie within 0.01 of each other). In descending score order every pixel of a region among its
first floor(saturation) pixels adds 1 / (saturation x #regions) to the mean sPRO (a fractional saturation area's
next pixel adds the rest up to 1 / #regions), and every defect-free pixel adds 1 / #defect-free pixels to the FPR;
the curve is read at the end of each group of equal scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.metrics.detection import partial_area

SPRO_FPR_LIMIT = 0.05


@dataclass(frozen=True)
class Region:
    """One ground-truth region: which test image it belongs to, its pixels (H, W) bool, its saturation area."""

    image: int
    mask: np.ndarray
    saturation: float  # pixels; fractional where an absolute area was scaled to the working resolution


def saturation_area(area: int, threshold: float, relative: bool) -> float:
    """The official rule: a fraction of the region (truncated to whole pixels) or a pixel count capped at its area
    (not truncated: the official np.minimum keeps a scaled, fractional count as it is)."""
    return int(threshold * area) if relative else min(threshold, area)


def _check(maps: np.ndarray, regions: list[Region]) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"anomaly maps must be (N, H, W), not {maps.shape}")
    if not regions:
        raise ValueError("sPRO needs at least one ground-truth region")
    for region in regions:
        if region.mask.shape != maps.shape[1:]:
            raise ValueError(f"a region of image {region.image} is {region.mask.shape}, the maps {maps.shape[1:]}")
        if region.saturation < 1:
            raise ValueError(f"a region of image {region.image} has a saturation area of {region.saturation} "
                             "pixels (a relative threshold times a tiny region truncates to 0)")
    if not np.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    return maps


def _defect_free(maps: np.ndarray, regions: list[Region]) -> np.ndarray:
    free = np.ones(maps.shape, dtype=bool)
    for region in regions:
        free[region.image] &= ~region.mask
    if not free.any():
        raise ValueError("sPRO's false positive rate needs defect-free pixels")
    return free


def spro_curve(maps: np.ndarray, regions: list[Region]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, mean sPRO) at every distinct score, from (0, 0) to (1, 1), FPR non-decreasing."""
    maps = _check(maps, regions)
    free = _defect_free(maps, regions)
    scores = [maps[free]]
    fpr_weights = [np.full(int(free.sum()), 1.0 / free.sum())]
    spro_weights = [np.zeros(int(free.sum()))]
    for region in regions:
        inside = np.sort(maps[region.image][region.mask])[::-1]
        counted = np.zeros(inside.size)
        whole = int(region.saturation)
        counted[:whole] = 1.0 / (region.saturation * len(regions))
        if whole < inside.size:  # the pixel that passes a fractional saturation area brings the region to 1
            counted[whole] = (region.saturation - whole) / (region.saturation * len(regions))
        scores.append(inside)
        fpr_weights.append(np.zeros(inside.size))
        spro_weights.append(counted)
    scores, fpr_weights, spro_weights = (np.concatenate(a) for a in (scores, fpr_weights, spro_weights))
    # descending scores; within equal scores each region's own order is kept (its saturated pixels first), which
    # does not matter at the group ends where the curve is read
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    fpr, spro = np.cumsum(fpr_weights[order]), np.cumsum(spro_weights[order])
    ends = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    return np.r_[0.0, _at_most_one(fpr[ends])], np.r_[0.0, _at_most_one(spro[ends])]


def _at_most_one(curve: np.ndarray) -> np.ndarray:
    """A cumulative sum of fractions, with 1 where rounding left it a hair above or below (fractional areas)."""
    return np.where(np.abs(curve - 1.0) < 1e-12, 1.0, np.minimum(curve, 1.0))


def spro_at(maps: np.ndarray, regions: list[Region], threshold: float) -> tuple[float, float]:
    """(FPR, mean sPRO) at one threshold, straight from the definition (scores strictly above it): the reference
    the exact curve is tested against."""
    maps = _check(maps, regions)
    free = _defect_free(maps, regions)
    above = maps > threshold
    fpr = (above & free).sum() / free.sum()
    spro = np.mean([min((above[r.image] & r.mask).sum() / r.saturation, 1.0) for r in regions])
    return float(fpr), float(spro)


def area_under(fpr: np.ndarray, spro: np.ndarray, fpr_limit: float = SPRO_FPR_LIMIT) -> float:
    """Trapezoidal area under the curve for FPR in [0, limit] (the curve interpolated at the limit), / limit."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"the FPR limit must lie in (0, 1], not {fpr_limit}")
    return partial_area(fpr, spro, fpr_limit) / fpr_limit


def au_spro(maps: np.ndarray, regions: list[Region], fpr_limit: float = SPRO_FPR_LIMIT) -> float:
    return area_under(*spro_curve(maps, regions), fpr_limit)
