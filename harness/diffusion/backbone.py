"""Latent text-to-image backbones behind one interface: VAE + UNet2DConditionModel + text encoder + tokenizer +
DDIM scheduler.

- `paper`: Stable Diffusion 1.5 through diffusers / transformers `from_pretrained`, on a local folder or a hub id.
- `tiny`: the same classes built from small configs (`build_tiny`; sizes and reasons in README.md) and a
  word-level tokenizer over a fixed vocabulary (base prompt words, rare placeholder words for DreamBooth-style
  tokens, and the training captions' words). It runs on a CPU; trained once on a captioned corpus and shipped
  (shipped.py), it is what methods fine-tune few-shot, as the papers fine-tune SD.

Either way a backbone folder holds `vae/`, `unet/`, `text_encoder/`, `tokenizer/`, `scheduler/` in diffusers'
layout, so `load(folder)` is the one code path for both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.diffusion.ddim import PREDICTION_TYPES

# Rare words to bind new concepts to (DreamBooth): they mean nothing in the pretraining prompts.
RARE_TOKENS = ("sks", "ktn", "pll", "ucd", "olis", "zwx", "qrv", "bxq", "vfx")  # vfx: DualAnoDiff's prompt
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
BASE_WORDS = ("a", "photo", "of", "an", "with", "defect", "mask", "background", "normal", "good", "the", "on", "in")
SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
# CompVis' LDM text2img-large (AnomalyDiffusion's backbone) in diffusers' layout names two parts otherwise
LDM_SUBFOLDERS = {"vae": "vqvae", "text_encoder": "bert"}


@dataclass
class Backbone:
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object

    @property
    def latent_scale(self) -> float:
        """SD's 0.18215 from its VAE config; the tiny VAE's is set after its training (pretrain.py), likewise one
        over the standard deviation of its latents."""
        return float(self.vae.config.scaling_factor)

    def to(self, device: torch.device) -> "Backbone":
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, tokens, dim) hidden states of the text encoder, as the UNet's cross-attention reads them."""
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    @property
    def latent_factor(self) -> int:
        """How many pixels one latent cell spans per side (8 for SD's VAE, 4 for the tiny one)."""
        config = self.vae.config
        levels = config.get("block_out_channels") or config.get("encoder_block_out_channels")
        return 2 ** (len(levels) - 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents."""
        return unscaled_latents(self.vae, images) * self.latent_scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(latents / self.latent_scale).sample.clamp(-1, 1)

    def save(self, folder: Path) -> None:
        for name in SUBFOLDERS:
            getattr(self, name).save_pretrained(folder / name)


def unscaled_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The autoencoder's latents before scaling: the posterior mean of a KL autoencoder such as SD's, the
    deterministic code of the tiny backbone's (diffusers' AutoencoderDC names it `latent`, AutoencoderTiny
    `latents`)."""
    encoded = vae.encode(images)
    for name in ("latent_dist", "latent", "latents"):
        if hasattr(encoded, name):
            value = getattr(encoded, name)
            return value.mean if name == "latent_dist" else value
    raise TypeError(f"{type(vae).__name__}.encode returned {type(encoded).__name__}: no latents in it")


TOKENS = 32  # the tiny tokenizer's context: a corpus caption ("a photo of a small red circle in the upper left
#             and a ... on a grey metal surface") is up to 26 words


def word_level_tokenizer(words: list[str], max_length: int = TOKENS):
    """A fast tokenizer over a fixed vocabulary: specials, base prompt words, rare tokens, then `words`' words sorted."""
    return tokenizer_over((*SPECIAL_TOKENS, *BASE_WORDS, *RARE_TOKENS, *sorted({w for p in words for w in split_words(p)})),
                          max_length)


def tokenizer_over(words: tuple[str, ...] | list[str], max_length: int = TOKENS):
    """The word-level tokenizer whose token i is words[i] (duplicates keep their first id); the specials among them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("_", " ")])  # as split_words
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=max_length)


def extend_vocabulary(backbone: "Backbone", words: list[str]) -> list[str]:
    """Give a word-level tiny backbone the words of `words` it lacks: appended to its tokenizer (earlier ids stay)
    and to its text encoder's embedding table, each new row the mean of the table's rows (then fine-tuned). Returns
    the words added. A backbone with a subword tokenizer (CLIP's BPE) spells every word already: nothing to add."""
    vocab = backbone.tokenizer.get_vocab()
    if "<unk>" not in vocab:
        return []
    added = [w for w in dict.fromkeys(w for text in words for w in split_words(text)) if w not in vocab]
    if not added:
        return []
    ordered = sorted(vocab, key=vocab.get)
    tokenizer = tokenizer_over(ordered + added, backbone.tokenizer.model_max_length)
    mean = backbone.text_encoder.get_input_embeddings().weight.detach().mean(0)
    with torch.random.fork_rng(devices=[]):  # the new rows' random start (overwritten) draws from no one's stream
        backbone.text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        backbone.text_encoder.get_input_embeddings().weight[len(ordered):] = mean
    backbone.tokenizer = tokenizer
    return added


def split_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))


TINY_LATENT_CHANNELS = 16
# the UNet's weights in channels-last layout: a tiny pretraining step runs 14% faster so on a CPU (measured; the
# fits' time did not measurably change)
CONV_LAYOUT = torch.channels_last


def build_tiny(words: list[str], resolution: int = 128, seed: int = 0,
               prediction_type: str = "v_prediction") -> Backbone:
    """The tiny backbone, randomly initialised (seeded); `words` are the vocabulary beyond the base prompt words;
    its UNet is to predict the noise (SD 1.5) or v (SD 2.x).

    Sizes and the reasons for them: harness/diffusion/README.md ("The tiny backbone")."""
    from diffusers import AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_level_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # TAESD's architecture (diffusers' AutoencoderTiny, a drop-in autoencoder for SD): plain convolutions
        # without normalisation train to a given PSNR in half the steps of a tiny AutoencoderKL on a CPU, and
        # its latents stay easy for the tiny UNet (README.md: DC-AE's reconstruct better, but samples decode to
        # colour speckle)
        vae = AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=TINY_LATENT_CHANNELS,
                              encoder_block_out_channels=(32, 32, 32), decoder_block_out_channels=(32, 32, 32),
                              num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), scaling_factor=1.0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))
        # cross-attention at every level but the coarsest, as SD; at the latent resolution without self-attention
        # (only_cross_attention: both attention layers of the block read the prompt), which would cost 4x on a CPU
        unet = UNet2DConditionModel(
            sample_size=resolution // 4, in_channels=TINY_LATENT_CHANNELS, out_channels=TINY_LATENT_CHANNELS,
            block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
            norm_num_groups=16, only_cross_attention=[True, False, False, False],
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    # SD's schedule; with v as the target the tiny UNet reads its prompt and draws from pure noise, with the noise
    # as target it keeps fine texture through DDIM inversion better (README.md: which to use when)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return Backbone(vae, unet.to(memory_format=CONV_LAYOUT), text_encoder, tokenizer, scheduler)


def load_frozen(source: str | Path, device: torch.device | None = None) -> Backbone:
    """`load` in eval mode with every network frozen, on `device` (default: the GPU where there is one): what a
    method fine-tunes adapters on, or samples from."""
    from harness.device import default_device

    backbone = load(source)
    backbone.unet.to(memory_format=CONV_LAYOUT)
    for module in (backbone.vae, backbone.unet, backbone.text_encoder):
        module.eval().requires_grad_(False)
    return backbone.to(device or default_device())


def is_ldm(source: str | Path) -> bool:
    """Whether a folder holds LDM text2img-large's layout (vqvae/, bert/: an LDMBert text encoder, 1280-d tokens)."""
    return all((Path(source) / folder).is_dir() for folder in LDM_SUBFOLDERS.values())


def load(source: str | Path, local_only: bool = True) -> Backbone:
    """A backbone from a folder (or hub id) in diffusers' layout: Stable Diffusion 1.5, a saved tiny backbone, or
    LDM text2img-large (its autoencoder in vqvae/, its LDMBert text encoder in bert/)."""
    import diffusers
    from diffusers import AutoModel, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import AutoTokenizer, CLIPTextModel

    common = {"local_files_only": local_only}
    folders = {**{name: name for name in SUBFOLDERS}, **(LDM_SUBFOLDERS if is_ldm(source) else {})}
    if is_ldm(source):
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as text_class
    else:
        text_class = CLIPTextModel
    quiet = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # some autoencoders save config keys they warn about when they read them
    try:
        config = AutoModel.load_config(str(source), subfolder=folders["vae"], **common)
        vae = complete(getattr(diffusers, config["_class_name"]), source, folders["vae"], **common)  # KL or tiny
    finally:
        diffusers_logging.set_verbosity(quiet)
    return Backbone(
        vae=vae,
        unet=complete(UNet2DConditionModel, source, folders["unet"], **common),
        text_encoder=complete(text_class, source, folders["text_encoder"], **common),
        tokenizer=AutoTokenizer.from_pretrained(source, subfolder=folders["tokenizer"], **common),
        scheduler=DDIMScheduler.from_pretrained(source, subfolder=folders["scheduler"], **common),
    )


def complete(cls, source: str | Path, subfolder: str, **kwargs) -> torch.nn.Module:
    """`cls.from_pretrained` of one network, which must find every weight in the checkpoint: the libraries would
    initialise missing ones at random with only a warning (transformers 4.x reading a text encoder saved by 5.x
    does so for all of them)."""
    from harness.errors import WeightsError

    model, info = cls.from_pretrained(str(source), subfolder=subfolder, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise WeightsError(f"{Path(source) / subfolder}: {len(missing)} of {type(model).__name__}'s weights are not in "
                           f"its checkpoint (e.g. {', '.join(sorted(missing)[:3])}); written by another version of "
                           f"the library? (DefectBench's tested versions: README.md, Development)")
    return model
