"""The backbone a diffusion method fine-tunes, made to exist once and found again.

- `tiny`: the harness pretrains the tiny backbone (pretrain.py) on the normal training images of a data set's
  categories. The result is cached under results/cache/backbones/<hash>, the hash covering the images' content,
  the pretraining settings and the code that builds and trains it, so every method, category and later run with
  the same inputs reuses it.
- `paper`: Stable Diffusion 1.5, found by harness/weights.py (a configured folder, the Hugging Face cache, or a
  download); nothing is trained.

Either way the answer is a `source` that `backbone.load` opens with `from_pretrained`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from harness import weights
from harness.errors import ConfigError
from harness.io import atomic_directory, atomic_write_json, sha256_file, sha256_json
from harness.paths import cache_dir
from harness.profiles import Profile, get_profile

PAPER_BACKBONE = "stable-diffusion-v1-5"
INFO_FILE = "backbone.json"
CODE_FILES = ("backbone.py", "pretrain.py")


@dataclass(frozen=True)
class NormalImages:
    """One category's normal training images: paths and content hashes (the hashes go into the cache key)."""

    category: str
    paths: tuple[Path, ...]
    hashes: tuple[str, ...]


def pretrain_config(overrides: dict, resolution: int, where: str = "backbone"):
    """The tiny backbone's PretrainConfig at `resolution`, with a suite's `backbone:` overrides checked by name."""
    from harness.diffusion.pretrain import PretrainConfig

    known = {f.name for f in dataclasses.fields(PretrainConfig)} - {"resolution"}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"{where}: unknown pretraining settings {sorted(unknown)}; known: {', '.join(sorted(known))}")
    from harness.diffusion.ddim import PREDICTION_TYPES

    if overrides.get("prediction_type", PREDICTION_TYPES[0]) not in PREDICTION_TYPES:
        raise ConfigError(f"{where}.prediction_type: {overrides['prediction_type']!r} is not one of {PREDICTION_TYPES}")
    from harness.device import AUTOCAST_TYPES

    if overrides.get("vae_autocast", "float32") not in AUTOCAST_TYPES:
        raise ConfigError(f"{where}.vae_autocast: {overrides['vae_autocast']!r} is not one of {AUTOCAST_TYPES}")
    return PretrainConfig(**{**overrides, "resolution": resolution})


def code_hash() -> str:
    here = Path(__file__).resolve().parent
    return sha256_json({name: sha256_file(here / name) for name in CODE_FILES})[:16]


def tiny_key(normals: list[NormalImages], config) -> str:
    return sha256_json({"images": {n.category: list(n.hashes) for n in normals}, "config": dataclasses.asdict(config),
                        "code": code_hash()})[:20]


def tiny_backbone(normals: list[NormalImages], config, progress: bool = False,
                  announce: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The cached tiny backbone for these images and settings, pretrained now if it is not cached yet.

    Returns its folder and its info (settings, image counts, loss history, seconds, and whether it was reused)."""
    folder = cache_dir("backbones") / tiny_key(normals, config)
    if (folder / INFO_FILE).is_file():
        return folder, {**json.loads((folder / INFO_FILE).read_text()), "reused": True}
    from harness.data.images import read_image
    from harness.diffusion.pretrain import CHECKPOINT, pretrain, prompt_for

    images, categories = [], []
    for entry in normals:
        images += [read_image(path, config.resolution) for path in entry.paths]
        categories += [entry.category] * len(entry.paths)
    if not images:
        raise ConfigError("the tiny backbone needs normal training images, and the data set has none")
    start = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")  # checkpoints: a killed pretraining resumes from them
    partial.mkdir(parents=True, exist_ok=True)
    estimate: list[str] = []

    def say(line: str) -> None:
        estimate.append(line)
        announce(line)

    if (partial / CHECKPOINT).is_file():
        announce(f"resuming the pretraining from its checkpoint in {partial}")
    backbone, history = pretrain(np.stack(images), [prompt_for(c) for c in categories], config, progress=progress,
                                 checkpoints=partial, announce=say)
    info = {"kind": "tiny-pretrained", "config": dataclasses.asdict(config), "code": code_hash(),
            "images": {n.category: len(n.paths) for n in normals}, "history": history,
            "seconds": round(time.perf_counter() - start, 1), "estimate": estimate[0] if estimate else None}
    with atomic_directory(folder, overwrite=True) as tmp:  # a concurrent twin may have finished first: same content
        backbone.save(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
    shutil.rmtree(partial, ignore_errors=True)
    return folder, {**info, "reused": False}


def paper_backbone(explicit: str | Path | None = None, name: str | None = None) -> tuple[Path, dict]:
    """A pretrained backbone's folder (default: Stable Diffusion 1.5), resolved by harness/weights.py."""
    resolved = weights.resolve_pipeline(name or PAPER_BACKBONE, explicit)
    return resolved.path, {"kind": "pretrained", "weights": resolved.as_record(), "reused": True}


def provision(profile: str | Profile, normals: list[NormalImages], overrides: dict | None = None,
              explicit: str | Path | None = None, progress: bool = False, name: str | None = None,
              announce: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The backbone folder for a profile: the tiny one pretrained here, or the pretrained backbone `name`."""
    profile = get_profile(profile)
    if profile.name == "tiny":
        return tiny_backbone(normals, pretrain_config(overrides or {}, profile.resolution), progress, announce)
    return paper_backbone(explicit, name)


def describe(info: dict, folder: Path) -> str:
    """A short provenance string for records: which backbone a result was made with."""
    if info.get("kind") == "tiny-pretrained":
        return f"tiny-pretrained:{folder.name}"
    record = info.get("weights", {})
    return f"{record.get('name', PAPER_BACKBONE)}:{record.get('source', '?')}"
