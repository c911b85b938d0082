"""The one fine-tuning loop diffusion methods call: latents cached once, paired image/mask augmentation, AdamW,
gradient clipping, seeded sampling, checkpoints that a killed fit resumes from, and a compact loss history.

A method supplies the trainable parameters and a loss of one batch (`loss_fn(batch, generator)`); the loop owns
everything else, so two methods never differ in how they iterate, clip or resume.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.diffusion.pretrain import loss_tenths
from harness.io import atomic_write_bytes

CHECKPOINT = "finetune-checkpoint.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    seed: int = 0
    checkpoint_every: int = 100  # steps between checkpoints (0: none)


@dataclass
class LatentBatch:
    latents: torch.Tensor  # (B, C, h, w)
    masks: torch.Tensor  # (B, 1, h, w) at latent resolution
    index: torch.Tensor  # (B,) which training image (before augmentation) each row came from
    companions: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, C, h, w) paired images' latents, by name
    pixel_masks: torch.Tensor | None = None  # (B, 1, H, W) bool: the masks at the images' size (a mask encoder's input)


class LatentData:
    """Training latents and latent masks, encoded once, with flipped variants (the paired augmentation: image and
    mask are flipped together before encoding, so no latent is an approximation of a flipped one)."""

    def __init__(self, latents: torch.Tensor, masks: torch.Tensor, index: torch.Tensor,
                 companions: dict[str, torch.Tensor] | None = None, pixel_masks: torch.Tensor | None = None):
        self.latents, self.masks, self.index = latents, masks, index
        self.companions, self.pixel_masks = companions or {}, pixel_masks

    @classmethod
    def encode(cls, backbone, images: np.ndarray, masks: np.ndarray, flips: bool = True,
               companions: dict[str, Callable[[np.ndarray, np.ndarray], torch.Tensor]] | None = None
               ) -> "LatentData":
        """images uint8 (N, H, W, 3), masks bool (N, H, W) -> every variant's latent and latent mask.

        `companions[name](images, masks)` makes a paired image of each variant (a float tensor (N, 3, H, W) in
        [-1, 1]; e.g. DualAnoDiff's anomaly part and BCM background), encoded beside it, so both carry the same
        flips; a batch has them in `LatentBatch.companions[name]`."""
        from harness.diffusion.latents import encode, latent_mask

        variants = [(images, masks)]
        if flips:
            variants += [(images[:, :, ::-1], masks[:, :, ::-1]), (images[:, ::-1], masks[:, ::-1])]
        makers = companions or {}
        latents, latent_masks, pixel_masks, made = [], [], [], {name: [] for name in makers}
        for variant_images, variant_masks in variants:
            variant_images, variant_masks = np.ascontiguousarray(variant_images), np.ascontiguousarray(variant_masks)
            z = encode(backbone, variant_images)
            latents.append(z)
            pixel_masks.append(torch.from_numpy(variant_masks)[:, None])
            latent_masks.append(latent_mask(variant_masks, z.shape[-1], z.device))
            for name, make in makers.items():
                made[name].append(encode(backbone, make(variant_images, variant_masks)))
        index = torch.arange(len(images)).repeat(len(variants))
        return cls(torch.cat(latents), torch.cat(latent_masks), index,
                   {name: torch.cat(parts) for name, parts in made.items()}, torch.cat(pixel_masks))

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, generator: torch.Generator, size: int) -> LatentBatch:
        chosen = torch.randint(0, len(self), (size,), generator=generator)
        rows = chosen.to(self.latents.device)
        return LatentBatch(self.latents[rows], self.masks[rows], self.index[chosen],
                           {name: latents[rows] for name, latents in self.companions.items()},
                           self.pixel_masks[chosen] if self.pixel_masks is not None else None)


def finetune(params: list[torch.nn.Parameter], data: LatentData,
             loss_fn: Callable[[LatentBatch, torch.Generator], torch.Tensor], config: FinetuneConfig,
             workdir: Path | None = None, desc: str = "fine-tune",
             buffers: list[torch.Tensor] | None = None,
             rates: dict[torch.nn.Parameter, float] | None = None) -> list[float]:
    """Train `params` for config.steps steps of loss_fn on batches of `data`; resumes from workdir's checkpoint.
    Random numbers (batches, noise, timesteps) come from one CPU generator seeded with config.seed, saved in the
    checkpoint, so a resumed fit draws exactly what an uninterrupted one would. Returns the loss history (means
    over tenths of the run). `buffers`: state the training changes besides `params` (BatchNorm's running statistics),
    kept in the checkpoint too. `rates`: a learning rate of its own for some of the parameters (the rest:
    config.learning_rate)."""
    optimiser = torch.optim.AdamW(_groups(params, rates or {}, config.learning_rate), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    buffers = buffers or []
    start = _resume(workdir, params + buffers, optimiser, generator, losses)
    for step in tqdm(range(start, config.steps), desc=desc, initial=start, total=config.steps, leave=False,
                     disable=None):
        loss = loss_fn(data.batch(generator, config.batch_size), generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimiser.step()
        losses.append(float(loss.detach()))
        if workdir is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            _checkpoint(workdir, step + 1, params + buffers, optimiser, generator, losses)
    if workdir is not None:  # finished: the caller saves what it trained; a checkpoint would only take space
        (Path(workdir) / CHECKPOINT).unlink(missing_ok=True)
    return loss_tenths(losses)


def _groups(params: list[torch.nn.Parameter], rates: dict[torch.nn.Parameter, float], default: float) -> list[dict]:
    """AdamW's parameter groups: one per learning rate, in the order of `params` (a checkpoint's order)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for param in params:
        groups.setdefault(float(rates.get(param, default)), []).append(param)
    return [{"params": members, "lr": rate} for rate, members in groups.items()]


def _checkpoint(workdir: Path, step: int, params, optimiser, generator: torch.Generator, losses: list[float]) -> None:
    buffer = io.BytesIO()
    torch.save({"step": step, "params": [p.detach().cpu() for p in params], "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(), "losses": losses}, buffer)
    atomic_write_bytes(Path(workdir) / CHECKPOINT, buffer.getvalue())


def _resume(workdir: Path | None, params, optimiser, generator: torch.Generator, losses: list[float]) -> int:
    path = Path(workdir) / CHECKPOINT if workdir is not None else None
    if path is None or not path.is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if len(saved["params"]) != len(params) or any(s.shape != p.shape for s, p in zip(saved["params"], params)):
        raise ValueError(f"{path}: the checkpoint holds other parameters than this fit trains; delete it")
    with torch.no_grad():
        for param, value in zip(params, saved["params"]):
            param.copy_(value.to(param.device))
    optimiser.load_state_dict(saved["optimiser"])
    generator.set_state(saved["generator"])
    losses += saved["losses"]
    return int(saved["step"])

