"""DualAnoDiff (Jin et al., CVPR 2025): one frozen latent diffusion model, two interrelated branches (the whole
anomaly image and its anomaly part), fine-tuned few-shot per defect type; a sample's mask is segmented from its
generated part. Equation numbers are the paper's; see README.md. The dual-branch attention is saim.py, the part's
segmentation segment.py; LoRA, the fine-tuning loop and the samplers are the shared toolkit in harness/diffusion/.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.diffusion import backbone as backbones
from harness.diffusion import ddim, processors
from harness.diffusion.finetune import FinetuneConfig, LatentBatch, LatentData, finetune
from harness.diffusion.latents import decode, encode, initial_noise, resize_images, resize_masks, to_tensor
from harness.diffusion.lora import TEXT_TARGETS, LoraSettings, add_lora, load_lora, save_lora
from harness.errors import MethodError

from . import bcm, saim
from .segment import STAND_IN, make_segmenter

MODEL_FILE, DUAL_FILE, TEXT_ADAPTER = "model.json", "dual.safetensors", "text_lora"
PART, BACKGROUND = "part", "background"  # companions of each training image (LatentData): I_a, BCM's I_b
SAIM_INITS = ("default", "zero")
TRAINED = ("lora", "text_lora", "saim", "saim_init", "bcm")  # what a fit trained: generate rebuilds exactly that
NO_FLIP_CATEGORIES = ("cable",)  # the authors' code means not to flip cable (its wires' colours have an order)


def fill_prompts(prompts: dict, category: str, defect_type: str) -> dict:
    """The prompts with `{category}` and `{defect}` replaced by the task's names (underscores as spaces): the
    class-word ablation's "a {category} with {defect}" instead of the rare tokens' "a vfx with sks"."""
    names = {"category": category.replace("_", " "), "defect": defect_type.replace("_", " ")}
    try:
        return {branch: text.format(**names) for branch, text in prompts.items()}
    except (KeyError, IndexError, ValueError) as error:
        raise MethodError(f"dualanodiff: prompts {prompts}: only {{category}} and {{defect}} may be filled in "
                          f"({type(error).__name__}: {error})") from None


def part_image(images: np.ndarray, masks: np.ndarray) -> torch.Tensor:
    """The anomaly part I_a = I * M_a, formed after normalising I to [-1, 1]: the background is 0, mid-grey.
    uint8 (N, H, W, 3), bool (N, H, W) -> float (N, 3, H, W)."""
    return to_tensor(images) * torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]


def interleave(whole: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """(B, ...) and (B, ...) -> (2B, ...) as [whole_0, part_0, whole_1, part_1, ...]."""
    return torch.stack([whole, part], dim=1).flatten(0, 1)


def dual_loss(target: torch.Tensor, target_part: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ||eps - eps_theta(z_t, t, tau(p))||^2 + ||eps* - eps*_theta(z'_t, t, tau(p'))||^2, `predicted` the
    interleaved pairs' predictions, the targets eps and eps* in the backbone's parametrization
    (`ddim.training_target`: the noises for SD 1.5, v for a v-prediction backbone). As the authors' code, one mean over
    both branches' elements (half the sum of the two terms' means: the same minimiser; Adam is indifferent to the
    factor, clipping at 1.0 sees the mean)."""
    return F.mse_loss(predicted, interleave(target, target_part))


class DualAnoDiff(Method):
    name = "dualanodiff"
    paper = ("Ying Jin, Jinlong Peng, Qingdong He, Teng Hu, Jiafu Wu, Hao Chen, Haoxuan Wang, Wenbing Zhu, Mingmin Chi, "
             "Jun Liu, Yabiao Wang. DualAnoDiff: Dual-Interrelated Diffusion Model for Few-Shot Anomaly Image "
             "Generation. CVPR 2025 (arXiv 2408.13509)")
    granularity = "defect_type"
    needs = frozenset({"target_normal"})  # BCM's background (on by default); nothing with bcm.enabled: false
    backbone = "stable-diffusion-v1-5"
    resources = {"tiny": {"num_cpus": 1, "num_gpus": 1}, "paper": {"num_cpus": 2, "num_gpus": 1}}

    def __init__(self, config, profile):
        super().__init__(config, profile)
        if config["saim_init"] not in SAIM_INITS:
            raise MethodError(f"dualanodiff: saim_init must be one of {SAIM_INITS}, not {config['saim_init']!r}")
        fill_prompts(config["prompts"], "category", "defect")  # a misspelt placeholder fails here, not in a fit
        try:
            ddim.scheduler_class(config["scheduler"])
        except ValueError as error:
            raise MethodError(f"dualanodiff: scheduler: {error}") from None
        if not config["bcm"]["enabled"]:
            self.needs = frozenset()  # no background to compensate: nothing of a normal image is read

    # -- fit: Eq. 4 on the few training anomalies of one defect type --

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        if task.backbone is None:
            raise MethodError("dualanodiff needs a diffusion backbone (FewShotTask.backbone)")
        start = time.perf_counter()
        seed = int(task.rng().integers(2**63 - 1))
        with torch.random.fork_rng():  # the adapters' and SAIM's starting weights: seeded, as everything else
            torch.manual_seed(seed)
            backbone, params = self._prepare(task.backbone, self.config, train=True)
        size = task.resolution  # the method's working resolution (Method.working_resolution)
        images = resize_images(np.stack([a.image for a in task.anomalies]), size)
        masks = resize_masks(np.stack([a.mask for a in task.anomalies]), size)
        flips = self.config["flips"] and task.category not in NO_FLIP_CATEGORIES
        companions = {PART: part_image}
        if self.config["bcm"]["enabled"]:
            companions[BACKGROUND] = lambda imgs, _: bcm.background_image(imgs, bcm.object_masks(imgs, task.texture))
        data = LatentData.encode(backbone, images, masks, flips=flips, companions=companions)
        cfg = self.config
        prompts = fill_prompts(cfg["prompts"], task.category, task.defect_types[0])
        history = finetune(params, data, self._loss(backbone, prompts), FinetuneConfig(
            steps=cfg["steps"], batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
            weight_decay=cfg["weight_decay"], grad_clip=cfg["grad_clip"], seed=seed), workdir,
            desc="dualanodiff: fine-tune")
        self._save(backbone, workdir)
        (workdir / MODEL_FILE).write_text(json.dumps({
            "backbone": str(task.backbone), "resolution": size,
            "prompts": prompts, "trained": {key: cfg[key] for key in TRAINED},
            "training_images": [a.id for a in task.anomalies], "flips": flips, "history": history,
            "trained_parameters": sum(p.numel() for p in params),
            "seconds": round(time.perf_counter() - start, 1)}, indent=2))

    def _loss(self, backbone: backbones.Backbone, filled: dict) -> Callable[[LatentBatch, torch.Generator],
                                                                          torch.Tensor]:
        scheduler, unet = backbone.scheduler, backbone.unet
        prompts = [filled["whole"], filled["part"]]
        use_saim, use_bcm = bool(self.config["saim"]), bool(self.config["bcm"]["enabled"])

        def loss(batch: LatentBatch, generator: torch.Generator) -> torch.Tensor:
            z, z_part = batch.latents, batch.companions[PART]
            pairs = len(z)
            eps = torch.randn(z.shape, generator=generator).to(z.device)  # independent noises,
            eps_part = torch.randn(z.shape, generator=generator).to(z.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (pairs,), generator=generator).to(z.device)
            z_t = interleave(scheduler.add_noise(z, eps, t), scheduler.add_noise(z_part, eps_part, t))  # one t
            text = backbone.encode_text(prompts).repeat(pairs, 1, 1)  # [p, p', p, p', ...], through the text LoRA
            background = None
            if use_bcm:  # the background's features, at the pair's t with its own noise
                z_b = batch.companions[BACKGROUND]
                eps_b = torch.randn(z.shape, generator=generator).to(z.device)
                background = _background_features(unet, scheduler.add_noise(z_b, eps_b, t), t, text[0::2])
            context = saim.context_for(pairs, use_saim, z.device, background=background)
            predicted = unet(z_t, t.repeat_interleave(2), encoder_hidden_states=text,
                             cross_attention_kwargs={"context": context}).sample
            target = ddim.training_target(scheduler, z, eps, t)
            return dual_loss(target, ddim.training_target(scheduler, z_part, eps_part, t), predicted)

        return loss

    # -- generate: both branches from independent noise, classifier-free guidance over the pairs --

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        model = json.loads((workdir / MODEL_FILE).read_text())
        if "trained" not in model:
            raise MethodError(f"{workdir / MODEL_FILE}: no record of what was trained (an older fit); fit again")
        trained = {**self.config, **model["trained"]}  # the fit's adapters, whatever this config says
        backbone, _ = self._prepare(request.backbone or Path(model["backbone"]), trained, train=False)
        self._load(backbone, workdir, trained)
        size = model["resolution"]
        segmenter = make_segmenter(self.config["mask"], backbone.device)
        with torch.no_grad():
            condition = self._condition(backbone, model["prompts"])
            for first in range(0, request.n, self.config["generation_batch"]):
                pairs = min(self.config["generation_batch"], request.n - first)
                # (whole, part) and, with BCM, the background's noise: each sample's own seeded stream
                latents = 3 if trained["bcm"]["enabled"] else 2
                noise = torch.stack([initial_noise(request.rng(first + i), backbone, size, latents)
                                     for i in range(pairs)]).to(backbone.device)
                targets = request.targets[first:first + pairs]
                background = (self._backgrounds(backbone, targets, size, noise[:, 2]) if trained["bcm"]["enabled"]
                              else None)
                z_0 = self._sample(backbone, condition, noise[:, :2].flatten(0, 1), trained["saim"], background)
                images = decode(backbone, z_0)
                for target, whole, found in zip(targets, images[0::2], segmenter.segment(images[1::2])):
                    extra = {"segmenter": segmenter.name, "part_empty": found.empty,
                             **({"segmenter_weights": segmenter.weights} if segmenter.weights else {})}
                    if background is not None:  # not normal_id: the sample is not drawn on that image
                        extra["background"] = target.normal.id
                    stand_in = ("mask: the stand-in segmenter's (no U2-Net weights)" if segmenter.name == STAND_IN
                                else None)
                    yield GeneratedSample(image=whole, mask=found.mask, defect_type=request.defect_type, extra=extra,
                                          stand_in=stand_in)

    def _backgrounds(self, backbone: backbones.Backbone, targets: list, size: int,
                     noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BCM's background latents and their noises for a guided batch: [mid-grey x B (unconditional); each
        target's normal image with its object blacked out (conditional)]."""
        if any(t.normal is None for t in targets):
            raise MethodError("dualanodiff: this fit was trained with BCM, which needs a normal image per sample; "
                              "generate with bcm.enabled: true (the request has no normal images)")
        normals = resize_images(np.stack([t.normal.image for t in targets]), size)
        objects = resize_masks(np.stack([t.normal_foreground for t in targets]), size)
        z_b = encode(backbone, bcm.background_image(normals, objects))
        grey = encode(backbone, torch.zeros(len(targets), 3, size, size))
        return torch.cat([grey, z_b]), torch.cat([noise, noise])

    def _condition(self, backbone: backbones.Backbone, prompts: dict) -> torch.Tensor:
        """[uncond whole, uncond part, cond whole, cond part] (the empty prompt for both unconditional branches,
        as the authors' pipeline): the order the guided batch keeps its pairs in."""
        return backbone.encode_text(["", "", prompts["whole"], prompts["part"]])

    def _sample(self, backbone: backbones.Backbone, condition: torch.Tensor, z_T: torch.Tensor,
                saim_on: bool | None = None, background: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """z_T: (2B) interleaved pairs. Each step runs the UNet on [z_T; z_T] (4B) with the unconditional pairs first
        and the conditional pairs after, so every pair stays together through SAIM, then guides. `background`: BCM's
        background latents and noises (2B, `_backgrounds`), noised to each step's t."""
        pairs, scale = len(z_T) // 2, float(self.config["guidance_scale"])
        use_saim = bool(saim_on if saim_on is not None else self.config["saim"])
        text = torch.cat([condition[:2].repeat(pairs, 1, 1), condition[2:].repeat(pairs, 1, 1)])

        def eps(z: torch.Tensor, t, _condition=None) -> torch.Tensor:
            doubled = torch.cat([z, z])
            features = None
            if background is not None:
                steps = torch.full((2 * pairs,), int(t), device=z.device)
                noised = backbone.scheduler.add_noise(background[0], background[1], steps)
                features = _background_features(backbone.unet, noised, t, text[0::2])
            context = saim.context_for(2 * pairs, use_saim, z.device, background=features)
            out = backbone.unet(doubled, t, encoder_hidden_states=text,
                                cross_attention_kwargs={"context": context}).sample
            unconditional, conditional = ddim.predicted_noise(backbone.scheduler, out, doubled, t).chunk(2)
            return unconditional + scale * (conditional - unconditional)

        steps = self.config["inference_steps"]
        if self.config["scheduler"] == "DDIMScheduler":
            return ddim.sample(eps, z_T, backbone.scheduler, steps)
        return ddim.sample_with(ddim.make_scheduler(self.config["scheduler"], backbone.scheduler), eps, z_T, steps)

    # -- the trained parts: branch LoRAs and SAIM on the UNet, LoRA on the text encoder --

    @staticmethod
    def _prepare(source: Path, config: dict, train: bool) -> tuple[backbones.Backbone, list[torch.nn.Parameter]]:
        """The frozen backbone with the dual-branch processors (and, to train, the text LoRA); the parameters a fit
        trains: both branches' LoRAs, SAIM (unless switched off), BCM (when on), the text LoRA."""
        backbone = backbones.load_frozen(source)
        lora, bcm_config = config["lora"], config["bcm"]
        saim.install(backbone.unet, int(lora["rank"]), lora.get("alpha"), config["saim_init"] == "zero",
                     int(bcm_config["hidden"]) if bcm_config["enabled"] else None)
        params = processors.branch_lora_parameters(backbone.unet)
        if config["saim"]:
            params += saim.saim_parameters(backbone.unet)
        params += saim.bcm_parameters(backbone.unet)
        if config["text_lora"] and train:
            params += add_lora(backbone.text_encoder, _text_settings(config))
        for param in params:
            param.requires_grad_(train)
        return backbone, params

    def _save(self, backbone: backbones.Backbone, workdir: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in saim.dual_state(backbone.unet).items()}, str(workdir / DUAL_FILE))
        if self.config["text_lora"]:
            save_lora(backbone.text_encoder, workdir / TEXT_ADAPTER, _text_settings(self.config))

    @staticmethod
    def _load(backbone: backbones.Backbone, workdir: Path, trained: dict) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(workdir / DUAL_FILE))
        expected = saim.dual_state(backbone.unet)
        if saved.keys() != expected.keys() or any(saved[k].shape != expected[k].shape for k in saved):
            raise MethodError(f"{workdir / DUAL_FILE}: its branch LoRAs / SAIM / BCM do not fit this configuration "
                              "(another rank or backbone?); fit again")
        backbone.unet.load_state_dict(saved, strict=False)
        if trained["text_lora"]:
            load_lora(backbone.text_encoder, workdir / TEXT_ADAPTER)



def _background_features(unet, z_b: torch.Tensor, t, text: torch.Tensor) -> bcm.BackgroundFeatures:
    """BCM's background pass: the whole branch (its LoRA, its prompt, no SAIM) denoises the noised background
    latents; returns each self-attention layer's input features, for the dual pass to read."""
    context, written = saim.background_context(len(z_b), z_b.device)
    unet(z_b, t, encoder_hidden_states=text, cross_attention_kwargs={"context": context})
    return bcm.BackgroundFeatures(written.features)


def _text_settings(config: dict) -> LoraSettings:
    return LoraSettings.from_config(config["text_lora"], TEXT_TARGETS)
