"""`defectbench synth`: the embedded default data set, written in the MVTec AD / LOCO / Caption layouts.

Two textures (weave, grain) and two objects (washer, pill) in MVTec AD layout, one category (tray) in MVTec LOCO
layout, and a caption for every defect image in `<category>/prompt/<defect>/NNN.txt`. Deterministic from the seed:
every image has its own random stream derived from (seed, category, part, defect type, index).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data.images import save_image, save_mask
from harness.data.model import DEFECTS_CONFIG
from harness.data.synth.base import SynthCategory
from harness.data.synth.draw import to_uint8
from harness.data.synth.loco import Tray
from harness.data.synth.objects import Pill, Washer
from harness.data.synth.textures import Grain, Weave
from harness.errors import ConfigError
from harness.io import atomic_directory, atomic_write_json

CATEGORIES: dict[str, SynthCategory] = {c.name: c for c in (Weave(), Grain(), Washer(), Pill(), Tray())}
SYNTH_VERSION = 2  # bump when the drawings change, so cached copies are regenerated (2: LOCO masks' pixel values)


# The smallest value of each setting the synthetic data set can be drawn with.
SYNTH_MINIMUMS = {"seed": 0, "size": 48, "n_train": 1, "n_validation": 0, "n_test_good": 1, "n_defect": 1}


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    size: int = 128
    n_train: int = 100
    n_validation: int = 10
    n_test_good: int = 12
    n_defect: int = 15
    categories: tuple[str, ...] = tuple(CATEGORIES)

    def __post_init__(self) -> None:
        for name, least in SYNTH_MINIMUMS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"synthetic data set: {name} must be an integer >= {least}, not {value!r}")

    def as_dict(self) -> dict:
        return {"version": SYNTH_VERSION, "seed": self.seed, "size": self.size, "n_train": self.n_train,
                "n_validation": self.n_validation, "n_test_good": self.n_test_good, "n_defect": self.n_defect,
                "categories": list(self.categories)}


def synthesize(out: Path, config: SynthConfig = SynthConfig(), overwrite: bool = False) -> Path:
    """Write the synthetic data set to `out` (atomically: a failed run leaves nothing behind)."""
    unknown = [c for c in config.categories if c not in CATEGORIES]
    if unknown:
        raise ConfigError(f"unknown synthetic categories {unknown}; known: {', '.join(CATEGORIES)}")
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        for index, name in enumerate(config.categories):
            write_category(tmp / name, CATEGORIES[name], index, config)
        atomic_write_json(tmp / "synth.json", config.as_dict())
    return Path(out)


def _rng(config: SynthConfig, *keys: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, *keys])


def write_category(folder: Path, category: SynthCategory, cat_index: int, config: SynthConfig) -> None:
    """One category's images, masks and captions under `folder`, drawn from the streams of (config.seed, cat_index);
    also for categories outside the data set (a test's own: methods/anomalyxfusion/tests/test_anomalyxfusion.py)."""
    parts = [("train", config.n_train, 0), ("test", config.n_test_good, 1)]
    if category.layout == "mvtec_loco":
        parts.append(("validation", config.n_validation, 2))
    for part, count, part_index in parts:
        for i in range(count):
            scene = category.normal(_rng(config, cat_index, part_index, 0, i), config.size)
            save_image(folder / part / "good" / f"{i:03d}.png", to_uint8(scene.image))
    if category.layout == "mvtec_loco":
        atomic_write_json(folder / DEFECTS_CONFIG, loco_defects_config(config.size))
    for defect_index, defect in enumerate(category.defect_types, start=1):
        for i in range(config.n_defect):
            rng = _rng(config, cat_index, 3, defect_index, i)
            scene = category.normal(rng, config.size)
            result = category.defect(defect, rng, scene)
            save_image(folder / "test" / defect / f"{i:03d}.png", to_uint8(result.image))
            _write_masks(folder / "ground_truth" / defect, i, result.regions, category.layout,
                         LOCO_PIXEL_VALUES.get(defect, 255))
            prompt = folder / "prompt" / defect / f"{i:03d}.txt"
            prompt.parent.mkdir(parents=True, exist_ok=True)
            prompt.write_text(result.caption + "\n", encoding="utf-8")


# MVTec LOCO marks each region's defect type by its mask's pixel value and gives each a saturation rule for sPRO
# (defects_config.json): here logical regions saturate at an absolute area (an eighth of the image's side,
# squared), structural ones at their whole area
LOCO_PIXEL_VALUES = {"logical_anomalies": 254, "structural_anomalies": 255}


def loco_defects_config(size: int) -> list[dict]:
    return [{"defect_name": "synthetic_logical", "pixel_value": LOCO_PIXEL_VALUES["logical_anomalies"],
             "saturation_threshold": int((size / 8) ** 2), "relative_saturation": False},
            {"defect_name": "synthetic_structural", "pixel_value": LOCO_PIXEL_VALUES["structural_anomalies"],
             "saturation_threshold": 1.0, "relative_saturation": True}]


def _write_masks(folder: Path, index: int, regions: list[np.ndarray], layout: str, value: int) -> None:
    if layout == "mvtec_loco":
        for r, region in enumerate(regions):
            save_mask(folder / f"{index:03d}" / f"{r:03d}.png", region, value)
    else:
        save_mask(folder / f"{index:03d}_mask.png", np.logical_or.reduce(regions))


def cached(config: SynthConfig = SynthConfig()) -> Path:
    """The synthetic data set for `config` under results/cache/synthetic, written on first use."""
    from harness.io import sha256_json
    from harness.paths import cache_dir

    default = config == SynthConfig(seed=config.seed)
    name = f"seed{config.seed}" if default else f"custom-{sha256_json(config.as_dict())[:12]}"
    root = cache_dir("synthetic") / f"{name}-v{SYNTH_VERSION}"
    if not root.is_dir():
        try:
            synthesize(root, config)
        except (FileExistsError, OSError):
            if not root.is_dir():  # another process writing the same set at once is fine; anything else is not
                raise
    return root


def read_synth_config(root: Path) -> dict | None:
    path = Path(root) / "synth.json"
    return json.loads(path.read_text()) if path.is_file() else None
