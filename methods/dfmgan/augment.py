"""Adaptive discriminator augmentation (Karras et al., "Training Generative Adversarial Networks with Limited Data",
NeurIPS 2020), simplified: a subset of the `bgc` pipe (blit, geometric, colour), each operation applied to an image
with probability p, and p adjusted from the sign of D's outputs on real images. Geometric operations are one affine
resampling with reflection padding (ADA: upsampled, FIR-filtered, then resampled). Every image D sees, real or
generated, goes through the same pipe.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GEOMETRIC = ("xflip", "rotate90", "translate", "scale", "rotate", "aniso")
COLOUR = ("brightness", "contrast", "lumaflip", "saturation")
OPERATIONS = GEOMETRIC + COLOUR
# the two that made DFMGAN's stage 1 draw rotated or inverted images from few normals (its issues #6, #55, #56)
LEAKING = ("rotate90", "lumaflip")


def check_operations(names) -> None:
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown:
        raise ValueError(f"dfmgan: unknown augmentation(s) {unknown}; known: {', '.join(OPERATIONS)}")


def augment(images: torch.Tensor, p: float, operations, generator: torch.Generator | None = None) -> torch.Tensor:
    """images (B, C, H, W) in [-1, 1], the first three channels RGB; each operation on each image with probability p.
    Colour operations leave further channels (a mask) alone; geometric ones move every channel."""
    if p <= 0 or not operations:
        return images
    b, dev = images.shape[0], images.device

    def draw(shape=()):
        return torch.rand((b, *shape), generator=generator, device=dev)

    def normal(scale: float):
        return torch.randn(b, generator=generator, device=dev) * scale

    def gate(name: str):
        return (draw() < p).float() if name in operations else torch.zeros(b, device=dev)

    eye = torch.eye(3, device=dev).repeat(b, 1, 1)
    m = eye.clone()

    def then(mat: torch.Tensor):
        nonlocal m
        m = m @ mat

    on = gate("xflip")  # x -> -x
    then(_diag(1 - 2 * on * (draw() < 0.5).float(), torch.ones(b, device=dev)))
    on = gate("rotate90")
    then(_rotation(on * torch.floor(draw() * 4) * math.pi / 2))
    on = gate("translate")  # up to 1/8 of the side (ADA: whole pixels)
    t = (draw((2,)) * 2 - 1) * 0.125 * on[:, None]
    then(_translation(t))
    on = gate("scale")  # isotropic, log-normal with sigma 0.2 ln 2
    s = torch.exp2(normal(0.2) * on)
    then(_diag(s, s))
    on = gate("rotate")  # any angle (ADA: with p_rot = 1 - sqrt(1 - p), twice)
    then(_rotation((draw() * 2 - 1) * math.pi * on))
    on = gate("aniso")
    s = torch.exp2(normal(0.2) * on)
    then(_diag(s, 1 / s))
    out = images
    if not torch.allclose(m, eye):
        grid = F.affine_grid(m[:, :2], list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    rgb, rest = out[:, :3], out[:, 3:]
    on = gate("brightness")
    rgb = rgb + (normal(0.2) * on)[:, None, None, None]
    on = gate("contrast")
    rgb = rgb * torch.exp2(normal(0.5) * on)[:, None, None, None]
    luma_axis = torch.full((3,), 1 / math.sqrt(3), device=dev)
    luma = (rgb * luma_axis[None, :, None, None]).sum(1, keepdim=True) * luma_axis[None, :, None, None]
    on = gate("lumaflip")
    flip = (on * (draw() < 0.5).float())[:, None, None, None]
    rgb = rgb - 2 * flip * luma
    luma = (rgb * luma_axis[None, :, None, None]).sum(1, keepdim=True) * luma_axis[None, :, None, None]
    on = gate("saturation")
    rgb = luma + (rgb - luma) * torch.exp2(normal(1.0) * on)[:, None, None, None]
    return torch.cat([rgb, rest], dim=1)


def _diag(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(sx.shape[0], 3, 3, device=sx.device)
    m[:, 0, 0], m[:, 1, 1], m[:, 2, 2] = sx, sy, 1
    return m


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(angle.shape[0], 3, 3, device=angle.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos(), 1
    return m


def _translation(t: torch.Tensor) -> torch.Tensor:
    m = torch.eye(3, device=t.device).repeat(t.shape[0], 1, 1)
    m[:, :2, 2] = t * 2  # the grid spans [-1, 1]: a shift of 1/8 of the side is 0.25
    return m


class AdaptiveP:
    """p += sign(E[sign(D(real))] - target) * (batch * interval) / (ada_kimg * 1000), every `interval` steps, kept in
    [0, max_p] (max_p < 1: ours, against the leaks of DFMGAN's issues #6 and #56)."""

    def __init__(self, target: float, interval: int, kimg: float, batch: int, max_p: float, p: float = 0.0):
        self.target, self.interval, self.kimg, self.batch, self.max_p, self.p = target, interval, kimg, batch, max_p, p
        self.signs: list[float] = []

    def observe(self, real_logits: torch.Tensor, step: int) -> None:
        self.signs.append(float(real_logits.detach().sign().mean()))
        if (step + 1) % self.interval == 0:
            rt = sum(self.signs) / len(self.signs)
            adjust = math.copysign(1.0, rt - self.target) * self.batch * self.interval / (self.kimg * 1000)
            self.p = min(max(self.p + adjust, 0.0), self.max_p)
            self.signs.clear()
