"""AnomalyDiffusion's mask generator (Hu et al., AAAI 2024, Sec. 3.4): textual inversion on the training masks of
one defect type, drawn as white-on-black images, then masks sampled from noise with the learned token.

As the authors' code (facts): 16 vectors for the placeholder, initialised from the word "crack"; the plain noise
loss over the whole latent; AdamW at 0.02 (5e-3 x batch 4); sampling with DDIM, 100 steps, eta 1, classifier-free
guidance 5 against the empty prompt; a pixel is in the mask where the mean over RGB exceeds 0.8 in [-1, 1]; a mask
with more than a third of the image's width of ones in its first or last row or column is rejected, and sampling
continues until enough masks pass. Here sampling stops after `max_batches` batches; what is missing then is taken
from the harness's target masks, and every sample records where its mask came from.

`unet_lora` (null in `paper`, the authors' frozen UNet): the tiny profile also trains a LoRA on the UNet with the
vectors, one per defect type, as it does for the images (README.md): a tiny backbone that had seen only photographs
of the category (the per-run one, before the shipped backbone) redrew the category from the vectors alone (grey washer rings, never a white shape on black).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from harness.diffusion import backbone as backbones
from harness.diffusion import ddim
from harness.diffusion.finetune import FinetuneConfig, LatentBatch, LatentData, finetune
from harness.diffusion.latents import decode, initial_noise
from harness.diffusion.lora import LoraSettings, add_lora
from harness.diffusion.placeholders import Placeholders, repeated, single_token_id

THRESHOLD = 0.8  # on the mean over RGB in [-1, 1]


def mask_images(masks: np.ndarray) -> np.ndarray:
    """bool (N, H, W) -> uint8 (N, H, W, 3): white defect on black."""
    return np.repeat(masks[..., None].astype(np.uint8) * 255, 3, axis=3)


def binarise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) decoded masks -> bool (N, H, W): mean over RGB in [-1, 1] above 0.8."""
    return (images.astype(np.float32) / 127.5 - 1).mean(axis=3) > THRESHOLD


def touches_border(mask: np.ndarray) -> bool:
    """The authors' rejection: more than width / 3 ones in the first or last row or column."""
    limit = mask.shape[1] / 3
    return any(int(edge.sum()) > limit for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1]))


@dataclass
class MaskPrompts:
    """The placeholder written `vectors` times in each template, and the encoder that injects the vectors."""

    holders: Placeholders
    word: str
    prompts: list[str]

    @classmethod
    def build(cls, backbone: backbones.Backbone, word: str, templates: list[str], vectors: int) -> "MaskPrompts":
        return cls(Placeholders(backbone.tokenizer, [word]), word,
                   [repeated(t.format(word), word, vectors) for t in templates])

    def encode(self, backbone: backbones.Backbone, chosen: list[int], vectors: torch.Tensor) -> torch.Tensor:
        return self.holders.encode(backbone.text_encoder, [self.prompts[i] for i in chosen],
                                   {self.word: vectors.expand(len(chosen), -1, -1)})


def initial_vectors(backbone: backbones.Backbone, word: str, count: int) -> torch.nn.Parameter:
    table = backbone.text_encoder.get_input_embeddings().weight
    return torch.nn.Parameter(table[single_token_id(backbone.tokenizer, word)].detach().clone().expand(count, -1)
                              .clone())


def lora_settings(config: dict) -> LoraSettings | None:
    return LoraSettings.from_config(config.get("unet_lora"))


def fit(backbone: backbones.Backbone, masks: np.ndarray, config: dict, seed: int, workdir=None) -> tuple[
        torch.Tensor, list[float]]:
    """Textual inversion of `config["vectors"]` vectors on white-on-black images of `masks` (one defect type):
    returns the vectors (vectors, width) and the loss history. With `unet_lora`, a LoRA is added to `backbone`'s
    UNet and trained with them (the caller saves it)."""
    vectors = initial_vectors(backbone, config["init_word"], int(config["vectors"]))
    lora = lora_settings(config)
    adapter = add_lora(backbone.unet, lora, seed=seed) if lora else []
    prompts = MaskPrompts.build(backbone, config["placeholder"], config["templates"], int(config["vectors"]))
    data = LatentData.encode(backbone, mask_images(masks), masks, flips=False)  # the authors: no augmentation
    scheduler, unet = backbone.scheduler, backbone.unet

    def loss(batch: LatentBatch, generator: torch.Generator) -> torch.Tensor:
        z0 = batch.latents
        eps = torch.randn(z0.shape, generator=generator).to(z0.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator).to(z0.device)
        chosen = torch.randint(0, len(prompts.prompts), (len(z0),), generator=generator).tolist()
        predicted = unet(scheduler.add_noise(z0, eps, t), t,
                         encoder_hidden_states=prompts.encode(backbone, chosen, vectors[None])).sample
        return F.mse_loss(predicted, ddim.training_target(scheduler, z0, eps, t))

    history = finetune([vectors, *adapter], data, loss, FinetuneConfig(
        steps=int(config["steps"]), batch_size=int(config["batch_size"]), learning_rate=float(config["learning_rate"]),
        weight_decay=0.01, grad_clip=0.0, seed=seed), workdir, desc="anomalydiffusion: mask generator")
    return vectors.detach(), history


@dataclass
class Sampled:
    masks: list[np.ndarray]  # the masks that passed, at most n
    drawn: int  # masks sampled
    rejected: int  # of them, touching the border or empty


def sample(backbone: backbones.Backbone, vectors: torch.Tensor, config: dict, n: int, size: int,
           rng: np.random.Generator) -> Sampled:
    """Masks from noise with the learned vectors (module docstring), until n pass or `max_batches` batches."""
    prompts = MaskPrompts.build(backbone, config["placeholder"], config["templates"], len(vectors))
    batch = int(config["batch_size_sampling"])
    passed, drawn, rejected = [], 0, 0
    with torch.no_grad():
        unconditional = backbone.encode_text([""] * batch)
        for _ in range(int(config["max_batches"])):
            if len(passed) >= n:
                break
            chosen = [int(rng.integers(len(prompts.prompts))) for _ in range(batch)]
            condition = prompts.encode(backbone, chosen, vectors.to(backbone.device)[None])
            z_T = torch.cat([initial_noise(rng, backbone, size) for _ in range(batch)]).to(backbone.device)
            generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))

            def eps(z: torch.Tensor, t: int, _condition=None) -> torch.Tensor:
                both = torch.cat([z, z])
                out = backbone.unet(both, t, encoder_hidden_states=torch.cat([unconditional, condition])).sample
                plain, guided = ddim.predicted_noise(backbone.scheduler, out, both, t).chunk(2)
                return plain + float(config["guidance_scale"]) * (guided - plain)

            z_0 = ddim.sample(eps, z_T, backbone.scheduler, int(config["inference_steps"]), eta=float(config["eta"]),
                              generator=generator)
            for mask in binarise(decode(backbone, z_0)):
                drawn += 1
                if touches_border(mask) or not mask.any():
                    rejected += 1
                elif len(passed) < n:
                    passed.append(mask)
    return Sampled(passed, drawn, rejected)
