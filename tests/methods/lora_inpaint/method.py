"""A minimal diffusion method built only from harness/diffusion, to show that adding one is a directory: LoRA on
the backbone's UNet, a DreamBooth-style prompt with a rare token, and blended sampling that generates inside the
target mask and keeps the target image's latent outside it. Not a published method; the tests run it in a suite."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.device import default_device
from harness.diffusion import backbone as backbones
from harness.diffusion import ddim
from harness.diffusion.finetune import FinetuneConfig, LatentData, finetune
from harness.diffusion.latents import decode, encode, latent_mask
from harness.diffusion.lora import LoraSettings, add_lora, load_lora, save_lora


class LoraInpaint(Method):
    name = "lora_inpaint"
    paper = "DefectBench's example diffusion method (LoRA + DreamBooth prompt + blended sampling)"
    needs = frozenset({"target_normal", "target_mask"})
    backbone = "stable-diffusion-v1-5"
    resources = {"num_cpus": 1, "num_gpus": 1}

    def prompt(self, category: str) -> str:
        return f"a photo of {self.config['token']} defect on {category.replace('_', ' ')}"

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        backbone = self._open(task.backbone)
        settings = LoraSettings(rank=self.config["rank"])
        seed = int(task.rng().integers(2**31))
        params = add_lora(backbone.unet, settings, seed=seed)
        data = LatentData.encode(backbone, np.stack([a.image for a in task.anomalies]),
                                 np.stack([a.mask for a in task.anomalies]))
        with torch.no_grad():
            text = backbone.encode_text([self.prompt(task.category)])
        scheduler, unet = backbone.scheduler, backbone.unet

        def loss(batch, generator):
            noise = torch.randn(batch.latents.shape, generator=generator).to(batch.latents.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(noise),), generator=generator)
            z_t = scheduler.add_noise(batch.latents, noise, t.to(noise.device))
            predicted = unet(z_t, t.to(noise.device), encoder_hidden_states=text.expand(len(noise), -1, -1)).sample
            return F.mse_loss(predicted, ddim.training_target(scheduler, batch.latents, noise, t.to(noise.device)))

        config = FinetuneConfig(steps=self.config["steps"], batch_size=self.config["batch_size"],
                                learning_rate=self.config["learning_rate"], seed=seed)
        history = finetune(params, data, loss, config, workdir, desc="lora_inpaint")
        save_lora(unet, workdir / "lora", settings)
        (workdir / "fit.json").write_text(json.dumps({"prompt": self.prompt(task.category), "history": history}))

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        backbone = self._open(request.backbone)
        load_lora(backbone.unet, workdir / "lora")
        prompt = json.loads((workdir / "fit.json").read_text())["prompt"]
        with torch.no_grad():
            text = backbone.encode_text([prompt])
            for i, target in enumerate(request.targets):
                known = encode(backbone, target.normal.image[None])
                m = latent_mask(target.mask[None], known.shape[-1], known.device)
                generator = torch.Generator().manual_seed(int(request.rng(i).integers(2**31)))
                z_T = torch.randn(known.shape, generator=generator).to(known.device)
                eps = lambda z, t, c: ddim.predicted_noise(  # noqa: E731
                    backbone.scheduler, backbone.unet(z, t, encoder_hidden_states=c).sample, z, t)
                z_0 = ddim.blended_sample(eps, z_T, known, m, backbone.scheduler, self.config["inference_steps"], text)
                yield GeneratedSample.on_target(target, decode(backbone, z_0)[0], target.mask, request.defect_type)

    @staticmethod
    def _open(folder: Path) -> backbones.Backbone:
        backbone = backbones.load(folder).to(default_device())
        for module in (backbone.vae, backbone.unet, backbone.text_encoder):
            module.eval().requires_grad_(False)
        return backbone
