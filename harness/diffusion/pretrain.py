"""Pretraining of the tiny backbone on normal images: the stand-in for Stable Diffusion's pretraining.

Two stages, as latent diffusion is trained: the VAE first (reconstruction, MSE, plus a small KL term; SD's
perceptual and adversarial terms are left out because their networks would need pretrained weights), then the
UNet and the text encoder on the frozen VAE's latents with the epsilon-prediction loss of DDPM, conditioned on
prompts "a photo of a <category>" and, one time in ten, on the empty prompt (so classifier-free guidance works).

The VAE sees generic content too (random shapes and colours drawn on its crops, `generic_content`), so that it
stays a general autoencoder as SD's is, rather than one that can only reconstruct normal images.
The VAE is fully convolutional, so it trains on random `vae_crop` px crops (5x faster than whole 128 px images on
a CPU, as SD's VAE trained on 256 px crops); the images are encoded once for the UNet stage (posterior mean and
standard deviation kept, a latent drawn from them at every step).
The methods then fine-tune this backbone few-shot, as the papers fine-tune SD.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.diffusion.backbone import Backbone, build_tiny
from harness.device import default_device
from harness.diffusion.latents import to_tensor as to_model_input


@dataclass(frozen=True)
class PretrainConfig:
    resolution: int = 128
    vae_steps: int = 400
    unet_steps: int = 800
    batch_size: int = 8
    vae_crop: int = 64  # VAE training crops (px); 0: whole images
    vae_lr: float = 1e-3
    unet_lr: float = 3e-4
    kl_weight: float = 1e-6
    vae_augment: bool = True  # generic content in the VAE's crops (see generic_content)
    empty_prompt_rate: float = 0.1
    seed: int = 0


def prompt_for(category: str) -> str:
    return f"a photo of a {category.replace('_', ' ')}"


def pretrain(images: np.ndarray, categories: list[str], config: PretrainConfig = PretrainConfig(),
             progress: bool = False) -> tuple[Backbone, dict]:
    """A tiny backbone trained on `images` (uint8 (N, H, W, 3) at config.resolution), image i showing a
    `categories[i]`. Returns the backbone and the loss history (mean over each tenth of each stage)."""
    if len(images) != len(categories) or len(images) == 0:
        raise ValueError(f"need one category per image and at least one image (got {len(images)}, {len(categories)})")
    # random numbers are drawn on the CPU (the same stream on every device), the networks train on the GPU if any
    backbone = build_tiny(sorted(set(categories)), config.resolution, config.seed).to(default_device())
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    history = {"vae": _train_vae(backbone, images, config, rng, generator, progress),
               "unet": _train_unet(backbone, images, categories, config, rng, generator, progress)}
    for module in (backbone.vae, backbone.unet, backbone.text_encoder):
        module.eval().requires_grad_(False)
    return backbone.to(torch.device("cpu")), history


def _batch(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, n, size)


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


def _train_vae(backbone: Backbone, images: np.ndarray, config: PretrainConfig, rng, generator, progress) -> list[float]:
    vae = backbone.vae.train()
    optimiser = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    losses = []
    for _ in tqdm(range(config.vae_steps), desc="pretrain VAE", disable=not progress, leave=False):
        crops = _crops(rng, images[_batch(rng, len(images), config.batch_size)], config.vae_crop)
        x = to_model_input(generic_content(rng, crops) if config.vae_augment else crops).to(backbone.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, backbone.device)
        loss = F.mse_loss(vae.decode(z).sample, x) + config.kl_weight * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return loss_tenths(losses)


def _train_unet(backbone: Backbone, images: np.ndarray, categories: list[str], config: PretrainConfig, rng,
                generator, progress) -> list[float]:
    unet, text_encoder = backbone.unet.train(), backbone.text_encoder.train()
    optimiser = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=config.unet_lr)
    prompts = np.array([prompt_for(c) for c in categories])
    steps_total = backbone.scheduler.config.num_train_timesteps
    mean, std = _encode_all(backbone, images, config.batch_size)
    losses = []
    for _ in tqdm(range(config.unet_steps), desc="pretrain UNet", disable=not progress, leave=False):
        chosen = _batch(rng, len(images), config.batch_size)
        index = torch.from_numpy(chosen).to(mean.device)
        z0 = (mean[index] + std[index] * _randn(mean[index].shape, generator, mean.device)) * backbone.latent_scale
        text = [p if rng.random() >= config.empty_prompt_rate else "" for p in prompts[chosen]]
        noise = _randn(z0.shape, generator, z0.device)
        t = torch.randint(0, steps_total, (len(chosen),), generator=generator).to(z0.device)
        z_t = backbone.scheduler.add_noise(z0, noise, t)
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=backbone.encode_text(text)).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return loss_tenths(losses)


def _randn(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device)


@torch.no_grad()
def _encode_all(backbone: Backbone, images: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every image, unscaled."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = backbone.vae.encode(to_model_input(images[start:start + batch_size]).to(backbone.device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def loss_tenths(losses: list[float]) -> list[float]:
    """The mean loss over each tenth of a run (fewer chunks for short runs): a compact history."""
    chunks = np.array_split(np.asarray(losses), min(10, len(losses))) if losses else []
    return [round(float(c.mean()), 5) for c in chunks]
