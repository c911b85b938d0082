"""Cho et al.'s masked cross-attention (Eq. 10-11), as a processor of the diffusion toolkit.

The text condition is two encoded prompts side by side on the token axis, C = [C_a; C_b] (each `tokens` long): C_a
the prompt of the masked region (the defect token in C1, the mask token in C2), C_b the background token's prompt.
With m' the mask resized to the attention map's resolution and tau = sqrt(d),

    Attn(z, C) = m' * softmax(Q K_a^T / tau) V_a + (1 - m') * softmax(Q K_b^T / tau) V_b

per head, so inside the mask a query attends only to the region's prompt and outside only to the background's.
The mask and the token count travel with each UNet call (`TwoPrompts` in the toolkit's AttentionContext.extras);
a recorder in the context keeps the region prompt's maps (Eq. 13 reads the defect token's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.diffusion.processors import AttentionContext, ToolkitAttnProcessor

KEY = "two_prompts"


@dataclass(frozen=True)
class TwoPrompts:
    mask: torch.Tensor  # (B, 1, h, w) at latent resolution, 1 inside the region
    tokens: int  # tokens of each prompt: C_a is condition[:, :tokens], C_b condition[:, tokens:]


def context_for(mask: torch.Tensor, tokens: int, **toolkit) -> AttentionContext:
    """The per-call context: the masked rule's inputs, and any of the toolkit's (record, ...)."""
    return AttentionContext(extras={KEY: TwoPrompts(mask, tokens)}, **toolkit)


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


class MaskedTwoPromptProcessor(ToolkitAttnProcessor):
    """Eq. 10-11 on every cross-attention call whose context carries `TwoPrompts`; any other call (self-attention,
    or no two prompts) is the toolkit's attention."""

    def _attend(self, attn, query: torch.Tensor, source: torch.Tensor, attention_mask: torch.Tensor | None,
                context: AttentionContext | None, batch: int, is_cross: bool, record: bool = True) -> torch.Tensor:
        two = context.extras.get(KEY) if context is not None else None
        if not is_cross or two is None:
            return super()._attend(attn, query, source, attention_mask, context, batch, is_cross, record)
        if source.shape[1] != 2 * two.tokens:
            raise ValueError(f"{self.name}: the condition has {source.shape[1]} tokens, not two prompts of "
                             f"{two.tokens}")
        region = super()._attend(attn, query, source[:, :two.tokens], None, context, batch, True, record=True)
        background = super()._attend(attn, query, source[:, two.tokens:], None, context, batch, True, record=False)
        m = mask_for(two.mask, query.shape[1]).to(region.dtype)
        return m * region + (1 - m) * background


def two_prompt_condition(backbone, region_prompt: str, background_prompt: str) -> tuple[torch.Tensor, int]:
    """C = [C_a; C_b]: the two encoded prompts side by side on the token axis, and the number of tokens of each."""
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
