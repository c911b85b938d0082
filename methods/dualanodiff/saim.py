"""DualAnoDiff's dual-branch attention (Jin et al., CVPR 2025, Sec. 3.2), as behaviours of the diffusion toolkit's
attention layers.

The UNet's batch is interleaved branch pairs [whole_0, part_0, whole_1, part_1, ...]: branch 0 denoises the
whole anomaly image, branch 1 its anomaly part. In every attention layer, self- and cross-attention alike:

1. each branch attends over its own tokens with the frozen projections plus its own LoRA on q, k, v and out (the
   toolkit's BranchLoRA, `SampleBranches` = 0, 1, 0, 1, ...);
2. SAIM, the self-attention interaction module, lets the two branches exchange information at every spatial
   position: with O the attention output (after the output projection),
       u = W_i LN(O)                        per branch (one W_i, LN shared by both)
       S = softmax(q k^T / sqrt(c)) v       over the pair (a 2 x 2 attention, one head, c channels),
                                            q, k, v = W_q u, W_k u, W_v u (full c x c projections with bias)
       O <- O + W_o S
   (the authors' code calls it temporal attention, as AnimateDiff's motion module it follows).
3. with BCM (bcm.py), the whole branch's self-attention takes its keys and values from features compensated by the
   background's, written by a background pass of the whole branch alone (no SAIM) before the dual pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from harness.diffusion import processors
from harness.diffusion.processors import AttentionContext, Behaviour, BranchLoRA, Call, SampleBranches

from . import bcm

BRANCHES = 2  # whole image, anomaly part


@dataclass(frozen=True)
class Pairs:
    """SAIM's input: the call's batch is `count` interleaved (whole, part) pairs; `interact` False switches SAIM off
    for the call (the "no SAIM" ablation)."""

    count: int
    interact: bool = True


class SAIM(Behaviour):
    """The interaction of a pair of branches at each position (the module docstring's equations).

    `zero_init`: W_o starts at zero, so SAIM starts as the identity (the authors' code keeps PyTorch's default
    initialisation, which changes the pretrained UNet's output from the first step)."""

    slot = "saim"

    def __init__(self, channels: int, zero_init: bool = False):
        super().__init__()
        self.norm = torch.nn.LayerNorm(channels, eps=1e-6)
        self.proj_in = torch.nn.Linear(channels, channels)
        self.to_q = torch.nn.Linear(channels, channels)
        self.to_k = torch.nn.Linear(channels, channels)
        self.to_v = torch.nn.Linear(channels, channels)
        self.proj_out = torch.nn.Linear(channels, channels)
        if zero_init:
            torch.nn.init.zeros_(self.proj_out.weight)
            torch.nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(2B, L, C) interleaved pairs -> the same, with each position's pair interacting."""
        pairs2, positions, channels = hidden_states.shape
        if pairs2 % BRANCHES:
            raise ValueError(f"SAIM needs interleaved branch pairs, got a batch of {pairs2}")
        u = self.proj_in(self.norm(hidden_states))
        # (B, 2, L, C) -> (B * L, 2, C): at each position, the sequence (whole, part)
        u = u.reshape(pairs2 // BRANCHES, BRANCHES, positions, channels).transpose(1, 2)
        u = u.reshape(-1, BRANCHES, channels)
        s = F.scaled_dot_product_attention(self.to_q(u), self.to_k(u), self.to_v(u), scale=1 / math.sqrt(channels))
        s = s.reshape(pairs2 // BRANCHES, positions, BRANCHES, channels).transpose(1, 2).reshape(pairs2, positions,
                                                                                                 channels)
        return hidden_states + self.proj_out(s)

    def output(self, hidden_states: torch.Tensor, call: Call) -> torch.Tensor:
        pairs = call.context.get(Pairs)
        if pairs is None and call.context.get(bcm.BackgroundPass) is not None:  # the whole branch alone
            return hidden_states
        if pairs is None or BRANCHES * pairs.count != len(hidden_states):
            raise ValueError(f"{call.layer}: the batch must be interleaved (whole, part) pairs with "
                             "SampleBranches = 0, 1, 0, 1, ... (saim.context_for)")
        return self(hidden_states) if pairs.interact else hidden_states


def pair_branches(pairs: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The branch index of each sample of `pairs` interleaved pairs: 0, 1, 0, 1, ..."""
    return torch.arange(BRANCHES * pairs, device=device) % BRANCHES


def context_for(pairs: int, saim: bool = True, device: torch.device | str = "cpu",
                background: bcm.BackgroundFeatures | None = None) -> AttentionContext:
    """The per-call context of a UNet call on `pairs` interleaved (whole, part) pairs: each sample's branch (on the
    UNet's device), SAIM on or off, and BCM's background features."""
    return AttentionContext(SampleBranches(pair_branches(pairs, device)), Pairs(pairs, saim), background)


def background_context(count: int, device: torch.device | str = "cpu") -> tuple[AttentionContext, bcm.BackgroundPass]:
    """The context of BCM's background pass on `count` background latents (the whole branch's LoRA, no SAIM), and
    what it writes the features into."""
    written = bcm.BackgroundPass()
    branch = torch.zeros(count, dtype=torch.long, device=device)
    return AttentionContext(SampleBranches(branch), written), written


def behaviours(name: str, attn, rank: int, alpha: float | None = None, zero_init: bool = False,
               bcm_hidden: int | None = None) -> list[Behaviour]:
    """One layer's: both branches' LoRAs, SAIM on the output, and with `bcm_hidden` BCM on a self-attention layer."""
    if attn.residual_connection or attn.rescale_output_factor != 1:
        raise ValueError(f"{name}: SAIM follows SD's attention layers (no residual inside, no output rescaling)")
    made = [BranchLoRA(attn, BRANCHES, rank, alpha), SAIM(attn.to_out[0].out_features, zero_init=zero_init)]
    if bcm_hidden and not attn.is_cross_attention:
        made.append(bcm.BackgroundCompensation(attn.to_k.in_features, bcm_hidden))
    return made


def install(unet: torch.nn.Module, rank: int, alpha: float | None = None, zero_init: bool = False,
            bcm_hidden: int | None = None) -> None:
    """The dual-branch behaviours on every attention layer of `unet` (its LoRAs, SAIM and, with `bcm_hidden`, BCM
    trainable from then on)."""
    processors.install(unet, partial(behaviours, rank=rank, alpha=alpha, zero_init=zero_init, bcm_hidden=bcm_hidden))


def saim_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if f".processor.{SAIM.slot}." in n]


def bcm_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if f".processor.{bcm.BackgroundCompensation.slot}." in n]


def dual_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The branch LoRAs, SAIM and BCM of every layer: what a fit trains on the frozen UNet, saved alone."""
    own = {n: t.detach().cpu() for n, t in unet.state_dict().items()
           if f".processor.{SAIM.slot}." in n or f".processor.{bcm.BackgroundCompensation.slot}." in n}
    return {**processors.branch_lora_state(unet), **own}
