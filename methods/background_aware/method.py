"""Background-aware defect generation by DDIM inversion (Cho et al.): a defect generated on a target normal image,
whose background denoising is disentangled from the defect. Equation numbers are the paper's; see README.md.

Notation: z0 the latent of an image, m the defect mask at latent resolution, alpha_t the cumulative schedule,
C1 = [defect prompt; background prompt], C2 = [mask prompt; background prompt], each read through the masked
cross-attention of Eq. 10-11 (attention.py). Everything else (LoRA, the fine-tuning loop, DDIM, attention
recording) is the shared toolkit in harness/diffusion/.
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

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.diffusion import backbone as backbones
from harness.diffusion import ddim, processors
from harness.diffusion.finetune import FinetuneConfig, LatentBatch, LatentData, finetune
from harness.diffusion.latents import decode, encode, initial_noise, latent_mask, resize_images, resize_masks
from harness.diffusion.lora import LoraSettings, add_lora, load_lora, save_lora
from harness.errors import MethodError

from .attention import behaviours, context_for, token_index, two_prompt_condition

MODEL_FILE, ADAPTER = "model.json", "lora"
LOSSES, INITS = ("disentangled", "naive"), ("inversion", "random")


# ---- the paper's equations ---------------------------------------------------------------------------------------


def masked_noising(z0: torch.Tensor, m: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6-7: z_t = sqrt(a) z0 + sqrt(1 - a) eps and z_t^m = sqrt(a) (1 - m) z0 + sqrt(1 - a) (1 - m) eps."""
    a = alpha.reshape(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    z_t_masked = a.sqrt() * (1 - m) * z0 + (1 - a).sqrt() * (1 - m) * eps
    return z_t, z_t_masked


def disentangled_loss(target: torch.Tensor, defect: torch.Tensor, background: torch.Tensor,
                      m: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ||m (eps - eps_theta(z_t, t, C1))||^2 + ||(1 - m) (eps - eps_theta(z_t^m, t, C2))||^2, each a mean
    over the latent's elements. `target` is eps in the backbone's parametrization (`ddim.training_target`: eps
    itself for SD 1.5 and the default tiny backbone, v for a v-prediction one; on z_t^m it is then (1 - m) v,
    which the (1 - m) factor makes v);
    `defect` and `background` are the UNet's outputs under C1 and C2."""
    return (m * (target - defect)).pow(2).mean() + ((1 - m) * (target - background)).pow(2).mean()


def naive_loss(target: torch.Tensor, defect: torch.Tensor) -> torch.Tensor:
    """Eq. 2, the plain latent-diffusion loss ||eps - eps_theta(z_t, t, C1)||^2 over the whole latent (in the
    backbone's parametrization, as `disentangled_loss`)."""
    return (target - defect).pow(2).mean()


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
    """Eq. 13: the defect token's cross-attention map A (B, 1, h, w) times m, upsampled bilinearly to the image
    size and thresholded. Before the threshold the map is rescaled per sample to [0, 1] over the mask's pixels
    (its minimum there to 0, its maximum to 1): attention probabilities spread over every token of the prompt, so
    a fixed threshold on them keeps all or nothing of the mask; rescaled, the mask follows where the token
    attends most."""
    weighted = attention * F.interpolate(m, size=attention.shape[-2:], mode="nearest")
    upsampled = F.interpolate(weighted, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    inside = F.interpolate(m, size=(size, size), mode="nearest")[:, 0] > 0.5
    big = torch.finfo(upsampled.dtype).max
    low = torch.where(inside, upsampled, big).flatten(1).amin(1)[:, None, None]
    high = torch.where(inside, upsampled, -big).flatten(1).amax(1)[:, None, None]
    scaled = (upsampled - low) / (high - low).clamp_min(1e-12)
    return ((scaled >= threshold) & inside).cpu().numpy()


# ---- prompts and the UNet under the masked attention ---------------------------------------------------------------


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
    """C1, C2 and the unconditional C1 (empty region prompt, for the optional guidance), encoded once (the text
    encoder is not fine-tuned), and the UNet's noise prediction under the masked attention."""

    def __init__(self, backbone: backbones.Backbone, prompts: Prompts):
        self.c1, self.tokens = two_prompt_condition(backbone, prompts.defect, prompts.background)
        self.c2, _ = two_prompt_condition(backbone, prompts.mask, prompts.background)
        self.c1_unconditional, _ = two_prompt_condition(backbone, "", prompts.background)
        self.defect_token = token_index(backbone.tokenizer, prompts.defect, prompts.defect_token)
        self.unet, self.scheduler = backbone.unet, backbone.scheduler

    def predict(self, z: torch.Tensor, t: torch.Tensor | int, conditions: list[torch.Tensor], m: torch.Tensor,
                record: processors.Recorder | None = None) -> torch.Tensor:
        """The UNet's output at z under C = conditions[i] for the i-th equal share of the batch, m its masks."""
        share = len(z) // len(conditions)
        condition = torch.cat([c.expand(share, -1, -1) for c in conditions])
        context = context_for(m, self.tokens, record=record)
        return self.unet(z, t, encoder_hidden_states=condition, cross_attention_kwargs={"context": context}).sample

    def eps(self, z: torch.Tensor, t: int, conditions: list[torch.Tensor], m: torch.Tensor,
            record: processors.Recorder | None = None) -> torch.Tensor:
        """eps_theta(z, t, C): the noise that output predicts."""
        return ddim.predicted_noise(self.scheduler, self.predict(z, t, conditions, m, record), z, t)


# ---- the method --------------------------------------------------------------------------------------------------


class BackgroundAware(Method):
    name = "background_aware"
    paper = ("Cho, Kim, Safarov, Bang, Park. Background-Aware Defect Generation for Robust Industrial Anomaly "
             "Detection (first titled: Revisiting DDIM Inversion for Controlling Defect Generation by Disentangling "
             "the Background). arXiv 2411.16767")
    granularity = "defect_type"
    needs = frozenset({"target_normal", "target_mask"})
    backbone = "stable-diffusion-v1-5"
    # fine-tunes and samples a diffusion model: a GPU where there is one (a share of it for the tiny networks)
    resources = {"tiny": {"num_cpus": 1, "num_gpus": 1}, "paper": {"num_cpus": 2, "num_gpus": 1}}

    def __init__(self, config, profile):
        super().__init__(config, profile)
        if config["loss"] not in LOSSES:
            raise MethodError(f"background_aware: loss must be one of {LOSSES}, not {config['loss']!r}")
        if config["init"] not in INITS:
            raise MethodError(f"background_aware: init must be one of {INITS}, not {config['init']!r}")

    @property
    def two_paths(self) -> bool:
        """Algorithm 1 (inversion, two paths) for the full method; the ablations sample plain DDIM from noise."""
        return self.config["loss"] == "disentangled" and self.config["init"] == "inversion"

    # -- fit: Eq. 5 (or Eq. 2) on the few training anomalies of one defect type --

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        if task.backbone is None:
            raise MethodError("background_aware needs a diffusion backbone (FewShotTask.backbone); the runner "
                              "provides it through the backbone job")
        start = time.perf_counter()
        backbone = backbones.load_frozen(task.backbone)
        settings = self._lora_settings()
        seed = int(task.rng().integers(2**63 - 1))
        params = add_lora(backbone.unet, settings, seed=seed)
        processors.install(backbone.unet, behaviours)
        size = task.resolution  # the method's working resolution (Method.working_resolution)
        data = LatentData.encode(backbone, resize_images(np.stack([a.image for a in task.anomalies]), size),
                                 resize_masks(np.stack([a.mask for a in task.anomalies]), size),
                                 flips=self.config["flips"])
        prompts = Prompts.for_category(self.config["tokens"], task.category)
        loss = self._loss(Conditions(backbone, prompts), backbone.scheduler)
        cfg = self.config
        history = finetune(params, data, loss, FinetuneConfig(
            steps=cfg["steps"], batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
            seed=seed), workdir, desc="background_aware: fine-tune")
        save_lora(backbone.unet, workdir / ADAPTER, settings)
        (workdir / MODEL_FILE).write_text(json.dumps({
            "backbone": str(task.backbone), "prompts": prompts.__dict__, "resolution": size,
            "training_images": [a.id for a in task.anomalies], "loss": cfg["loss"], "history": history,
            "seconds": round(time.perf_counter() - start, 1)}, indent=2))

    def _loss(self, conditions: Conditions, scheduler) -> Callable[[LatentBatch, torch.Generator], torch.Tensor]:
        alphas = scheduler.alphas_cumprod
        naive = self.config["loss"] == "naive"

        def loss(batch: LatentBatch, generator: torch.Generator) -> torch.Tensor:
            z0, m = batch.latents, batch.masks
            eps = torch.randn(z0.shape, generator=generator).to(z0.device)
            t = torch.randint(0, len(alphas), (len(z0),), generator=generator)
            z_t, z_t_masked = masked_noising(z0, m, eps, alphas[t].to(z0.device))
            t = t.to(z0.device)
            target = ddim.training_target(scheduler, z0, eps, t)
            if naive:
                return naive_loss(target, conditions.predict(z_t, t, [conditions.c1], m))
            # one UNet call for both terms: [z_t; z_t^m] with [C1; C2]
            both = conditions.predict(torch.cat([z_t, z_t_masked]), torch.cat([t, t]), [conditions.c1, conditions.c2],
                                      torch.cat([m, m]))
            return disentangled_loss(target, *both.chunk(2), m)

        return loss

    # -- generate: Algorithm 1 on each target normal image and mask --

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        model = json.loads((workdir / MODEL_FILE).read_text())
        # the backbone as this machine has it (the folder recorded at fit time may have moved with the results)
        backbone = backbones.load_frozen(request.backbone or Path(model["backbone"]))
        load_lora(backbone.unet, workdir / ADAPTER)
        processors.install(backbone.unet, behaviours)
        conditions = Conditions(backbone, Prompts(**model["prompts"]))
        size, batch = model["resolution"], self.config["generation_batch"]
        with torch.no_grad():
            for first in range(0, request.n, batch):
                targets = request.targets[first:first + batch]
                noise = torch.cat([initial_noise(request.rng(first + i), backbone, size) for i in range(len(targets))])
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
        recorder = processors.Recorder(tokens=(conditions.defect_token,))
        defect_eps = self._defect_eps(conditions, m, recorder)
        steps = self.config["inference_steps"]
        if self.two_paths:
            z_T_masked = masked_inversion(lambda z, t: conditions.eps(z, t, [conditions.c2], m),
                                          z0, m, backbone.scheduler, steps)
            z_T = z_T_masked + m * noise  # z_T* = z~_T^m + m * eps

            def eps_both(z_m, z_star, t):
                return conditions.eps(z_m, t, [conditions.c2], m), defect_eps(z_star, t)

            z0_star, _ = background_aware_sampling(eps_both, z_T, z_T_masked, m, backbone.scheduler, steps)
        else:  # the ablations (Tables 4-5): plain DDIM from N(0, I) with the C1 model, the background made anew
            z0_star = ddim.sample(lambda z, t, _: defect_eps(z, t), noise, backbone.scheduler, steps)
        images = resize_images(decode(backbone, z0_star), out_size)
        if not self.config["refine_mask"]:
            return images, target_masks
        attention = recorder.mean(z0.shape[-1])[-len(targets):]  # the conditional C1 rows
        return images, refine_mask(attention, m, out_size, self.config["refine_threshold"])

    def _defect_eps(self, conditions: Conditions, m: torch.Tensor, recorder: processors.Recorder) -> EpsFn:
        """eps_theta(z*, t, C1), with classifier-free guidance on this branch alone when guidance_scale != 1
        (the unconditional C1 keeps the background prompt: only the defect prompt is guided)."""
        scale = float(self.config["guidance_scale"])

        def eps(z: torch.Tensor, t: int) -> torch.Tensor:
            if scale == 1.0:
                return conditions.eps(z, t, [conditions.c1], m, recorder)
            both = conditions.eps(torch.cat([z, z]), t, [conditions.c1_unconditional, conditions.c1],
                                  torch.cat([m, m]), recorder)
            unconditional, conditional = both.chunk(2)
            return unconditional + scale * (conditional - unconditional)

        return eps

    # -- helpers --

    def _lora_settings(self) -> LoraSettings:
        return LoraSettings.from_config(self.config["lora"])

