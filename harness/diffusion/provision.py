"""The backbone a diffusion method fine-tunes, made to exist once and found again.

- `tiny`: the shipped backbone (shipped.py; `backbones/defectbench-tiny`, or $DEFECTBENCH_TINY_BACKBONE). Where a
  run's categories are ones it was trained on (every normal training image among those it saw, by content hash) it
  is used as it is. Otherwise the harness fine-tunes it on the run's normal images first (its UNet and text
  encoder; the autoencoder and latent scale kept, as SD's are; the category names added to its vocabulary; a
  quarter of each batch replays its generic scenes, so the general prior stays), cached under
  results/cache/backbones/<hash> (the images' content, the settings, the shipped weights and the code).
- `paper`: Stable Diffusion 1.5, found by harness/weights.py (a configured folder, the Hugging Face cache, or a
  download); nothing is trained.

Either way the answer is a `source` that `backbone.load` opens with `from_pretrained`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
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
CODE_FILES = ("backbone.py", "corpus.py", "pretrain.py", "provision.py")
# the shipped folder's files that make the model (its card, measures and grid do not)
MODEL_PARTS = ("model_index.json", "vae", "unet", "text_encoder", "tokenizer", "scheduler")
SHIPPED_ENV = "DEFECTBENCH_TINY_BACKBONE"


@dataclass(frozen=True)
class NormalImages:
    """One category's normal training images: paths and content hashes (the hashes go into the cache key)."""

    category: str
    paths: tuple[Path, ...]
    hashes: tuple[str, ...]


def shipped_folder() -> Path:
    """The tiny backbone the `tiny` profile starts from: $DEFECTBENCH_TINY_BACKBONE, else the shipped one."""
    from harness.diffusion.shipped import SHIPPED

    folder = Path(os.environ.get(SHIPPED_ENV) or SHIPPED)
    if not (folder / "corpus.json").is_file() or not (folder / "unet").is_dir():
        raise ConfigError(f"{folder}: not a trained tiny backbone (no corpus.json or unet/); "
                          f"`defectbench backbone train` makes one")
    return folder


def _model_files(folder: Path) -> list[Path]:
    return sorted(f for part in MODEL_PARTS for f in ([folder / part] if (folder / part).is_file()
                                                      else (folder / part).rglob("*")) if f.is_file())


@functools.lru_cache(maxsize=8)
def _identity(folder: str, stamp: tuple) -> str:  # stamp: the files' sizes and times, so an edit is seen
    root = Path(folder)
    return sha256_json({str(f.relative_to(root)): sha256_file(f) for f in _model_files(root)})[:16]


def shipped_identity(folder: Path) -> str:
    """The shipped backbone by content: the hash of its model files (not of its card): in job keys and records."""
    folder = Path(folder).resolve()
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in _model_files(folder))
    return _identity(str(folder), stamp)


def shipped_covers(normals: list[NormalImages], folder: Path) -> bool:
    """Whether the backbone in `folder` was trained on every one of these normal images, under their category's
    name (corpus.json lists the hashes of the normal images it saw, per category)."""
    seen = json.loads((Path(folder) / "corpus.json").read_text()).get("normals", {})
    return all(set(n.hashes) <= set(seen.get(n.category, ())) for n in normals)


# What the fine-tuning of the shipped backbone on a run's normal images changes, and its defaults: 800 UNet steps of
# 16 at a peak rate of 5e-4 (a tenth of the shipped training), a quarter of each batch from its generic scenes
FINETUNE = {"unet_steps": 800, "batch_size": 16, "unet_lr": 5e-4, "generic_share": 0.25, "empty_prompt_rate": 0.1,
            "clip_grad": 1.0, "seed": 0, "checkpoint_every": 100}
REPLAYED_SCENES = 1000  # generic scenes of the shipped corpus drawn again for the fine-tuning's replay


def finetune_config(overrides: dict, resolution: int, where: str = "backbone"):
    """The fine-tuning's PretrainConfig at `resolution`: FINETUNE with a suite's `backbone:` overrides, checked by
    name and type. The autoencoder and the UNet's target belong to the shipped backbone: they cannot change."""
    from harness.diffusion.pretrain import PretrainConfig

    unknown = set(overrides) - set(FINETUNE)
    if unknown:
        raise ConfigError(f"{where}: {sorted(unknown)} cannot be set: the suite's backbone settings are those of "
                          f"the shipped backbone's fine-tuning on unseen categories ({', '.join(FINETUNE)})")
    for key, value in overrides.items():
        default = FINETUNE[key]
        kind = (int,) if isinstance(default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise ConfigError(f"{where}.{key}: {value!r} is not a non-negative {type(default).__name__}")
    settings = {**FINETUNE, **overrides}
    for key in ("generic_share", "empty_prompt_rate"):
        if not settings[key] < 1:
            raise ConfigError(f"{where}.{key}: {settings[key]!r} must lie in [0, 1)")
    for key in ("unet_steps", "batch_size"):  # 0 steps would fine-tune nothing, yet make a backbone job of its own
        if settings[key] < 1:
            raise ConfigError(f"{where}.{key}: {settings[key]!r} must be at least 1")
    return PretrainConfig(**{**settings, "resolution": resolution, "vae_steps": 0})


def code_hash() -> str:
    here = Path(__file__).resolve().parent
    return sha256_json({name: sha256_file(here / name) for name in CODE_FILES})[:16]


def finetune_key(normals: list[NormalImages], config, shipped: str) -> str:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every"}  # not the result's
    return sha256_json({"images": {n.category: list(n.hashes) for n in normals}, "config": settings,
                        "shipped": shipped, "code": code_hash()})[:20]


def finetuned_backbone(normals: list[NormalImages], config, progress: bool = False,
                       announce: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The shipped backbone fine-tuned on these normal images (cached; a killed fine-tuning resumes). Returns its
    folder and its info (settings, image counts, words added, loss history, seconds, and whether it was reused)."""
    from harness.data.images import read_image
    from harness.diffusion.backbone import load
    from harness.diffusion.corpus import CorpusConfig, generic_scenes
    from harness.diffusion.pretrain import CHECKPOINT, pretrain, prompt_for

    source = shipped_folder()
    shipped = shipped_identity(source)
    folder = cache_dir("backbones") / finetune_key(normals, config, shipped)
    if (folder / INFO_FILE).is_file():
        return folder, {**json.loads((folder / INFO_FILE).read_text()), "reused": True}
    images, captions = [], []
    for entry in normals:
        images += [read_image(path, config.resolution) for path in entry.paths]
        captions += [prompt_for(entry.category)] * len(entry.paths)
    if not images:
        raise ConfigError("fine-tuning the tiny backbone needs normal training images, and the data set has none")
    sources = ["run"] * len(images)
    if config.generic_share > 0:
        recorded = json.loads((source / "corpus.json").read_text())["config"]
        corpus = CorpusConfig(**{**recorded, "categories": tuple(recorded["categories"]), "size": config.resolution})
        drawn = config.unet_steps * config.batch_size * config.generic_share  # how many a fine-tuning can draw
        scenes, texts = generic_scenes(corpus, int(min(REPLAYED_SCENES, corpus.generic, np.ceil(drawn))))
        images += list(scenes)
        captions += texts
        sources += ["generic"] * len(texts)
    start = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")  # checkpoints: a killed fine-tuning resumes from them
    partial.mkdir(parents=True, exist_ok=True)
    estimate: list[str] = []

    def say(line: str) -> None:
        estimate.append(line)
        announce(line)

    if (partial / CHECKPOINT).is_file():
        announce(f"resuming the fine-tuning from its checkpoint in {partial}")
    backbone = load(source)
    vocabulary = set(backbone.tokenizer.get_vocab())
    tuned, history = pretrain(np.stack(images), captions, config, progress=progress, checkpoints=partial, announce=say,
                              sources=sources, start_from=backbone)
    info = {"kind": "tiny-finetuned", "shipped": shipped, "config": dataclasses.asdict(config), "code": code_hash(),
            "images": {n.category: len(n.paths) for n in normals},
            "words_added": sorted(set(tuned.tokenizer.get_vocab()) - vocabulary), "history": history,
            "seconds": round(time.perf_counter() - start, 1), "estimate": estimate[0] if estimate else None}
    with atomic_directory(folder, overwrite=True) as tmp:  # a concurrent twin may have finished first: same content
        tuned.save(tmp)
        atomic_write_json(tmp / INFO_FILE, info)
    shutil.rmtree(partial, ignore_errors=True)
    return folder, {**info, "reused": False}


def tiny_backbone(normals: list[NormalImages], overrides: dict | None = None, resolution: int = 128,
                  progress: bool = False, announce: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The `tiny` profile's backbone for these normal images: the shipped one where it saw them all, else the
    shipped one fine-tuned on them."""
    folder = shipped_folder()
    if shipped_covers(normals, folder):
        return folder, {"kind": "shipped", "shipped": shipped_identity(folder), "reused": True}
    return finetuned_backbone(normals, finetune_config(overrides or {}, resolution), progress, announce)


def paper_backbone(explicit: str | Path | None = None, name: str | None = None) -> tuple[Path, dict]:
    """A pretrained backbone's folder (default: Stable Diffusion 1.5), resolved by harness/weights.py."""
    resolved = weights.resolve_pipeline(name or PAPER_BACKBONE, explicit)
    return resolved.path, {"kind": "pretrained", "weights": resolved.as_record(), "identity": resolved.identity(),
                           "reused": True}


def provision(profile: str | Profile, normals: list[NormalImages], overrides: dict | None = None,
              explicit: str | Path | None = None, progress: bool = False, name: str | None = None,
              announce: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The backbone folder for a profile: the shipped tiny one (fine-tuned on `normals` where it has not seen
    them), or the pretrained backbone `name`."""
    profile = get_profile(profile)
    if profile.shipped_backbone:
        return tiny_backbone(normals, overrides, profile.resolution, progress, announce)
    return paper_backbone(explicit, name)


def describe(info: dict, folder: Path) -> str:
    """A short provenance string for records: which backbone a result was made with."""
    if info.get("kind") == "shipped":
        return f"defectbench-tiny:{info['shipped']}"
    if info.get("kind") == "tiny-finetuned":
        return f"defectbench-tiny-finetuned:{folder.name}"
    record = info.get("weights", {})  # by content, not by where it was found (cache, download or a folder)
    return f"{record.get('name', PAPER_BACKBONE)}:{info.get('identity', '?')}"
