"""CutPaste and CutPaste-scar (Li et al., CVPR 2021): a patch of a normal image pasted elsewhere on it."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from harness import GeneratedSample, GenerationRequest, Method
from harness.imaging import affine_patch, color_jitter


class CutPaste(Method):
    name = "cutpaste"
    paper = "Li, Sohn, Yoon, Pfister. CutPaste: Self-Supervised Learning for Anomaly Detection and Localization. CVPR 2021"
    needs = frozenset({"target_normal"})

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        for i, target in enumerate(request.targets):
            rng = request.rng(i)
            variant = self.config["variant"]
            if variant == "both":
                variant = "cutpaste" if rng.random() < 0.5 else "scar"
            paste = self.cut_paste if variant == "cutpaste" else self.scar
            image, mask = paste(rng, target.normal.image)
            yield GeneratedSample.on_target(target, image, mask, request.defect_type, variant=variant)

    def jitter(self, rng: np.random.Generator, patch: np.ndarray) -> np.ndarray:
        j = self.config["color_jitter"]
        return color_jitter(rng, patch, j, j, j, j) if j > 0 else patch

    def cut_paste(self, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A rectangle of area ratio U(area_ratio) and log-uniform aspect ratio, cut, jittered, pasted."""
        h, w = image.shape[:2]
        area = rng.uniform(*self.config["area_ratio"]) * h * w
        r = self.config["aspect_ratio"]
        aspect = math.exp(rng.uniform(math.log(r), math.log(1 / r)))
        ph = int(np.clip(round(math.sqrt(area / aspect)), 1, h - 1))
        pw = int(np.clip(round(math.sqrt(area * aspect)), 1, w - 1))
        y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        patch = self.jitter(rng, image[y0:y0 + ph, x0:x0 + pw])
        ty, tx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        out, mask = image.copy(), np.zeros((h, w), bool)
        out[ty:ty + ph, tx:tx + pw] = patch
        mask[ty:ty + ph, tx:tx + pw] = True
        return out, mask

    def scar(self, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A long thin rectangle (the paper's sizes, scaled), cut, jittered, rotated in [-45, 45] deg, pasted."""
        h, w = image.shape[:2]
        scale = min(h, w) / self.config["reference_size"]
        pw = max(1, round(rng.uniform(*self.config["scar_width"]) * scale))
        ph = max(2, round(rng.uniform(*self.config["scar_height"]) * scale))
        y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
        patch = self.jitter(rng, image[y0:y0 + ph, x0:x0 + pw])
        angle = rng.uniform(-self.config["scar_rotation"], self.config["scar_rotation"])
        patch = affine_patch(patch, angle, 1.0, False, False, cv2.INTER_LINEAR)
        shape = affine_patch(np.ones((ph, pw), bool), angle, 1.0, False, False)
        sh, sw = shape.shape
        ty, tx = rng.integers(0, max(1, h - sh + 1)), rng.integers(0, max(1, w - sw + 1))
        region = shape[:h - ty, :w - tx]
        out, mask = image.copy(), np.zeros((h, w), bool)
        out[ty:ty + region.shape[0], tx:tx + region.shape[1]][region] = patch[:region.shape[0], :region.shape[1]][region]
        mask[ty:ty + region.shape[0], tx:tx + region.shape[1]] = region
        return out, mask
