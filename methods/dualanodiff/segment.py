"""The mask of a generated sample, from its generated anomaly part.

The paper segments the part image with U2-Net (the authors run xuebinqin/U-2-Net's test script on the part
images: input 320 px, per-image min-max normalised output, bilinear back; their segmentation loader thresholds it
at 0.5): `u2net.py`. Its weights (u2net.pth, 173.6 MB, `harness/weights.py`: the torch hub cache or the method's
`mask.u2net_weights`) are the user's to provide; without them the recorded stand-in below segments the part
(`mask.segmenter: auto`), and each sample says which did (`extra.segmenter`).

Stand-in: the part image's background is uniform (mid-grey in training: the anomaly image times its mask, in
[-1, 1]; a generated part's background may be shifted off mid-grey by guidance, as a whole field), so a pixel
belongs to the part where it is far from the background's colour, the part's per-channel median: the distance
max_c |part_c - median_c|, Otsu's threshold on it, a morphological opening (a (2r+1)-px square, r = `opening`),
then connected components smaller than `min_area` of the image dropped. Like U2-Net's saliency, it does not see a
uniform field as an object, whatever its colour, nor a line or dot one pixel wide (a generated part's faint texture
crosses the threshold in such specks: on tray they outlined the image's border).

A part that is near-uniform (no pixel of `min_area` of the image further than `empty_distance` from its background)
has no anomaly to segment; min-max normalisation, as in U2-Net's script, would stretch its noise into a
full-frame mask. Such a part gets an empty mask and is flagged (`extra.part_empty`), so it can be counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from harness import weights
from harness.errors import MethodError

STAND_IN = "stand-in: distance from the part's background colour, Otsu, opening, components >= min_area"
U2NET = "u2net"
SEGMENTERS = ("auto", U2NET, "stand-in")


@dataclass(frozen=True)
class PartMask:
    mask: np.ndarray  # bool (H, W)
    empty: bool  # the part was near-uniform: no anomaly drawn


def distance_from_background(part: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float (H, W): the largest channel distance from the part's background colour, its
    per-channel median (mid-grey for a part drawn as trained)."""
    values = part.astype(np.float64)
    return np.abs(values - np.median(values.reshape(-1, 3), axis=0)).max(axis=2)


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


def segment_part(part: np.ndarray, empty_distance: float = 16.0, min_area: float = 0.001,
                 opening: int = 1) -> PartMask:
    """The stand-in segmenter (module docstring). `min_area` is a fraction of the image's pixels; `opening` a radius
    in pixels (0: none)."""
    distance = distance_from_background(part)
    smallest = max(1, int(round(min_area * distance.size)))
    if near_uniform(part, empty_distance, min_area):
        return PartMask(np.zeros(distance.shape, dtype=bool), empty=True)
    mask = distance > max(otsu_threshold(distance), empty_distance)
    if opening:
        mask = ndimage.binary_opening(mask, structure=np.ones((2 * opening + 1,) * 2, bool))
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= smallest))
    return PartMask(mask, empty=not mask.any())


def near_uniform(part: np.ndarray, empty_distance: float = 16.0, min_area: float = 0.001) -> bool:
    """No `min_area` of the part's pixels are further than `empty_distance` from its background: nothing drawn."""
    distance = distance_from_background(part)
    return int((distance > empty_distance).sum()) < max(1, int(round(min_area * distance.size)))


@dataclass(frozen=True)
class Segmenter:
    name: str  # recorded in each sample's extra.segmenter
    weights: str | None  # the U2-Net file's source and identity, when U2-Net segments
    segment: Callable[[np.ndarray], list[PartMask]]  # uint8 (N, H, W, 3) parts -> their masks


def make_segmenter(mask_config: dict, device: torch.device | str = "cpu") -> Segmenter:
    """U2-Net when its weights are found (`segmenter: auto` or `u2net`; `u2net` without them is an error), else the
    stand-in. A near-uniform part gets an empty, flagged mask either way (U2-Net would stretch its noise)."""
    choice = mask_config.get("segmenter", "auto")
    if choice not in SEGMENTERS:
        raise MethodError(f"dualanodiff: mask.segmenter must be one of {SEGMENTERS}, not {choice!r}")
    empty, area = float(mask_config["empty_distance"]), float(mask_config["min_area"])
    opening = int(mask_config.get("opening", 1))
    found = weights.find(U2NET, mask_config.get("u2net_weights")) if choice != "stand-in" else None
    if found is None:
        if choice == U2NET:
            raise MethodError(f"dualanodiff: mask.segmenter is u2net but {weights.KNOWN[U2NET].filename} is neither in "
                              f"{weights.cache_dir()} nor set as mask.u2net_weights")
        return Segmenter(STAND_IN, None, lambda parts: [segment_part(p, empty, area, opening) for p in parts])
    from .u2net import U2Net, part_mask, saliency

    model = U2Net()
    model.load_state_dict(weights.load_state_dict(found))
    model.to(device)

    def segment(parts: np.ndarray) -> list[PartMask]:
        uniform = [near_uniform(p, empty, area) for p in parts]
        maps = saliency(model, parts[[not u for u in uniform]]) if not all(uniform) else []
        drawn = iter(maps)
        return [PartMask(np.zeros(p.shape[:2], bool), True) if u else _u2net_mask(part_mask(next(drawn)))
                for p, u in zip(parts, uniform)]

    return Segmenter(U2NET, f"{found.describe()} {found.identity()}", segment)


def _u2net_mask(mask: np.ndarray) -> PartMask:
    return PartMask(mask, empty=not mask.any())
