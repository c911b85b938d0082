"""Metrics for samples made on a known normal image (none of the papers report these).

- background_fidelity: how much of the normal image survives outside the defect mask.
  `bg_psnr`: PSNR of the squared error over the pixels outside the mask (all channels), **pooled over the
  samples** (the summed squared error over the summed pixel count): one sample that left its background
  identical (infinite PSNR) cannot dominate a mean of decibels. Capped at 100 dB, which identical backgrounds reach
  and so does any mean squared error below 255² x 1e-10 (uncapped, a nearly identical background would rank above
  an identical one): the record says so (`capped`, `identical`). `bg_lpips`: the per-pixel LPIPS map between sample
  and normal image (lpips' spatial=True), averaged over the pixels outside the mask; at the generated images' size.
- mask_alignment: `mask_iou`, the IoU between the sample's mask and the pixels that changed most: the |mask|
  pixels with the largest change (max over channels of |sample - normal|; ties at the cut included; unchanged
  pixels never count). No fixed threshold: a faint stain (+20/255) in the mask scores as well as a strong one,
  and a change spread over the background scores low however strong it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from harness.data.images import read_image, read_mask
from harness.metrics.lpips_net import LPIPSNet, load_lpips_array

PSNR_CAP = 100.0


@dataclass(frozen=True)
class PairedSample:
    image: Path
    mask: Path
    normal: Path


def squared_error_outside(sample: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """(sum of squared differences, number of values) over the pixels outside the mask, all channels."""
    outside = ~mask
    diff = sample[outside].astype(np.float64) - normal[outside].astype(np.float64)
    return float(np.sum(diff ** 2)), int(diff.size)


def psnr_from_error(squared_error: float, count: int) -> float:
    """PSNR of a summed squared error over `count` uint8 values, capped at PSNR_CAP (an identical image reaches it)."""
    if count == 0:
        return float("nan")
    mse = squared_error / count
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, 10.0 * np.log10(255.0 ** 2 / mse))


def psnr_outside(sample: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> float:
    """PSNR outside the mask of one sample (capped at 100 dB)."""
    return psnr_from_error(*squared_error_outside(sample, normal, mask))


def changed_region(sample: np.ndarray, normal: np.ndarray, k: int) -> np.ndarray:
    """The k pixels that changed most (ties at the k-th value included), among those that changed at all."""
    diff = np.abs(sample.astype(np.int16) - normal.astype(np.int16)).max(axis=2)
    if k <= 0 or not diff.any():
        return np.zeros(diff.shape, dtype=bool)
    cut = np.partition(diff.ravel(), diff.size - k)[diff.size - k]
    return (diff >= cut) & (diff > 0)


def mask_iou(sample: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the mask with the |mask| most-changed pixels; NaN for an empty mask."""
    k = int(mask.sum())
    if k == 0:
        return float("nan")
    changed = changed_region(sample, normal, k)
    return float((changed & mask).sum() / (changed | mask).sum())


def _load(paired: PairedSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sample = read_image(paired.image)
    size = sample.shape[0]
    return sample, read_image(paired.normal, size), read_mask(paired.mask, size)


def paired_metrics(samples: Sequence[PairedSample], net: LPIPSNet | None,
                   batch_size: int = 8) -> dict[str, list[float]]:
    """Per-sample values: bg_psnr, bg_lpips (if a net is given), mask_iou, and bg_error / bg_count (the squared
    error outside the mask and its number of values, for the pooled bg_psnr)."""
    out: dict[str, list[float]] = {"bg_psnr": [], "bg_lpips": [], "mask_iou": [], "bg_error": [], "bg_count": []}
    for start in range(0, len(samples), batch_size):
        loaded = [_load(p) for p in samples[start:start + batch_size]]
        for sample, normal, mask in loaded:
            error, count = squared_error_outside(sample, normal, mask)
            out["bg_error"].append(error)
            out["bg_count"].append(count)
            out["bg_psnr"].append(psnr_from_error(error, count))
            out["mask_iou"].append(mask_iou(sample, normal, mask))
        if net is not None:
            out["bg_lpips"] += _background_lpips(net, loaded)
    if net is None:
        del out["bg_lpips"]
    return out


@torch.no_grad()
def _background_lpips(net: LPIPSNet, loaded: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[float]:
    sizes = {s.shape[:2] for s, _, _ in loaded}
    if len(sizes) > 1:  # different sizes cannot share a batch
        return [v for item in loaded for v in _background_lpips(net, [item])]
    size = sizes.pop()
    samples = torch.stack([load_lpips_array(s, None) for s, _, _ in loaded])
    normals = torch.stack([load_lpips_array(n, None) for _, n, _ in loaded])
    maps = net.spatial_map(net.features(samples), net.features(normals), size).cpu().numpy()
    values = []
    for value_map, (_, _, mask) in zip(maps, loaded):
        outside = ~mask
        values.append(float(value_map[outside].mean()) if outside.any() else float("nan"))
    return values
