"""The mask of a generated sample, from its generated anomaly part.

The paper segments the part image with U2-Net (the authors run xuebinqin/U-2-Net's test script on the part
images: input 320 px, per-image min-max normalised output, bilinear back; their segmentation loader thresholds it
at 0.5). Its architecture and weights (u2net.pth, 173.6 MB) are not part of DefectBench yet, so every profile uses
the recorded stand-in below, and each sample says so (`extra.segmenter`).

Stand-in: the part image's background is mid-grey (the anomaly image times its mask, in [-1, 1]), so a pixel
belongs to the part where it is far from mid-grey: the distance max_c |part_c - 127.5|, Otsu's threshold on it,
then connected components smaller than `min_area` of the image dropped.

A part that is near-uniform (no pixel of `min_area` of the image further than `empty_distance` from mid-grey)
has no anomaly to segment; min-max normalisation, as in U2-Net's script, would stretch its noise into a
full-frame mask. Such a part gets an empty mask and is flagged (`extra.part_empty`), so it can be counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

STAND_IN = "stand-in: distance from mid-grey, Otsu, components >= min_area"


@dataclass(frozen=True)
class PartMask:
    mask: np.ndarray  # bool (H, W)
    empty: bool  # the part was near-uniform: no anomaly drawn


def distance_from_grey(part: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float (H, W): the largest channel distance from mid-grey (0 .. 127.5)."""
    return np.abs(part.astype(np.float64) - 127.5).max(axis=2)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of a histogram of `values` (Otsu, 1979); values
    strictly above it are the foreground."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def segment_part(part: np.ndarray, empty_distance: float = 16.0, min_area: float = 0.001) -> PartMask:
    """The stand-in segmenter (module docstring). `min_area` is a fraction of the image's pixels."""
    distance = distance_from_grey(part)
    smallest = max(1, int(round(min_area * distance.size)))
    if int((distance > empty_distance).sum()) < smallest:
        return PartMask(np.zeros(distance.shape, dtype=bool), empty=True)
    mask = distance > max(otsu_threshold(distance), empty_distance)
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= smallest))
    return PartMask(mask, empty=not mask.any())
