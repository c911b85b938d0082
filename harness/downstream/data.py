"""The data every downstream model and detector shares: the real test part of a category, the generated
samples of every defect type (with a held-out validation part), and the scoring of anomaly maps into records.

The test part is the same for every row of a table: the real test images of every defect type of the split,
plus the category's normal test images. Nothing here reads a method's training part.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data.model import DEFECTS_CONFIG, GOOD, Sample
from harness.data.splits import Split
from harness.errors import DataError
from harness.data.images import read_image, read_image_cv2, read_mask, read_region, resize_mask
from harness.data.samples import read_samples
from harness.io import atomic_write_bytes
from harness.metrics import detection, spro
from harness.metrics.specs import COMPAT_METRICS

ALL = "all"  # the defect_type of a record computed over the whole test part
# how a job reads the test part's images (its `test_images`): ours, or as the published localisation code reads them
TEST_READERS = {"pil-bicubic": read_image, "cv2-bilinear": read_image_cv2}
DEFAULT_TEST_IMAGES = "pil-bicubic"


@dataclass
class ImageSet:
    """Images (N, H, W, 3) uint8, masks (N, H, W) bool, and the defect type of each ('good' for normals)."""

    images: np.ndarray
    masks: np.ndarray
    defect_types: list[str]
    names: list[str]  # sample keys or file paths, for traceability
    mask_levels: np.ndarray | None = None  # (N, H, W) uint8: the masks as the published code resizes them (test part)

    def __len__(self) -> int:
        return len(self.defect_types)

    @property
    def labels(self) -> np.ndarray:
        return np.array([d != GOOD for d in self.defect_types])

    def subset(self, index: np.ndarray | list[int]) -> "ImageSet":
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(self.images[index], self.masks[index], [self.defect_types[i] for i in index],
                        [self.names[i] for i in index], None if self.mask_levels is None else self.mask_levels[index])

    @classmethod
    def concat(cls, parts: list["ImageSet"]) -> "ImageSet":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no images to concatenate")
        return cls(np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts]),
                   [d for p in parts for d in p.defect_types], [n for p in parts for n in p.names])


def from_samples(samples: list[Sample], resolution: int, read=read_image) -> ImageSet:
    if not samples:
        return ImageSet(np.zeros((0, resolution, resolution, 3), np.uint8), np.zeros((0, resolution, resolution), bool),
                        [], [])
    images = np.stack([read(s.image, resolution) for s in samples])
    masks = np.stack([s.load_mask(resolution) for s in samples])
    return ImageSet(images, masks, [s.defect_type for s in samples], [s.key for s in samples])


def test_samples(split: Split) -> list[Sample]:
    """The real test part in its fixed order: every defect type's test images, then the normal test images."""
    return [*(s for d in sorted(split.defects) for s in split.defects[d].test), *split.normal_test]


def test_set(split: Split, resolution: int, images: str = DEFAULT_TEST_IMAGES) -> ImageSet:
    """The real test part (`test_samples`), its images read by `TEST_READERS[images]`, with the masks also as the
    published evaluation resizes them."""
    samples = test_samples(split)
    test = from_samples(samples, resolution, TEST_READERS[images])
    if samples:
        test.mask_levels = np.stack([s.load_mask_levels(resolution) for s in samples])
    return test


def normal_set(split: Split, part: str, resolution: int) -> ImageSet:
    samples = {"train": split.normal_train, "validation": split.normal_validation}[part]
    return from_samples(samples, resolution)


def generated_set(folders: dict[str, Path], resolution: int) -> ImageSet:
    """Generated samples of each defect type, from generate jobs' sample folders (samples.jsonl)."""
    parts = []
    for defect in sorted(folders):
        rows = read_samples(folders[defect])
        if not rows:
            raise DataError(folders[defect], "no generated samples (samples.jsonl missing or empty)")
        images = np.stack([read_image(folders[defect] / r["image"], resolution) for r in rows])
        masks = np.stack([read_mask(folders[defect] / r["mask"], resolution) for r in rows])
        parts.append(ImageSet(images, masks, [defect] * len(rows), [str(folders[defect] / r["image"]) for r in rows]))
    return ImageSet.concat(parts)


def hold_out(samples: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, validation): per defect type, a seeded ceil(fraction * n) of the samples (none when n < 2)."""
    rng = np.random.default_rng(seed)
    train, validation = [], []
    types = np.array(samples.defect_types)
    for defect in sorted(set(samples.defect_types)):
        index = np.flatnonzero(types == defect)
        index = index[rng.permutation(index.size)]
        k = math.ceil(fraction * index.size) if index.size >= 2 and fraction > 0 else 0
        validation += sorted(index[:k].tolist())
        train += sorted(index[k:].tolist())
    return samples.subset(train), samples.subset(validation)


@dataclass(frozen=True)
class LocoRegions:
    """An MVTec LOCO test part's regions for sPRO (harness.metrics.spro), or why there are none."""

    regions: list[spro.Region]
    missing: str | None = None  # why sPRO cannot be computed
    dropped: int = 0  # regions too small to keep a pixel at the working resolution


def test_regions(split: Split, resolution: int) -> LocoRegions | None:
    """Each mask file of the test part (`test_samples`' order) as one region with its saturation area at the
    working resolution (an absolute area scaled by the pixel counts); None for a category not in the LOCO layout."""
    category = split.category
    if category.layout != "mvtec_loco":
        return None
    if category.saturation is None:
        return LocoRegions([], f"no {DEFECTS_CONFIG} in {category.root}: sPRO needs its saturation areas")
    regions, dropped = [], 0
    for index, sample in enumerate(test_samples(split)):
        for path in sample.masks:
            mask, value = read_region(path)
            rule = category.saturation.get(value)
            if rule is None:
                raise DataError(path, f"pixel value {value} is not listed in {category.root / DEFECTS_CONFIG}")
            small = resize_mask(mask, resolution) if mask.shape != (resolution, resolution) else mask
            if not small.any():
                dropped += 1
                continue
            # an absolute area scales with the pixel count and is kept fractional (the official rule never truncates it)
            threshold = rule.threshold if rule.relative else rule.threshold * small.size / mask.size
            # a relative rule on a region of a few pixels truncates to 0 (the official code then divides by it)
            regions.append(spro.Region(index, small, max(1, spro.saturation_area(int(small.sum()), threshold,
                                                                                  rule.relative))))
    return LocoRegions(regions, None, dropped)


def score_maps(test: ImageSet, maps: np.ndarray, image_scores: np.ndarray,
               compat_scores: np.ndarray | None = None, loco: LocoRegions | None = None) -> list[dict]:
    """Records of every detection metric: over the whole test part ('all') and per defect type (that type's
    images with every normal test image). A subset holding one class only gets no record. With `compat_scores`
    (the image scores as the published code makes them) and the test part's mask levels, the published
    evaluation's metrics (`*_compat`) are recorded too; with an MVTec LOCO test part's regions, AU-sPRO."""
    if maps.shape != test.masks.shape:
        raise ValueError(f"anomaly maps {maps.shape} do not match the test masks {test.masks.shape}")
    types = np.array(test.defect_types)
    groups = {ALL: np.ones(len(test), dtype=bool)}
    for defect in sorted(set(test.defect_types) - {GOOD}):
        groups[defect] = (types == defect) | (types == GOOD)
    records = []
    for name, keep in groups.items():
        labels = test.labels[keep]
        if labels.all() or not labels.any():
            continue
        n = int(keep.sum())
        values = detection.detection_metrics(labels, image_scores[keep], test.masks[keep], maps[keep])
        records += [{"metric": metric, "value": value, "n": n, "defect_type": name} for metric, value in values.items()]
        if compat_scores is not None and test.mask_levels is not None:
            records += _compat_records(labels, compat_scores[keep], test.mask_levels[keep], maps[keep], n, name)
    return records + (_spro_records(groups, maps, loco) if loco is not None else [])


def _spro_records(groups: dict[str, np.ndarray], maps: np.ndarray, loco: LocoRegions) -> list[dict]:
    """AU-sPRO (FPR up to 0.05) per defect type, each with every normal test image; the whole test part's is the
    mean of those (MVTec LOCO's rule for a category: logical and structural anomalies evaluated apart)."""
    details = {"fpr_limit": spro.SPRO_FPR_LIMIT, "regions_dropped": loco.dropped}
    types = {name: keep for name, keep in groups.items() if name != ALL}
    if loco.missing:
        return [{"metric": "pixel_spro", "value": None, "missing": loco.missing, "n": int(keep.sum()),
                 "defect_type": name} for name, keep in groups.items()]
    records = []
    for name, keep in types.items():
        position = np.cumsum(keep) - 1  # an image's index within the group
        regions = [spro.Region(int(position[r.image]), r.mask, r.saturation) for r in loco.regions if keep[r.image]]
        if regions:
            value = spro.au_spro(maps[keep], regions)
            records.append({"metric": "pixel_spro", "value": value, "n": int(keep.sum()), "defect_type": name,
                            "details": {**details, "regions": len(regions)}})
    if records:
        records.append({"metric": "pixel_spro", "value": float(np.mean([r["value"] for r in records])),
                        "n": int(groups[ALL].sum()), "defect_type": ALL,
                        "details": {**details, "regions": len(loco.regions), "mean_of": [r["defect_type"] for r in records]}})
    return records


def _compat_records(labels: np.ndarray, scores: np.ndarray, levels: np.ndarray, maps: np.ndarray, n: int,
                    name: str) -> list[dict]:
    if (levels == 255).any():
        values = detection.compat_metrics(labels, scores, levels, maps)
        return [{"metric": metric, "value": value, "n": n, "defect_type": name} for metric, value in values.items()]
    # no pixel-level ground truth left under the published resizing; the image-level metrics do not need it
    images = detection.compat_metrics(labels, scores, None, maps)
    reason = "no fully covered defect pixel after the published mask resizing (every defect is too small)"
    return ([{"metric": m, "value": v, "n": n, "defect_type": name} for m, v in images.items()] +
            [{"metric": m, "value": None, "n": n, "defect_type": name, "missing": reason}
             for m in COMPAT_METRICS if m not in images])


def save_maps(path: Path, test: ImageSet, maps: np.ndarray, image_scores: np.ndarray) -> None:
    """The anomaly maps (float16) and image scores of a test part, with the names of the images."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, maps=maps.astype(np.float16), image_scores=image_scores,
                        names=np.array(test.names), defect_types=np.array(test.defect_types))
    atomic_write_bytes(path, buffer.getvalue())
