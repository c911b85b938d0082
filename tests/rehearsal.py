"""Rehearsal models: randomly initialised networks in the exact layout of a paper's backbone, only the widths reduced,
saved with `save_pretrained` into diffusers' folder layout, so that the real loader (`harness.diffusion.backbone.load`)
reads them as it reads a downloaded Stable Diffusion 1.5. The `paper` profile's code paths then run on a CPU in
seconds: the same block types, depths, attention placement, latent channels and downsampling factor, the same
schedulers, and CLIP's real BPE tokenizer (its merges as open-clip-torch ships them, 49,408 tokens).

SD 1.5's configuration facts (runwayml/stable-diffusion-v1-5's model_index and configs): UNet block widths 320, 640,
1280, 1280 (here 32, 64, 64, 64), 8 heads, cross-attention 768 (here 32); autoencoder widths 128, 256, 512, 512
(here 32, 32, 64, 64), 4 latent channels, f = 8, scaling 0.18215; CLIP ViT-L/14's text tower, 12 layers, width 768
(here 32), quick-GELU, 77 positions; PNDM (the pipeline's) and DDIM over the scaled-linear betas 0.00085-0.012.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import torch

SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}
SD15_UNET_LAYOUT = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "sample_size": 64,
    "norm_num_groups": 32, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
}
SD15_VAE_LAYOUT = {
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "latent_channels": 4, "in_channels": 3, "out_channels": 3, "sample_size": 512,
    "norm_num_groups": 32, "act_fn": "silu", "scaling_factor": 0.18215,
}
CLIP_TEXT_LAYOUT = {"vocab_size": 49408, "num_hidden_layers": 12, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
WIDTHS = {"unet": (32, 64, 64, 64), "cross_attention": 32, "vae": (32, 32, 64, 64), "text": 32, "text_heads": 4,
          "bert": 32, "bert_heads": 8, "bert_head_dim": 4, "clip": "reduced"}
# the papers' own widths (SD 1.5's, LDM text2img-large's, ViT-B/32's): the same builders at full size, for make bench-gpu
FULL_WIDTHS = {"unet": (320, 640, 1280, 1280), "cross_attention": 768, "vae": (128, 256, 512, 512), "text": 768,
               "text_heads": 12, "bert": 1280, "bert_heads": 8, "bert_head_dim": 64, "clip": "full"}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters, in CLIP's order (which fixes the token
    ids): the printable Latin-1 bytes first, mapped to themselves, then the others, mapped to code points from 256 on."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [byte for byte in range(256) if byte not in kept]
    return {**{byte: chr(byte) for byte in kept}, **{byte: chr(256 + i) for i, byte in enumerate(others)}}


def clip_tokenizer(folder: Path):
    """CLIP's BPE tokenizer from open-clip-torch's merges file (the first 48,894 merges, as CLIP uses): the vocabulary
    is the 256 byte characters, the same with the end-of-word mark, one token per merge, then <|startoftext|> and
    <|endoftext|>; 77 tokens, padded with <|endoftext|> as SD 1.5's tokenizer. Saved into `folder`."""
    import json

    import open_clip
    from transformers import CLIPTokenizer

    lines = gzip.open(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8")
    merges = lines.split("\n")[1:49152 - 256 - 2 + 1]
    characters = list(bytes_to_unicode().values())
    vocabulary = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocabulary)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)  # files
    tokenizer.save_pretrained(folder)
    return tokenizer


def stable_diffusion_15(folder: Path, seed: int = 0, widths: dict = WIDTHS) -> Path:
    """A random model in SD 1.5's layout (module docstring) saved into `folder` (vae/, unet/, text_encoder/,
    tokenizer/, scheduler/ with PNDM's config, as the hub's; DDIM reads the same file); `widths`: WIDTHS (reduced)
    or FULL_WIDTHS."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=widths["vae"], **SD15_VAE_LAYOUT).save_pretrained(folder / "vae")
    UNet2DConditionModel(block_out_channels=widths["unet"], cross_attention_dim=widths["cross_attention"],
                         **SD15_UNET_LAYOUT).save_pretrained(folder / "unet")
    text = CLIPTextConfig(hidden_size=widths["text"], intermediate_size=4 * widths["text"],
                          num_attention_heads=widths["text_heads"], projection_dim=widths["text"], **CLIP_TEXT_LAYOUT)
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    clip_tokenizer(folder / "tokenizer")
    PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in SD15_SCHEDULER.items() if k != "clip_sample"}
                  ).save_pretrained(folder / "scheduler")
    return folder


# CompVis' LDM text2img-large in diffusers' layout (CompVis/ldm-text2im-large-256): its first stage in vqvae/ (a KL
# autoencoder, f = 8, 4 latent channels, widths 128, 256, 512, 512; here 32, 32, 64, 64), the UNet at 32 x 32
# latents with SD's block types and widths 320-1280 (here 32-64), cross-attention on LDMBert's 1280-d tokens (here
# 32), LDMBert: 32 layers, 8 heads of 64, feed-forward 5120 (here 8 heads of 4), BERT's uncased WordPiece tokenizer,
# 77 tokens; DDIM over the scaled-linear betas 0.00085-0.012
LDM_UNET_LAYOUT = {**SD15_UNET_LAYOUT, "sample_size": 32}
LDM_VAE_LAYOUT = {**SD15_VAE_LAYOUT, "sample_size": 256}
LDM_BERT_LAYOUT = {"encoder_layers": 32, "max_position_embeddings": 77, "activation_function": "gelu"}
# BERT's vocabulary reduced to the words the methods' prompts use (the uncased vocabulary's 30,522 entries are not
# on these machines): its specials first, as BERT's, then "*", AnomalyDiffusion's placeholder, one token as in BERT's
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece_tokenizer(folder: Path, words: list[str]):
    """A BertTokenizer (uncased WordPiece, 77 tokens) over BERT's specials, "*" and `words`, saved into `folder`."""
    from transformers import BertTokenizer

    vocabulary = list(dict.fromkeys([*WORDPIECE_SPECIALS, "*", "-", *words]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=77, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def ldm_text2img_large(folder: Path, words: list[str], seed: int = 0, widths: dict = WIDTHS) -> Path:
    """A random model in LDM text2img-large's layout (above) saved into `folder` (vqvae/, unet/, bert/, tokenizer/,
    scheduler/, as the hub's); `words`: the tokenizer's vocabulary beyond BERT's specials and "*"."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(seed)
    tokenizer = wordpiece_tokenizer(folder / "tokenizer", words)
    AutoencoderKL(block_out_channels=widths["vae"], **LDM_VAE_LAYOUT).save_pretrained(folder / "vqvae")
    UNet2DConditionModel(block_out_channels=widths["unet"], cross_attention_dim=widths["bert"],
                         **LDM_UNET_LAYOUT).save_pretrained(folder / "unet")
    LDMBertModel(LDMBertConfig(vocab_size=len(tokenizer), d_model=widths["bert"], encoder_ffn_dim=4 * widths["bert"],
                               encoder_attention_heads=widths["bert_heads"], head_dim=widths["bert_head_dim"],
                               **LDM_BERT_LAYOUT)).save_pretrained(folder / "bert")
    DDIMScheduler(**{k: v for k, v in SD15_SCHEDULER.items()}).save_pretrained(folder / "scheduler")
    return folder


# OpenAI's CLIP ViT-B/32 in open-clip's layout (AnomalyXFusion's caption and image features): a 224-px ViT, patches
# of 32, 12 layers of width 768 (here 64, heads of 16); the text tower's 12 layers of width 512 (here 32, 4 heads),
# 77 positions, CLIP's 49,408 BPE tokens (open-clip's own tokenizer, the real one); a 512-d joint space (here 32)
CLIP_VIT_B_32 = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "head_width": 16,
                                                 "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 12}}
CLIP_REHEARSAL = "ViT-B-32-rehearsal"


def clip_vit_b_32(folder: Path, seed: int = 0, widths: dict = WIDTHS) -> tuple[str, Path]:
    """A random CLIP in ViT-B/32's layout (above; at full width open-clip's own ViT-B-32), registered with open-clip
    as CLIP_REHEARSAL and saved as a checkpoint in `folder`: (the model's name, the checkpoint)."""
    import json

    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    name = "ViT-B-32" if widths["clip"] == "full" else CLIP_REHEARSAL
    if name == CLIP_REHEARSAL:
        (folder / f"{CLIP_REHEARSAL}.json").write_text(json.dumps(CLIP_VIT_B_32))
        open_clip.add_model_config(folder / f"{CLIP_REHEARSAL}.json")
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(name).state_dict(), folder / "clip.pt")
    return name, folder / "clip.pt"


class FitWatch:
    """What a fit trains, seen from outside: each backbone the method loads frozen (`harness.diffusion.backbone.
    load_frozen`) and, at each fine-tuning the method starts (its module's `finetune`), the parameters it hands the
    optimiser and those of the last loaded backbone that require a gradient then. Install with `watch(monkeypatch,
    module)`."""

    def __init__(self):
        self.backbones: list = []
        self.calls: list[dict] = []

    def networks(self, backbone) -> list[torch.nn.Module]:
        return [backbone.unet, backbone.vae, backbone.text_encoder]

    def count(self, backbone, trainable: bool) -> int:
        return sum(p.numel() for m in self.networks(backbone) for p in m.parameters() if p.requires_grad == trainable)


def watch(monkeypatch, *modules) -> FitWatch:
    from harness.diffusion import backbone as backbones

    seen = FitWatch()
    load_frozen = backbones.load_frozen

    def watched_load(*args, **kwargs):
        seen.backbones.append(load_frozen(*args, **kwargs))
        return seen.backbones[-1]

    def watched(finetune, where):
        def watched_finetune(params, *args, **kwargs):
            backbone = seen.backbones[-1]
            grad = {id(p) for m in seen.networks(backbone) for p in m.parameters() if p.requires_grad}
            seen.calls.append({"where": where, "params": list(params), "backbone_trainable": grad,
                               "frozen": seen.count(backbone, False), "trained": sum(p.numel() for p in params)})
            return finetune(params, *args, **kwargs)
        return watched_finetune

    monkeypatch.setattr(backbones, "load_frozen", watched_load)
    for module in modules:
        monkeypatch.setattr(module, "finetune", watched(module.finetune, module.__name__.rsplit(".", 1)[-1]))
    return seen


def lora_parameters(unet: torch.nn.Module, rank: int, targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
                    ) -> int:
    """The size of a rank-`rank` LoRA on `targets` of every attention layer of a diffusers UNet: A (r x in) and
    B (out x r) per projection."""
    from diffusers.models.attention_processor import Attention

    total = 0
    for attention in (m for m in unet.modules() if isinstance(m, Attention)):
        for name in targets:
            layer = attention.get_submodule(name)
            total += rank * (layer.in_features + layer.out_features)
    return total
