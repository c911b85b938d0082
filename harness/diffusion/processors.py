"""Attention processors of the diffusion toolkit: every per-call input travels with the call, as
`unet(..., cross_attention_kwargs={"context": AttentionContext(...)})`; the processors hold no per-call state.

One processor class serves self- and cross-attention layers alike and does, where the context asks for it:
- per-branch LoRA: low-rank updates of the q, k, v and output projections, one adapter per branch, chosen per
  sample of the batch by `context.branch` (peft switches adapters per call, so it cannot train two branches in
  one batch; these adapters can);
- recording: the cross-attention maps of chosen tokens, averaged over heads, into `context.record`;
- a key/value store: self-attention keys and values written in one UNet pass and, in a later pass, attended to
  beside the layer's own (`context.kv`, mode "write" then "read");
- re-weighting: a spatial map added to, or multiplying, the cross-attention logits of a token range
  (`context.reweight`).
With an empty context it computes exactly what diffusers' AttnProcessor computes (tested).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F


@dataclass
class Recorder:
    tokens: tuple[int, ...]  # token positions whose maps are kept
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(B, len(tokens), h, w), ...]

    def mean(self, size: int) -> torch.Tensor:
        """Every recorded map resized to size x size and averaged over layers and calls: (B, len(tokens), s, s)."""
        resized = [F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
                   for maps in self.maps.values() for m in maps]
        if not resized:
            raise ValueError("no attention map was recorded (no cross-attention layer ran with this context)")
        return torch.stack(resized).mean(0)


@dataclass
class KVStore:
    mode: str = "write"  # write: keep each self-attention layer's keys and values; read: attend to them too
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TokenReweight:
    start: int  # token range [start, stop) of the cross-attention
    stop: int
    weights: torch.Tensor  # (B, 1, h, w) spatial map, resized to each layer's resolution
    scale: float = 1.0  # added to the logits: logit + scale * weight
    multiply: bool = False  # instead: logit * weight (AnomalyDiffusion's adaptive attention re-weighting)
    columns: torch.Tensor | None = None  # (B, tokens) bool: per-sample tokens instead of [start, stop)


@dataclass
class AttentionContext:
    branch: torch.Tensor | None = None  # (B,) branch index of each sample, for per-branch LoRA
    record: Recorder | None = None
    kv: KVStore | None = None
    reweight: TokenReweight | None = None
    extras: dict = field(default_factory=dict)  # inputs of method-specific processors (methods/<name>/)


class BranchLoRA(torch.nn.Module):
    """Low-rank updates of one Linear layer, one per branch: x -> B_b A_b x for the sample's branch b."""

    def __init__(self, branches: int, features_in: int, features_out: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(branches, rank, features_in) / rank)
        self.up = torch.nn.Parameter(torch.zeros(branches, features_out, rank))  # zero: starts as the base layer
        self.scaling = (alpha or rank) / rank

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        down, up = self.down[branch], self.up[branch]  # (B, r, in), (B, out, r)
        return torch.einsum("bor,bri,bni->bno", up, down, x) * self.scaling


def _projection_sizes(attn) -> dict[str, tuple[int, int]]:
    return {"q": (attn.to_q.in_features, attn.to_q.out_features), "k": (attn.to_k.in_features, attn.to_k.out_features),
            "v": (attn.to_v.in_features, attn.to_v.out_features),
            "out": (attn.to_out[0].in_features, attn.to_out[0].out_features)}


class ToolkitAttnProcessor(torch.nn.Module):
    """diffusers attention with the context's per-call inputs (see the module docstring)."""

    def __init__(self, name: str, attn, branches: int = 0, rank: int = 4, alpha: float | None = None):
        super().__init__()
        self.name = name
        self.lora = torch.nn.ModuleDict({p: BranchLoRA(branches, i, o, rank, alpha)
                                         for p, (i, o) in _projection_sizes(attn).items()}) if branches else None

    def _project(self, part: str, layer, x: torch.Tensor, context: AttentionContext | None) -> torch.Tensor:
        out = layer(x)
        if self.lora is not None:
            if context is None or context.branch is None:
                raise ValueError(f"{self.name}: per-branch LoRA needs the branch of each sample (context.branch)")
            out = out + self.lora[part](x, context.branch.to(x.device))
        return out

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 context: AttentionContext | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, tokens = (hidden_states if not is_cross else encoder_hidden_states).shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(self._project("q", attn.to_q, hidden_states, context))
        source = hidden_states if not is_cross else (attn.norm_encoder_hidden_states(encoder_hidden_states)
                                                     if attn.norm_cross else encoder_hidden_states)
        hidden_states = self._attend(attn, query, source, attention_mask, context, batch, is_cross)
        hidden_states = attn.to_out[1](self._project("out", attn.to_out[0], hidden_states, context))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, query: torch.Tensor, source: torch.Tensor, attention_mask: torch.Tensor | None,
                context: AttentionContext | None, batch: int, is_cross: bool, record: bool = True) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V over `source` (the layer's own states, or the text condition), heads merged:
        (B, queries, inner dim). Methods with their own attention rule override this (methods/<name>/)."""
        key = attn.head_to_batch_dim(self._project("k", attn.to_k, source, context))
        value = attn.head_to_batch_dim(self._project("v", attn.to_v, source, context))
        if not is_cross and context is not None and context.kv is not None:
            key, value = self._store(context.kv, key, value)
        recording = is_cross and record and context is not None and context.record is not None
        reweighting = is_cross and context is not None and context.reweight is not None
        upcast = (attn.upcast_attention or attn.upcast_softmax) and query.dtype != torch.float32
        if not (recording or reweighting or upcast):  # no map to keep or change: the fused kernel, which never holds
            return attn.batch_to_head_dim(F.scaled_dot_product_attention(  # the queries x keys matrix (SD's 64 x 64
                query, key, value, attn_mask=attention_mask, scale=attn.scale))  # latents: 4096 x 4096 per head)
        probabilities = self._probabilities(attn, query, key, attention_mask, context if is_cross else None, batch)
        if recording:
            self._record(context.record, probabilities, batch)
        return attn.batch_to_head_dim(torch.bmm(probabilities, value))

    def _store(self, kv: KVStore, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kv.mode == "write":
            kv.keys[self.name], kv.values[self.name] = key.detach(), value.detach()
            return key, value
        if kv.mode != "read":
            raise ValueError(f"KVStore.mode must be 'write' or 'read', not {kv.mode!r}")
        if self.name not in kv.keys:
            raise ValueError(f"{self.name}: nothing was written to the key/value store for this layer")
        return torch.cat([key, kv.keys[self.name]], dim=1), torch.cat([value, kv.values[self.name]], dim=1)

    @staticmethod
    def _probabilities(attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                       context: AttentionContext | None, batch: int) -> torch.Tensor:
        """softmax(Q K^T scale + mask [+ the re-weighting map on a token range]), as attn.get_attention_scores."""
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        base = attention_mask if attention_mask is not None else torch.zeros(
            query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
        logits = torch.baddbmm(base, query, key.transpose(-1, -2), beta=0 if attention_mask is None else 1,
                               alpha=attn.scale)
        if context is not None and context.reweight is not None:
            logits = _reweighted(logits, context.reweight, batch)
        if attn.upcast_softmax:
            logits = logits.float()
        return logits.softmax(dim=-1).to(dtype)

    def _record(self, recorder: Recorder, probabilities: torch.Tensor, batch: int) -> None:
        heads, positions = probabilities.shape[0] // batch, probabilities.shape[1]
        side = int(round(math.sqrt(positions)))
        chosen = probabilities[..., list(recorder.tokens)].reshape(batch, heads, positions, -1).mean(1)
        recorder.maps.setdefault(self.name, []).append(chosen.transpose(1, 2).reshape(batch, -1, side, side))


def _reweighted(logits: torch.Tensor, reweight: TokenReweight, batch: int) -> torch.Tensor:
    positions = logits.shape[1]
    side = int(round(math.sqrt(positions)))
    weights = F.interpolate(reweight.weights.float(), size=(side, side), mode="bilinear", align_corners=False)
    weights = weights.flatten(1).to(logits.dtype)  # (B, positions)
    heads = logits.shape[0] // batch
    per_row = weights.repeat_interleave(heads, 0)[:, :, None]  # (B * heads, positions, 1)
    if reweight.columns is not None:
        columns = reweight.columns.to(logits.device).repeat_interleave(heads, 0)[:, None, :]  # (B * heads, 1, T)
    else:
        columns = torch.zeros(1, 1, logits.shape[-1], dtype=torch.bool, device=logits.device)
        columns[..., reweight.start:reweight.stop] = True
    if reweight.multiply:
        return logits * torch.where(columns, per_row, torch.ones_like(per_row))
    return logits + torch.where(columns, reweight.scale * per_row, torch.zeros_like(per_row))


def install(unet: torch.nn.Module, branches: int = 0, rank: int = 4, alpha: float | None = None,
            processor: Callable[..., ToolkitAttnProcessor] | None = None) -> dict:
    """A ToolkitAttnProcessor (or `processor(name, layer, branches, rank, alpha)`, a method's own) on every
    attention layer of `unet` (with `branches` per-branch LoRA adapters, trainable parameters of the UNet from then
    on); returns the previous processors (`unet.set_attn_processor(previous)`)."""
    make = processor or ToolkitAttnProcessor
    previous = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    made = {}
    for key in previous:
        layer = modules[key.removesuffix(".processor")]
        reference = layer.to_q.weight  # a processor's own parameters go where its layer is (a GPU, a dtype)
        made[key] = make(key.removesuffix(".processor"), layer, branches, rank, alpha).to(reference.device)
    unet.set_attn_processor(made)
    return previous


@contextlib.contextmanager
def installed(unet: torch.nn.Module, branches: int = 0, rank: int = 4,
              processor: Callable[..., ToolkitAttnProcessor] | None = None) -> Iterator[None]:
    previous = install(unet, branches, rank, processor=processor)
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def branch_lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if ".processor.lora." in n]


def branch_lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The per-branch adapters alone (to save beside the backbone instead of a full UNet)."""
    return {n: t.detach().cpu() for n, t in unet.state_dict().items() if ".processor.lora." in n}
