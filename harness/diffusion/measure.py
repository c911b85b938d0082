"""Measure a backbone folder (the shipped one by default) against the per-run backbone of before, and write its
measures.json and sample grid (`defectbench backbone measure`; the card reads them: shipped.render_card)."""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Callable

from harness.diffusion import provision
from harness.diffusion.pretrain import PretrainConfig
from harness.diffusion.shipped import GRID_FILE, MEASURES_FILE, SHIPPED, TRAINING_FILE, read_json, write_grid
from harness.io import atomic_directory, atomic_write_json, sha256_json
from harness.provenance import code_version, machine


def per_run_baseline(categories: tuple[str, ...], announce: Callable[[str], None] = print) -> Path:
    """The backbone a run pretrained for itself before the shipped one: PretrainConfig's defaults (the smoke suite's
    recipe: 1,400 autoencoder + 600 UNet steps), from scratch, on the categories' normal training images prompted "a
    photo of a <category>" (cached under results/cache/backbones by the images, the settings and the code)."""
    import numpy as np

    from harness.diffusion.pretrain import pretrain, prompt_for
    from harness.diffusion.quality import synthetic_images
    from harness.paths import cache_dir

    config = PretrainConfig()
    references = synthetic_images(categories, config.resolution)
    key = sha256_json({"images": {r.category: hashlib.sha256(r.train.tobytes()).hexdigest() for r in references},
                       "config": dataclasses.asdict(config), "code": provision.code_hash()})[:20]
    folder = cache_dir("backbones") / f"per-run-{key}"
    if not (folder / "unet").is_dir():
        images = np.concatenate([r.train for r in references])
        captions = [prompt_for(r.category) for r in references for _ in r.train]
        backbone, _ = pretrain(images, captions, config, progress=True, announce=announce)
        with atomic_directory(folder, overwrite=True) as tmp:
            backbone.save(tmp)
    return folder


def measure_folder(folder: Path = SHIPPED, baseline: bool = True, n_samples: int = 64, write: bool = True,
                   announce: Callable[[str], None] = print) -> dict:
    """Measure the backbone in `folder` (and the per-run baseline); with `write`, write measures.json and the
    sample grid into the folder."""
    from harness.diffusion import quality
    from harness.diffusion.backbone import load_frozen

    folder = Path(folder)
    training = read_json(folder, TRAINING_FILE)
    categories = tuple(training["recipe"]["corpus"]["categories"])
    references = quality.synthetic_images(categories, training["recipe"]["pretrain"]["resolution"])
    start = time.perf_counter()
    backbone = load_frozen(folder)
    result = {"backbone": quality.measure(backbone, references, n_samples), "n_samples": n_samples,
              "machine": machine(), "code": code_version()["git"], "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if write:
        write_grid(backbone, folder / GRID_FILE, categories)
    if baseline:
        announce("measuring the per-run backbone of before (PretrainConfig's defaults, pretrained now if not cached)")
        result["per_run"] = quality.measure(load_frozen(per_run_baseline(categories, announce)), references, n_samples)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if write:
        atomic_write_json(folder / MEASURES_FILE, result)
    return result
