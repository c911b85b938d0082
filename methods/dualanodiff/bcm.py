"""DualAnoDiff's background compensation module, BCM (Jin et al., CVPR 2025, Sec. 3.3, Eq. 5-6).

A background image I_b = (1 - M_f) * I (the image with its object blacked out; M_f an object mask) is denoised by
the whole-image branch in a pass of its own, which keeps each self-attention layer's input features phi(z_b).
In the dual pass, the whole-image branch's self-attention then takes its keys and values from
    phi(z) <- phi(z) + gamma * MLP(phi(z_b))                      (Eq. 5-6)
(its queries from phi(z) alone); gamma is a learnable scalar per layer, initialised at 0.1, the MLP two linear
layers with a GELU between them. The part branch and the cross-attention layers are unchanged.

The paper and the authors' code (bcm-dual-interrelated_diff/) differ, and this follows the paper: the code mixes
(1 - a) phi(z) + a MLP(phi(z_b)) with a = 0 at the start (BCM switched off until trained), has no activation in its
MLP (two linear layers are one linear map) and encodes the background without the autoencoder's latent scale.
Where the paper is silent, the code's choices are kept: the background pass uses the whole branch's LoRA and no
SAIM, its latent is noised at the pair's timestep with its own noise, the MLP's hidden width is 320 at every layer
(SD 1.5's smallest width; `hidden` in method.yaml), and in classifier-free guidance the unconditional branch's
background is a mid-grey image (the VAE latent of zeros).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from harness.diffusion.latents import to_tensor
from harness.diffusion.processors import Behaviour, Call
from harness.imaging import estimate_foreground

GAMMA_INIT = 0.1
WHOLE = slice(0, None, 2)  # the whole branch's samples of the dual pass's interleaved (whole, part) pairs (saim.py)


@dataclass(frozen=True)
class BackgroundPass:
    """BCM's input in the background pass (the whole branch alone): each self-attention layer's input features are
    written to `features`."""

    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class BackgroundFeatures:
    """BCM's input in the dual pass: the background pass's features, read by the same layers."""

    features: dict[str, torch.Tensor]


class BackgroundCompensation(Behaviour):
    """phi(z) + gamma * MLP(phi(z_b)) for one self-attention layer: the whole branch's keys and values."""

    slot = "bcm"

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(channels, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, channels))
        self.gamma = torch.nn.Parameter(torch.tensor(GAMMA_INIT))

    def forward(self, features: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        if background.shape != features.shape:
            raise ValueError(f"BCM: background features {tuple(background.shape)} do not match the whole branch's "
                             f"{tuple(features.shape)} (one background per whole image)")
        return features + self.gamma * self.mlp(background)

    def keys_from(self, source: torch.Tensor, call: Call) -> torch.Tensor:
        """Eq. 5-6: the background pass writes phi(z_b); the dual pass compensates the whole branch's phi(z)."""
        if call.cross:
            return source
        written = call.context.get(BackgroundPass)
        if written is not None:
            written.features[call.layer] = source
            return source
        background = call.context.get(BackgroundFeatures)
        if background is None or call.layer not in background.features:
            raise ValueError(f"{call.layer}: BCM needs the background pass's features (saim.background_context)")
        source = source.clone()
        source[WHOLE] = self(source[WHOLE], background.features[call.layer])
        return source


def background_image(images: np.ndarray, objects: np.ndarray) -> torch.Tensor:
    """I_b = (1 - M_f) * I, the object blacked out, as the autoencoder's input: uint8 (N, H, W, 3) and bool
    (N, H, W) -> float (N, 3, H, W) in [-1, 1]."""
    return to_tensor(images * ~objects[..., None])


def object_masks(images: np.ndarray, texture: bool | None = None) -> np.ndarray:
    """M_f of each image: `harness.imaging.estimate_foreground`, the stand-in for U2-Net's object mask (everywhere
    on a texture, so a texture's background is black)."""
    return np.stack([estimate_foreground(image, texture) for image in images])
