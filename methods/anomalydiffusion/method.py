"""AnomalyDiffusion (Hu et al., AAAI 2024): a frozen latent diffusion model, conditioned on a spatial anomaly
embedding (embedding.py) learned few-shot per category, generates a defect inside a given mask on a normal image by
blended sampling. Equation and section numbers are the paper's; see README.md. Shared machinery (placeholders,
the fine-tuning loop, blended DDIM) is the toolkit in harness/diffusion/.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from harness import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.diffusion import backbone as backbones
from harness.diffusion import ddim, processors
from harness.diffusion.finetune import FinetuneConfig, LatentBatch, LatentData, finetune
from harness.diffusion.latents import decode, encode, initial_noise, latent_mask, resize_images, resize_masks
from harness.diffusion.lora import LoraSettings, add_lora, load_lora, save_lora
from harness.diffusion.placeholders import Placeholders, repeated, single_token_id, word_norm
from harness.errors import MethodError

from . import adaptive, maskgen
from .augment import with_pool
from .embedding import AnomalyEmbedding, EncoderShape

MODEL_FILE, EMBEDDING_FILE, MASK_FILE = "model.json", "embedding.safetensors", "mask_generator.safetensors"
ADAPTER = "unet_lora"  # the tiny profile's LoRA on the UNet (`unet_lora`), saved alone
MASK_ADAPTERS = "mask_lora"  # the tiny profile's mask generator LoRAs (`mask_generator.unet_lora`): one per defect type
ADAPTIVE = (True, False, "textures")  # re-weighting always, never, or on texture categories (the authors' rule)
MASK_SOURCES = ("generated", "data")  # the mask generator's (maskgen.py), or the harness's target masks (ablation)
SHORTFALL = "data (the mask generator gave too few)"  # a target's mask where the generator's was planned: a stand-in


class TemplateText:
    """(template index per sample, e (B, tokens, width)) -> the text encoder's states of each sample's template with
    the placeholder written `tokens` times and replaced by e, in order."""

    def __init__(self, text_encoder, holders: Placeholders, word: str, prompts: list[str]):
        self.text_encoder, self.holders, self.word, self.prompts = text_encoder, holders, word, prompts

    @property
    def count(self) -> int:
        return len(self.prompts)

    def __call__(self, templates: list[int], vectors: torch.Tensor) -> torch.Tensor:
        return self.holders.encode(self.text_encoder, [self.prompts[i] for i in templates], {self.word: vectors})

    def columns(self, templates: list[int]) -> torch.Tensor:
        """(B, tokens) bool: where each sample's prompt holds the embedding's vectors."""
        return self.holders.token_ids([self.prompts[i] for i in templates]) == self.holders.ids[self.word]


def masked_loss(target: torch.Tensor, predicted: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sec. 3.2's loss: the mean over every latent element of (m * (eps - eps_theta))^2, as the authors' code (the
    normaliser is the whole latent, not the mask's area)."""
    return (m * (target - predicted)).pow(2).mean()


class AnomalyDiffusion(Method):
    name = "anomalydiffusion"
    paper = ("Teng Hu, Jiangning Zhang, Ran Yi, Yuzhen Du, Xu Chen, Liang Liu, Yabiao Wang, Chengjie Wang. "
             "AnomalyDiffusion: Few-Shot Anomaly Image Generation with Diffusion Model. AAAI 2024")
    granularity = "category"
    needs = frozenset({"target_normal", "target_mask"})
    backbone = "ldm-text2im-large-256"  # CompVis' LDM text2img-large (LDMBert, 256 px), as the authors
    resources = {"tiny": {"num_cpus": 1, "num_gpus": 1}, "paper": {"num_cpus": 2, "num_gpus": 1}}
    setting_types = {"adaptive_mask": (bool, str)}  # ADAPTIVE: true, false or "textures" (checked in __init__)

    def __init__(self, config, profile):
        super().__init__(config, profile)
        if config["masks"] not in MASK_SOURCES:
            raise MethodError(f"anomalydiffusion: masks must be one of {MASK_SOURCES}, not {config['masks']!r}")
        if config["adaptive_mask"] not in ADAPTIVE:
            raise MethodError(f"anomalydiffusion: adaptive_mask must be one of {ADAPTIVE}, "
                              f"not {config['adaptive_mask']!r}")
        if config["blend"] not in ddim.BLENDS:
            raise MethodError(f"anomalydiffusion: blend must be one of {ddim.BLENDS}, not {config['blend']!r}")
        if not config["templates"]:
            raise MethodError("anomalydiffusion: templates: at least one is needed")
        for template in config["templates"]:
            try:
                repeated(template.format(config["placeholder"]), config["placeholder"], 2)
            except (ValueError, IndexError, KeyError):
                raise MethodError(f"anomalydiffusion: template {template!r} needs exactly one {{}}, as a word of its "
                                  "own, for the placeholder") from None

    # -- fit: the masked loss on the few training anomalies of every defect type of the category --

    def fit(self, task: FewShotTask, workdir: Path) -> None:
        if task.backbone is None:
            raise MethodError("anomalydiffusion needs a diffusion backbone (FewShotTask.backbone)")
        start = time.perf_counter()
        backbone = backbones.load_frozen(task.backbone)
        seed = int(task.rng().integers(2**63 - 1))
        defect_types = sorted({a.defect_type for a in task.anomalies})
        size = task.resolution  # the method's working resolution (Method.working_resolution)
        with torch.random.fork_rng():  # the encoders' random initialisation: seeded
            torch.manual_seed(seed)
            embedding = self._new_embedding(backbone, task, defect_types, size, workdir).to(backbone.device).train()
        augment = self.config["augment"]
        images, masks, source = with_pool(task.rng("augment"),
                                          resize_images(np.stack([a.image for a in task.anomalies]), size),
                                          resize_masks(np.stack([a.mask for a in task.anomalies]), size),
                                          int(augment["pool"]), int(augment["max_rotation"]))
        data = LatentData.encode(backbone, images, masks, flips=self.config["flips"])
        rows = [task.anomalies[i] for i in source]  # the training anomaly of each row of the pool
        cfg = self.config
        steps = int(cfg["steps_per_defect_type"]) * len(defect_types)
        lora = self._lora_settings()
        adapter = add_lora(backbone.unet, lora, seed=seed) if lora else []
        settings = FinetuneConfig(steps=steps, batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
                                  weight_decay=0.0, grad_clip=cfg["grad_clip"], seed=seed)
        history = finetune(list(embedding.parameters()) + adapter, data, self._loss(backbone, embedding, rows),
                           settings, workdir, desc=f"{self.name}: fine-tune", rates=self._learning_rates(embedding),
                           buffers=list(embedding.buffers()))  # BatchNorm's statistics: a resumed fit keeps them
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in embedding.state_dict().items()},
                  str(workdir / EMBEDDING_FILE))
        if lora:
            save_lora(backbone.unet, workdir / ADAPTER, lora)
        frozen = None if lora else backbone  # the image fit trained the embedding only: its UNet is still frozen
        mask_histories = self._fit_mask_generators(task, defect_types, size, seed, workdir, frozen)
        (workdir / MODEL_FILE).write_text(json.dumps({
            "backbone": str(task.backbone), "resolution": size, "defect_types": defect_types, "steps": steps,
            "texture": task.texture,
            "embedding": cfg["embedding"], "placeholder": cfg["placeholder"], "templates": cfg["templates"],
            "training_images": [a.id for a in task.anomalies], "history": history, "mask_generator": mask_histories,
            "unet_lora": cfg["unet_lora"], "mask_adapters": self._mask_adapters(defect_types),
            "trained_parameters": sum(p.numel() for p in [*embedding.parameters(), *adapter]),
            **self._fit_record(embedding), "seconds": round(time.perf_counter() - start, 1)}, indent=2))

    def _loss(self, backbone: backbones.Backbone, embedding: torch.nn.Module, rows: list
              ) -> Callable[[LatentBatch, torch.Generator], torch.Tensor]:
        scheduler, unet = backbone.scheduler, backbone.unet
        text = self._text(backbone, embedding.tokens)

        def loss(batch: LatentBatch, generator: torch.Generator) -> torch.Tensor:
            z0, m = batch.latents, batch.masks
            eps = torch.randn(z0.shape, generator=generator).to(z0.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator).to(z0.device)
            templates = torch.randint(0, text.count, (len(z0),), generator=generator).tolist()
            vectors = self._training_vectors(embedding, [rows[i] for i in batch.index.tolist()],
                                             batch.pixel_masks.to(z0.device), t)
            predicted = unet(scheduler.add_noise(z0, eps, t), t,
                             encoder_hidden_states=text(templates, vectors)).sample
            return masked_loss(ddim.training_target(scheduler, z0, eps, t), predicted, m)

        return loss

    # -- the hooks a method built on this one overrides (methods/anomalyxfusion) --

    def _new_embedding(self, backbone: backbones.Backbone, task: FewShotTask, defect_types: list[str], size: int,
                       workdir: Path) -> torch.nn.Module:
        """The embedding to train, randomly initialised (under the fit's seed)."""
        return self._embedding(backbone, defect_types)

    def _training_vectors(self, embedding: AnomalyEmbedding, rows: list, masks: torch.Tensor, t: torch.Tensor
                          ) -> torch.Tensor:
        """(B, tokens, width) for training rows (their anomalies, pixel masks and timesteps)."""
        return embedding([row.defect_type for row in rows], masks)

    def _learning_rates(self, embedding: torch.nn.Module) -> dict[torch.nn.Parameter, float]:
        """Parameters trained at a rate other than `learning_rate` (none here)."""
        return {}

    def _fit_record(self, embedding: torch.nn.Module) -> dict:
        """What model.json records of the embedding beyond the common fields."""
        return {}

    def _load_embedding(self, backbone: backbones.Backbone, model: dict, workdir: Path) -> torch.nn.Module:
        embedding = self._embedding(backbone, model["defect_types"], model["embedding"]).to(backbone.device)
        from safetensors.torch import load_file

        embedding.load_state_dict(load_file(str(workdir / EMBEDDING_FILE)))
        return embedding.eval()  # the authors' code leaves it in training mode (batch statistics): see README.md

    def _conditioning(self, embedding: AnomalyEmbedding, text: "TemplateText", defect_type: str, targets: list,
                      masks: torch.Tensor, templates: list[int]) -> Callable[[int], torch.Tensor]:
        """The text encoder's states for a batch at denoising step t: here the same at every step."""
        condition = text(templates, embedding([defect_type] * len(targets), masks))
        return lambda t: condition

    # -- generate: blended sampling inside each target mask on its normal image --

    def generate(self, request: GenerationRequest, workdir: Path) -> Iterator[GeneratedSample]:
        model = json.loads((workdir / MODEL_FILE).read_text())
        if request.defect_type not in model["defect_types"]:
            raise MethodError(f"{workdir / MODEL_FILE}: fitted on {model['defect_types']}, not {request.defect_type!r}")
        backbone = backbones.load_frozen(request.backbone or Path(model["backbone"]))
        embedding = self._load_embedding(backbone, model, workdir)
        adaptive_on = self._adaptive(model)
        if adaptive_on:
            processors.install(backbone.unet, processors.each_layer(processors.Reweight))  # the per-call map
        text = self._text(backbone, embedding.tokens, model["placeholder"], model["templates"])
        size, batch = model["resolution"], self.config["generation_batch"]
        masks, sources, record = self._masks(backbone, request, workdir, model)  # before the images' LoRA
        if model.get("unet_lora"):
            load_lora(backbone.unet, workdir / ADAPTER)
        with torch.no_grad():
            for first in range(0, request.n, batch):
                targets = request.targets[first:first + batch]
                chosen = masks[first:first + batch]
                images = self._generate_batch(backbone, embedding, text, request, first, targets, chosen, size,
                                              adaptive_on)
                for target, image, mask, source in zip(targets, images, chosen, sources[first:first + batch]):
                    yield GeneratedSample(image=image, mask=resize_masks(mask[None], image.shape[0])[0],
                                          defect_type=request.defect_type, normal_id=target.normal.id,
                                          mask_id=None if source == "generated" else target.mask_source,
                                          caption=target.caption,
                                          extra={"mask_source": source, "adaptive_mask": adaptive_on, **record},
                                          stand_in=f"mask: {source}" if source == SHORTFALL else None)

    def _masks(self, backbone: backbones.Backbone, request: GenerationRequest, workdir: Path, model: dict
               ) -> tuple[list[np.ndarray], list[str], dict]:
        """Each target's mask at the working size: the mask generator's (`masks: generated`), the targets' where it
        gave fewer than n (recorded), or the targets' (`masks: data`)."""
        data = list(resize_masks(np.stack([t.mask for t in request.targets]), model["resolution"]))
        if self.config["masks"] == "data":
            return data, ["data"] * len(data), {}
        from safetensors.torch import load_file

        vectors = load_file(str(workdir / MASK_FILE))[request.defect_type].to(backbone.device)
        adapter = model.get("mask_adapters", {}).get(request.defect_type)
        if adapter:  # the tiny profile's LoRA of this defect type's generator, on a copy of the frozen backbone
            backbone = backbones.load_frozen(request.backbone or Path(model["backbone"]))
            load_lora(backbone.unet, workdir / adapter)
        sampled = maskgen.sample(backbone, vectors, self._mask_settings(), request.n, model["resolution"],
                                 request.rng("masks"))
        passed = len(sampled.masks)
        sources = ["generated"] * passed + [SHORTFALL] * (request.n - passed)
        record = {"mask_generator": {"drawn": sampled.drawn, "rejected": sampled.rejected, "passed": passed}}
        return sampled.masks + data[passed:], sources, record

    def _fit_mask_generators(self, task: FewShotTask, defect_types: list[str], size: int, seed: int,
                             workdir: Path, frozen: backbones.Backbone | None = None) -> dict:
        """One textual inversion per defect type on its training masks (`masks: generated`), on the frozen
        backbone (`frozen`, loaded once when None; a fresh copy per defect type for its own LoRA in tiny); saves
        the vectors (and the LoRAs)."""
        if self.config["masks"] != "generated":
            return {}
        from safetensors.torch import save_file

        settings, adapters = self._mask_settings(), self._mask_adapters(defect_types)
        vectors, histories = {}, {}
        for index, defect in enumerate(defect_types):
            if defect in adapters:
                backbone = backbones.load_frozen(task.backbone)
            else:
                backbone = frozen = frozen or backbones.load_frozen(task.backbone)
            masks = resize_masks(np.stack([a.mask for a in task.anomalies_of(defect)]), size)
            vectors[defect], histories[defect] = maskgen.fit(backbone, masks, settings, seed + 1 + index,
                                                             workdir / "mask_generator" / str(index))
            if defect in adapters:
                save_lora(backbone.unet, workdir / adapters[defect], maskgen.lora_settings(settings))
        save_file({d: v.cpu().contiguous() for d, v in vectors.items()}, str(workdir / MASK_FILE))
        return histories

    def _mask_adapters(self, defect_types: list[str]) -> dict[str, str]:
        """Where each defect type's mask generator LoRA is saved, relative to the fit's folder (none in `paper`)."""
        if self.config["masks"] != "generated" or not maskgen.lora_settings(self.config["mask_generator"]):
            return {}
        return {defect: f"{MASK_ADAPTERS}/{index}" for index, defect in enumerate(defect_types)}

    def _mask_settings(self) -> dict:
        return {**self.config["mask_generator"], "placeholder": self.config["placeholder"],
                "templates": self.config["templates"]}

    def _adaptive(self, model: dict) -> bool:
        """Whether this generation re-weights attention (`adaptive_mask`): `textures` follows the authors' run-mvtec.py,
        on for texture anomalies, off for structural ones (by the fitted category's kind; an unknown kind: off)."""
        setting = self.config["adaptive_mask"]
        return bool(model.get("texture")) if setting == "textures" else bool(setting)

    def _generate_batch(self, backbone: backbones.Backbone, embedding: AnomalyEmbedding, text, request, first: int,
                        targets: list, chosen: list[np.ndarray], size: int, adaptive_on: bool) -> np.ndarray:
        out_size = targets[0].normal.image.shape[0]
        masks = np.stack(chosen)
        z0 = encode(backbone, resize_images(np.stack([t.normal.image for t in targets]), size))
        m = latent_mask(masks, z0.shape[-1], z0.device)
        rngs = [request.rng(first + i) for i in range(len(targets))]
        z_T = torch.cat([initial_noise(rng, backbone, size) for rng in rngs]).to(z0.device)
        templates = [int(rng.integers(text.count)) for rng in rngs]
        condition_at = self._conditioning(embedding, text, request.defect_type, targets,
                                          torch.from_numpy(masks)[:, None].to(z0.device), templates)
        # each sample's own stream for eta's and the blend's noise: a sample is the same in any batch
        generators = [torch.Generator().manual_seed(int(rng.integers(2**63 - 1))) for rng in rngs]

        steps = self.config["inference_steps"]
        columns = text.columns(templates) if adaptive_on else None

        def mask_at(t: int) -> torch.Tensor:  # the adaptive option also dilates the blend's mask
            return adaptive.dilate(m, adaptive.radius(t, steps)) if adaptive_on else m

        def eps(z: torch.Tensor, t: int, _condition=None) -> torch.Tensor:
            kwargs = {}
            if adaptive_on:
                weights = adaptive.attention_weights(z, z0, mask_at(t))
                kwargs["cross_attention_kwargs"] = {"context": processors.AttentionContext(
                    processors.TokenReweight(0, 0, weights, multiply=True, columns=columns))}
            out = backbone.unet(z, t, encoder_hidden_states=condition_at(t), **kwargs).sample
            return ddim.predicted_noise(backbone.scheduler, out, z, t)

        z_0 = ddim.blended_sample(eps, z_T, z0, mask_at, backbone.scheduler, steps,
                                  eta=float(self.config["eta"]), generator=generators, blend=self.config["blend"])
        images = resize_images(decode(backbone, z_0), out_size)
        if self.config["paste_back"]:  # an option (off, as the authors): the normal image's pixels outside the mask
            kept = ~resize_masks(masks, out_size)[..., None]
            images = np.where(kept, np.stack([t.normal.image for t in targets]), images)
        return images

    # -- the trained parts --

    def _embedding(self, backbone: backbones.Backbone, defect_types: list[str],
                   settings: dict | None = None) -> AnomalyEmbedding:
        settings = settings or self.config["embedding"]
        table = backbone.text_encoder.get_input_embeddings().weight
        initial = table[single_token_id(backbone.tokenizer, settings["init_word"])]
        encoder = settings["encoder"]
        shape = EncoderShape(int(encoder["input_size"]), tuple(encoder["channels"]), tuple(encoder["units"]),
                             int(encoder["pyramid"]))
        scale = word_norm(table) if settings.get("normalise_tokens") else None
        return AnomalyEmbedding(defect_types, initial, int(settings["mask_tokens"]), int(settings["anomaly_vectors"]),
                                shape, scale)

    def _text(self, backbone: backbones.Backbone, tokens: int, placeholder: str | None = None,
              templates: list[str] | None = None) -> "TemplateText":
        word = placeholder or self.config["placeholder"]
        try:
            holders = Placeholders(backbone.tokenizer, [word])
        except ValueError as error:
            raise MethodError(f"anomalydiffusion: placeholder: {error}") from None
        prompts = [repeated(t.format(word), word, tokens) for t in (templates or self.config["templates"])]
        return TemplateText(backbone.text_encoder, holders, word, prompts)

    def _lora_settings(self) -> LoraSettings | None:
        return LoraSettings.from_config(self.config["unet_lora"])

