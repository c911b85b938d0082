"""AnomalyDiffusion's adaptive attention re-weighting (Hu et al., AAAI 2024, Sec. 3.3; the authors' `--adaptive_mask`),
an option, off by default (its users report it can hurt: sjtuplayer/anomalydiffusion#57).

At each sampling step t (the authors' code, as facts):
- the latent mask is dilated by r(t) = floor((t + 100) * 8 / 1000) cells (* 16 when sampling takes 50 steps), and
  the dilated mask m_d also replaces the mask of the blend;
- d = mean over channels of (m_d * (z_t - z_0))^2, with z_t the current latent and z_0 the normal image's;
- where d = 0 it is set to -1; w' = m_d / d; w = |m_d| * w' / sum(w') per image (so w averages about 1 over m_d);
  w is then set to 1 where it is 0 or below 1 and clipped at 1.5 (w in [1, 1.5]; 1 outside the dilated mask);
- w multiplies the pre-softmax cross-attention logits of the anomaly embedding's tokens, at every pixel of every
  cross-attention layer (resized bilinearly to its resolution).
Pixels whose latent is still far from the normal image get less extra attention to the anomaly tokens than those
close to it, which would otherwise stay normal. The authors' code also re-weights the first ([CLS]) token, which
the paper does not describe; here only the embedding's tokens are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP = 1.5


def radius(t: int, steps: int) -> int:
    """r(t): the dilation in latent cells at timestep t of a `steps`-step sampling."""
    return (int(t) + 100) * (16 if steps == 50 else 8) // 1000


def dilate(m: torch.Tensor, cells: int) -> torch.Tensor:
    """A (B, 1, h, w) {0, 1} mask grown by a (2 cells + 1)-wide square."""
    return F.max_pool2d(m, 2 * cells + 1, stride=1, padding=cells) if cells > 0 else m


def attention_weights(z_t: torch.Tensor, z_0: torch.Tensor, m_d: torch.Tensor) -> torch.Tensor:
    """w (B, 1, h, w) from the current latent, the normal latent and the dilated mask (module docstring)."""
    d = (m_d * (z_t - z_0)).pow(2).mean(1, keepdim=True)
    d = torch.where(d == 0, torch.full_like(d, -1.0), d)
    raw = m_d / d
    total = raw.sum(dim=(1, 2, 3), keepdim=True)
    area = m_d.sum(dim=(1, 2, 3), keepdim=True)
    w = torch.where(total != 0, area * raw / torch.where(total != 0, total, torch.ones_like(total)),
                    torch.ones_like(raw))
    return torch.where(w < 1, torch.ones_like(w), w).clamp(max=CLIP)
