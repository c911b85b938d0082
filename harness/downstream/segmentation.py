"""The published localisation protocol (AnomalyDiffusion, DualAnoDiff): a segmentation U-Net trained on normal
and generated images, evaluated on the real test part.

- Network: DRAEM's discriminative U-Net (anomalib's `DiscriminativeSubNetwork`), RGB in, 2 classes out, base
  width 64 (`paper`) or 16 (`tiny`).
- Loss: focal loss (gamma 2) on the softmax of the two logits, per pixel, averaged.
- Optimiser: Adam (lr 1e-4); the learning rate is multiplied by 0.2 at 80 % and at 90 % of the steps. The
  `tiny` profile runs the training forward pass under bf16 autocast where the machine computes bf16 natively
  (`autocast: auto` in models.yaml, harness/device.py; elsewhere float32, and the record says which; `paper`:
  float32).
- Data: each sample of a batch is, with probability 1/2, a normal training image (empty mask), else a generated
  sample (its mask; an empty generated mask makes it a normal sample). An epoch is as many steps as it takes to
  draw (normal + generated training images) samples.
- Scores: the anomaly map is the softmax probability of the anomaly class; the image score is the max of its
  21 x 21 average-pooled map.
- Model selection: every `eval_every` epochs the network is scored on a validation part (held-out generated
  samples and held-out normal training images) by pixel AP, and the best state is kept. `select_on: test`
  scores the test part instead (the published practice; every table marks it), `last` keeps the final state.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.device import autocast, default_device
from harness.downstream.config import SELECTIONS
from harness.downstream.data import ImageSet
from harness.metrics import detection



def build_unet(base_width: int) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of timm and anomalib's own modules at import
        from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork  # imports slowly: only here

    return DiscriminativeSubNetwork(in_channels=3, out_channels=2, base_width=base_width)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean over pixels of -(1 - p_t)^gamma log p_t, p_t the softmax probability of the true class.
    logits: (B, 2, H, W); target: (B, H, W) integer classes."""
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None].long())[:, 0]
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], as DRAEM feeds its discriminative network."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def predict(net: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
            pool_kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly maps (N, H, W) float32, image scores (N,))."""
    net.eval()
    maps = []
    for start in range(0, len(images), batch_size):
        logits = net(to_input(images[start:start + batch_size], device))
        maps.append(torch.softmax(logits, dim=1)[:, 1].float().cpu().numpy())
    net.train()
    out = np.concatenate(maps) if maps else np.zeros((0, *images.shape[1:3]), np.float32)
    return out, detection.image_scores_from_maps(out, pool_kernel)


@dataclass
class Selection:
    """What model selection saw: (epoch, score) per validation, and the chosen epoch."""

    on: str
    metric: str
    history: list[tuple[int, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float = -math.inf


def selection_score(net: torch.nn.Module, part: ImageSet, config: dict, device: torch.device) -> float:
    """Pixel AP on a selection part (image AP where it has no anomalous pixel, e.g. only empty masks)."""
    maps, scores = predict(net, part.images, config["batch_size"], device, config["pool_kernel"])
    if part.masks.any() and not part.masks.all():
        return detection.average_precision(part.masks, maps)
    if part.labels.any() and not part.labels.all():
        return detection.average_precision(part.labels, scores)
    raise ValueError("the selection part holds one class only: it cannot rank models")


def lr_schedule(optimiser: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate times 0.2 after 80 % and again after 90 % of the steps (DRAEM's schedule)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimiser, [int(0.8 * total_steps), int(0.9 * total_steps)], gamma=0.2)


def train(normal: ImageSet, generated: ImageSet, config: dict, seed: int,
          selection_part: ImageSet | None = None, progress: bool = False) -> tuple[torch.nn.Module, Selection]:
    """Train the U-Net; returns it with the selected state loaded, and the selection history."""
    if len(normal) == 0 or len(generated) == 0:
        raise ValueError(f"segmentation needs normal and generated training images (got {len(normal)} normal, "
                         f"{len(generated)} generated)")
    device = default_device()
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_unet(config["base_width"]).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=config["lr"])
    batch = config["batch_size"]
    steps_per_epoch = math.ceil((len(normal) + len(generated)) / batch)
    total = config["epochs"] * steps_per_epoch
    schedule = lr_schedule(optimiser, total)
    select_on = config["select_on"] if selection_part is not None else "last"
    selection = Selection(select_on, "pixel_ap")
    best_state = None
    bar = tqdm(total=total, desc="segmentation U-Net", disable=not progress, leave=False)
    for epoch in range(1, config["epochs"] + 1):
        for _ in range(steps_per_epoch):
            images, masks = _draw(rng, normal, generated, batch, config["p_generated"])
            with autocast(device, config["autocast"]):
                logits = net(to_input(images, device))
            loss = focal_loss(logits.float(), torch.from_numpy(masks).to(device), config["focal_gamma"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update()
        if select_on != "last" and (epoch % config["eval_every"] == 0 or epoch == config["epochs"]):
            score = selection_score(net, selection_part, config, device)
            selection.history.append((epoch, score))
            if score > selection.best_score:
                selection.best_epoch, selection.best_score = epoch, score
                best_state = copy.deepcopy(net.state_dict())
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    else:
        selection.best_epoch = config["epochs"]
    return net, selection


def _draw(rng: np.random.Generator, normal: ImageSet, generated: ImageSet, batch: int,
          p_generated: float) -> tuple[np.ndarray, np.ndarray]:
    """A batch where each sample is generated with probability p_generated, else normal (with an empty mask)."""
    from_generated = rng.random(batch) < p_generated
    images, masks = [], []
    for use_generated in from_generated:
        source = generated if use_generated else normal
        i = int(rng.integers(len(source)))
        images.append(source.images[i])
        masks.append(source.masks[i] if use_generated else np.zeros(source.masks.shape[1:], dtype=bool))
    return np.stack(images), np.stack(masks).astype(np.int64)


def run(normal_train: ImageSet, normal_validation: ImageSet, generated_train: ImageSet,
        generated_validation: ImageSet, test: ImageSet, config: dict, seed: int,
        progress: bool = False) -> tuple[np.ndarray, np.ndarray, Selection]:
    """Train with model selection as configured, then predict the test part: (maps, image scores, selection)."""
    if config["select_on"] not in SELECTIONS:
        raise ValueError(f"select_on must be one of {', '.join(SELECTIONS)}, not {config['select_on']!r}")
    part: ImageSet | None
    if config["select_on"] == "test":
        part = test
    elif config["select_on"] == "validation":
        part = ImageSet.concat([generated_validation, normal_validation]) if len(generated_validation) else None
    else:
        part = None
    net, selection = train(normal_train, generated_train, config, seed, part, progress)
    maps, scores = predict(net, test.images, config["batch_size"], next(net.parameters()).device, config["pool_kernel"])
    return maps, scores, selection

