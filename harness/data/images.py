"""Reading images and masks from disk: any size, grayscale or RGB, PNG or JPEG; resized at load time."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_THRESHOLD = 127  # a mask pixel above this (of 255) belongs to the defect


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def natural_key(path: Path) -> tuple:
    """Sort key of a file name with its digit runs compared as numbers: 0, 1, 2, ..., 10 (generation order), not
    0, 1, 10, 2; the whole name breaks ties (01 and 1)."""
    name = Path(path).name
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))), name


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;gray"})


def image_header(path: Path) -> tuple[tuple[int, int], str]:
    """((width, height), PIL mode) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(path, f"unreadable image ({err})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    return image_header(path)[0]


def _open_decoded(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now, so truncated files fail here with their name
        return image
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(path, f"unreadable or truncated image ({err})") from None


def verify_image(path: Path) -> None:
    """Decode the whole file; raises DataError if it is unreadable or truncated."""
    _open_decoded(path).close()


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """An RGB uint8 array (H, W, 3); resized to size x size with PIL's antialiased bicubic filter."""
    image = _open_decoded(Path(path)).convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()


def read_image_cv2(path: Path, size: int | None = None) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) as the published localisation code reads its test images: cv2.imread, then
    cv2.resize's default (bilinear, no antialiasing); their test loop turns OpenCV's BGR into RGB, as here."""
    import cv2

    if not Path(path).is_file():
        raise DataError(path, "file not found")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(path, "unreadable image (cv2.imread)")
    if size is not None and image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size))
    return np.ascontiguousarray(image[:, :, ::-1])


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 array resized to size x size as `read_image` resizes (PIL's antialiased bicubic filter)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.BICUBIC))


def read_mask(paths: Sequence[Path] | Path, size: int | None = None) -> np.ndarray:
    """A boolean (H, W) mask: the union of the given mask files (LOCO has one file per region)."""
    if isinstance(paths, (str, Path)):
        paths = [Path(paths)]
    union: np.ndarray | None = None
    for path in paths:
        layer = np.asarray(_open_decoded(Path(path)).convert("L")) > MASK_THRESHOLD
        if union is not None and layer.shape != union.shape:
            raise DataError(path, f"mask size {layer.shape[::-1]} differs from the other masks {union.shape[::-1]}")
        union = layer if union is None else (union | layer)
    if union is None:
        raise ValueError("read_mask needs at least one path")
    if size is not None and union.shape != (size, size):
        return resize_mask(union, size)
    return union


def read_mask_levels(paths: Sequence[Path], size: int) -> np.ndarray:
    """The published loaders' ground truth: the union of the masks as uint8 0/255, resized to size x size with
    OpenCV's bilinear interpolation (cv2.resize's default), values 0..255 (see harness.metrics.detection)."""
    import cv2

    union = read_mask(paths).astype(np.uint8) * 255
    return cv2.resize(union, (size, size)) if union.shape != (size, size) else union


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean mask with bilinear interpolation and a 0.5 threshold (as the published loaders do)."""
    layer = Image.fromarray(mask.astype(np.float32))
    return np.asarray(layer.resize((size, size), Image.BILINEAR)) >= 0.5


def save_image(path: Path, image: np.ndarray) -> None:
    """Save an RGB uint8 array as PNG (never JPEG: its artefacts shift FID)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")


def save_mask(path: Path, mask: np.ndarray, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.asarray(mask, dtype=bool) * value).astype(np.uint8)).save(path, format="PNG")


def read_region(path: Path) -> tuple[np.ndarray, int]:
    """One MVTec LOCO region mask: its pixels (H, W) bool and the pixel value naming its defect type (the mask holds
    0 and that one value)."""
    layer = np.asarray(_open_decoded(Path(path)).convert("L"))
    values = np.unique(layer[layer > 0])
    if values.size != 1:
        raise DataError(path, f"a region mask must hold 0 and one pixel value, not {values.size} values "
                              f"({', '.join(map(str, values[:5]))})")
    return layer > 0, int(values[0])
