"""Metrics for samples made on a known normal image (none of the papers report these).

- background_fidelity: how much of the normal image survives outside the defect mask.
  `bg_psnr`: PSNR over the pixels outside the mask (all channels), capped at 100 dB (identical backgrounds);
  `bg_lpips`: the per-pixel LPIPS map between sample and normal image (lpips' spatial=True), averaged over
  the pixels outside the mask; computed at the generated images' resolution.
- mask_alignment: `mask_iou`, the IoU between the sample's mask and where the sample differs from its normal
  image (max over channels of |sample - normal| above `threshold` of the 0..255 range).
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
DIFF_THRESHOLD = 0.1


@dataclass(frozen=True)
class PairedSample:
    image: Path
    mask: Path
    normal: Path


def psnr_outside(sample: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> float:
    outside = ~mask
    if not outside.any():
        return float("nan")
    diff = sample[outside].astype(np.float64) - normal[outside].astype(np.float64)
    mse = float(np.mean(diff ** 2))
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, 10.0 * np.log10(255.0 ** 2 / mse))


def changed_region(sample: np.ndarray, normal: np.ndarray, threshold: float = DIFF_THRESHOLD) -> np.ndarray:
    return np.abs(sample.astype(np.int16) - normal.astype(np.int16)).max(axis=2) > threshold * 255


def mask_iou(sample: np.ndarray, normal: np.ndarray, mask: np.ndarray, threshold: float = DIFF_THRESHOLD) -> float:
    changed = changed_region(sample, normal, threshold)
    union = (changed | mask).sum()
    return float((changed & mask).sum() / union) if union else float("nan")


def _load(paired: PairedSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sample = read_image(paired.image)
    size = sample.shape[0]
    return sample, read_image(paired.normal, size), read_mask(paired.mask, size)


def paired_metrics(samples: Sequence[PairedSample], net: LPIPSNet | None, threshold: float = DIFF_THRESHOLD,
                   batch_size: int = 8) -> dict[str, list[float]]:
    """Per-sample bg_psnr, bg_lpips (if a net is given) and mask_iou."""
    out: dict[str, list[float]] = {"bg_psnr": [], "bg_lpips": [], "mask_iou": []}
    for start in range(0, len(samples), batch_size):
        loaded = [_load(p) for p in samples[start:start + batch_size]]
        for sample, normal, mask in loaded:
            out["bg_psnr"].append(psnr_outside(sample, normal, mask))
            out["mask_iou"].append(mask_iou(sample, normal, mask, threshold))
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
