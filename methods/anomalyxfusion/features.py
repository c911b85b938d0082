"""The frozen feature extractors behind AnomalyXFusion's semantic (Eq. 1) and textural (Eq. 3) embeddings.

- `paper`: CLIP ViT-B/32 through open-clip, text features of the caption and image features of image ⊙ mask, with
  the weights found by harness/weights.py (`clip-vit-b-32`: OpenAI's file, or any open-clip checkpoint with a
  matching `model` name).
- `tiny` (no CLIP on these machines): a bag of words over the tiny backbone's word embeddings (the mean of the
  caption's rows), its vocabulary extended by the words of the fit's training captions (new rows drawn at random,
  seeded: the tiny tokenizer knows only its corpus's words) and centred on the fit's training captions, and the tiny VAE
  encoder's latents of image ⊙ mask pooled over the mask. Both are stand-ins, recorded in model.json with what
  they produced (`CaptionEncoder.record`, `ImageFeatures.record`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.diffusion.backbone import Backbone, split_words
from harness.errors import MethodError

CLIP_WEIGHTS = "clip-vit-b-32"
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class CaptionEncoder:
    """captions -> (B, d) features, frozen."""

    dim: int
    record: dict

    def __call__(self, captions: list[str]) -> torch.Tensor:
        raise NotImplementedError


class ImageFeatures:
    """images uint8 (B, H, W, 3) and masks bool (B, H, W) -> (B, d) features of image ⊙ mask, frozen."""

    dim: int
    record: dict

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class TinyCaptionEncoder(CaptionEncoder):
    """A bag of words over the tiny text encoder's word embeddings: the mean of the caption's words' rows, `words`
    (the training captions' words that the tiny tokenizer lacks) added as new rows, N(0, std of the table), from
    `seed`, centred on `centre_on` (the fit's training captions): minus their mean feature. Not the encoder's
    output: pooled at its end token (or averaged over its positions) it is nearly the same vector for every caption
    (cosine >= 0.95 between captions that differ in their defect; README.md), as measured on the per-run backbone whose two
    layers had been trained on "a photo of a <category>" alone. Centred, because the words every caption shares ("a", "stain", "of the", the
    object's name) are most of an uncentred mean, so that normalised (Eq. 1) the word that tells two captions apart
    is a small part of it: uncentred, the tiny model drew the same stain whatever the caption (README.md)."""

    def __init__(self, backbone: Backbone, words: list[str], seed: int, centre_on: list[str]):
        vocab = dict(backbone.tokenizer.get_vocab())
        added = [w for w in dict.fromkeys(words) if w not in vocab]
        table = backbone.text_encoder.get_input_embeddings().weight.detach().float().cpu()
        rows = torch.randn(len(added), table.shape[1], generator=torch.Generator().manual_seed(seed)) * table.std()
        self.table = torch.cat([table, rows])
        self.vocab = {**vocab, **{w: len(vocab) + i for i, w in enumerate(added)}}
        self.unknown = vocab.get(getattr(backbone.tokenizer, "unk_token", None) or "<unk>", 0)
        self.dim = table.shape[1]
        self.words, self.seed = added, seed
        self.centre = self._mean_rows(centre_on).mean(0) if centre_on else torch.zeros(self.dim)
        self.record = {"stand_in": "mean of the caption's word embeddings in the tiny text encoder's table, centred on "
                                   "the fit's training captions (no CLIP)",
                       "words_added": len(added), "centred_on": len(centre_on)}

    def _mean_rows(self, captions: list[str]) -> torch.Tensor:
        rows = [[self.vocab.get(w, self.unknown) for w in split_words(c)] or [self.unknown] for c in captions]
        return torch.stack([self.table[ids].mean(0) for ids in rows])

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self._mean_rows(captions) - self.centre

    def coverage(self, captions: list[str]) -> dict:
        """How much of the captions the encoder reads: words it has no row for (every word is read: no length cut)."""
        words = [split_words(c) for c in captions]
        return {"captions": len(captions), "unknown_words": sum(w not in self.vocab for ws in words for w in ws),
                "words": sum(len(ws) for ws in words)}


class TinyImageFeatures(ImageFeatures):
    """The tiny VAE encoder's latents of image ⊙ mask, averaged over the mask's latent cells."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.dim = int(backbone.vae.config.latent_channels)
        self.record = {"stand_in": "tiny VAE encoder's latents of image x mask pooled over the mask (no CLIP)"}

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        from harness.diffusion.latents import encode, latent_mask

        with torch.no_grad():
            latents = encode(self.backbone, images * masks[..., None].astype(images.dtype))
            m = latent_mask(masks, latents.shape[-1], latents.device).float()
        return (latents * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1)


class ClipFeatures(CaptionEncoder):
    """open-clip's `model` (ViT-B-32) from a checkpoint file: text features when called with captions, image
    features through `images`."""

    def __init__(self, model: str, path: Path, device: torch.device):
        try:
            import open_clip
        except ImportError:
            raise MethodError("anomalyxfusion's paper profile needs open-clip (pip install open-clip-torch)") from None
        try:
            network = open_clip.create_model(model, pretrained=str(path), device=device)
        except Exception as error:  # OpenAI's own file is TorchScript: open-clip reads it with load_openai_model
            try:
                network = open_clip.load_openai_model(str(path), precision="fp32", device=device)
            except Exception:
                raise MethodError(f"{path}: cannot load open-clip {model!r} from it ({error})") from None
        self.network = network.eval().requires_grad_(False)
        self.tokenize = open_clip.get_tokenizer(model)
        size = getattr(self.network.visual, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.dim = int(self.network.text_projection.shape[-1])
        self.record = {"model": model, "weights": str(path)}
        self.images = ClipImages(self)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        device = next(self.network.parameters()).device
        with torch.no_grad():
            return self.network.encode_text(self.tokenize(captions).to(device)).float()


class ClipImages(ImageFeatures):
    """CLIP image features of image ⊙ mask at the model's size, CLIP's normalisation."""

    def __init__(self, clip: ClipFeatures):
        self.clip, self.record = clip, clip.record
        self.dim = int(clip.network.visual.output_dim)

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        network, size = self.clip.network, self.clip.size
        device = next(network.parameters()).device
        x = torch.from_numpy(images * masks[..., None].astype(images.dtype)).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
        with torch.no_grad():
            return network.encode_image(((x - mean) / std).to(device)).float()
