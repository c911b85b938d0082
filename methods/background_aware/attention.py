"""Cho et al.'s masked cross-attention (Eq. 10-11), as a behaviour of the diffusion toolkit's attention layers.

The text condition is two encoded prompts side by side on the token axis, C = [C_a; C_b] (each `tokens` long): C_a
the prompt of the masked region (the defect token in C1, the mask token in C2), C_b the background token's prompt.
With m' the mask resized to the attention map's resolution and tau = sqrt(d),

    Attn(z, C) = m' * softmax(Q K_a^T / tau) V_a + (1 - m') * softmax(Q K_b^T / tau) V_b

per head, so inside the mask a query attends only to the region's prompt and outside only to the background's.
The mask and the token count travel with each UNet call (`TwoPrompts` in the toolkit's AttentionContext); the
toolkit's Record keeps the region prompt's maps where the context carries a Recorder (Eq. 13 reads the defect
token's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.diffusion.processors import Attend, AttentionContext, Behaviour, Call, Record, Recorder


@dataclass(frozen=True)
class TwoPrompts:
    """The masked rule's input."""

    mask: torch.Tensor  # (B, 1, h, w) at latent resolution, 1 inside the region
    tokens: int  # tokens of each prompt: C_a is condition[:, :tokens], C_b condition[:, tokens:]


def context_for(mask: torch.Tensor, tokens: int, record: Recorder | None = None) -> AttentionContext:
    """The per-call context: the masked rule's inputs and, to keep the region prompt's maps, a recorder."""
    return AttentionContext(TwoPrompts(mask, tokens), record)


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


class MaskedTwoPrompts(Behaviour):
    """Eq. 10-11 on every cross-attention call whose context carries `TwoPrompts`; any other call (self-attention,
    or no two prompts) is the layer's plain attention."""

    slot = "two_prompts"

    def attend(self, attend: Attend, query: torch.Tensor, source: torch.Tensor, attention_mask: torch.Tensor | None,
               call: Call) -> torch.Tensor | None:
        two = call.context.get(TwoPrompts)
        if not call.cross or two is None:
            return None
        if source.shape[1] != 2 * two.tokens:
            raise ValueError(f"{call.layer}: the condition has {source.shape[1]} tokens, not two prompts of "
                             f"{two.tokens}")
        region_mask, background_mask = ((None, None) if attention_mask is None else
                                        (attention_mask[..., :two.tokens], attention_mask[..., two.tokens:]))
        region = attend(query, source[:, :two.tokens], region_mask, observe=True)
        background = attend(query, source[:, two.tokens:], background_mask, observe=False)
        m = mask_for(two.mask, query.shape[1]).to(region.dtype)
        return m * region + (1 - m) * background


def behaviours(name: str, attn) -> list[Behaviour]:
    """Every layer's: the masked rule, and the toolkit's recording of the region prompt's maps."""
    return [MaskedTwoPrompts(), Record()]


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
