"""AnomalyDiffusion's spatial anomaly embedding (Hu et al., AAAI 2024, Sec. 3.2): e = [e_a ; e_s].

- e_a, the anomaly embedding: a few learned vectors per defect type (4 in the paper), initialised from the token
  embedding of a word ("anomaly"), so that one model of a category keeps its defect types apart;
- e_s = E_s(m), the spatial embedding: tokens (4) computed from the defect's mask by an encoder in the style of
  pSp (Richardson et al., 2021): an IR-ResNet body, a feature pyramid, and per token a stack of stride-2
  convolutions and a linear layer. Randomly initialised, as the authors' code (it loads nothing there).

Written from the paper and from reading the authors' code (sjtuplayer/anomalydiffusion, MIT; facts only). The
encoder's sizes are parameters: the paper's (IR-50: 3, 4, 14, 3 units of 64, 128, 256, 512 channels; a 512-wide
pyramid; a 256 px mask) or a small one for the `tiny` profile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.diffusion.placeholders import at_scale


@dataclass(frozen=True)
class EncoderShape:
    input_size: int = 256  # the mask is resized to this (px)
    channels: tuple[int, ...] = (64, 128, 256, 512)  # per body stage; the first unit of each halves the size
    units: tuple[int, ...] = (3, 4, 14, 3)
    pyramid: int = 512  # the feature pyramid's width


class ResidualUnit(nn.Module):
    """IR bottleneck: BN, 3x3 conv, PReLU, 3x3 conv (stride s), BN, plus a shortcut (max-pool with stride s where the
    width stays, else a strided 1x1 conv and BN)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(channels_in), nn.Conv2d(channels_in, channels_out, 3, 1, 1, bias=False),
            nn.PReLU(channels_out), nn.Conv2d(channels_out, channels_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels_out))
        self.shortcut = (nn.MaxPool2d(1, stride) if channels_in == channels_out else
                         nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(channels_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class EqualLinear(nn.Module):
    """StyleGAN's equalised linear layer: weights drawn N(0, 1) and scaled by 1/sqrt(fan-in) at run time."""

    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features_out, features_in))
        self.bias = nn.Parameter(torch.zeros(features_out))
        self.scale = 1 / math.sqrt(features_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class TokenHead(nn.Module):
    """One token from a (C, s, s) feature map: log2(s) stride-2 3x3 convolutions with LeakyReLU down to 1 x 1,
    then an equalised linear layer (pSp's GradualStyleBlock)."""

    def __init__(self, channels_in: int, width: int, spatial: int):
        super().__init__()
        layers, channels = [], channels_in
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels, width, 3, 2, 1), nn.LeakyReLU()]
            channels = width
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(width, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(features).flatten(1))


class MaskEncoder(nn.Module):
    """E_s: masks (B, 1, H, W) -> `tokens` embeddings (B, tokens, width). The mask enters as 2m - 1 on three
    channels at `shape.input_size`; every token is read from the finest level of the pyramid, p1 (the authors' code
    sets pSp's coarse and middle indices to 0, so no head reads c3 or p2)."""

    def __init__(self, width: int, tokens: int = 4, shape: EncoderShape = EncoderShape()):
        super().__init__()
        if len(shape.channels) != 4 or len(shape.units) != 4:
            raise ValueError("the mask encoder's body has four stages (channels and units)")
        self.shape = shape
        first = shape.channels[0]
        self.stem = nn.Sequential(nn.Conv2d(3, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first), nn.PReLU(first))
        stages, channels = [], first
        for width_out, units in zip(shape.channels, shape.units):
            stages.append(nn.Sequential(*[ResidualUnit(channels if i == 0 else width_out, width_out, 2 if i == 0 else 1)
                                          for i in range(units)]))
            channels = width_out
        self.stages = nn.ModuleList(stages)
        self.lateral_middle = nn.Conv2d(shape.channels[2], shape.pyramid, 1)
        self.lateral_fine = nn.Conv2d(shape.channels[1], shape.pyramid, 1)
        if shape.channels[3] != shape.pyramid:
            raise ValueError("the pyramid's width must equal the last stage's channels (pSp adds them)")
        spatial = shape.input_size // 4  # the second stage's output
        if spatial < 1 or spatial & (spatial - 1):
            raise ValueError(f"the mask encoder's input_size / 4 must be a power of two (its heads halve it to 1 x 1), "
                             f"not {shape.input_size} / 4")
        self.heads = nn.ModuleList(TokenHead(shape.pyramid, width, spatial) for _ in range(tokens))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        x = 2 * masks.float() - 1
        x = F.interpolate(x, size=(self.shape.input_size,) * 2, mode="bilinear", align_corners=False)
        x = self.stem(x.expand(-1, 3, -1, -1))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        _, fine, middle, coarse = features
        p2 = _upsample_add(coarse, self.lateral_middle(middle))
        p1 = _upsample_add(p2, self.lateral_fine(fine))
        return torch.stack([head(p1) for head in self.heads], dim=1)


def _upsample_add(coarse: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    return F.interpolate(coarse, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


class AnomalyEmbedding(nn.Module):
    """e = [e_a ; e_s]: per sample, its defect type's `anomaly_vectors` learned vectors, then E_s of its mask; E_s's
    tokens brought to `scale` where one is given (`at_scale`: the tiny profile's `normalise_tokens`), as the paper
    where it is None."""

    def __init__(self, defect_types: list[str], initial: torch.Tensor, mask_tokens: int = 4,
                 anomaly_vectors: int = 4, shape: EncoderShape = EncoderShape(), scale: float | None = None):
        super().__init__()
        self.defect_types, self.scale = list(defect_types), scale
        # ParameterDict keys may not hold dots; indices keep any defect type's name safe
        self.anomaly = nn.ParameterList(nn.Parameter(initial.detach().clone().expand(anomaly_vectors, -1).clone())
                                        for _ in self.defect_types)
        self.encoder = MaskEncoder(initial.shape[-1], mask_tokens, shape)

    @property
    def tokens(self) -> int:
        return self.anomaly[0].shape[0] + len(self.encoder.heads)

    def forward(self, defect_types: list[str], masks: torch.Tensor) -> torch.Tensor:
        """defect type per sample, masks (B, 1, H, W) -> (B, tokens, width)."""
        unknown = sorted(set(defect_types) - set(self.defect_types))
        if unknown:
            raise ValueError(f"no anomaly embedding for defect types {unknown}; trained on {self.defect_types}")
        e_a = torch.stack([self.anomaly[self.defect_types.index(d)] for d in defect_types])
        return torch.cat([e_a, at_scale(self.encoder(masks), self.scale)], dim=1)
