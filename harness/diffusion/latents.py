"""Between the harness's arrays and a backbone's latents: images <-> latents, masks -> latent masks, resizing."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.diffusion.backbone import Backbone


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode(backbone: Backbone, images: np.ndarray | torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """uint8 images (B, H, W, 3), or a float tensor (B, 3, H, W) in [-1, 1] -> scaled latents (posterior means)
    on the backbone's device."""
    tensor = images if isinstance(images, torch.Tensor) else to_tensor(images)
    out = [backbone.encode_images(tensor[i:i + batch_size].to(backbone.device))
           for i in range(0, len(tensor), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def decode(backbone: Backbone, latents: torch.Tensor) -> np.ndarray:
    return to_uint8(backbone.decode_latents(latents))


def latent_mask(masks: np.ndarray, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool masks (B, H, W) -> float {0, 1} (B, 1, size, size) by max-pooling: a latent cell is in the mask if any
    of its pixels is, so the whole defect lies inside the latent mask (a defect pixel outside it would be learnt
    as background)."""
    tensor = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    return F.adaptive_max_pool2d(tensor, size).to(device)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, size, size, 3), PIL bicubic (the loader's filter)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) for image in images])


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """bool (B, H, W) -> (B, size, size): bilinear on {0, 1}, then >= 1/2."""
    if masks.shape[1:3] == (size, size):
        return masks
    tensor = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    return (F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0] >= 0.5).numpy()


def initial_noise(rng: np.random.Generator, backbone: Backbone, size: int, count: int = 1) -> torch.Tensor:
    """Starting latents z_T ~ N(0, I) of one sample (count of them, e.g. a pair's branches), drawn on the CPU from
    the sample's own random stream, so a sample is the same on any device and in any batch: (count, C, h, w)."""
    channels, side = backbone.unet.config.in_channels, size // backbone.latent_factor
    generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    return torch.randn(count, channels, side, side, generator=generator)
