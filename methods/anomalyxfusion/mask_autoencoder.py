"""Training ISTR's mask auto-encoder (embedding.MaskAutoencoder) with the dice loss, as ISTR trains it (on COCO's
instance masks there; here on the fit's training masks, augmented: no mask data set is reachable, and the test
part's masks are never seen). The encoder then starts the location embedding and is fine-tuned with it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harness.device import default_device

from .embedding import MaskAutoencoder, dice_loss


def augmented(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips, quarter turns, scales (0.7-1.3) and shifts (up to a quarter) of (B, 1, H, W) masks."""
    b = masks.shape[0]
    angle = torch.randint(0, 4, (b,), generator=generator).float() * (torch.pi / 2)
    scale = 0.7 + 0.6 * torch.rand(b, generator=generator)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * 0.5
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(masks.device), list(masks.shape), align_corners=False)
    return (F.grid_sample(masks.float(), grid, mode="bilinear", align_corners=False) > 0.5).float()


def fit_mask_autoencoder(autoencoder: MaskAutoencoder, masks: np.ndarray, settings: dict, seed: int) -> dict:
    """Adam on the dice loss of augmented training masks (bool (N, H, W)); returns the dice loss on the masks as
    given before and after, and the steps."""
    device = default_device()
    autoencoder.to(device)
    generator = torch.Generator().manual_seed(seed)
    data = autoencoder.resize(torch.from_numpy(masks)[:, None].float()).gt(0.5).float()
    optimiser = torch.optim.Adam(autoencoder.parameters(), lr=float(settings["learning_rate"]))
    before = _dice(autoencoder, data, device)
    steps, batch = int(settings["steps"]), int(settings["batch_size"])
    autoencoder.train()
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=generator)
        x = augmented(data[rows], generator).to(device)
        loss = dice_loss(autoencoder(x), x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {"steps": steps, "dice_loss_before": round(before, 4), "dice_loss_after": round(_dice(autoencoder, data, device), 4),
            "masks": len(data)}


def _dice(autoencoder: MaskAutoencoder, data: torch.Tensor, device: torch.device) -> float:
    autoencoder.eval()
    with torch.no_grad():
        value = float(dice_loss(autoencoder(data.to(device)), data.to(device)))
    autoencoder.train()
    return value
