"""Crop-and-paste: a real training defect, cut out by its mask, pasted onto a normal image's foreground."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.data.images import read_image, read_mask, save_image, save_mask
from harness.imaging import affine_patch, alpha_blend, bounding_box, feather, find_placement, place_patch


class CropPaste(Method):
    name = "croppaste"
    paper = "Crop-and-paste augmentation of real defects (baseline; cf. the copy-paste baselines of DFMGAN and AnomalyDiffusion)"
    needs = frozenset({"target_normal"})

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        """Cut every training defect out by its mask's bounding box (plus context) and store the crops."""
        crops = []
        for k, anomaly in enumerate(task.anomalies):
            box = bounding_box(anomaly.mask)
            if box is None:
                continue
            c = self.config["context"]
            y0, y1 = max(0, box[0] - c), min(anomaly.mask.shape[0], box[1] + c)
            x0, x1 = max(0, box[2] - c), min(anomaly.mask.shape[1], box[3] + c)
            save_image(workdir / "crops" / f"{k:03d}.png", anomaly.image[y0:y1, x0:x1])
            save_mask(workdir / "crops" / f"{k:03d}_mask.png", anomaly.mask[y0:y1, x0:x1])
            crops.append({"file": f"{k:03d}", "source": anomaly.id, "defect_type": anomaly.defect_type})
        (workdir / "crops.json").write_text(json.dumps(crops, indent=2))

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        crops = [c for c in json.loads((workdir / "crops.json").read_text()) if c["defect_type"] == request.defect_type]
        if not crops:
            raise ValueError(f"no training crops of defect type {request.defect_type!r} in {workdir}")
        for i, target in enumerate(request.targets):
            rng = request.rng(i)
            crop = crops[rng.integers(len(crops))]
            patch = read_image(workdir / "crops" / f"{crop['file']}.png")
            patch_mask = read_mask(workdir / "crops" / f"{crop['file']}_mask.png")
            image, mask = self.paste(rng, target.normal.image, target.normal_foreground, patch, patch_mask)
            sample = GeneratedSample.on_target(target, image, mask, request.defect_type, crop=crop["source"])
            sample.mask_id = crop["source"]
            yield sample

    def paste(self, rng: np.random.Generator, image: np.ndarray, foreground: np.ndarray, patch: np.ndarray,
              patch_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angle = rng.uniform(-self.config["max_rotation"], self.config["max_rotation"])
        scale = rng.uniform(*self.config["scale"])
        flip_h, flip_v = (bool(rng.random() < 0.5), bool(rng.random() < 0.5)) if self.config["flip"] else (False, False)
        patch = affine_patch(patch, angle, scale, flip_h, flip_v, cv2.INTER_LINEAR)
        patch_mask = affine_patch(patch_mask, angle, scale, flip_h, flip_v)
        patch, patch_mask = _fit(patch, patch_mask, image.shape[:2])
        top, left = find_placement(rng, patch_mask, foreground)
        mask = place_patch(image.shape[:2], patch_mask, top, left) & foreground
        if not mask.any():
            mask = place_patch(image.shape[:2], patch_mask, top, left)
        source = _place_image(image, patch, top, left)
        if self.config["blend"] == "poisson":
            return _poisson(image, source, mask), mask
        return alpha_blend(image, source, feather(mask, self.config["feather_sigma"]) * _support(image, patch, top, left)), mask


def _fit(patch: np.ndarray, mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Shrink a crop that would not fit on the image."""
    factor = min(1.0, 0.95 * shape[0] / patch.shape[0], 0.95 * shape[1] / patch.shape[1])
    if factor >= 1.0:
        return patch, mask
    size = (max(1, int(patch.shape[1] * factor)), max(1, int(patch.shape[0] * factor)))
    return (cv2.resize(patch, size, interpolation=cv2.INTER_AREA),
            cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool))


def _place_image(image: np.ndarray, patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """A copy of `image` with `patch` written at (top, left), clipped to the image."""
    out = image.copy()
    h, w = image.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + patch.shape[0], h), min(left + patch.shape[1], w)
    out[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def _support(image: np.ndarray, patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """1 where the (clipped) patch covers the image, so the feathered edge never reaches past the crop."""
    return place_patch(image.shape[:2], np.ones(patch.shape[:2], bool), top, left).astype(np.float32)


def _poisson(image: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """OpenCV seamless cloning of `source` into `image` over the (slightly dilated) mask."""
    region = cv2.dilate(mask.astype(np.uint8) * 255, np.ones((5, 5), np.uint8))
    region[[0, -1], :], region[:, [0, -1]] = 0, 0  # the cloned region must stay off the image border
    x, y, w, h = cv2.boundingRect(region)
    if w < 3 or h < 3:
        return alpha_blend(image, source, feather(mask, 1.0))
    # OpenCV puts the region's bounding box at centre - size // 2, i.e. exactly where it is in `source`.
    return cv2.seamlessClone(source, image, region, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
