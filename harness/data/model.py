"""What a data set on disk becomes: categories of samples (paths, masks, captions), read lazily."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.data.images import image_size, read_image, read_mask, read_mask_levels

GOOD = "good"

# MVTec AD's texture categories, the Magnetic-tile surface, and the synthetic textures; everything else is
# treated as an object unless the foreground estimate says otherwise.
KNOWN_TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood", "magnetic_tile", "weave", "grain"})
KNOWN_OBJECTS = frozenset({
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor",
    "zipper", "breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors",
    "washer", "tray",
})


def file_id_sort_key(file_id: str) -> tuple[int, int, str]:
    """Sort numerically where the id is a number (as MVTec's 000, 001, ...), else by name."""
    return (0, int(file_id), "") if file_id.isdigit() else (1, 0, file_id)


@dataclass(frozen=True)
class Sample:
    """One image of a category: a normal image (defect_type 'good') or a defect image with its masks."""

    category: str
    part: str  # "train" | "validation" | "test"
    defect_type: str
    file_id: str
    image: Path
    masks: tuple[Path, ...] = ()
    caption: str | None = None
    kind: str | None = None  # MVTec LOCO: "logical" or "structural"

    @property
    def key(self) -> str:
        """Stable id inside the category, e.g. 'test/crack/003' or 'train/good/012'."""
        return f"{self.part}/{self.defect_type}/{self.file_id}"

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != GOOD

    def load_image(self, size: int | None = None) -> np.ndarray:
        return read_image(self.image, size)

    def load_mask(self, size: int | None = None) -> np.ndarray:
        """The union of the sample's masks; all-False for a normal image."""
        if not self.masks:
            if size is None:
                width, height = image_size(self.image)
                return np.zeros((height, width), dtype=bool)
            return np.zeros((size, size), dtype=bool)
        return read_mask(self.masks, size)

    def load_mask_levels(self, size: int) -> np.ndarray:
        """The mask as the published evaluation code resizes it (uint8 0..255); all zero for a normal image."""
        return read_mask_levels(self.masks, size) if self.masks else np.zeros((size, size), dtype=np.uint8)


DEFECTS_CONFIG = "defects_config.json"  # MVTec LOCO: per defect type its masks' pixel value and sPRO saturation


@dataclass(frozen=True)
class SaturationRule:
    """An entry of MVTec LOCO's defects_config.json: a region of this defect type (its mask's pixel value) counts
    as fully found once `threshold` pixels of it are (relative: that fraction of its area)."""

    defect_name: str
    threshold: float
    relative: bool


@dataclass
class Category:
    """A category as read from disk. Defect samples are sorted by file id."""

    dataset: str
    name: str
    root: Path
    layout: str  # "mvtec_ad" | "mvtec_loco"
    train_good: list[Sample]
    validation_good: list[Sample]
    test_good: list[Sample]
    defects: dict[str, list[Sample]]
    warnings: list[str] = field(default_factory=list)
    saturation: dict[int, SaturationRule] | None = None  # MVTec LOCO's defects_config.json by pixel value

    @property
    def defect_types(self) -> list[str]:
        return sorted(self.defects)

    @property
    def texture(self) -> bool | None:
        """True for texture categories, False for objects, None where the name is unknown."""
        if self.name in KNOWN_TEXTURES:
            return True
        if self.name in KNOWN_OBJECTS:
            return False
        return None

    def all_samples(self) -> list[Sample]:
        samples = [*self.train_good, *self.validation_good, *self.test_good]
        for defect in self.defect_types:
            samples.extend(self.defects[defect])
        return samples

    def by_key(self) -> dict[str, Sample]:
        return {sample.key: sample for sample in self.all_samples()}
