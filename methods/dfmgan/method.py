"""DFMGAN (Duan et al., AAAI 2023): StyleGAN2 trained on a category's normal images (stage 1, `pretrain`, once per
category), then per defect type a defect mapping network and residual blocks that draw the defect and its mask on
the frozen stage-1 generator's features (stage 2, `fit`). It draws image and mask from noise: it takes no target
normal image or mask. See README.md; the networks are networks.py, the losses train.py, the augmentation augment.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.diffusion.latents import to_tensor, to_uint8
from harness.errors import MethodError

from . import shipped
from .augment import check_operations
from .networks import Discriminator, GanShape, Generator
from .train import Training, train_stage1, train_stage2

STAGE1_FILE, STAGE2_FILE, RECORD = "stage1.safetensors", "stage2.safetensors", "dfmgan.json"


def gan_shape(config: dict, resolution: int) -> GanShape:
    return GanShape(resolution=resolution, **config["network"])


def match_shape(config: dict, resolution: int) -> GanShape:
    """D_match: the discriminator's layout at its own channel_base / channel_max."""
    return replace(gan_shape(config, resolution), **config["match_network"])


def stage1_settings(config: dict) -> dict:
    """What stage 1 is made from besides the images (a shipped stage 1's card records it)."""
    return {"resolution": config["resolution"], "network": config["network"], "stage1": config["stage1"]}


def training(stage: dict, resolution: int) -> Training:
    """A stage's settings; its length is given in thousands of images (kimg), as the authors' code gives it."""
    check_operations(stage["ada"]["augment"])
    steps = max(1, round(stage["kimg"] * 1000 / stage["batch"]))
    return Training(steps=steps, batch=stage["batch"], learning_rate=stage["learning_rate"],
                    r1_gamma=stage["r1_gamma"], pl_weight=stage["pl_weight"], style_mixing=stage["style_mixing"],
                    ada_target=stage["ada"]["target"], ada_kimg=stage["ada"]["kimg"], ada_max_p=stage["ada"]["max_p"],
                    augment=tuple(stage["ada"]["augment"]), lambda_match=stage.get("lambda_match", 1.0),
                    lambda_ms=stage.get("lambda_ms", 0.1))


def save(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    from safetensors.torch import save_file

    save_file({f"{name}.{key}": value.contiguous() for name, module in modules.items()
               for key, value in module.state_dict().items()}, str(path))


def load(path: Path, modules: dict[str, torch.nn.Module], strict: bool = True) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, module in modules.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            missing, unexpected = module.load_state_dict(own, strict=False)
        except RuntimeError as err:  # a tensor of another size: made with other network settings
            raise MethodError(f"dfmgan: {path} does not fit this configuration's {name}: "
                              f"{str(err).splitlines()[-1].strip()}") from None
        if unexpected or (strict and missing):
            raise MethodError(f"dfmgan: {path} does not fit this configuration's {name} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


class DFMGAN(Method):
    name = "dfmgan"
    paper = ("Yuxuan Duan, Yan Hong, Li Niu, Liqing Zhang. Few-Shot Defect Image Generation via Defect-Aware Feature "
             "Manipulation. AAAI 2023")
    granularity = "defect_type"
    needs = frozenset()  # draws image and mask from noise (it cannot take a given mask: the authors' issue #44)
    pretrains = True  # stage 1, once per category
    resources = {"tiny": {"num_cpus": 1, "num_gpus": 1}, "paper": {"num_cpus": 2, "num_gpus": 1}}

    def __init__(self, config, profile):
        super().__init__(config, profile)
        for stage in ("stage1", "stage2"):
            check_operations(config[stage]["ada"]["augment"])

    @classmethod
    def pretrain_settings(cls, config: dict) -> dict:
        """What stage 1 reads: its job is shared by every fit whose config agrees on these."""
        return {**stage1_settings(config), "shipped_stage1": config["shipped_stage1"]}

    def pretrain(self, task: FewShotTask, workdir: Path) -> None:
        """Stage 1: StyleGAN2 from scratch on the category's normal training images, or the shipped one where it was
        made from the same images with the same settings (shipped.py)."""
        folder = (shipped.find(self.profile.name, task.category, [item.image for item in task.normals],
                               stage1_settings(self.config)) if self.config["shipped_stage1"] else None)
        if folder is not None:
            (workdir / RECORD).write_text(json.dumps(shipped.copy_to(folder, workdir), indent=1))
            return
        shape = gan_shape(self.config, task.resolution)
        settings = training(self.config["stage1"], task.resolution)
        normals = to_tensor(np.stack([item.image for item in task.normals]))
        start = time.perf_counter()
        _, g_ema, d, history, p = train_stage1(shape, normals, settings, seed=int(task.rng().integers(2**31)),
                                               desc=f"dfmgan stage 1 {task.category}")
        save(workdir / STAGE1_FILE, {"g_ema": g_ema, "d": d})
        record = {"stage": 1, "images": len(normals), "steps": settings.steps, "batch": settings.batch,
                  "ada_p": round(p, 4), "seconds": round(time.perf_counter() - start, 1), "history": history.rows}
        (workdir / RECORD).write_text(json.dumps(record, indent=1))

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        """Stage 2 for one defect type: f_d, the residual blocks, D (resumed) and D_match trained on its images."""
        if task.pretrained is None:
            raise MethodError("dfmgan: fit needs stage 1 (the category's pretrain job); none was given")
        (defect,) = task.defect_types
        shape = gan_shape(self.config, task.resolution)
        g, d = Generator(shape, defect=True), Discriminator(shape)
        load(task.pretrained / STAGE1_FILE, {"g_ema": g, "d": d}, strict=False)  # the defect parts are new
        anomalies = task.anomalies_of(defect)
        images = to_tensor(np.stack([a.image for a in anomalies]))
        masks = torch.from_numpy(np.stack([a.mask for a in anomalies])).float()[:, None] * 2 - 1
        settings = training(self.config["stage2"], task.resolution)
        start = time.perf_counter()
        _, g_ema, _, _, history = train_stage2(g, d, match_shape(self.config, task.resolution), images, masks,
                                               settings, seed=int(task.rng().integers(2**31)),
                                               desc=f"dfmgan stage 2 {task.category}/{defect}")
        save(workdir / STAGE2_FILE, {"g_ema": g_ema})
        record = {"stage": 2, "defect_type": defect, "images": len(anomalies), "steps": settings.steps,
                  "seconds": round(time.perf_counter() - start, 1), "history": history.rows}
        (workdir / RECORD).write_text(json.dumps(record, indent=1))

    def generator(self, workdir: Path, resolution: int) -> Generator:
        g = Generator(gan_shape(self.config, resolution), defect=True).eval().requires_grad_(False)
        load(workdir / STAGE2_FILE, {"g_ema": g})
        return g

    @torch.no_grad()
    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        """G_ema at psi = 1 with constant noise; z and z_d drawn from each sample's own stream; the mask M >= 0. A draw
        with an empty mask takes a new z_d, up to `empty_mask_redraws` times (the authors' issue #57)."""
        settings = self.config["generation"]
        resolution = self.working_resolution(self.profile.resolution)
        g = self.generator(workdir, resolution)
        z_dim = g.shape.z_dim
        for i in range(request.n):
            rng = request.rng(i)
            z = torch.from_numpy(rng.standard_normal((1, z_dim))).float()
            for redraw in range(settings["empty_mask_redraws"] + 1):
                z_d = torch.from_numpy(rng.standard_normal((1, z_dim))).float()
                image, logits = g(z, z_d, noise=settings["noise"], psi=settings["psi"])
                mask = (logits[0, 0] >= 0).numpy()
                if mask.any():
                    break
            yield GeneratedSample(image=to_uint8(image)[0], mask=mask, defect_type=request.defect_type,
                                  extra={"redraws": redraw, **({} if mask.any() else {"empty_mask": True})})
