"""DRAEM's simulated anomalies (Zavrtanik et al., ICCV 2021): Perlin-noise masks filled with augmented textures."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.data.images import IMAGE_SUFFIXES, read_image, save_image
from .noise import perlin, procedural_texture, rotate

Augmenter = Callable[[np.random.Generator, np.ndarray], np.ndarray]


class Draem(Method):
    name = "draem"
    paper = ("Zavrtanik, Kristan, Skocaj. DRAEM - A Discriminatively Trained Reconstruction Embedding for Surface "
             "Anomaly Detection. ICCV 2021")
    needs = frozenset({"target_normal"})

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        """Choose the anomaly source images (DRAEM uses no training anomalies) and record them."""
        rng = task.rng()
        kind = self.config["source"]
        if kind == "auto":
            kind = "other_categories" if task.other_normals else "procedural"
        if kind == "procedural":
            paths = []  # relative to the work folder, which may move once fit has finished
            for k in range(self.config["n_procedural"]):
                save_image(workdir / "textures" / f"{k:03d}.png", procedural_texture(rng, task.resolution))
                paths.append(f"textures/{k:03d}.png")
        elif kind == "other_categories":
            # relative to the data set's folder (`data:` prefix): the data may move once fit has finished
            data = task.root.parent if task.root else None
            paths = [f"data:{Path(p).relative_to(data).as_posix()}" if data and Path(p).is_relative_to(data) else str(p)
                     for files in task.other_normals.values() for p in files]
        elif kind == "folder":
            folder = Path(self.config["source_path"] or "")
            paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise ValueError(f"draem: unknown source {kind!r} (auto, other_categories, procedural, folder)")
        if not paths:
            raise ValueError(f"draem: no anomaly source images for source {kind!r} ({self.config['source_path'] or 'no other categories'})")
        if len(paths) > self.config["max_sources"]:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), self.config["max_sources"], replace=False))]
        (workdir / "sources.json").write_text(json.dumps({"kind": kind, "paths": paths}, indent=2))

    @staticmethod
    def _source(entry: str, workdir: Path, request: GenerationRequest) -> Path:
        """A recorded anomaly source: `data:` paths lie in the data set's folder, others in the work folder (absolute
        paths stay absolute)."""
        if entry.startswith("data:"):
            if request.root is None:
                raise ValueError("draem: the anomaly sources lie in the data set, but the request names no data folder")
            return request.root.parent / entry[len("data:"):]
        return workdir / entry

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        sources = json.loads((workdir / "sources.json").read_text())["paths"]
        for i, target in enumerate(request.targets):
            rng = request.rng(i)
            image = target.normal.image
            region = target.normal_foreground if self.config["foreground_only"] else np.ones(image.shape[:2], bool)
            mask = self.anomaly_mask(rng, image.shape[:2], region)
            source_path = self._source(sources[rng.integers(len(sources))], workdir, request)
            texture = self.augment(rng, read_image(source_path, None))
            texture = cv2.resize(texture, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
            beta = rng.uniform(*self.config["beta"])
            m = mask[..., None].astype(np.float32)
            out = image * (1 - m) + (1 - beta) * texture * m + beta * image * m
            yield GeneratedSample.on_target(target, np.clip(np.round(out), 0, 255).astype(np.uint8), mask,
                                            request.defect_type, beta=round(float(beta), 4), source=source_path.name)

    def anomaly_mask(self, rng: np.random.Generator, shape: tuple[int, int], region: np.ndarray) -> np.ndarray:
        """Perlin noise at scales (2^kx, 2^ky), rotated, thresholded; redrawn until it hits the allowed region."""
        low, high = self.config["perlin_scale"]
        for _ in range(100):
            scale = (2 ** int(rng.integers(low, high)), 2 ** int(rng.integers(low, high)))
            noise = rotate(perlin(rng, shape, scale), rng.uniform(-self.config["rotation"], self.config["rotation"]))
            mask = (noise > self.config["threshold"]) & region
            if mask.sum() >= 4:
                return mask
        raise RuntimeError("draem: could not draw a non-empty Perlin mask on the foreground in 100 tries")

    def augment(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """Three of DRAEM's ten augmentations, drawn without replacement, applied in the drawn order."""
        for k in rng.choice(len(AUGMENTERS), self.config["n_augmenters"], replace=False):
            image = AUGMENTERS[k](rng, image)
        return image


# DRAEM's augmenter list (imgaug in the paper's code), re-expressed with PIL / OpenCV.
def _gamma_contrast(rng, image):  # GammaContrast((0.5, 2.0), per_channel=True)
    gamma = rng.uniform(0.5, 2.0, 3)
    return np.clip(255.0 * (image / 255.0) ** gamma, 0, 255).astype(np.uint8)


def _brightness(rng, image):  # MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)), on luma
    ycc = np.asarray(Image.fromarray(image).convert("YCbCr")).astype(np.float32)
    ycc[..., 0] = ycc[..., 0] * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return np.asarray(Image.fromarray(np.clip(ycc, 0, 255).astype(np.uint8), "YCbCr").convert("RGB"))


def _sharpness(rng, image):  # pillike.EnhanceSharpness(factor=(0.0, 2.0))
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(rng, image):  # AddToHueAndSaturation((-50, 50), per_channel=True)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + rng.integers(-50, 51)) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + rng.integers(-50, 51), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


def _solarize(rng, image):  # Solarize(0.5, threshold=(32, 128))
    if rng.random() < 0.5:
        return image
    threshold = rng.uniform(32, 128)
    return np.where(image > threshold, 255 - image, image).astype(np.uint8)


def _posterize(rng, image):  # Posterize(nb_bits=(1, 8))
    return np.asarray(ImageOps.posterize(Image.fromarray(image), int(rng.integers(1, 9))))


def _invert(rng, image):  # Invert()
    return (255 - image).astype(np.uint8)


def _autocontrast(rng, image):  # pillike.Autocontrast(cutoff=(0, 20))
    return np.asarray(ImageOps.autocontrast(Image.fromarray(image), cutoff=float(rng.uniform(0, 20))))


def _equalize(rng, image):  # pillike.Equalize()
    return np.asarray(ImageOps.equalize(Image.fromarray(image)))


def _rotate(rng, image):  # Affine(rotate=(-45, 45))
    return rotate(image, rng.uniform(-45, 45))


AUGMENTERS: list[Augmenter] = [_gamma_contrast, _brightness, _sharpness, _hue_saturation, _solarize, _posterize,
                               _invert, _autocontrast, _equalize, _rotate]
