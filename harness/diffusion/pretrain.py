"""Training of the tiny backbone on captioned images: the stand-in for Stable Diffusion's pretraining (the shipped
backbone, shipped.py), and the fine-tuning of a trained one on a run's normal images (provision.py).

Two stages, as latent diffusion is trained: the autoencoder first (reconstruction, MSE; SD's perceptual and
adversarial terms are left out because their networks would need pretrained weights; the tiny autoencoder is
deterministic, as TAESD, so there is no KL term), then the latent scale (one over the latents' standard deviation,
SD's rule), then the UNet and the text encoder on the frozen autoencoder's latents with DDPM's loss in the
backbone's parametrization (the noise, or v as SD 2.x: `prediction_type`, `ddim.training_target`), conditioned on
each image's caption and, one time in ten, on the empty prompt (so classifier-free guidance works). A fine-tuning
(`start_from`) extends the vocabulary by the captions' new words, skips the autoencoder (vae_steps 0) and keeps its
latent scale.
Both stages use AdamW with a one-cycle schedule (5% warm-up, cosine decay), which takes short runs much further
than a constant rate.

The VAE sees generic content too (random shapes and colours drawn on its crops, `generic_content`), so that it
stays a general autoencoder as SD's is, rather than one that can only reconstruct normal images.
The VAE is fully convolutional, so it trains on random `vae_crop` px crops (more crops per step for the same cost
than whole 128 px images, as SD's VAE trained on 256 px crops); the images are encoded once for the UNet stage.
With a checkpoint folder, both stages save their state every `checkpoint_every` steps, and a killed training
resumes where it stopped with the same random numbers (tested).
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.diffusion import ddim
from harness.diffusion.backbone import (CONV_LAYOUT, Backbone, build_tiny, extend_vocabulary, split_words,
                                       unscaled_latents)
from harness.device import autocast, default_device
from harness.diffusion.latents import to_tensor as to_model_input
from harness.io import atomic_write_bytes


@dataclass(frozen=True)
class PretrainConfig:
    resolution: int = 128
    vae_steps: int = 1400
    unet_steps: int = 600
    vae_batch: int = 32  # VAE training crops per step
    vae_crop: int = 32  # VAE training crops (px); 0: whole images
    batch_size: int = 8  # UNet training latents per step
    vae_lr: float = 3e-3  # peak rates of a one-cycle schedule (5% warm-up, cosine decay): short runs converge further
    unet_lr: float = 1e-3
    vae_augment: bool = True  # generic content in the VAE's crops (see generic_content)
    vae_autocast: str = "float32"  # float32 | auto: the VAE stage's forward pass in bf16 where the CPU or GPU
    #                                computes bf16 natively (harness/device.py); another backbone: README.md
    empty_prompt_rate: float = 0.1
    prediction_type: str = "v_prediction"  # the UNet's target: v (SD 2.x) or epsilon, the noise (SD 1.5); README.md
    generic_share: float = 0.5  # of each batch, drawn from the images whose source is "generic" (where there are any)
    clip_grad: float = 0.0  # the gradients' norm is clipped to this (0: not clipped)
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints of a stage (0: none)


CHECKPOINT = "pretrain-checkpoint.pt"


def prompt_for(category: str) -> str:
    return f"a photo of a {category.replace('_', ' ')}"


def pretrain(images: np.ndarray, captions: list[str], config: PretrainConfig = PretrainConfig(),
             progress: bool = False, checkpoints: Path | None = None,
             announce: Callable[[str], None] | None = None, *, words: list[str] | None = None,
             sources: list[str] | None = None, start_from: Backbone | None = None) -> tuple[Backbone, dict]:
    """A tiny backbone trained on `images` (uint8 (N, H, W, 3) at config.resolution), image i captioned
    `captions[i]`. Returns the backbone and the loss history (mean over each tenth of each stage).

    `words`: the tokenizer's vocabulary beyond its reserved words (default: the captions' words). `sources`: where
    each image comes from; batches draw config.generic_share of their images from those of source "generic".
    `start_from`: a trained backbone to fine-tune instead of a new one (its vocabulary extended by the captions'
    new words; with vae_steps 0 its autoencoder and latent scale are kept, as SD's are when it is fine-tuned).
    With `checkpoints` (a folder), each stage saves its state there every config.checkpoint_every steps and a
    killed pretraining resumes from the last one, drawing the same random numbers as an uninterrupted run.
    `announce` receives a one-line estimate of the time it will take, measured on a few steps first."""
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"need one caption per image and at least one image (got {len(images)}, {len(captions)})")
    if sources is not None and len(sources) != len(images):
        raise ValueError(f"need one source per image (got {len(sources)} for {len(images)} images)")
    vocabulary = sorted({w for c in (words or captions) for w in split_words(c)})
    if start_from is None:
        backbone = build_tiny(vocabulary, config.resolution, config.seed, config.prediction_type)
    else:
        backbone = start_from
        backbone.unet.to(memory_format=CONV_LAYOUT)  # as build_tiny's: faster steps on a CPU
        extend_vocabulary(backbone, vocabulary)
    # random numbers are drawn on the CPU (the same stream on every device), the networks train on the GPU if any
    backbone.to(default_device())
    weights = _draw_weights(sources, config.generic_share)
    if announce is not None:
        announce(_estimate(backbone, images, captions, config))
    saved = _load_checkpoint(checkpoints)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    vae = _train_vae(backbone, images, config, rng, generator, progress, checkpoints, saved, weights)
    keep_scale = start_from is not None and config.vae_steps == 0
    unet = _train_unet(backbone, images, captions, config, rng, generator, progress, checkpoints, saved, vae, weights,
                       keep_scale)
    history = {"vae": vae["history"], "unet": unet["history"],
               "seconds": {"vae": round(vae["seconds"], 1), "unet": round(unet["seconds"], 1)}}
    for module in (backbone.vae, backbone.unet, backbone.text_encoder):
        module.eval().requires_grad_(False)
    return backbone.to(torch.device("cpu")), history


def _draw_weights(sources: list[str] | None, generic_share: float) -> np.ndarray | None:
    """Each image's probability of being drawn into a batch: `generic_share` spread over the generic images, the
    rest over the others (None: uniform, when there are not both)."""
    if sources is None:
        return None
    generic = np.array([s == "generic" for s in sources])
    if generic.all() or not generic.any():
        return None
    return np.where(generic, generic_share / generic.sum(), (1 - generic_share) / (~generic).sum())


def _batch(rng: np.random.Generator, n: int, size: int, weights: np.ndarray | None = None) -> np.ndarray:
    return rng.integers(0, n, size) if weights is None else rng.choice(n, size, p=weights)


def _crops(rng: np.random.Generator, images: np.ndarray, size: int) -> np.ndarray:
    """One random size x size crop of each image (the whole image when size is 0 or not smaller)."""
    height, width = images.shape[1:3]
    if not size or size >= min(height, width):
        return images
    ys, xs = rng.integers(0, height - size + 1, len(images)), rng.integers(0, width - size + 1, len(images))
    return np.stack([image[y:y + size, x:x + size] for image, y, x in zip(images, ys, xs)])


def generic_content(rng: np.random.Generator, crops: np.ndarray, shapes: int = 3) -> np.ndarray:
    """The crops (uint8 (B, h, w, 3)) flipped, their colours scaled, and up to `shapes` random ellipses and strokes
    drawn on each, filled with a random flat colour or the pixels beneath scaled by a random factor.

    SD's VAE is a general image autoencoder; trained on normal images alone ours would be a model of normality
    that reconstructs any anomaly as normal (the principle of reconstruction-based anomaly detection), and no
    fine-tuning of the UNet could then draw a defect. Random shapes of random colour and contrast keep it general.
    No defect image is used."""
    out = crops.astype(np.float32)
    height, width = out.shape[1:3]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for image in out:
        if rng.random() < 0.5:
            image[:] = image[:, ::-1]
        if rng.random() < 0.5:
            image[:] = image[::-1]
        image *= rng.uniform(0.8, 1.2, 3).astype(np.float32)
        for _ in range(rng.integers(0, shapes + 1)):
            region = _random_shape(rng, y, x)
            if rng.random() < 0.5:
                image[region] = rng.uniform(0, 255, 3)
            else:
                image[region] *= rng.uniform(0.3, 1.7)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _random_shape(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A random ellipse or straight stroke (bool map) of 1/40 to 1/4 of the crop's side."""
    side = min(y.shape)
    cy, cx = rng.uniform(0, y.shape[0]), rng.uniform(0, y.shape[1])
    if rng.random() < 0.5:
        ry, rx = rng.uniform(side / 40, side / 4, 2)
        angle = rng.uniform(0, np.pi)
        dy, dx = y - cy, x - cx
        u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
        return (u / ry) ** 2 + (v / rx) ** 2 <= 1
    angle, length, width = rng.uniform(0, 2 * np.pi), rng.uniform(side / 8, side / 2), rng.uniform(0.5, side / 20)
    ey, ex = cy + length * np.sin(angle), cx + length * np.cos(angle)
    along = np.clip(((y - cy) * (ey - cy) + (x - cx) * (ex - cx)) / length ** 2, 0, 1)
    return np.hypot(y - cy - along * (ey - cy), x - cx - along * (ex - cx)) <= width


@dataclass
class _Stage:
    """One pretraining stage's loop: optimiser, one-cycle schedule, checkpoints, loss history."""

    name: str
    modules: dict[str, torch.nn.Module]
    steps: int
    lr: float
    rng: np.random.Generator
    generator: torch.Generator
    checkpoints: Path | None
    every: int
    clip_grad: float = 0.0
    extra: dict = field(default_factory=dict)  # saved with every checkpoint (the UNet stage: the finished VAE)
    seconds_before: float = 0.0  # spent before a resume
    seconds: float = 0.0

    def run(self, step_loss: Callable[[], torch.Tensor], saved: dict | None, progress: bool) -> list[float]:
        params = [p for m in self.modules.values() for p in m.parameters()]
        optimiser = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        total = max(self.steps, 1)  # 5% warm-up (10% for 20 steps: torch divides by zero where it ends on step 0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=self.lr, total_steps=total,
                                                       pct_start=0.1 if round(0.05 * total, 9) == 1 else 0.05)
        losses: list[float] = []
        start, self.clock = 0, time.perf_counter()
        if saved is not None and saved["stage"] == self.name:
            start = self._restore(saved, optimiser, schedule, losses)
        for step in tqdm(range(start, self.steps), desc=f"pretrain {self.name}", initial=start, total=self.steps,
                         disable=not progress, leave=False):
            loss = step_loss()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            if self.checkpoints is not None and self.every and (step + 1) % self.every == 0 and step + 1 < self.steps:
                self._save(step + 1, optimiser, schedule, losses)
        self.seconds = self.elapsed()
        return loss_tenths(losses)

    def elapsed(self) -> float:
        """Seconds spent in this stage, over every start of a resumed training."""
        return self.seconds_before + time.perf_counter() - self.clock

    def _save(self, step: int, optimiser, schedule, losses: list[float]) -> None:
        buffer = io.BytesIO()
        torch.save({"stage": self.name, "step": step, "losses": losses, "seconds": self.elapsed(),
                    "modules": {k: {n: t.cpu() for n, t in m.state_dict().items()} for k, m in self.modules.items()},
                    "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                    "rng": json.dumps(self.rng.bit_generator.state), "generator": self.generator.get_state(),
                    "extra": self.extra}, buffer)
        atomic_write_bytes(self.checkpoints / CHECKPOINT, buffer.getvalue())

    def _restore(self, saved: dict, optimiser, schedule, losses: list[float]) -> int:
        for key, module in self.modules.items():
            module.load_state_dict(saved["modules"][key])
        optimiser.load_state_dict(saved["optimiser"])
        schedule.load_state_dict(saved["schedule"])
        self.rng.bit_generator.state = json.loads(saved["rng"])
        self.generator.set_state(saved["generator"])
        losses += saved["losses"]
        self.seconds_before = float(saved.get("seconds", 0.0))
        return int(saved["step"])


def _load_checkpoint(folder: Path | None) -> dict | None:
    path = folder / CHECKPOINT if folder is not None else None
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _vae_loss(backbone: Backbone, images: np.ndarray, config: PretrainConfig, rng,
              weights: np.ndarray | None) -> torch.Tensor:
    crops = _crops(rng, images[_batch(rng, len(images), config.vae_batch, weights)], config.vae_crop)
    x = to_model_input(generic_content(rng, crops) if config.vae_augment else crops).to(backbone.device)
    with autocast(backbone.device, config.vae_autocast):
        reconstruction = backbone.vae.decode(unscaled_latents(backbone.vae, x)).sample
    return F.mse_loss(reconstruction.float(), x)


def _train_vae(backbone: Backbone, images: np.ndarray, config: PretrainConfig, rng, generator, progress,
               checkpoints: Path | None, saved: dict | None, weights: np.ndarray | None = None) -> dict:
    """The autoencoder stage: {"history": losses, "seconds": spent}."""
    if saved is not None and saved["stage"] == "UNet":  # the VAE stage had finished before the kill
        backbone.vae.load_state_dict(saved["extra"]["vae"])
        backbone.vae.eval().requires_grad_(False)
        return {"history": saved["extra"]["vae_history"], "seconds": saved["extra"].get("vae_seconds", 0.0)}
    if config.vae_steps == 0:
        backbone.vae.eval().requires_grad_(False)
        return {"history": [], "seconds": 0.0}
    backbone.vae.train().requires_grad_(True)
    stage = _Stage("VAE", {"vae": backbone.vae}, config.vae_steps, config.vae_lr, rng, generator, checkpoints,
                   config.checkpoint_every, config.clip_grad)
    history = stage.run(lambda: _vae_loss(backbone, images, config, rng, weights), saved, progress)
    backbone.vae.eval().requires_grad_(False)
    return {"history": history, "seconds": stage.seconds}


def _train_unet(backbone: Backbone, images: np.ndarray, captions: list[str], config: PretrainConfig, rng,
                generator, progress, checkpoints: Path | None, saved: dict | None, vae: dict,
                weights: np.ndarray | None = None, keep_scale: bool = False) -> dict:
    """The UNet + text encoder stage on the frozen autoencoder's latents: {"history": losses, "seconds": spent}."""
    unet, text_encoder = backbone.unet.train().requires_grad_(True), backbone.text_encoder.train().requires_grad_(True)
    prompts = np.array(captions, dtype=object)
    steps_total = backbone.scheduler.config.num_train_timesteps
    latents = _encode_all(backbone, images, config.batch_size)
    if not keep_scale:
        # SD's latent scale (0.18215) is one over the standard deviation of its VAE's latents: the same rule here
        backbone.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * backbone.latent_scale

    def step_loss() -> torch.Tensor:
        chosen = _batch(rng, len(images), config.batch_size, weights)
        z0 = latents[torch.from_numpy(chosen).to(latents.device)]
        text = [p if rng.random() >= config.empty_prompt_rate else "" for p in prompts[chosen]]
        noise = _randn(z0.shape, generator, z0.device)
        t = torch.randint(0, steps_total, (len(chosen),), generator=generator).to(z0.device)
        z_t = backbone.scheduler.add_noise(z0, noise, t)
        return F.mse_loss(unet(z_t, t, encoder_hidden_states=backbone.encode_text(text)).sample,
                          ddim.training_target(backbone.scheduler, z0, noise, t))

    finished_vae = {"vae": {n: t.cpu() for n, t in backbone.vae.state_dict().items()}, "vae_history": vae["history"],
                    "vae_seconds": vae["seconds"]}
    stage = _Stage("UNet", {"unet": unet, "text_encoder": text_encoder}, config.unet_steps, config.unet_lr, rng,
                   generator, checkpoints, config.checkpoint_every, config.clip_grad, finished_vae)
    history = stage.run(step_loss, saved, progress)
    return {"history": history, "seconds": stage.seconds}


def _estimate(backbone: Backbone, images: np.ndarray, captions: list[str], config: PretrainConfig) -> str:
    """A one-line estimate of the pretraining's time from timed steps of each stage on copies of the networks
    (random numbers of their own: the real run's stream is not touched). Each stage runs one untimed step first,
    so a GPU's start-up (kernel selection, lazy loading) does not count as training time."""
    import copy

    probe = copy.deepcopy(backbone)
    rng, generator = np.random.default_rng(config.seed + 1), torch.Generator().manual_seed(config.seed + 1)
    seconds = {"vae": 0.0}
    for stage in ("vae", "unet") if config.vae_steps else ("unet",):
        durations = []
        for steps in (1, 3):  # the warm-up, then three timed steps
            timed = PretrainConfig(**{**dataclasses.asdict(config), "vae_steps": steps if stage == "vae" else 0,
                                      "unet_steps": steps if stage == "unet" else 0, "checkpoint_every": 0})
            clock = time.perf_counter()
            if stage == "vae":
                _train_vae(probe, images[:timed.batch_size], timed, rng, generator, False, None, None)
            else:
                _train_unet(probe, images[:timed.batch_size], captions[:timed.batch_size], timed, rng, generator,
                            False, None, None, {"history": [], "seconds": 0.0}, keep_scale=True)
            durations.append(time.perf_counter() - clock)
        seconds[stage] = durations[-1] / 3
    total = seconds["vae"] * config.vae_steps + seconds["unet"] * config.unet_steps
    return (f"training the tiny backbone on {len(images)} images ({config.vae_steps} autoencoder + "
            f"{config.unet_steps} UNet steps on {backbone.device.type}, {torch.get_num_threads()} threads): "
            f"about {total / 60:.1f} min")


def _randn(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device)


@torch.no_grad()
def _encode_all(backbone: Backbone, images: np.ndarray, batch_size: int) -> torch.Tensor:
    """The VAE's latents of every image, unscaled."""
    return torch.cat([unscaled_latents(backbone.vae, to_model_input(images[start:start + batch_size]).to(backbone.device))
                      for start in range(0, len(images), batch_size)])


def loss_tenths(losses: list[float]) -> list[float]:
    """The mean loss over each tenth of a run (fewer chunks for short runs): a compact history."""
    chunks = np.array_split(np.asarray(losses), min(10, len(losses))) if losses else []
    return [round(float(c.mean()), 5) for c in chunks]
