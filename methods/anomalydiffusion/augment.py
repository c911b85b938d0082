"""The authors' training augmentation (their `--data_enhance`), as facts of their code: with probability 0.5, each
sample is flipped up-down and left-right (each with p = 0.5) and rotated by an integer angle in [0, 20] degrees
(nearest neighbour, no expansion, the corners filled with 0 in [-1, 1]: mid-grey), then cropped to rows
[r1, r2) and columns [c1, c2) with r1 uniform in [0, top of the mask's box] and r2 in [bottom of the box, H] (so the
defect stays in), and resized back to the working size (the aspect ratio is not kept).

Here the augmented copies are drawn once per fit (`pool` per training image, seeded) and encoded with the originals,
so the fine-tuning loop keeps its cached latents; the authors draw anew for every batch, one coin and one crop (the
union of the batch's mask boxes) per batch.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

MID_GREY = 128  # 0 in [-1, 1]


def augmented_copy(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, max_rotation: int = 20
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (image, mask) of uint8 (H, W, 3) and bool (H, W), the same size."""
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    angle = int(rng.integers(0, max_rotation + 1))
    rotated = Image.fromarray(np.ascontiguousarray(image)).rotate(angle, resample=Image.Resampling.NEAREST,
                                                                  fillcolor=(MID_GREY,) * 3)
    rotated_mask = Image.fromarray(np.ascontiguousarray(mask).astype(np.uint8) * 255).rotate(
        angle, resample=Image.Resampling.NEAREST, fillcolor=0)
    image, mask = np.asarray(rotated), np.asarray(rotated_mask) > 127
    return _crop_around(rng, image, mask)


def _crop_around(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = mask.shape
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):  # the defect rotated out of view (or none): no crop
        return image, mask
    top, bottom = int(rng.integers(0, rows[0] + 1)), int(rng.integers(rows[-1] + 1, height + 1))
    left, right = int(rng.integers(0, columns[0] + 1)), int(rng.integers(columns[-1] + 1, width + 1))
    crop = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right]))
    crop_mask = Image.fromarray(np.ascontiguousarray(mask[top:bottom, left:right]).astype(np.uint8) * 255)
    size = (width, height)
    return (np.asarray(crop.resize(size, Image.Resampling.BILINEAR)),
            np.asarray(crop_mask.resize(size, Image.Resampling.BILINEAR)) >= 128)


def with_pool(rng: np.random.Generator, images: np.ndarray, masks: np.ndarray, pool: int, max_rotation: int = 20
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The originals, each `pool` times, then `pool` augmented copies of each (half the rows augmented, as the
    authors' p = 0.5); returns images, masks and the training image each row shows."""
    if pool <= 0:
        return images, masks, np.arange(len(images))
    copies = [augmented_copy(rng, image, mask, max_rotation) for _ in range(pool) for image, mask in zip(images, masks)]
    source = np.concatenate([np.tile(np.arange(len(images)), pool), np.tile(np.arange(len(images)), pool)])
    return (np.concatenate([np.tile(images, (pool, 1, 1, 1)), np.stack([c[0] for c in copies])]),
            np.concatenate([np.tile(masks, (pool, 1, 1)), np.stack([c[1] for c in copies])]), source)
