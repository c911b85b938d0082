"""Background-aware defect generation by DDIM inversion (Cho et al.): a defect generated on a target normal image,
whose background denoising is disentangled from the defect. Equation numbers are the paper's; see README.md.

Notation: z0 the latent of an image, m the defect mask at latent resolution, alpha_t the cumulative schedule,
C1 = [defect prompt; background prompt], C2 = [mask prompt; background prompt], each read through the masked
cross-attention of Eq. 10-11 (harness/diffusion/attention.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.device import default_device
from harness.diffusion import backbone as backbones
from harness.diffusion import ddim
from harness.diffusion.attention import MaskState, masked_cross_attention, token_index, two_prompt_condition
from harness.diffusion.latents import decode, encode, latent_mask, resize_images, resize_masks
from harness.diffusion.pretrain import loss_tenths
from harness.errors import MethodError

MODEL_FILE = "model.json"
LOSSES, INITS = ("disentangled", "naive"), ("inversion", "random")


# ---- the paper's equations ---------------------------------------------------------------------------------------


def masked_noising(z0: torch.Tensor, m: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6-7: z_t = sqrt(a) z0 + sqrt(1 - a) eps and z_t^m = sqrt(a) (1 - m) z0 + sqrt(1 - a) (1 - m) eps."""
    a = alpha.reshape(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    z_t_masked = a.sqrt() * (1 - m) * z0 + (1 - a).sqrt() * (1 - m) * eps
    return z_t, z_t_masked


def disentangled_loss(eps: torch.Tensor, eps_defect: torch.Tensor, eps_background: torch.Tensor,
                      m: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ||m (eps - eps_theta(z_t, t, C1))||^2 + ||(1 - m) (eps - eps_theta(z_t^m, t, C2))||^2, each a mean
    over the latent's elements."""
    return (m * (eps - eps_defect)).pow(2).mean() + ((1 - m) * (eps - eps_background)).pow(2).mean()


def naive_loss(eps: torch.Tensor, eps_defect: torch.Tensor) -> torch.Tensor:
    """Eq. 2, the plain latent-diffusion loss ||eps - eps_theta(z_t, t, C1)||^2 over the whole latent."""
    return (eps - eps_defect).pow(2).mean()


EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def masked_inversion(eps_background: EpsFn, z0: torch.Tensor, m: torch.Tensor, scheduler, steps: int) -> torch.Tensor:
    """Algorithm 1, inversion: DDIM inversion (Eq. 4) of z0^m = (1 - m) z0 with the masked update of Eq. 8, the
    predicted noise multiplied by (1 - m), so the masked region stays exactly zero on the way to z_T^m."""
    return ddim.invert(lambda z, t, _: (1 - m) * eps_background(z, t), (1 - m) * z0, scheduler, steps)


def background_aware_sampling(eps_both: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
                              z_T: torch.Tensor, z_T_masked: torch.Tensor, m: torch.Tensor, scheduler, steps: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, sampling: z_t* and the background path z_t^m denoised side by side with DDIM (Eq. 3).

    `eps_both(z_m, z_star, t)` returns (eps_theta(z_t^m, t, C2), eps_theta(z_t*, t, C1)). Eq. 9 mixes them,
    eps = (1 - m) eps_theta(z_t^m, t, C2) + m eps_theta(z_t*, t, C1), to step z_t*; the background path steps
    with (1 - m) eps_theta(z_t^m, t, C2) (Eq. 8). Outside the mask both paths then take identical steps, so
    z_0* equals z_0^m there (Proposition 1). Returns (z_0*, z_0^m)."""
    z_star, z_m = z_T, z_T_masked
    for t in ddim.timesteps(scheduler, steps):
        alpha_t, alpha_s = ddim.alpha_at(scheduler, t), ddim.alpha_at(scheduler, ddim.previous(scheduler, t, steps))
        eps_bg, eps_def = eps_both(z_m, z_star, t)
        z_star = ddim.ddim_step(z_star, (1 - m) * eps_bg + m * eps_def, alpha_t, alpha_s)
        z_m = ddim.ddim_step(z_m, (1 - m) * eps_bg, alpha_t, alpha_s)
    return z_star, z_m


def refine_mask(attention: torch.Tensor, m: torch.Tensor, size: int, threshold: float = 0.5) -> np.ndarray:
    """Eq. 13: the defect token's cross-attention map (B, 1, h, w) times m', upsampled bilinearly to the image
    size and thresholded. The map is first scaled to a maximum of 1 per sample: attention probabilities spread
    over every token of the prompt and rarely reach 1/2 themselves."""
    weighted = attention * F.interpolate(m, size=attention.shape[-2:], mode="bilinear", align_corners=False)
    upsampled = F.interpolate(weighted, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = upsampled.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (upsampled / peak >= threshold).cpu().numpy()


# ---- prompts -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    defect: str  # C1's region prompt, holding the defect token
    mask: str  # C2's region prompt, holding the mask token
    background: str  # the background token's prompt, shared by C1 and C2
    defect_token: str

    @classmethod
    def for_category(cls, tokens: dict, category: str) -> "Prompts":
        return cls(defect=f"a photo of {tokens['defect']} defect", mask=f"a photo of {tokens['mask']} mask",
                   background=f"a photo of {tokens['background']} {category.replace('_', ' ')}",
                   defect_token=tokens["defect"])


class Conditions:
    """C1 and C2 encoded once (the text encoder stays frozen), and the masked-attention state they are read with."""

    def __init__(self, backbone: backbones.Backbone, prompts: Prompts):
        self.c1, tokens = two_prompt_condition(backbone, prompts.defect, prompts.background)
        self.c2, _ = two_prompt_condition(backbone, prompts.mask, prompts.background)
        self.state = MaskState(tokens=tokens)
        self.defect_token_index = token_index(backbone.tokenizer, prompts.defect, prompts.defect_token)

    def predict(self, unet, z: torch.Tensor, t: torch.Tensor | int, condition: torch.Tensor,
                m: torch.Tensor) -> torch.Tensor:
        """eps_theta(z, t, condition) with masked cross-attention over m (one condition row per latent)."""
        self.state.mask = m
        if condition.shape[0] != z.shape[0]:
            condition = condition.expand(z.shape[0], -1, -1)
        return unet(z, t, encoder_hidden_states=condition).sample


# ---- the method --------------------------------------------------------------------------------------------------


class BackgroundAware(Method):
    name = "background_aware"
    paper = ("Cho, Kim, Safarov, Bang, Park. Background-Aware Defect Generation for Robust Industrial Anomaly "
             "Detection (first titled: Revisiting DDIM Inversion for Controlling Defect Generation by Disentangling "
             "the Background). arXiv 2411.16767")
    granularity = "defect_type"
    needs = frozenset({"target_normal", "target_mask"})
    uses_backbone = True
    resources = {"num_cpus": 1, "num_gpus": 1}  # fine-tunes and samples a diffusion model: a GPU where there is one

    def __init__(self, config, profile):
        super().__init__(config, profile)
        if config["loss"] not in LOSSES:
            raise MethodError(f"background_aware: loss must be one of {LOSSES}, not {config['loss']!r}")
        if config["init"] not in INITS:
            raise MethodError(f"background_aware: init must be one of {INITS}, not {config['init']!r}")

    # -- fit: Eq. 5 (or Eq. 2) on the few training anomalies of one defect type --

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        if task.backbone is None:
            raise MethodError("background_aware needs a diffusion backbone (FewShotTask.backbone); the runner "
                              "provides it through the backbone job")
        start = time.perf_counter()
        backbone = self._open(task.backbone)
        size = self._resolution(task.resolution)
        images = resize_images(np.stack([a.image for a in task.anomalies]), size)
        z0 = encode(backbone, images)
        m = latent_mask(resize_masks(np.stack([a.mask for a in task.anomalies]), size), z0.shape[-1], z0.device)
        prompts = Prompts.for_category(self.config["tokens"], task.category)
        history = self._finetune(backbone, Conditions(backbone, prompts), z0, m, int(task.rng().integers(2**63 - 1)))
        backbone.unet.save_pretrained(workdir / "unet")
        (workdir / MODEL_FILE).write_text(json.dumps({
            "backbone": str(task.backbone), "prompts": prompts.__dict__, "resolution": size,
            "training_images": [a.id for a in task.anomalies], "loss": self.config["loss"], "history": history,
            "seconds": round(time.perf_counter() - start, 1)}, indent=2))

    def _finetune(self, backbone, conditions: Conditions, z0: torch.Tensor, m: torch.Tensor, seed: int) -> list[float]:
        unet, cfg = backbone.unet, self.config
        unet.train().requires_grad_(True)
        optimiser = torch.optim.AdamW(unet.parameters(), lr=cfg["learning_rate"], weight_decay=1e-2)
        generator = torch.Generator(device=z0.device).manual_seed(seed)
        alphas = backbone.scheduler.alphas_cumprod.to(z0.device)
        n, batch = len(z0), cfg["batch_size"]
        losses = []
        with masked_cross_attention(unet, conditions.state):
            for _ in tqdm(range(cfg["steps"]), desc="background_aware: fine-tune", leave=False, disable=None):
                chosen = torch.randint(0, n, (batch,), generator=generator, device=z0.device)
                eps = torch.randn(z0[chosen].shape, generator=generator, device=z0.device)
                t = torch.randint(0, len(alphas), (batch,), generator=generator, device=z0.device)
                z_t, z_t_masked = masked_noising(z0[chosen], m[chosen], eps, alphas[t])
                if cfg["loss"] == "naive":
                    loss = naive_loss(eps, conditions.predict(unet, z_t, t, conditions.c1, m[chosen]))
                else:  # one UNet call for both terms: [z_t; z_t^m] with [C1; C2]
                    both = conditions.predict(unet, torch.cat([z_t, z_t_masked]), torch.cat([t, t]),
                                              torch.cat([conditions.c1.expand(batch, -1, -1),
                                                         conditions.c2.expand(batch, -1, -1)]),
                                              torch.cat([m[chosen], m[chosen]]))
                    loss = disentangled_loss(eps, both[:batch], both[batch:], m[chosen])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
        unet.eval().requires_grad_(False)
        return loss_tenths(losses)

    # -- generate: Algorithm 1 on each target normal image and mask --

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        model = json.loads((workdir / MODEL_FILE).read_text())
        # the backbone as this machine has it (the folder recorded at fit time may have moved with the results)
        backbone = self._open(request.backbone or Path(model["backbone"]), unet=workdir / "unet")
        conditions = Conditions(backbone, Prompts(**model["prompts"]))
        size = model["resolution"]
        batch = self.config["generation_batch"]
        with torch.no_grad(), masked_cross_attention(backbone.unet, conditions.state):
            for first in range(0, request.n, batch):
                targets = request.targets[first:first + batch]
                noise = torch.stack([self._noise(request.rng(first + i), backbone, size) for i in range(len(targets))])
                images, masks = self._generate_batch(backbone, conditions, targets, noise.to(backbone.device), size)
                for target, image, mask in zip(targets, images, masks):
                    yield GeneratedSample.on_target(target, image, mask, request.defect_type,
                                                    init=self.config["init"], refined=self.config["refine_mask"])

    def _generate_batch(self, backbone, conditions: Conditions, targets, noise: torch.Tensor, size: int
                        ) -> tuple[np.ndarray, np.ndarray]:
        out_size = targets[0].normal.image.shape[0]
        target_masks = np.stack([t.mask for t in targets])
        z0 = encode(backbone, resize_images(np.stack([t.normal.image for t in targets]), size))
        m = latent_mask(resize_masks(target_masks, size), z0.shape[-1], z0.device)
        unet, steps, b = backbone.unet, self.config["inference_steps"], len(targets)
        if self.config["init"] == "inversion":
            z_T_masked = masked_inversion(lambda z, t: conditions.predict(unet, z, t, conditions.c2, m),
                                          z0, m, backbone.scheduler, steps)
            z_T = z_T_masked + m * noise  # z_T* = z~_T^m + m * eps
        else:  # the ablation: no inversion, the background comes from noise too
            z_T, z_T_masked = noise, (1 - m) * noise
        state = conditions.state
        state.record_token, state.recorded = conditions.defect_token_index, []
        attention = torch.zeros(b, 1, *z0.shape[-2:], device=z0.device)
        calls = 0

        def eps_both(z_m, z_star, t):
            nonlocal attention, calls
            both = conditions.predict(unet, torch.cat([z_m, z_star]), t,
                                      torch.cat([conditions.c2.expand(b, -1, -1), conditions.c1.expand(b, -1, -1)]),
                                      torch.cat([m, m]))
            for recorded in state.recorded:  # the defect token's maps of the C1 half, at latent resolution
                attention = attention + F.interpolate(recorded[b:], size=z0.shape[-2:], mode="bilinear",
                                                      align_corners=False)
                calls += 1
            state.recorded = []
            return both[:b], both[b:]

        z0_star, _ = background_aware_sampling(eps_both, z_T, z_T_masked, m, backbone.scheduler, steps)
        state.record_token = None
        images = resize_images(decode(backbone, z0_star), out_size)
        if not self.config["refine_mask"]:
            return images, target_masks
        return images, refine_mask(attention / max(calls, 1), m, out_size, self.config["refine_threshold"])

    # -- helpers --

    def _resolution(self, task_resolution: int) -> int:
        return int(self.config["resolution"] or task_resolution)

    @staticmethod
    def _noise(rng: np.random.Generator, backbone, size: int) -> torch.Tensor:
        channels = backbone.unet.config.in_channels
        side = size // (2 ** (len(backbone.vae.config.block_out_channels) - 1))
        generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        return torch.randn(channels, side, side, generator=generator)

    @staticmethod
    def _open(source: Path, unet: Path | None = None) -> backbones.Backbone:
        backbone = backbones.load(source)
        if unet is not None:
            from diffusers import UNet2DConditionModel

            backbone.unet = UNet2DConditionModel.from_pretrained(unet)
        for module in (backbone.vae, backbone.unet, backbone.text_encoder):
            module.eval().requires_grad_(False)
        return backbone.to(default_device())
