"""Pretraining of the tiny backbone on normal images: the stand-in for Stable Diffusion's pretraining.

Two stages, as latent diffusion is trained: the VAE first (reconstruction, MSE, plus a small KL term; SD's
perceptual and adversarial terms are left out because their networks would need pretrained weights), then the
UNet and the text encoder on the frozen VAE's latents with the epsilon-prediction loss of DDPM, conditioned on
prompts "a photo of a <category>" and, one time in ten, on the empty prompt (so classifier-free guidance works).
The methods then fine-tune this backbone few-shot, as the papers fine-tune SD.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.diffusion.backbone import Backbone, build_tiny


@dataclass(frozen=True)
class PretrainConfig:
    resolution: int = 128
    vae_steps: int = 400
    unet_steps: int = 800
    batch_size: int = 8
    vae_lr: float = 1e-3
    unet_lr: float = 3e-4
    kl_weight: float = 1e-6
    empty_prompt_rate: float = 0.1
    seed: int = 0


def prompt_for(category: str) -> str:
    return f"a photo of a {category.replace('_', ' ')}"


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def pretrain(images: np.ndarray, categories: list[str], config: PretrainConfig = PretrainConfig(),
             progress: bool = False) -> tuple[Backbone, dict]:
    """A tiny backbone trained on `images` (uint8 (N, H, W, 3) at config.resolution), image i showing a
    `categories[i]`. Returns the backbone and the loss history (mean over each tenth of each stage)."""
    if len(images) != len(categories) or len(images) == 0:
        raise ValueError(f"need one category per image and at least one image (got {len(images)}, {len(categories)})")
    backbone = build_tiny(sorted(set(categories)), config.resolution, config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    history = {"vae": _train_vae(backbone, images, config, rng, generator, progress),
               "unet": _train_unet(backbone, images, categories, config, rng, generator, progress)}
    for module in (backbone.vae, backbone.unet, backbone.text_encoder):
        module.eval().requires_grad_(False)
    return backbone, history


def _batch(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, n, size)


def _train_vae(backbone: Backbone, images: np.ndarray, config: PretrainConfig, rng, generator, progress) -> list[float]:
    vae = backbone.vae.train()
    optimiser = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    losses = []
    for _ in tqdm(range(config.vae_steps), desc="pretrain VAE", disable=not progress, leave=False):
        x = to_model_input(images[_batch(rng, len(images), config.batch_size)])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = F.mse_loss(vae.decode(z).sample, x) + config.kl_weight * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return _tenths(losses)


def _train_unet(backbone: Backbone, images: np.ndarray, categories: list[str], config: PretrainConfig, rng,
                generator, progress) -> list[float]:
    unet, text_encoder = backbone.unet.train(), backbone.text_encoder.train()
    optimiser = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=config.unet_lr)
    prompts = np.array([prompt_for(c) for c in categories])
    steps_total = backbone.scheduler.config.num_train_timesteps
    losses = []
    for _ in tqdm(range(config.unet_steps), desc="pretrain UNet", disable=not progress, leave=False):
        chosen = _batch(rng, len(images), config.batch_size)
        with torch.no_grad():
            z0 = backbone.encode_images(to_model_input(images[chosen]))
        text = [p if rng.random() >= config.empty_prompt_rate else "" for p in prompts[chosen]]
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, steps_total, (len(chosen),), generator=generator)
        z_t = backbone.scheduler.add_noise(z0, noise, t)
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=backbone.encode_text(text)).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return _tenths(losses)


def _tenths(losses: list[float]) -> list[float]:
    chunks = np.array_split(np.asarray(losses), min(10, len(losses))) if losses else []
    return [round(float(c.mean()), 5) for c in chunks]
