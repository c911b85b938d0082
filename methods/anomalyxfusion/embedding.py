"""AnomalyXFusion's X-embedding (Hu et al., 2024, Sec. 3-4): three modalities of a defect fused into the tokens that
take the place of AnomalyDiffusion's anomaly embedding in the prompt.

- Semantic (Eq. 1): e_sem = W · (f_text(caption) / ||f_text(caption)||), replicated to k tokens (`SemanticEmbedding`).
- Location (Eq. 2): e_loc = E_CNN(E_AE(mask)), E_AE the encoder of a mask auto-encoder in ISTR's shape, trained
  with the dice loss (`MaskAutoencoder`, `dice_loss`), E_CNN a small CNN and a linear layer to k tokens
  (`LocationEmbedding`); both are fine-tuned with the rest.
- Textural (Eq. 3): k learned tokens per defect type, initialised from image features of image ⊙ mask
  (`TexturalEmbedding`; AnomalyDiffusion's e_a, which starts from the word "anomaly").
- MIF (Eq. 4-5): e_mul = [e_sem ; e_loc ; e_tex] (tokens), e_X = e_mul + MLP(Attn(e_mul)) (`MultimodalFusion`).
- DDF (Eq. 13-14): e_t = MLP([e_X ; Linear(τ(t))]), τ the sinusoidal timestep embedding, broadcast over the tokens
  and concatenated on channels (`DynamicFusion`); recomputed at every denoising step.

The paper gives no sizes for the attention, the MLPs or E_CNN; the ones chosen are parameters (method.yaml) and
README.md records them. Written from the paper; no code of the authors' has these parts (their public code is a
patched AnomalyDiffusion with caption features only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.diffusion.placeholders import at_scale


class SemanticEmbedding(nn.Module):
    """Eq. 1: caption features (B, d) -> (B, k, width): L2-normalised, projected (trained), replicated to k tokens;
    brought to `scale` where one is given (`at_scale`)."""

    def __init__(self, feature_dim: int, width: int, tokens: int, scale: float | None = None):
        super().__init__()
        self.tokens, self.scale = tokens, scale
        self.projection = nn.Linear(feature_dim, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = at_scale(self.projection(F.normalize(features.float(), dim=-1)), self.scale)
        return projected[:, None, :].expand(-1, self.tokens, -1)


class MaskAutoencoder(nn.Module):
    """ISTR's mask auto-encoder: a `size` px mask, four stride-2 4x4 convolutions with BatchNorm and ELU (16-32-64-128
    channels), then a (size/16) x (size/16) convolution to a `code`-d vector; the decoder mirrors it with transposed
    convolutions to mask logits."""

    def __init__(self, size: int = 112, channels: tuple[int, ...] = (16, 32, 64, 128), code: int = 256):
        super().__init__()
        steps = 2 ** len(channels)
        if size % steps:
            raise ValueError(f"the mask auto-encoder's size must be a multiple of {steps}, not {size}")
        self.size, self.code = size, code
        layers, previous = [], 1
        for width in channels:
            layers += [nn.Conv2d(previous, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ELU()]
            previous = width
        self.encoder = nn.Sequential(*layers, nn.Conv2d(previous, code, size // steps))
        layers = [nn.ConvTranspose2d(code, previous, size // steps), nn.BatchNorm2d(previous), nn.ELU()]
        for width in [*reversed(channels[:-1]), 1]:
            layers += [nn.ConvTranspose2d(previous, width, 4, 2, 1)]
            layers += [nn.BatchNorm2d(width), nn.ELU()] if width != 1 else []
            previous = width
        self.decoder = nn.Sequential(*layers)

    def resize(self, masks: torch.Tensor) -> torch.Tensor:
        return F.interpolate(masks.float(), size=(self.size,) * 2, mode="bilinear", align_corners=False)

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (B, 1, H, W) -> codes (B, code, 1, 1)."""
        return self.encoder(self.resize(masks))

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (B, 1, H, W) -> reconstructed mask probabilities (B, 1, size, size)."""
        return torch.sigmoid(self.decoder(self.encode(masks)))


def dice_loss(predicted: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ISTR's dice loss, 1 - 2 Σxy / (Σx² + Σy²) per mask, averaged over the batch."""
    x, y = predicted.flatten(1), target.float().flatten(1)
    return (1 - 2 * (x * y).sum(1) / (x.pow(2).sum(1) + y.pow(2).sum(1) + eps)).mean()


class LocationEmbedding(nn.Module):
    """Eq. 2: e_loc = E_CNN(E_AE(mask)). The code has no spatial extent, so E_CNN's convolutions are 1 x 1; a linear
    layer writes k tokens of the backbone's width, brought to `scale` where one is given (`at_scale`)."""

    def __init__(self, autoencoder: MaskAutoencoder, width: int, tokens: int, hidden: int, scale: float | None = None):
        super().__init__()
        self.autoencoder_encoder, self.resize = autoencoder.encoder, autoencoder.resize
        self.tokens, self.width, self.scale = tokens, width, scale
        self.cnn = nn.Sequential(nn.Conv2d(autoencoder.code, hidden, 1), nn.ELU(), nn.Conv2d(hidden, hidden, 1), nn.ELU())
        self.linear = nn.Linear(hidden, tokens * width)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        code = self.autoencoder_encoder(self.resize(masks))
        return at_scale(self.linear(self.cnn(code).flatten(1)).view(-1, self.tokens, self.width), self.scale)


class TexturalEmbedding(nn.Module):
    """Eq. 3: k learned tokens per defect type, starting from `initial` (types, k, width)."""

    def __init__(self, defect_types: list[str], initial: torch.Tensor):
        super().__init__()
        self.defect_types = list(defect_types)
        if initial.shape[0] != len(self.defect_types):
            raise ValueError(f"one initial (k, width) per defect type: {len(self.defect_types)} types, "
                             f"{initial.shape[0]} initials")
        self.tokens = nn.ParameterList(nn.Parameter(row.detach().clone()) for row in initial)

    def forward(self, defect_types: list[str]) -> torch.Tensor:
        unknown = sorted(set(defect_types) - set(self.defect_types))
        if unknown:
            raise ValueError(f"no textural embedding for defect types {unknown}; trained on {self.defect_types}")
        return torch.stack([self.tokens[self.defect_types.index(d)] for d in defect_types])


class MultimodalFusion(nn.Module):
    """MIF, Eq. 4-5: e_X = e_mul + MLP(Attn(e_mul)), token self-attention. The MLP's last layer starts at zero, so
    training starts from e_X = e_mul (the modalities as they are) and learns their interaction."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, e_mul: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(e_mul, e_mul, e_mul, need_weights=False)
        return e_mul + self.mlp(attended)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """τ(t): the sinusoidal timestep embedding of the backbone's UNet (cos first, as SD's), (B,) -> (B, dim)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t.reshape(-1).float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class DynamicFusion(nn.Module):
    """DDF, Eq. 13-14: e_t = MLP([e_X ; Linear(τ(t))]), the timestep's features broadcast over the tokens and
    concatenated on channels, an MLP back to the width. `residual` (the tiny profile's deviation, README.md):
    e_t = e_X + MLP(...), the MLP's last layer starting at zero, so e_t starts as e_X and learns the timestep's
    share."""

    def __init__(self, width: int, time_dim: int, hidden: int, residual: bool = False):
        super().__init__()
        self.time_dim, self.residual = time_dim, residual
        self.time = nn.Linear(time_dim, width)
        self.mlp = nn.Sequential(nn.Linear(2 * width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        if residual:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, e_x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t, device=e_x.device).reshape(-1).expand(e_x.shape[0])
        time = self.time(timestep_features(t, self.time_dim).to(e_x.dtype))
        out = self.mlp(torch.cat([e_x, time[:, None, :].expand_as(e_x)], dim=-1))
        return e_x + out if self.residual else out


class XEmbedding(nn.Module):
    """The tokens AnomalyXFusion writes at the placeholder: [e_sem ;] e_loc ; e_tex, fused by MIF and made
    timestep-dependent by DDF, each part switchable as the paper's ablation (Table 6)."""

    def __init__(self, location: LocationEmbedding, textural: TexturalEmbedding,
                 semantic: SemanticEmbedding | None = None, fusion: MultimodalFusion | None = None,
                 dynamic: DynamicFusion | None = None):
        super().__init__()
        self.location, self.textural, self.semantic = location, textural, semantic
        self.fusion, self.dynamic = fusion, dynamic

    @property
    def tokens(self) -> int:
        return self.location.tokens * (3 if self.semantic is not None else 2)

    def fused(self, defect_types: list[str], caption_features: torch.Tensor | None, masks: torch.Tensor
              ) -> torch.Tensor:
        """e_X (B, tokens, width), or e_mul where MIF is off. `caption_features` None with the semantic part on:
        its tokens are zero (the caption claim's negative control)."""
        e_loc = self.location(masks)
        parts = []
        if self.semantic is not None:
            parts = [self.semantic(caption_features) if caption_features is not None else
                     e_loc.new_zeros(masks.shape[0], self.semantic.tokens, self.semantic.projection.out_features)]
        e_mul = torch.cat([*parts, e_loc, self.textural(defect_types)], dim=1)
        return self.fusion(e_mul) if self.fusion is not None else e_mul

    def at_step(self, e_x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """e_t: e_X at denoising step t (DDF), or e_X itself where DDF is off."""
        return self.dynamic(e_x, t) if self.dynamic is not None else e_x

    def forward(self, defect_types: list[str], caption_features: torch.Tensor | None, masks: torch.Tensor,
                t: torch.Tensor | int) -> torch.Tensor:
        return self.at_step(self.fused(defect_types, caption_features, masks), t)
