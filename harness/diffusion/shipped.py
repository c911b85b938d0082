"""The tiny backbone DefectBench ships: trained once on the corpus (corpus.py), committed in diffusers' folder layout,
and opened with `from_pretrained` like Stable Diffusion 1.5 (backbone.load).

`defectbench backbone train` makes it from RECIPE (seeded, resumable from its checkpoints); the folder records how
(`training.json`: settings, corpus version, steps, seed, threads, command, hardware, time, loss history) and what it
saw (`corpus.json`: every generic scene's hash and the synthetic normals' file hashes). `defectbench backbone
measure` adds its measures and a sample grid (`measures.json`, `samples.png`, quality.py), and `defectbench backbone
card` renders its README.md from those files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from harness.diffusion.corpus import CORPUS_VERSION, Corpus, CorpusConfig, build, corpus_id, vocabulary
from harness.diffusion.pretrain import PretrainConfig
from harness.errors import ConfigError
from harness.io import atomic_directory, atomic_write_json
from harness.paths import REPO_ROOT

SHIPPED = REPO_ROOT / "backbones" / "defectbench-tiny"
TRAINING_FILE = "training.json"
CORPUS_FILE = "corpus.json"
MEASURES_FILE = "measures.json"
GRID_FILE = "samples.png"


@dataclass(frozen=True)
class Recipe:
    """Everything the shipped backbone is made from; a test checks the shipped folder records exactly this."""

    corpus: CorpusConfig = CorpusConfig()
    # 4,000 autoencoder steps (1,400 left tray and weave near 32 dB with three categories; five and the generic
    # scenes now share its capacity), 8,000 UNet steps of 16 (27x the per-run backbone's 4,800 samples), clipped gradients so the
    # longer runs cannot diverge, half of each batch from the generic scenes
    pretrain: PretrainConfig = PretrainConfig(resolution=128, vae_steps=4000, unet_steps=8000, vae_batch=32, vae_crop=32,
                                              batch_size=16, vae_lr=2e-3, unet_lr=1e-3, generic_share=0.5,
                                              clip_grad=1.0, seed=0, checkpoint_every=200)

    def as_dict(self) -> dict:
        return {"corpus": dataclasses.asdict(self.corpus), "pretrain": dataclasses.asdict(self.pretrain)}


RECIPE = Recipe()


def corpus_record(corpus: Corpus, config: CorpusConfig) -> dict:
    """What the backbone saw, by content: one hash per generic scene (image and caption), the normals' file hashes."""
    scenes = [hashlib.sha256(image.tobytes() + caption.encode()).hexdigest()[:16]
              for image, caption, source in zip(corpus.images, corpus.captions, corpus.sources) if source == "generic"]
    content = hashlib.sha256(json.dumps([scenes, corpus.normal_hashes], sort_keys=True).encode()).hexdigest()
    return {"version": CORPUS_VERSION, "id": corpus_id(config), "content": content, "config": dataclasses.asdict(config),
            "generic_scenes": scenes, "normals": corpus.normal_hashes}


def model_index() -> dict:
    """diffusers' pipeline index, so the folder also opens as a StableDiffusionPipeline."""
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _version("diffusers"),
            "vae": ["diffusers", "AutoencoderTiny"], "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}


def train(out: Path = SHIPPED, recipe: Recipe = RECIPE, progress: bool = True,
          announce: Callable[[str], None] = print) -> Path:
    """Train the backbone of `recipe` into `out` (atomically; a killed run resumes from `<out>.partial`)."""
    from harness.diffusion.pretrain import pretrain

    out = Path(out)
    if (out / TRAINING_FILE).is_file():
        raise ConfigError(f"{out} already holds a trained backbone; remove it (or give another --out) to train again")
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    start, code = time.perf_counter(), git_version()
    announce(f"drawing the corpus ({recipe.corpus.generic} generic scenes and the synthetic normals)")
    corpus = build(recipe.corpus, progress=progress)
    record = corpus_record(corpus, recipe.corpus)
    backbone, history = pretrain(corpus.images, corpus.captions, recipe.pretrain, progress=progress,
                                 checkpoints=partial, announce=announce, words=vocabulary(recipe.corpus.categories),
                                 sources=corpus.sources)
    training = {"recipe": recipe.as_dict(), "corpus": {k: record[k] for k in ("version", "id", "content")},
                "images": {"generic": recipe.corpus.generic, **{c: len(h) for c, h in corpus.normal_hashes.items()}},
                "vocabulary": len(backbone.tokenizer), "history": history,
                "seconds": round(time.perf_counter() - start, 1), "machine": machine(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "code": code,
                "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    with atomic_directory(out, overwrite=True) as tmp:
        backbone.save(tmp)
        atomic_write_json(tmp / "model_index.json", model_index())
        atomic_write_json(tmp / CORPUS_FILE, record)
        atomic_write_json(tmp / TRAINING_FILE, training)
    shutil.rmtree(partial, ignore_errors=True)
    return out


def read_json(folder: Path, name: str) -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise ConfigError(f"{path}: missing; the backbone folder is incomplete (train it with `defectbench backbone "
                          f"train`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


def machine() -> dict:
    """Where it ran: what the numbers and the time depend on."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch, "cpu") else {}
    return {"cpu": capabilities.get("cpu_name") or platform.processor(), "cpu_capability":
            torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "diffusers": _version("diffusers"), "transformers": _version("transformers"),
            "python": platform.python_version(), "os": platform.platform()}


def git_version() -> str:
    """The commit the code was at (with `+dirty` where the tree had changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "") if commit else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
