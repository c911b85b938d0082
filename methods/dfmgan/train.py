"""DFMGAN's two trainings (Duan et al., AAAI 2023), both StyleGAN2's loss (Karras et al., CVPR 2020) as StyleGAN2-ADA
computes it: the non-saturating logistic loss, lazy R1 on D every `d_reg_interval` steps and lazy path-length
regularisation on G every `g_reg_interval` steps (Adam's lr x r and betas ^ r, r = I / (I + 1)), style mixing, the
generator's moving average (G_ema) and adaptive augmentation.

- stage 1 (`train_stage1`): G and D from scratch on the category's normal images.
- stage 2 (`train_stage2`): the stage-1 mapping and synthesis frozen; f_d and the residual blocks trained with
  L_G = softplus(-D(x)) + lambda_match softplus(-D_match([x, tanh(10 M)])) + lambda_ms L_ms,
  L_ms = mean|w_d1 - w_d2| / mean|tanh(10 M1) - tanh(10 M2)|; D resumed, D_match new, both with R1, on the defect
  images of one defect type with their masks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import AdaptiveP, augment
from .networks import Discriminator, GanShape, Generator


@dataclass(frozen=True)
class Training:
    steps: int
    batch: int = 16
    learning_rate: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float | None = None  # None: StyleGAN2-ADA's auto, 0.0002 * resolution^2 / batch
    pl_weight: float = 2.0
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing: float = 0.9
    g_reg_interval: int = 4
    d_reg_interval: int = 16
    ema_kimg: float | None = None  # None: batch * 10 / 32
    ema_rampup: float | None = 0.05
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_kimg: float = 500
    ada_max_p: float = 1.0
    augment: tuple[str, ...] = ()
    lambda_match: float = 1.0  # stage 2
    lambda_ms: float = 0.1  # stage 2: the code's default (its help text says 1.0)
    mask_sharpness: float = 10.0  # tanh(10 M): the mask D_match and L_ms see

    def gamma(self, resolution: int) -> float:
        return self.r1_gamma if self.r1_gamma is not None else 0.0002 * resolution ** 2 / self.batch


@dataclass
class History:
    """Per logged step: the losses and p; written into the fit's record."""

    every: int
    rows: list[dict] = field(default_factory=list)

    def log(self, step: int, **values: float) -> None:
        if step % self.every == 0:
            self.rows.append({"step": step, **{k: round(float(v.detach() if torch.is_tensor(v) else v), 5)
                                                for k, v in values.items()}})


def lazy_adam(parameters, settings: Training, interval: int) -> torch.optim.Adam:
    r = interval / (interval + 1)
    return torch.optim.Adam(parameters, lr=settings.learning_rate * r,
                            betas=(settings.betas[0] ** r, settings.betas[1] ** r), eps=1e-8)


def r1_penalty(d: nn.Module, reals: torch.Tensor, p: float, settings: Training, generator) -> torch.Tensor:
    """gamma / 2 * E ||grad_x D(aug(x))||^2 on real images."""
    reals = reals.detach().requires_grad_(True)
    logits = d(augment(reals, p, settings.augment, generator))
    (grad,) = torch.autograd.grad(logits.sum(), reals, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


class PathLength:
    """E (|J_w^T y| - a)^2, y ~ N(0, I) / sqrt(H W), a the moving mean of the lengths (decay 0.01)."""

    def __init__(self, decay: float):
        self.mean, self.decay = torch.zeros([]), decay

    def penalty(self, images: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
        (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
        lengths = grad.square().sum(2).mean(1).sqrt()
        self.mean = self.mean.lerp(lengths.mean().detach(), self.decay)
        return (lengths - self.mean).square().mean()


def mixed_ws(g: Generator, z: torch.Tensor, probability: float, track: bool = True) -> torch.Tensor:
    """w of z for every layer; with `probability`, the layers from a random cutoff on take w of another z. track:
    update w_avg (stage 1; stage 2 leaves the frozen mapping as it was)."""
    ws = g.mapping(z, track=track)
    if probability > 0 and torch.rand([]) < probability:
        cutoff = int(torch.randint(1, ws.shape[1], []))
        ws[:, cutoff:] = g.mapping(torch.randn_like(z))[:, cutoff:]
    return ws


class Ema:
    """G_ema <- beta G_ema + (1 - beta) G, beta = 0.5 ^ (batch / ema_nimg), ema_nimg ramped up over the first images."""

    def __init__(self, g: Generator, settings: Training):
        self.model = copy.deepcopy(g).eval().requires_grad_(False)
        self.settings = settings
        self.kimg = settings.ema_kimg if settings.ema_kimg is not None else settings.batch * 10 / 32

    @torch.no_grad()
    def update(self, g: Generator, images_seen: int) -> None:
        nimg = self.kimg * 1000
        if self.settings.ema_rampup is not None:
            nimg = min(nimg, images_seen * self.settings.ema_rampup)
        beta = 0.5 ** (self.settings.batch / max(nimg, 1e-8))
        for target, source in zip(self.model.parameters(), g.parameters()):
            target.copy_(source.detach().lerp(target, beta))
        for target, source in zip(self.model.buffers(), g.buffers()):
            target.copy_(source)


def _batches(data: torch.Tensor, batch: int, generator: torch.Generator):
    while True:
        yield data[torch.randint(len(data), (batch,), generator=generator)]


def train_stage1(shape: GanShape, normals: torch.Tensor, settings: Training, seed: int,
                 progress: Callable[[int], None] | None = None, desc: str = "dfmgan stage 1"):
    """normals (N, 3, R, R) in [-1, 1] -> (G, G_ema, D, history, p)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    g, d = Generator(shape), Discriminator(shape)
    ema = Ema(g, settings)
    g_opt, d_opt = lazy_adam(g.parameters(), settings, settings.g_reg_interval), lazy_adam(d.parameters(), settings,
                                                                                         settings.d_reg_interval)
    ada = AdaptiveP(settings.ada_target, settings.ada_interval, settings.ada_kimg, settings.batch, settings.ada_max_p)
    pl, history, reals = PathLength(settings.pl_decay), History(max(1, settings.steps // 50)), _batches(
        normals, settings.batch, generator)
    gamma = settings.gamma(shape.resolution)
    for step in tqdm(range(settings.steps), desc=desc, leave=False, mininterval=5):
        aug = lambda x: augment(x, ada.p, settings.augment, generator)  # noqa: E731
        # G: softplus(-D(G(z)))
        g.requires_grad_(True), d.requires_grad_(False)
        z = torch.randn(settings.batch, shape.z_dim)
        fakes, _ = g.synthesis(mixed_ws(g, z, settings.style_mixing))
        loss_g = F.softplus(-d(aug(fakes))).mean()
        g_opt.zero_grad(set_to_none=True)
        loss_g.backward()
        if step % settings.g_reg_interval == 0 and settings.pl_weight > 0:
            ws = g.mapping(torch.randn(settings.batch // settings.pl_batch_shrink, shape.z_dim))
            ws = ws.detach().requires_grad_(True)
            images, _ = g.synthesis(ws)
            (pl.penalty(images, ws) * settings.pl_weight * settings.g_reg_interval).backward()
        g_opt.step()
        # D: softplus(D(G(z))) + softplus(-D(x)), R1 every d_reg_interval steps
        g.requires_grad_(False), d.requires_grad_(True)
        with torch.no_grad():
            fakes, _ = g.synthesis(mixed_ws(g, torch.randn(settings.batch, shape.z_dim), settings.style_mixing))
        real = next(reals)
        real_logits = d(aug(real))
        loss_d = F.softplus(d(aug(fakes))).mean() + F.softplus(-real_logits).mean()
        d_opt.zero_grad(set_to_none=True)
        loss_d.backward()
        if step % settings.d_reg_interval == 0 and gamma > 0:
            (r1_penalty(d, real, ada.p, settings, generator) * gamma / 2 * settings.d_reg_interval).backward()
        d_opt.step()
        ada.observe(real_logits, step)
        ema.update(g, (step + 1) * settings.batch)
        history.log(step, loss_g=loss_g, loss_d=loss_d, p=ada.p)
        if progress:
            progress(step)
    return g, ema.model, d, history, ada.p


def train_stage2(g: Generator, d: Discriminator, match_shape: GanShape, images: torch.Tensor, masks: torch.Tensor,
                 settings: Training, seed: int, desc: str = "dfmgan stage 2", gate: bool = True):
    """g: a stage-1 generator rebuilt with defect=True (its stage-1 part loaded and frozen here); d: the stage-1 D,
    resumed. images (N, 3, R, R) in [-1, 1], masks (N, 1, R, R) in {-1, 1} -> (G, G_ema, D, D_match, history)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    shape = g.shape
    g.requires_grad_(False)
    trained = g.defect_parameters()
    d_match = Discriminator(match_shape, image_channels=4)
    ema = Ema(g, settings)
    g_opt = lazy_adam(trained, settings, settings.g_reg_interval)
    d_opt = lazy_adam([*d.parameters(), *d_match.parameters()], settings, settings.d_reg_interval)
    ada = AdaptiveP(settings.ada_target, settings.ada_interval, settings.ada_kimg, settings.batch, settings.ada_max_p)
    pl, history = PathLength(settings.pl_decay), History(max(1, settings.steps // 50))
    pairs = _batches(torch.cat([images, masks], dim=1), settings.batch, generator)
    gamma, k = settings.gamma(shape.resolution), settings.mask_sharpness
    half = settings.batch // 2

    def generate(batch: int, with_ms: bool = False):
        z, z_d = torch.randn(batch, shape.z_dim), torch.randn(batch, shape.z_dim)
        ws = mixed_ws(g, z, settings.style_mixing, track=False)
        defect_ws = g.defect_mapping(z_d)
        out, mask = g.synthesis(ws, defect_ws, gate=gate)
        if not with_ms:
            return out, mask, None
        # L_ms: the first half's backbone w with the second half's w_d, against the first half as drawn
        mask2 = g.mask(ws[:half], defect_ws[half:2 * half])  # the mask alone: the image is not read
        w_gap = (defect_ws[:half, 0] - defect_ws[half:2 * half, 0]).abs().mean()
        m_gap = (torch.tanh(k * mask[:half]) - torch.tanh(k * mask2)).abs().mean()
        return out, mask, w_gap / (m_gap + 1e-5)

    for step in tqdm(range(settings.steps), desc=desc, leave=False, mininterval=5):
        aug = lambda x: augment(x, ada.p, settings.augment, generator)  # noqa: E731
        for p in trained:
            p.requires_grad_(True)
        d.requires_grad_(False), d_match.requires_grad_(False)
        fakes, mask, ms = generate(settings.batch, with_ms=settings.lambda_ms > 0)
        loss_adv = F.softplus(-d(aug(fakes))).mean()
        loss_match = F.softplus(-d_match(torch.cat([fakes, torch.tanh(k * mask)], 1))).mean()
        loss_g = loss_adv + settings.lambda_match * loss_match + (settings.lambda_ms * ms if ms is not None else 0)
        g_opt.zero_grad(set_to_none=True)
        loss_g.backward()
        if step % settings.g_reg_interval == 0 and settings.pl_weight > 0:
            batch = settings.batch // settings.pl_batch_shrink
            ws = g.mapping(torch.randn(batch, shape.z_dim)).detach().requires_grad_(True)
            out, _ = g.synthesis(ws, g.defect_mapping(torch.randn(batch, shape.z_dim)), gate=gate)
            (pl.penalty(out, ws) * settings.pl_weight * settings.g_reg_interval).backward()
        g_opt.step()
        for p in trained:
            p.requires_grad_(False)
        d.requires_grad_(True), d_match.requires_grad_(True)
        with torch.no_grad():
            fakes, mask, _ = generate(settings.batch)
        real = next(pairs)
        real_logits = d(aug(real[:, :3]))
        loss_d = F.softplus(d(aug(fakes))).mean() + F.softplus(-real_logits).mean()
        loss_dm = (F.softplus(d_match(torch.cat([fakes, torch.tanh(k * mask)], 1))).mean()
                   + F.softplus(-d_match(real)).mean())
        d_opt.zero_grad(set_to_none=True)
        (loss_d + loss_dm).backward()
        if step % settings.d_reg_interval == 0 and gamma > 0:
            r1 = r1_penalty(d, real[:, :3], ada.p, settings, generator) + r1_penalty(d_match, real, 0.0, settings, None)
            (r1 * gamma / 2 * settings.d_reg_interval).backward()
        d_opt.step()
        ada.observe(real_logits, step)
        ema.update(g, (step + 1) * settings.batch)
        history.log(step, loss_g=loss_adv, loss_match=loss_match, loss_ms=ms if ms is not None else 0.0,
                    loss_d=loss_d, loss_d_match=loss_dm, p=ada.p, mask_area=(mask >= 0).float().mean())
    return g, ema.model, d, d_match, history
