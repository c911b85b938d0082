"""Attention processors of the diffusion toolkit: one behaviour per class, composed per layer.

Every attention layer gets one `LayerProcessor` holding the behaviours a method installs on it (`install`). The
processor computes diffusers' attention and gives each behaviour its hooks:

    hidden -> q = project("q")                                    BranchLoRA
    source (the layer's own states, or the text condition)
           -> keys_from(source)                                   a method's (DualAnoDiff's BCM)
    attend: one behaviour may replace it, calling the plain one   a method's (Cho et al.'s masked rule)
           k, v = project("k"), project("v")                      BranchLoRA
           logits = Q K^T scale (+ mask) -> logits(...)           Reweight
           softmax -> observe(...)                                Record
    out = project("out") -> output(...)                           a method's (DualAnoDiff's SAIM)

Every per-call input travels with the call, as `unet(..., cross_attention_kwargs={"context": AttentionContext(
...)})`: a typed value per behaviour (`Recorder` for Record, `TokenReweight` for Reweight, `SampleBranches` for
BranchLoRA, a method's own types for its behaviours), found by its exact type. A behaviour whose input the call
does not carry does nothing, or raises where it cannot do without (BranchLoRA; DualAnoDiff's SAIM and BCM). The
processors hold no per-call state. With no behaviour, or none with an input, a layer computes exactly what
diffusers' AttnProcessor computes (tested).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")


class AttentionContext:
    """The per-call inputs of the layers' behaviours: at most one value of each type (None values are left out)."""

    def __init__(self, *inputs: object):
        self._inputs: dict[type, object] = {}
        for value in inputs:
            if value is None:
                continue
            if type(value) in self._inputs:
                raise ValueError(f"one attention context holds two {type(value).__name__} inputs")
            self._inputs[type(value)] = value

    def get(self, kind: type[T]) -> T | None:
        return self._inputs.get(kind)  # type: ignore[return-value]


@dataclass(frozen=True)
class Call:
    """What a behaviour knows of the call it is in."""

    layer: str  # the attention layer's module name
    cross: bool  # cross-attention (the text condition) or self-attention
    batch: int  # samples in the call (the heads are folded into the batch of q, k, v, the logits)
    context: AttentionContext


class Attend(Protocol):
    """The layer's plain attention of `query` over `source`; `observe` False keeps its map from the observers."""

    def __call__(self, query: torch.Tensor, source: torch.Tensor, attention_mask: torch.Tensor | None,
                 observe: bool = True) -> torch.Tensor: ...


class Behaviour(torch.nn.Module):
    """One behaviour of an attention layer; every hook leaves its input as it is. Its parameters are the layer
    processor's, under the behaviour's `slot` (`<layer>.processor.<slot>.<name>` in the UNet's state dict)."""

    slot = ""

    def project(self, part: str, x: torch.Tensor, out: torch.Tensor, call: Call) -> torch.Tensor:
        """The projection `part` (q, k, v or out) of x, `out` as the layer computes it."""
        return out

    def keys_from(self, source: torch.Tensor, call: Call) -> torch.Tensor:
        """The states the keys and values are projected from."""
        return source

    def attend(self, attend: Attend, query: torch.Tensor, source: torch.Tensor, attention_mask: torch.Tensor | None,
               call: Call) -> torch.Tensor | None:
        """The attention output (heads merged) in place of `attend(query, source, attention_mask)`; None (having
        called nothing): the plain one."""
        return None

    def needs_map(self, call: Call, observe: bool) -> bool:
        """Whether this call must form the attention map (else the fused kernel runs, which never holds it, and no
        `logits` or `observe` hook runs): a behaviour with either hook says when it needs them."""
        return False

    def logits(self, logits: torch.Tensor, call: Call) -> torch.Tensor:
        return logits

    def observe(self, probabilities: torch.Tensor, call: Call) -> None:
        """The attention map softmax(logits): (batch * heads, queries, keys)."""

    def output(self, hidden_states: torch.Tensor, call: Call) -> torch.Tensor:
        """The layer's output after the output projection (before the 4-D reshape and the residual)."""
        return hidden_states


# ---- the toolkit's behaviours -------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Record's input: the token positions whose cross-attention maps are kept, and the maps."""

    tokens: tuple[int, ...]
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [(B, len(tokens), h, w), ...]

    def mean(self, size: int) -> torch.Tensor:
        """Every recorded map resized to size x size and averaged over layers and calls: (B, len(tokens), s, s)."""
        resized = [F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
                   for maps in self.maps.values() for m in maps]
        if not resized:
            raise ValueError("no attention map was recorded (no cross-attention layer ran with this context)")
        return torch.stack(resized).mean(0)


class Record(Behaviour):
    """Keeps the cross-attention maps of the Recorder's tokens, averaged over heads."""

    slot = "record"

    def needs_map(self, call: Call, observe: bool) -> bool:
        return call.cross and observe and call.context.get(Recorder) is not None

    def observe(self, probabilities: torch.Tensor, call: Call) -> None:
        recorder = call.context.get(Recorder)
        if not call.cross or recorder is None:
            return
        heads, positions = probabilities.shape[0] // call.batch, probabilities.shape[1]
        side = int(round(math.sqrt(positions)))
        chosen = probabilities[..., list(recorder.tokens)].reshape(call.batch, heads, positions, -1).mean(1)
        recorder.maps.setdefault(call.layer, []).append(chosen.transpose(1, 2).reshape(call.batch, -1, side, side))


@dataclass(frozen=True)
class TokenReweight:
    """Reweight's input."""

    start: int  # token range [start, stop) of the cross-attention
    stop: int
    weights: torch.Tensor  # (B, 1, h, w) spatial map, resized to each layer's resolution
    scale: float = 1.0  # added to the logits: logit + scale * weight
    multiply: bool = False  # instead: logit * weight (AnomalyDiffusion's adaptive attention re-weighting)
    columns: torch.Tensor | None = None  # (B, tokens) bool: per-sample tokens instead of [start, stop)


class Reweight(Behaviour):
    """A spatial map added to, or multiplying, the cross-attention logits of a token range."""

    slot = "reweight"

    def needs_map(self, call: Call, observe: bool) -> bool:
        return call.cross and call.context.get(TokenReweight) is not None

    def logits(self, logits: torch.Tensor, call: Call) -> torch.Tensor:
        reweight = call.context.get(TokenReweight)
        if not call.cross or reweight is None:
            return logits
        side = int(round(math.sqrt(logits.shape[1])))
        weights = F.interpolate(reweight.weights.float(), size=(side, side), mode="bilinear", align_corners=False)
        weights = weights.flatten(1).to(logits.dtype)  # (B, positions)
        heads = logits.shape[0] // call.batch
        per_row = weights.repeat_interleave(heads, 0)[:, :, None]  # (B * heads, positions, 1)
        if reweight.columns is not None:
            columns = reweight.columns.to(logits.device).repeat_interleave(heads, 0)[:, None, :]  # (B * heads, 1, T)
        else:
            columns = torch.zeros(1, 1, logits.shape[-1], dtype=torch.bool, device=logits.device)
            columns[..., reweight.start:reweight.stop] = True
        if reweight.multiply:
            return logits * torch.where(columns, per_row, torch.ones_like(per_row))
        return logits + torch.where(columns, reweight.scale * per_row, torch.zeros_like(per_row))


@dataclass(frozen=True)
class SampleBranches:
    """BranchLoRA's input: the branch index of each sample of the call, (B,)."""

    index: torch.Tensor


class BranchAdapters(torch.nn.Module):
    """Low-rank updates of one Linear layer, one per branch: x -> B_b A_b x for the sample's branch b."""

    def __init__(self, branches: int, features_in: int, features_out: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(branches, rank, features_in) / rank)
        self.up = torch.nn.Parameter(torch.zeros(branches, features_out, rank))  # zero: starts as the base layer
        self.scaling = (alpha or rank) / rank

    def forward(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        down, up = self.down[branch], self.up[branch]  # (B, r, in), (B, out, r)
        return torch.einsum("bor,bri,bni->bno", up, down, x) * self.scaling


class BranchLoRA(Behaviour):
    """Per-branch LoRA on q, k, v and out: one adapter per branch, chosen per sample by `SampleBranches` (peft
    switches adapters per call, so it cannot train two branches in one batch; these adapters can)."""

    slot = "lora"

    def __init__(self, attn, branches: int, rank: int = 4, alpha: float | None = None):
        super().__init__()
        sizes = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "out": attn.to_out[0]}
        for part, layer in sizes.items():
            self.add_module(part, BranchAdapters(branches, layer.in_features, layer.out_features, rank, alpha))

    def project(self, part: str, x: torch.Tensor, out: torch.Tensor, call: Call) -> torch.Tensor:
        branches = call.context.get(SampleBranches)
        if branches is None:
            raise ValueError(f"{call.layer}: per-branch LoRA needs the branch of each sample (SampleBranches)")
        return out + self.get_submodule(part)(x, branches.index.to(x.device))


# ---- the layer processor ------------------------------------------------------------------------------------------


class LayerProcessor(torch.nn.Module):
    """diffusers' attention with the behaviours' hooks (see the module docstring), applied in their order."""

    def __init__(self, name: str, behaviours: list[Behaviour]):
        super().__init__()
        self.name = name
        self.behaviours = list(behaviours)
        for behaviour in self.behaviours:
            kind = type(behaviour)
            if not behaviour.slot or hasattr(self, behaviour.slot):
                raise ValueError(f"{name}: behaviour {kind.__name__}'s slot {behaviour.slot!r} is empty or taken")
            if (kind.logits is not Behaviour.logits or kind.observe is not Behaviour.observe) and (
                    kind.needs_map is Behaviour.needs_map):
                raise ValueError(f"{name}: behaviour {kind.__name__} changes or reads the attention map but never "
                                 "asks for it (needs_map): the fused kernel would skip it")
            self.add_module(behaviour.slot, behaviour)
        self._attends = [b for b in self.behaviours if type(b).attend is not Behaviour.attend]
        if len(self._attends) > 1:
            raise ValueError(f"{name}: two behaviours replace the attention ({[type(b).__name__ for b in self._attends]})")

    def _project(self, part: str, layer, x: torch.Tensor, call: Call) -> torch.Tensor:
        out = layer(x)
        for behaviour in self.behaviours:
            out = behaviour.project(part, x, out, call)
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
        call = Call(self.name, is_cross, batch, context if context is not None else AttentionContext())
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(self._project("q", attn.to_q, hidden_states, call))
        source = hidden_states if not is_cross else (attn.norm_encoder_hidden_states(encoder_hidden_states)
                                                     if attn.norm_cross else encoder_hidden_states)
        for behaviour in self.behaviours:
            source = behaviour.keys_from(source, call)

        def attend(query: torch.Tensor, source: torch.Tensor, attention_mask: torch.Tensor | None,
                   observe: bool = True) -> torch.Tensor:
            return self._attend(attn, query, source, attention_mask, call, observe)

        replaced = self._attends[0].attend(attend, query, source, attention_mask, call) if self._attends else None
        hidden_states = replaced if replaced is not None else attend(query, source, attention_mask)
        hidden_states = attn.to_out[1](self._project("out", attn.to_out[0], hidden_states, call))
        for behaviour in self.behaviours:
            hidden_states = behaviour.output(hidden_states, call)
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, query: torch.Tensor, source: torch.Tensor, attention_mask: torch.Tensor | None,
                call: Call, observe: bool) -> torch.Tensor:
        """softmax(Q K^T scale + mask) V over `source`, heads merged: (B, queries, inner dim)."""
        key = attn.head_to_batch_dim(self._project("k", attn.to_k, source, call))
        value = attn.head_to_batch_dim(self._project("v", attn.to_v, source, call))
        upcast = (attn.upcast_attention or attn.upcast_softmax) and query.dtype != torch.float32
        if not (upcast or any(b.needs_map(call, observe) for b in self.behaviours)):
            # no map to keep or change: the fused kernel, which never holds the queries x keys matrix (SD's 64 x 64
            # latents: 4096 x 4096 per head)
            return attn.batch_to_head_dim(F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale))
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        base = attention_mask if attention_mask is not None else torch.zeros(
            query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
        logits = torch.baddbmm(base, query, key.transpose(-1, -2), beta=0 if attention_mask is None else 1,
                               alpha=attn.scale)  # as attn.get_attention_scores
        for behaviour in self.behaviours:
            logits = behaviour.logits(logits, call)
        if attn.upcast_softmax:
            logits = logits.float()
        probabilities = logits.softmax(dim=-1).to(dtype)
        if observe:
            for behaviour in self.behaviours:
                behaviour.observe(probabilities, call)
        return attn.batch_to_head_dim(torch.bmm(probabilities, value))


Behaviours = Callable[[str, torch.nn.Module], list[Behaviour]]  # (name, attention layer) -> its behaviours


def no_behaviours(name: str, attn: torch.nn.Module) -> list[Behaviour]:
    return []


def each_layer(*kinds: type[Behaviour]) -> Behaviours:
    """A fresh behaviour of each kind (ones without settings: Record, Reweight) on every layer."""
    return lambda name, attn: [kind() for kind in kinds]


def install(unet: torch.nn.Module, behaviours: Behaviours = no_behaviours) -> dict:
    """A LayerProcessor with `behaviours(name, layer)` on every attention layer of `unet` (their parameters trainable
    parameters of the UNet from then on, on the layer's device); returns the previous processors
    (`unet.set_attn_processor(previous)`)."""
    previous = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    made = {}
    for key in previous:
        name = key.removesuffix(".processor")
        layer = modules[name]
        made[key] = LayerProcessor(name, behaviours(name, layer)).to(layer.to_q.weight.device)
    unet.set_attn_processor(made)
    return previous


@contextlib.contextmanager
def installed(unet: torch.nn.Module, behaviours: Behaviours = no_behaviours) -> Iterator[None]:
    previous = install(unet, behaviours)
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def branch_lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if f".processor.{BranchLoRA.slot}." in n]


def branch_lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The per-branch adapters alone (to save beside the backbone instead of a full UNet)."""
    return {n: t.detach().cpu() for n, t in unet.state_dict().items() if f".processor.{BranchLoRA.slot}." in n}
