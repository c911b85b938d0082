"""Attention-processor helpers: swap processors on chosen UNet layers, record cross-attention maps, and the masked
cross-attention of Cho et al. (Eq. 10-11).

Masked cross-attention. The text condition is two encoded prompts side by side along the token axis, C = [C_a; C_b]
(each `tokens` long): C_a the prompt of the masked region (the defect token in C1, the mask token in C2) and C_b
the background token's prompt. With m' the mask resized to the attention map's resolution and tau = sqrt(d),

    Attn(z, C) = m' * softmax(Q K_a^T / tau) V_a + (1 - m') * softmax(Q K_b^T / tau) V_b

per head, so inside the mask a query attends only to the region's prompt and outside only to the background's.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F


@dataclass
class MaskState:
    """What the masked processors read at each UNet call: the latent-resolution mask (B, 1, h, w), the number of
    tokens of each prompt, and optionally where to record the region token's attention maps."""

    mask: torch.Tensor | None = None
    tokens: int = 0
    record_token: int | None = None  # token index inside C_a whose attention map is recorded
    recorded: list[torch.Tensor] = field(default_factory=list)  # (B, 1, h_l, w_l) per layer call


def mask_for(mask: torch.Tensor, n_queries: int) -> torch.Tensor:
    """The mask (B, 1, h, w) resized to a square attention map of n_queries positions: (B, n_queries, 1).

    Down to a coarser map by max-pooling, as the latent mask itself (latents.latent_mask): a position is in m' if
    any of its latent cells is. Bilinear resizing would leave a defect of one latent cell at 1/4 of a cell on the
    next level and 1/16 on the one after, so the defect prompt would hardly reach the UNet's coarse layers."""
    side = int(round(math.sqrt(n_queries)))
    if side * side != n_queries:
        raise ValueError(f"attention over {n_queries} positions is not a square map")
    mask = mask.float()
    if side <= mask.shape[-1]:
        resized = F.adaptive_max_pool2d(mask, side)
    else:
        resized = F.interpolate(mask, size=(side, side), mode="nearest")
    return resized.flatten(2).transpose(1, 2)


class MaskedCrossAttnProcessor:
    """Eq. 10-11 for one diffusers `Attention` module used as cross-attention."""

    def __init__(self, state: MaskState):
        self.state = state

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_) -> torch.Tensor:
        state = self.state
        if encoder_hidden_states is None or state.mask is None:
            raise ValueError("masked cross-attention needs the two prompts and a mask (MaskState.mask)")
        residual, batch, n = hidden_states, hidden_states.shape[0], hidden_states.shape[1]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        outputs, probabilities = [], []
        for part in (encoder_hidden_states[:, :state.tokens], encoder_hidden_states[:, state.tokens:]):
            key = attn.head_to_batch_dim(attn.to_k(part))
            value = attn.head_to_batch_dim(attn.to_v(part))
            p = attn.get_attention_scores(query, key, None)  # softmax(Q K^T / sqrt(d)), (B * heads, n, tokens)
            probabilities.append(p)
            outputs.append(attn.batch_to_head_dim(torch.bmm(p, value)))
        m = mask_for(state.mask, n).to(outputs[0].dtype)
        hidden = m * outputs[0] + (1 - m) * outputs[1]
        if state.record_token is not None:
            heads = probabilities[0].shape[0] // batch
            token_map = probabilities[0][..., state.record_token].reshape(batch, heads, n).mean(1)
            side = int(round(math.sqrt(n)))
            state.recorded.append(token_map.reshape(batch, 1, side, side))
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, object]:
    """Names of the UNet's cross-attention modules (`attn2` of each transformer block) -> module."""
    return {name: module for name, module in unet.named_modules()
            if name.endswith("attn2") and getattr(module, "is_cross_attention", False)}


def set_cross_attention_processor(unet: torch.nn.Module, make_processor) -> dict[str, object]:
    """Put `make_processor(name)` on every cross-attention layer (self-attention keeps its own); returns the
    previous processors so they can be restored with `unet.set_attn_processor(previous)`."""
    previous = dict(unet.attn_processors)
    processors = {key: (make_processor(key) if key.endswith("attn2.processor") else proc)
                  for key, proc in previous.items()}
    unet.set_attn_processor(processors)
    return previous


@contextlib.contextmanager
def masked_cross_attention(unet: torch.nn.Module, state: MaskState) -> Iterator[MaskState]:
    """Every cross-attention layer of `unet` runs Eq. 10-11 reading `state` while the block runs."""
    previous = set_cross_attention_processor(unet, lambda _: MaskedCrossAttnProcessor(state))
    try:
        yield state
    finally:
        unet.set_attn_processor(previous)


def two_prompt_condition(backbone, region_prompt: str, background_prompt: str) -> tuple[torch.Tensor, int]:
    """C = [C_a; C_b] for the masked processor: the two encoded prompts side by side on the token axis, and the
    number of tokens of each."""
    with torch.no_grad():
        encoded = backbone.encode_text([region_prompt, background_prompt])
    return torch.cat([encoded[:1], encoded[1:]], dim=1), encoded.shape[1]


def token_index(tokenizer, prompt: str, word: str) -> int:
    """Where `word` sits in the tokenised `prompt` (special tokens counted); it must be a single token."""
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    if len(pieces) != 1:
        raise ValueError(f"{word!r} is {len(pieces)} tokens for this tokenizer; choose a word that is one token")
    ids = tokenizer(prompt).input_ids
    if pieces[0] not in ids:
        raise ValueError(f"{word!r} does not occur in the prompt {prompt!r}")
    return ids.index(pieces[0])
