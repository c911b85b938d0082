"""What a tiny backbone is worth before any method fine-tunes it, per synthetic category (the shipped backbone's card,
`make bench`):

- **autoencoder PSNR** on held-out normal images (the synthetic set's test/good), pooled over the images;
- **clean-latent error** at timesteps t: noise held-out normal latents to t, predict the clean latent with the UNet
  (prompted with the category), and take the RMSE over the latents' standard deviation; beside it the same error
  of a per-category **linear 5 x 5 denoiser** (ridge regression from the 5 x 5 neighbourhood of z_t, every
  channel, to the clean latent at its centre; fitted on the training normals' latents) and of the identity
  (z_t / sqrt(alpha_t));
- **samples from pure noise** (25 DDIM steps, classifier-free guidance at SD's default 7.5 and at 3): KID (the
  project's own, harness/metrics/fidelity.py) of n samples against the category's normal training images, and the
  share of samples a nearest-centroid classifier (16 x 16 thumbnails, the five categories' training normals)
  assigns to the prompted category.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.diffusion import ddim
from harness.diffusion.backbone import Backbone
from harness.diffusion.latents import decode, encode
from harness.diffusion.pretrain import prompt_for

TIMESTEPS = (10, 100, 300)


@dataclass
class CategoryImages:
    category: str
    train: np.ndarray  # uint8 (N, H, W, 3): the split's normal training images
    held_out: np.ndarray  # the test/good images


def synthetic_images(categories: tuple[str, ...], size: int = 128, synth_seed: int = 0) -> list[CategoryImages]:
    """Each synthetic category's normal training images (the default split's) and held-out normal images."""
    from harness.data.images import read_image
    from harness.diffusion.corpus import synthetic_splits

    return [CategoryImages(name, np.stack([read_image(s.image, size) for s in split.normal_train]),
                           np.stack([read_image(s.image, size) for s in split.normal_test]))
            for name, split in synthetic_splits(categories, synth_seed).items()]


@torch.no_grad()
def autoencoder_psnr(backbone: Backbone, images: np.ndarray) -> float:
    """PSNR of the reconstructions, pooled over the images (capped at 100 dB)."""
    from harness.metrics.paired import psnr_from_error

    error = np.sum((decode(backbone, encode(backbone, images)).astype(np.float64) - images) ** 2)
    return psnr_from_error(float(error), images.size)


def noised(backbone: Backbone, z0: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device)
    return backbone.scheduler.add_noise(z0, noise, torch.full((len(z0),), t, device=z0.device)), noise


def clean_estimate(backbone: Backbone, z_t: torch.Tensor, t: int, text: torch.Tensor) -> torch.Tensor:
    """The UNet's estimate of z_0 from z_t (whatever it predicts: the noise or v)."""
    output = backbone.unet(z_t, t, encoder_hidden_states=text.expand(len(z_t), -1, -1)).sample
    eps = ddim.predicted_noise(backbone.scheduler, output, z_t, t)
    alpha = ddim.alpha_at(backbone.scheduler, t).to(z_t.device)
    return (z_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def relative_rmse(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate - truth).pow(2).mean().sqrt() / truth.std())


@torch.no_grad()
def clean_latent_errors(backbone: Backbone, images: CategoryImages, timesteps=TIMESTEPS, seed: int = 0,
                        batch: int = 16) -> dict[int, dict[str, float]]:
    """{t: {"unet", "linear", "identity"}} on the held-out normals' latents (see the module's docstring)."""
    z_train, z_test = encode(backbone, images.train), encode(backbone, images.held_out)
    text = backbone.encode_text([prompt_for(images.category)])
    out = {}
    for t in timesteps:
        z_t, _ = noised(backbone, z_test, t, seed)
        unet = torch.cat([clean_estimate(backbone, z_t[i:i + batch], t, text) for i in range(0, len(z_t), batch)])
        alpha = ddim.alpha_at(backbone.scheduler, t).to(z_t.device)
        linear = LinearDenoiser.fit(*[noised(backbone, z_train, t, seed + 1 + k)[0] for k in range(2)],
                                    targets=z_train.repeat(2, 1, 1, 1)).predict(z_t)
        out[t] = {"unet": relative_rmse(unet, z_test), "linear": relative_rmse(linear, z_test),
                  "identity": relative_rmse(z_t / alpha.sqrt(), z_test)}
    return out


class LinearDenoiser:
    """z_0 at a position as an affine function of z_t's 5 x 5 neighbourhood (every channel), least squares with a
    small ridge."""

    SIZE = 5

    def __init__(self, weights: torch.Tensor):
        self.weights = weights  # (C * 25 + 1, C)

    @staticmethod
    def features(z: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(z, LinearDenoiser.SIZE, padding=LinearDenoiser.SIZE // 2)  # (B, C*25, H*W)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return torch.cat([rows, torch.ones(len(rows), 1, device=z.device)], 1).double()

    @classmethod
    def fit(cls, *noisy: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> "LinearDenoiser":
        x = cls.features(torch.cat(noisy))
        y = targets.permute(0, 2, 3, 1).reshape(-1, targets.shape[1]).double()
        gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        return cls(torch.linalg.solve(gram, x.T @ y))

    def predict(self, z_t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z_t.shape
        return (self.features(z_t) @ self.weights).float().reshape(b, h, w, c).permute(0, 3, 1, 2)


@torch.no_grad()
def samples_from_noise(backbone: Backbone, prompt: str, n: int, seed: int = 0, steps: int = 25,
                       guidance: float = 7.5, size: int = 128, batch: int = 16) -> np.ndarray:
    """n uint8 images drawn from pure noise with DDIM and classifier-free guidance."""
    generator = torch.Generator().manual_seed(seed)
    channels, factor = backbone.unet.config.in_channels, backbone.latent_factor
    text = backbone.encode_text([prompt, ""])

    def eps(z, t, condition):
        output = backbone.unet(z, t, encoder_hidden_states=condition).sample
        return ddim.predicted_noise(backbone.scheduler, output, z, t)

    out = []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        z = torch.randn((count, channels, size // factor, size // factor), generator=generator).to(backbone.device)
        condition = (text[:1].expand(count, -1, -1), text[1:].expand(count, -1, -1))
        out.append(decode(backbone, ddim.sample(ddim.guided_stacked(eps, guidance), z, backbone.scheduler, steps,
                                                condition)))
    return np.concatenate(out)


def thumbnails(images: np.ndarray, side: int = 16) -> np.ndarray:
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return F.adaptive_avg_pool2d(tensor, side).flatten(1).numpy()


def recognised(samples: np.ndarray, category: str, references: list[CategoryImages]) -> float:
    """The share of samples whose thumbnail lies nearest to `category`'s mean training thumbnail."""
    centroids = np.stack([thumbnails(r.train).mean(0) for r in references])
    distances = ((thumbnails(samples)[:, None] - centroids[None]) ** 2).sum(-1)
    names = [r.category for r in references]
    return float(np.mean([names[i] == category for i in distances.argmin(1)]))


def kid(samples: np.ndarray, real: np.ndarray, resolution: int = 128) -> dict:
    """KID between two uint8 image sets, with the benchmark's Inception (random weights where none are installed)."""
    from harness.data.images import save_image
    from harness.metrics.fidelity import InceptionFeatures, kernel_distance

    features = InceptionFeatures("tiny")
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for name, images in (("samples", samples), ("real", real)):
            paths[name] = [Path(folder) / f"{name}-{i:04d}.png" for i in range(len(images))]
            for path, image in zip(paths[name], images):
                save_image(path, image)
        pools = {name: features.extract(p, resolution)["pool"] for name, p in paths.items()}
    value = kernel_distance(pools["samples"], pools["real"])
    return {**value, "inception": features.provenance()["inception"], "random_inception": features.provenance()["random"]}


GUIDANCE = (7.5, 3.0)  # SD's pipeline default first, then a milder one


def measure(backbone: Backbone, references: list[CategoryImages], n_samples: int = 64, seed: int = 0,
            guidance: tuple[float, ...] = GUIDANCE, progress: bool = True) -> dict:
    """Every measure of the module's docstring, per category: {category: {...}}; the samples' per guidance scale."""
    from tqdm.auto import tqdm

    out = {}
    for images in tqdm(references, desc="measuring the backbone", disable=not progress, leave=False):
        drawn = {}
        for scale in guidance:
            samples = samples_from_noise(backbone, prompt_for(images.category), n_samples, seed=seed, guidance=scale)
            drawn[str(scale)] = {"kid": kid(samples, images.train),
                                 "recognised": recognised(samples, images.category, references)}
        out[images.category] = {
            "autoencoder_psnr": autoencoder_psnr(backbone, images.held_out),
            "clean_latent_error": {str(t): v for t, v in clean_latent_errors(backbone, images, seed=seed).items()},
            "samples": drawn, "n_samples": n_samples, "n_train": len(images.train),
            "n_held_out": len(images.held_out)}
    return out
