"""AnomalyXFusion (Hu et al., 2024): AnomalyDiffusion's few-shot generator with its anomaly embedding replaced by
the X-embedding (embedding.py): the defect's caption, mask and image fused (MIF) and made timestep-dependent (DDF).

Built on methods/anomalydiffusion (its fine-tuning, masked loss, templates and blended sampler, through the hooks
that class leaves open); only the embedding and its inputs are this method's. See README.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness import FewShotTask
from harness.diffusion import backbone as backbones
from harness.diffusion.backbone import split_words
from harness.diffusion.latents import resize_images, resize_masks
from harness.diffusion.placeholders import word_norm
from harness.errors import MethodError
from harness.methods import get_method_info, method_package

from .embedding import (DynamicFusion, LocationEmbedding, MaskAutoencoder, MultimodalFusion, SemanticEmbedding,
                        TexturalEmbedding, XEmbedding)
from .features import CLIP_WEIGHTS, ClipFeatures, TinyCaptionEncoder, TinyImageFeatures
from .mask_autoencoder import fit_mask_autoencoder

base = method_package("anomalydiffusion")
EMBEDDING_FILE = base.EMBEDDING_FILE
INHERITED = ("placeholder", "templates")  # null in method.yaml: AnomalyDiffusion's value for the profile
FEATURES = ("clip", "tiny")


class AnomalyXFusion(base.AnomalyDiffusion):
    name = "anomalyxfusion"
    paper = ("Jie Hu, Yawen Huang, Yilin Lu, Guoyang Xie, Guannan Jiang, Yefeng Zheng, Zhichao Lu. "
             "AnomalyXFusion: Multi-modal Anomaly Synthesis with Diffusion. arXiv 2404.19444, 2024")
    needs = frozenset({"target_normal", "target_mask", "caption"})
    builds_on = ("anomalydiffusion",)

    def __init__(self, config, profile):
        inherited = get_method_info("anomalydiffusion").config(profile)
        config = {**config, **{k: inherited[k] for k in INHERITED if config[k] is None}}
        if config["masks"] != "data":
            raise MethodError("anomalyxfusion: masks must be 'data' (the location embedding reads the given mask; "
                              f"the method has no mask generator), not {config['masks']!r}")
        if config["embedding"]["features"] not in FEATURES:
            raise MethodError(f"anomalyxfusion: embedding.features must be one of {FEATURES}, "
                              f"not {config['embedding']['features']!r}")
        super().__init__(config, profile)
        self._captions = None  # the caption encoder of the current fit or generation
        self._caption_features: dict[str, torch.Tensor] = {}

    # -- fit: the X-embedding's parts, built from the task's training anomalies --

    def _new_embedding(self, backbone: backbones.Backbone, task: FewShotTask, defect_types: list[str], size: int,
                       workdir: Path) -> XEmbedding:
        settings = self.config["embedding"]
        captions = [_caption_of(a) for a in task.anomalies]
        seed = int(task.rng("captions").integers(2**31 - 1))
        words = sorted({w for c in captions for w in split_words(c)})
        self._captions = self._caption_encoder(backbone, words, seed, captions)
        self._caption_features = dict(zip(captions, self._captions(captions)))
        images = resize_images(np.stack([a.image for a in task.anomalies]), size)
        masks = resize_masks(np.stack([a.mask for a in task.anomalies]), size)
        autoencoder, self._mask_history = self._mask_autoencoder(masks, int(task.rng("mask-ae").integers(2**31 - 1)))
        image_features = self._image_features(backbone)
        features = image_features(images, masks).cpu()
        table = backbone.text_encoder.get_input_embeddings().weight.detach().cpu()
        initial = textural_init(features, [a.defect_type for a in task.anomalies], defect_types,
                                int(settings["tokens"]), table, seed)
        self._record = {"caption_words": self._captions.words if hasattr(self._captions, "words") else [],
                        "caption_seed": seed, "caption_feature_dim": self._captions.dim,
                        "training_captions": captions,
                        "caption_encoder": {**self._captions.record, **_coverage(self._captions, captions)},
                        "image_features": {**image_features.record, "dim": image_features.dim,
                                           "norms": [round(float(n), 4) for n in features.norm(dim=1)]},
                        "mask_autoencoder": self._mask_history}
        return self._build(settings, defect_types, self._captions.dim, table, autoencoder, initial)

    @staticmethod
    def _build(settings: dict, defect_types: list[str], caption_dim: int, table: torch.Tensor,
               autoencoder: MaskAutoencoder, initial: torch.Tensor) -> XEmbedding:
        """The X-embedding for the backbone whose word-embedding `table` it writes into: its width, and the tokens'
        scale where `normalise_tokens` (the table's mean norm, as the textural tokens start)."""
        k, width = int(settings["tokens"]), table.shape[1]
        scale = word_norm(table) if settings.get("normalise_tokens") else None
        fusion, dynamic = settings["fusion"], settings["dynamic"]
        return XEmbedding(
            LocationEmbedding(autoencoder, width, k, int(settings["location"]["hidden"]), scale),
            TexturalEmbedding(defect_types, initial),
            SemanticEmbedding(caption_dim, width, k, scale) if settings["semantic"] else None,
            MultimodalFusion(width, int(fusion["heads"]), int(fusion["mlp_ratio"]) * width) if settings["mif"] else None,
            DynamicFusion(width, int(dynamic["time_dim"]), int(dynamic["mlp_ratio"]) * width,
                          bool(dynamic.get("residual", False))) if settings["ddf"] else None)

    def _training_vectors(self, embedding: XEmbedding, rows: list, masks: torch.Tensor, t: torch.Tensor
                          ) -> torch.Tensor:
        features = self._features_of([_caption_of(row) for row in rows], masks.device)
        return embedding([row.defect_type for row in rows], features, masks, t)

    def _learning_rates(self, embedding: XEmbedding) -> dict[torch.nn.Parameter, float]:
        """The X-embedding's networks at `embedding.learning_rate`; e_sem's projection, MIF and DDF at their own where
        set (`semantic_learning_rate`, `fusion.` / `dynamic.learning_rate`); the textural tokens at the method's rate,
        as AnomalyDiffusion's e_a."""
        settings = self.config["embedding"]
        rate = float(settings["learning_rate"])
        own_rates = ((embedding.semantic, settings["semantic_learning_rate"]),
                     (embedding.fusion, settings["fusion"]["learning_rate"]),
                     (embedding.dynamic, settings["dynamic"]["learning_rate"]))
        own = {id(p): rate if own_rate is None else float(own_rate)
               for part, own_rate in own_rates if part is not None for p in part.parameters()}
        tokens = {id(p) for p in embedding.textural.parameters()}
        return {p: own.get(id(p), rate) for p in embedding.parameters() if id(p) not in tokens}

    def _fit_record(self, embedding: XEmbedding) -> dict:
        self._captions, self._caption_features = None, {}  # the fit is over: its frozen encoder is not kept
        return {"x_embedding": self._record}

    def _mask_autoencoder(self, masks: np.ndarray, seed: int) -> tuple[MaskAutoencoder, dict]:
        """ISTR's mask auto-encoder: the file of `embedding.location.weights` (a state dict of MaskAutoencoder), or
        trained here on the fit's training masks with the dice loss."""
        settings = self.config["embedding"]["location"]
        autoencoder = MaskAutoencoder(int(settings["size"]), tuple(settings["channels"]), int(settings["code"]))
        if settings["weights"]:
            from harness.weights import load_file

            path = Path(settings["weights"]).expanduser()
            missing = autoencoder.load_state_dict(load_file(path, "mask auto-encoder"), strict=False)
            if missing.missing_keys:
                raise MethodError(f"{path}: not a mask auto-encoder of this shape (missing {missing.missing_keys[:3]})")
            return autoencoder, {"weights": str(path)}
        return autoencoder, fit_mask_autoencoder(autoencoder, masks, settings, seed)

    # -- generate: e_X once per batch, e_t at every step --

    def _load_embedding(self, backbone: backbones.Backbone, model: dict, workdir: Path) -> XEmbedding:
        record = model["x_embedding"]
        self._captions = self._caption_encoder(backbone, record["caption_words"], record["caption_seed"],
                                               record.get("training_captions", []))
        fitted_with = record.get("caption_encoder", {}).get("stand_in")
        if fitted_with != self._captions.record.get("stand_in"):
            raise MethodError(f"anomalyxfusion: {workdir} was fitted with other caption features ({fitted_with}); "
                              "fit it again")
        self._caption_features = {}
        settings = model["embedding"]  # as fitted (the switches and sizes of this fit, whatever the config now)
        location = settings["location"]
        autoencoder = MaskAutoencoder(int(location["size"]), tuple(location["channels"]), int(location["code"]))
        table = backbone.text_encoder.get_input_embeddings().weight.detach().cpu()
        embedding = self._build(settings, model["defect_types"], record["caption_feature_dim"], table, autoencoder,
                                torch.zeros(len(model["defect_types"]), int(settings["tokens"]), table.shape[1]))
        from safetensors.torch import load_file

        embedding.load_state_dict(load_file(str(workdir / EMBEDDING_FILE)))
        return embedding.to(backbone.device).eval()

    def _conditioning(self, embedding: XEmbedding, text, defect_type: str, targets: list, masks: torch.Tensor,
                      templates: list[int]) -> Callable[[int], torch.Tensor]:
        missing = [t.normal.id for t in targets if not t.caption]
        if missing:
            raise MethodError(f"anomalyxfusion needs a caption for every target; none for the targets on {missing}")
        features = self._features_of([t.caption for t in targets], masks.device)
        e_x = embedding.fused([defect_type] * len(targets), features, masks)
        if embedding.dynamic is None:
            condition = text(templates, e_x)
            return lambda t: condition
        return lambda t: text(templates, embedding.at_step(e_x, t))  # DDF: a new e_t at every denoising step

    # -- the frozen feature extractors --

    def _features_of(self, captions: list[str], device: torch.device) -> torch.Tensor:
        unseen = [c for c in dict.fromkeys(captions) if c not in self._caption_features]
        if unseen:
            self._caption_features.update(zip(unseen, self._captions(unseen)))
        return torch.stack([self._caption_features[c] for c in captions]).to(device)

    def _caption_encoder(self, backbone: backbones.Backbone, words: list[str], seed: int, captions: list[str]):
        """The frozen caption encoder; the tiny one is rebuilt at generation from what the fit recorded (its added
        words, their seed, and the training captions it is centred on)."""
        if self.config["embedding"]["features"] == "tiny":
            return TinyCaptionEncoder(backbone, words, seed, captions)
        return self._clip(backbone)

    def _image_features(self, backbone: backbones.Backbone):
        if self.config["embedding"]["features"] == "tiny":
            return TinyImageFeatures(backbone)
        clip = self._captions if isinstance(self._captions, ClipFeatures) else self._clip(backbone)
        return clip.images

    def _clip(self, backbone: backbones.Backbone) -> ClipFeatures:
        from harness import weights

        settings = self.config["embedding"]["clip"]
        resolved = weights.resolve(CLIP_WEIGHTS, self.profile, settings["weights"])
        if resolved.path is None:
            raise MethodError(f"anomalyxfusion: no weights for {CLIP_WEIGHTS}; set embedding.clip.weights")
        return ClipFeatures(settings["model"], resolved.path, backbone.device)


def _caption_of(item) -> str:
    if not item.caption:
        raise MethodError(f"anomalyxfusion: the training anomaly {item.id} ({item.path}) has no caption; MVTec Caption "
                          "gives one per defect image (<category>/prompt/<defect>/NNN.txt, or a captions JSON)")
    return item.caption


def _coverage(encoder, captions: list[str]) -> dict:
    return encoder.coverage(captions) if hasattr(encoder, "coverage") else {}


def textural_init(features: torch.Tensor, types: list[str], defect_types: list[str], tokens: int,
                  table: torch.Tensor, seed: int) -> torch.Tensor:
    """Eq. 3's start: token j of a defect type from the image features of its j-th training image (cycled), mapped
    to the token width by a fixed random projection where the widths differ (CLIP's 512 -> the text encoder's) and
    scaled to the mean norm of the text encoder's token embeddings. (types, tokens, width)."""
    width = table.shape[1]
    generator = torch.Generator().manual_seed(seed)
    projection = (torch.eye(width) if features.shape[1] == width else
                  torch.randn(features.shape[1], width, generator=generator) / features.shape[1] ** 0.5)
    scale = word_norm(table)
    out = []
    for defect in defect_types:
        own = features[[i for i, t in enumerate(types) if t == defect]]
        rows = torch.stack([own[j % len(own)] for j in range(tokens)]) @ projection
        out.append(torch.nn.functional.normalize(rows, dim=1) * scale)
    return torch.stack(out)
