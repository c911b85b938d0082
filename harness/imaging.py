"""Image operations shared by the harness and the methods: foreground, mask placement, jitter, blending.

Images are uint8 (H, W, 3) unless stated; masks are boolean (H, W). Randomness always comes from an explicit
`np.random.Generator`, so every result is reproducible from a seed.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage

MIN_FOREGROUND_FRACTION = 0.01
TEXTURE_FOREGROUND_FRACTION = 0.85


def estimate_foreground(image: np.ndarray, texture: bool | None = None) -> np.ndarray:
    """Where an object is: pixels far (Otsu threshold) from the median border colour, cleaned up.

    Textures (texture=True) are foreground everywhere. With texture=None the estimate decides: an image whose
    "object" covers almost all of it, or almost none, is treated as a texture.
    """
    h, w = image.shape[:2]
    everywhere = np.ones((h, w), dtype=bool)
    if texture:
        return everywhere
    b = max(2, min(h, w) // 32)
    border = np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
                             image[:, :b].reshape(-1, 3), image[:, -b:].reshape(-1, 3)]).astype(np.float32)
    distance = np.linalg.norm(image.astype(np.float32) - np.median(border, axis=0), axis=2)
    distance = ndimage.gaussian_filter(distance, 1.0)
    scaled = np.clip(distance * (255.0 / max(distance.max(), 1e-6)), 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(otsu * distance.max() / 255.0, 12.0)  # at least some absolute contrast
    fg = ndimage.binary_closing(ndimage.binary_opening(distance > threshold), iterations=2)
    fg = _keep_large_components(fg, 0.01 * h * w)
    fg = _fill_small_holes(fg, 0.005 * h * w)
    fraction = fg.mean()
    if fraction < MIN_FOREGROUND_FRACTION or (texture is None and fraction > TEXTURE_FOREGROUND_FRACTION):
        return everywhere
    return fg


def _keep_large_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    areas = ndimage.sum(mask, labels, range(1, count + 1))
    keep = [i + 1 for i, a in enumerate(areas) if a >= min_area] or [int(np.argmax(areas)) + 1]
    return np.isin(labels, keep)


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    holes, count = ndimage.label(~mask)
    if count == 0:
        return mask
    areas = ndimage.sum(~mask, holes, range(1, count + 1))
    border_labels = set(np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])))
    fill = [i + 1 for i, a in enumerate(areas) if a <= max_area and (i + 1) not in border_labels]
    return mask | np.isin(holes, fill)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end-exclusive, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def affine_patch(patch: np.ndarray, angle_deg: float, scale: float, flip_h: bool, flip_v: bool,
                 interpolation: int = cv2.INTER_NEAREST) -> np.ndarray:
    """Flip, rotate and scale a patch (mask or image) about its centre, on a canvas large enough to hold it."""
    if flip_h:
        patch = patch[:, ::-1]
    if flip_v:
        patch = patch[::-1]
    h, w = patch.shape[:2]
    side = int(np.ceil(np.hypot(h, w) * max(scale, 1.0))) + 2
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle_deg, scale)
    matrix[:, 2] += (side / 2 - w / 2, side / 2 - h / 2)
    src = np.ascontiguousarray(patch.astype(np.uint8) if patch.dtype == bool else patch)
    out = cv2.warpAffine(src, matrix, (side, side), flags=interpolation, borderValue=0)
    return out.astype(bool) if patch.dtype == bool else out


def place_patch(canvas_shape: tuple[int, int], patch_mask: np.ndarray, top: int, left: int) -> np.ndarray:
    """A full-size mask holding `patch_mask` with its top-left corner at (top, left), clipped to the canvas."""
    out = np.zeros(canvas_shape, dtype=bool)
    h, w = patch_mask.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, canvas_shape[0]), min(left + w, canvas_shape[1])
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = patch_mask[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def find_placement(rng: np.random.Generator, patch_mask: np.ndarray, foreground: np.ndarray,
                   tries: int = 60, min_inside: float = 0.98) -> tuple[int, int]:
    """A random top-left position for `patch_mask` so that (nearly) all of it lies on `foreground`.

    Falls back to the best position seen when no try puts `min_inside` of the patch on the foreground.
    """
    h, w = patch_mask.shape
    H, W = foreground.shape
    ys, xs = np.nonzero(foreground)
    area = max(int(patch_mask.sum()), 1)
    best, best_inside = (max(0, (H - h) // 2), max(0, (W - w) // 2)), -1.0
    py, px = np.nonzero(patch_mask)
    cy, cx = int(py.mean()) if len(py) else h // 2, int(px.mean()) if len(px) else w // 2
    for _ in range(tries):
        i = rng.integers(len(ys))
        top, left = int(ys[i]) - cy, int(xs[i]) - cx
        inside = (place_patch((H, W), patch_mask, top, left) & foreground).sum() / area
        if inside > best_inside:
            best, best_inside = (top, left), inside
        if inside >= min_inside:
            break
    return best


def jitter_mask(rng: np.random.Generator, mask: np.ndarray, foreground: np.ndarray, *,
                max_rotation: float = 30.0, scale_range: tuple[float, float] = (0.8, 1.2)) -> np.ndarray:
    """A training mask moved to a random place on the foreground, randomly flipped, rotated and scaled.

    The result is cut to the foreground, so a defect never lands off the object.
    """
    box = bounding_box(mask)
    if box is None:
        return np.zeros_like(foreground)
    y0, y1, x0, x1 = box
    patch = affine_patch(mask[y0:y1, x0:x1], rng.uniform(-max_rotation, max_rotation), rng.uniform(*scale_range),
                         bool(rng.random() < 0.5), bool(rng.random() < 0.5))
    tight = bounding_box(patch)
    if tight is None:
        patch = mask[y0:y1, x0:x1]
    else:
        patch = patch[tight[0]:tight[1], tight[2]:tight[3]]
    patch = _fit_inside(patch, foreground.shape)
    top, left = find_placement(rng, patch, foreground)
    placed = place_patch(foreground.shape, patch, top, left) & foreground
    return placed if placed.any() else place_patch(foreground.shape, patch, top, left)


def _fit_inside(patch: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = patch.shape
    factor = min(1.0, 0.95 * shape[0] / h, 0.95 * shape[1] / w)
    if factor >= 1.0:
        return patch
    size = (max(1, int(w * factor)), max(1, int(h * factor)))
    return cv2.resize(patch.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


def color_jitter(rng: np.random.Generator, image: np.ndarray, brightness: float = 0.1, contrast: float = 0.1,
                 saturation: float = 0.1, hue: float = 0.1) -> np.ndarray:
    """torchvision's ColorJitter with factors drawn from `rng` (applied in a random order, as torchvision does)."""
    pil = Image.fromarray(image)
    ops = [
        lambda im: TF.adjust_brightness(im, rng.uniform(1 - brightness, 1 + brightness)),
        lambda im: TF.adjust_contrast(im, rng.uniform(1 - contrast, 1 + contrast)),
        lambda im: TF.adjust_saturation(im, rng.uniform(1 - saturation, 1 + saturation)),
        lambda im: TF.adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    for k in rng.permutation(len(ops)):
        pil = ops[k](pil)
    return np.asarray(pil, dtype=np.uint8).copy()


def feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A soft alpha in [0, 1]: the mask blurred by a Gaussian of `sigma` pixels (0.5 on its outline)."""
    if sigma <= 0:
        return mask.astype(np.float32)
    return np.clip(ndimage.gaussian_filter(mask.astype(np.float32), sigma), 0.0, 1.0)


def alpha_blend(background: np.ndarray, foreground: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = background.astype(np.float32) * (1 - alpha[..., None]) + foreground.astype(np.float32) * alpha[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    array = np.stack(images) if isinstance(images, list) else images
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0
