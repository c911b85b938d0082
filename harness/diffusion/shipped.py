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
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from harness.diffusion.corpus import CORPUS_VERSION, Corpus, CorpusConfig, build, corpus_id, vocabulary
from harness.diffusion.pretrain import PretrainConfig
from harness.errors import ConfigError
from harness.io import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text
from harness.paths import REPO_ROOT
from harness.provenance import code_version, machine, package_version

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


def scene_hash(image, caption: str) -> str:
    return hashlib.sha256(image.tobytes() + caption.encode()).hexdigest()[:16]


def corpus_content(scenes: list[str], normals: dict[str, list[str]]) -> str:
    """The corpus's content hash, from its scenes' hashes and its normal images' file hashes."""
    return hashlib.sha256(json.dumps([scenes, normals], sort_keys=True).encode()).hexdigest()


def corpus_record(corpus: Corpus, config: CorpusConfig) -> dict:
    """What the backbone saw, by content: one hash per generic scene (image and caption), the normals' file hashes."""
    scenes = [scene_hash(image, caption)
              for image, caption, source in zip(corpus.images, corpus.captions, corpus.sources) if source == "generic"]
    return {"version": CORPUS_VERSION, "id": corpus_id(config), "content": corpus_content(scenes, corpus.normal_hashes),
            "config": dataclasses.asdict(config), "generic_scenes": scenes, "normals": corpus.normal_hashes}


def model_index() -> dict:
    """diffusers' pipeline index, so the folder also opens as a StableDiffusionPipeline."""
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": package_version("diffusers"),
            "vae": ["diffusers", "AutoencoderTiny"], "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}


RECIPE_FILE = "recipe.json"  # in the .partial folder: a resumed training must be the same recipe


def train(out: Path = SHIPPED, recipe: Recipe = RECIPE, progress: bool = True,
          announce: Callable[[str], None] = print) -> Path:
    """Train the backbone of `recipe` into `out` (atomically; a killed run resumes from `<out>.partial`)."""
    from harness.diffusion.pretrain import pretrain

    out = Path(out)
    if (out / TRAINING_FILE).is_file():
        raise ConfigError(f"{out} already holds a trained backbone; remove it (or give another --out) to train again")
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    started = _resume_record(partial, recipe)
    announce(f"drawing the corpus ({recipe.corpus.generic} generic scenes and the synthetic normals)")
    corpus = build(recipe.corpus, progress=progress)
    record = corpus_record(corpus, recipe.corpus)
    backbone, history = pretrain(corpus.images, corpus.captions, recipe.pretrain, progress=progress,
                                 checkpoints=partial, announce=announce, words=vocabulary(recipe.corpus.categories),
                                 sources=corpus.sources)
    training = {"recipe": recipe.as_dict(), "corpus": {k: record[k] for k in ("version", "id", "content")},
                "images": {"generic": recipe.corpus.generic, **{c: len(h) for c, h in corpus.normal_hashes.items()}},
                "vocabulary": len(backbone.tokenizer), "history": history,
                "seconds": round(sum(history["seconds"].values()), 1), "machine": machine(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "code": started["code"],
                "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    with atomic_directory(out, overwrite=True) as tmp:
        backbone.save(tmp)
        atomic_write_json(tmp / "model_index.json", model_index())
        atomic_write_json(tmp / CORPUS_FILE, record)
        atomic_write_json(tmp / TRAINING_FILE, training)
    shutil.rmtree(partial, ignore_errors=True)
    return out


def _resume_record(partial: Path, recipe: Recipe) -> dict:
    """The training's record in its .partial folder: the recipe (a different one is refused, not mixed in), the
    code version of its first start, and when each start began."""
    path = partial / RECIPE_FILE
    now = {"started": time.time(), "code": code_version()["git"]}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["recipe"] != json.loads(json.dumps(recipe.as_dict())):
            raise ConfigError(f"{partial} holds the checkpoints of another recipe; remove it to start again")
        saved["starts"].append(now["started"])
    else:
        saved = {"recipe": recipe.as_dict(), "code": now["code"], "starts": [now["started"]]}
    atomic_write_json(path, saved)
    return saved


def read_json(folder: Path, name: str) -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise ConfigError(f"{path}: missing; the backbone folder is incomplete (train it with `defectbench backbone "
                          f"train`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None


# --- measures and card ------------------------------------------------------------------------------------------

# prompts of the grid's last row: the general vocabulary, drawn from noise
GENERIC_PROMPTS = ("a photo of a red circle on a grey metal surface", "a photo of a blue striped surface",
                   "a photo of a large yellow star in the centre on a black plastic surface",
                   "a photo of a brown wood surface with a dark crack", "a photo of a white paper surface",
                   "a photo of a green checkered surface", "a photo of a small pink square on a teal fabric surface",
                   "a photo of a grey stone surface with a large dark stain")


def write_grid(backbone, path: Path, categories: tuple[str, ...], per_row: int = 8, seed: int = 1) -> None:
    """One row per category (samples from pure noise), then one of the generic prompts, 4 px apart."""
    import numpy as np

    from harness.diffusion.pretrain import prompt_for
    from harness.diffusion.quality import samples_from_noise

    rows = [samples_from_noise(backbone, prompt_for(c), per_row, seed=seed) for c in categories]
    rows.append(np.concatenate([samples_from_noise(backbone, p, 1, seed=seed) for p in GENERIC_PROMPTS[:per_row]]))
    side = rows[0].shape[1]
    grid = np.full((len(rows) * (side + 4) - 4, per_row * (side + 4) - 4, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[r * (side + 4):r * (side + 4) + side, c * (side + 4):c * (side + 4) + side] = image
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def render_card(folder: Path = SHIPPED) -> str:
    """The folder's README.md, from training.json, corpus.json and measures.json."""
    from tabulate import tabulate

    folder = Path(folder)
    training, corpus = read_json(folder, TRAINING_FILE), read_json(folder, CORPUS_FILE)
    measures = read_json(folder, MEASURES_FILE) if (folder / MEASURES_FILE).is_file() else None
    pre, machine_ = training["recipe"]["pretrain"], training["machine"]
    sizes = {name: _megabytes(folder / name) for name in ("unet", "vae", "text_encoder", "tokenizer")}
    scale = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    lines = [
        "# defectbench-tiny: the tiny text-to-image backbone DefectBench ships", "",
        "A miniature of Stable Diffusion 1.5 in diffusers' folder layout (`model_index.json`, `unet/`, `vae/`, "
        "`text_encoder/`, `tokenizer/`, `scheduler/`; weights as safetensors), opened with `from_pretrained` by the "
        "same loader as SD 1.5 (`harness/diffusion/backbone.py: load`). The `tiny` profile's diffusion methods "
        "fine-tune it few-shot, as the papers fine-tune SD; a run on categories it has not seen fine-tunes it on "
        "their normal images first (`harness/diffusion/provision.py`).", "",
        "## What it is", "",
        tabulate([["UNet", "`UNet2DConditionModel`, channels 32-64-64-64, one layer per block, cross-attention "
                   "at 32/16/8 px latents, predicts v", sizes["unet"]],
                  ["autoencoder", "TAESD's architecture (`AutoencoderTiny`), 4x down, 16 latent channels, "
                   f"latent scale {scale:.4f} (1 / std of the training latents)", sizes["vae"]],
                  ["text encoder", "`CLIPTextModel`, 2 layers, width 64, 32 tokens", sizes["text_encoder"]],
                  ["tokenizer", f"word-level, {training['vocabulary']} words (below)", sizes["tokenizer"]],
                  ["scheduler", "DDIM, scaled-linear betas 0.00085-0.012, 1000 steps, v-prediction", ""]],
                 headers=["part", "what", "MB"], tablefmt="github"), "",
        "**Tokenizer: word-level, over the corpus's words.** Every word of a corpus caption is one token, its row "
        "trained as that word. The reserved words are not trained: the rare words (`sks`, `ktn`, `pll`, ...), "
        "which DreamBooth-style prompts bind new concepts to, and the base prompt words the methods use that the "
        "corpus does not (`defect`, `mask`, `normal`, `good`). CLIP's BPE vocabulary "
        "(49,408 tokens) at width 64 would be a 12.6 MB table, half this folder, with nearly every row untrained. A "
        "run that meets a word the tokenizer lacks (a new category's name) appends it, with a new row "
        "(`backbone.extend_vocabulary`), and fine-tunes.", "",
        "## What it was trained on", "",
        f"Corpus version {corpus['version']} (`harness/diffusion/corpus.py`, id `{corpus['id']}`, content "
        f"`{corpus['content'][:16]}`): {training['images']['generic']} procedural captioned scenes (surfaces of a "
        "material or pattern in a colour, shapes on them, marks on them: scratches, spots, stains, cracks, dots, "
        "streaks; captions such as \"a photo of a small red circle in the upper left on a grey metal surface\"), and "
        "the normal training images of the synthetic categories, prompted \"a photo of a <category>\": " +
        ", ".join(f"{c} {n}" for c, n in training["images"].items() if c != "generic") + ".", "",
        "**No defect leaks in.** The synthetic categories contribute their normal training images only (the default "
        "split's `normal_train`, read from the data set's files; `corpus.json` lists their hashes), never a test "
        "image; the marks are drawn by the corpus's own code on generic surfaces, never on a benchmark category's "
        "image and never by the synthetic data set's defect code. A few-shot method learns a benchmark defect from "
        "its few shots.", "",
        "## How it was made", "",
        f"`{training['command']}` at code `{training['code']}`, {training['date']}: "
        f"{pre['vae_steps']} autoencoder steps (batches of {pre['vae_batch']} crops of {pre['vae_crop']} px, peak "
        f"rate {pre['vae_lr']}), then {pre['unet_steps']} UNet + text encoder steps (batches of {pre['batch_size']}"
        f" latents, peak rate {pre['unet_lr']}, {pre['empty_prompt_rate']:.0%} empty prompts), one-cycle schedules, "
        f"gradients clipped at {pre['clip_grad']}, {pre['generic_share']:.0%} of each batch from the generic "
        f"scenes, seed {pre['seed']}; {training['seconds'] / 60:.0f} min on {machine_['threads']} threads of "
        f"{machine_['cpu']} ({machine_['cpu_capability']}; torch {machine_['torch']}, diffusers "
        f"{machine_['diffusers']}). The whole recipe is `Recipe` in `harness/diffusion/shipped.py`; `training.json` "
        "holds it with the loss history. `make backbone` trains it again (resumable: a killed run continues from "
        "`<folder>.partial`); a GPU takes minutes (the device tool, where one is lent).", ""]
    if measures:
        lines += _measure_lines(measures)
    path = folder / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return str(path)


def _megabytes(path: Path) -> str:
    return f"{sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 1e6:.1f}"


def _measure_lines(measures: dict) -> list[str]:
    from tabulate import tabulate

    shipped, before = measures["backbone"], measures.get("per_run", {})
    first = next(iter(shipped.values()))
    scales = list(first["samples"])
    timesteps = list(first["clean_latent_error"])
    quality_rows, sample_rows = [], []
    for category, m in shipped.items():
        old = before.get(category)
        errors, old_errors = m["clean_latent_error"], old["clean_latent_error"] if old else None
        quality_rows.append([category, f"{m['autoencoder_psnr']:.2f}", f"{old['autoencoder_psnr']:.2f}" if old else "—",
                             *(f"{errors[t]['unet']:.3f}" for t in timesteps),
                             *(f"{errors[t]['linear']:.3f}" for t in timesteps),
                             *((f"{old_errors[t]['unet']:.3f}" for t in timesteps) if old else ["—"] * len(timesteps))])
        for scale in scales:
            now, then = m["samples"][scale], old["samples"][scale] if old else None
            sample_rows.append([category, scale, f"{now['kid']['value']:.4f}", f"{then['kid']['value']:.4f}" if then
                                else "—", _ratio(then, now), f"{now['recognised']:.0%}",
                                f"{then['recognised']:.0%}" if then else "—"])
    random = first["samples"][scales[0]]["kid"]["random_inception"]
    not_below = [f"{category} at t = {t} ({m['clean_latent_error'][t]['unet']:.3f} against "
                 f"{m['clean_latent_error'][t]['linear']:.3f})" for category, m in shipped.items() for t in timesteps
                 if round(m["clean_latent_error"][t]["unet"], 3) >= round(m["clean_latent_error"][t]["linear"], 3)]
    t_heads = [f"t = {t}" for t in timesteps]
    return [
        "## Measures", "",
        f"`defectbench backbone measure` ({measures['date']}, code `{measures['code']}`; "
        "`harness/diffusion/quality.py`). *Per-run* is the backbone a run pretrained for itself before this one, "
        "with PretrainConfig's defaults (the smoke suite's recipe: 1,400 autoencoder + 600 UNet steps of 8, "
        "from scratch) on the five categories' normal training images.", "",
        "**Autoencoder PSNR** (dB, on the held-out normals, test/good) and **clean-latent error**: the RMSE of the "
        "UNet's estimate of the clean latent over the latents' standard deviation, on the held-out normals noised "
        "to t and prompted with their category; beside it a linear 5x5 denoiser fitted per category and t on the "
        "training normals' latents (its own autoencoder's).", "",
        tabulate(quality_rows, headers=["category", "PSNR", "PSNR per-run", *(f"UNet {h}" for h in t_heads),
                                        *(f"linear {h}" for h in t_heads), *(f"per-run UNet {h}" for h in t_heads)],
                 tablefmt="github"), "",
        ("The UNet's error is below the linear denoiser's everywhere." if not not_below else
         "The UNet's error is not below the linear denoiser's for " + "; ".join(not_below) + "; everywhere else it "
         "is below."), "",
        f"**Samples from pure noise**: {measures['n_samples']} per category, 25 DDIM steps, classifier-free guidance "
        "at SD's pipeline default (7.5) and at 3. KID: the benchmark's own, "
        + ("with a **random-weight Inception** (no weights on the machine), so it ranks backbones against each "
           "other only; " if random else "") + "against the category's normal training images. Recognised: the "
        "share of samples whose 16 x 16 thumbnail is nearest to the prompted category's mean.", "",
        tabulate(sample_rows, headers=["category", "guidance", "KID", "KID per-run", "per-run / this",
                                       "recognised", "recognised per-run"], tablefmt="github"), "",
        "One row per category from pure noise (\"a photo of a <category>\", guidance 7.5), then one sample per "
        f"generic prompt ({'; '.join(GENERIC_PROMPTS)}):", "", f"![samples]({GRID_FILE})", "",
        *LIMITS]


# What a look at the grid and the corpus shows that the numbers do not; a corpus version 2 would fix the first three.
LIMITS = [
    "## Known limits (corpus version 1)", "",
    "- Some generic words are weakly bound: a star comes out as a blob, a crack on wood is often not drawn, and the "
    "corpus draws its dots at one size whatever the size word says.",
    "- Some corpus marks are nearly invisible (light marks on white, dark ones on black), so their captions teach "
    "little; a crack's position phrase names where it starts.",
    "- The corpus's marks (scratches, spots, stains, cracks) are drawn by its own code on generic surfaces, but they "
    "are the same kinds of marks as the synthetic data set's defects: on the synthetic data a method starts from a "
    "prior that has seen such shapes, which real-data results do not share.",
    "- The reserved base words (`defect`, `mask`, `normal`, `good`) and the rare words are untrained rows: a method "
    "that prompts with them trains them, as it would bind a rare token in SD.",
    "- Guidance matters for the objects: from pure noise at guidance 3 the pill is mostly not drawn; at 7.5 it "
    "is (the table above).", ""]


def _ratio(then: dict | None, now: dict) -> str:
    if then is None:
        return "—"
    a, b = then["kid"]["value"], now["kid"]["value"]
    return f"{a / b:.1f}x" if b > 0 else ("∞ (KID ≤ 0)" if a > 0 else "—")
