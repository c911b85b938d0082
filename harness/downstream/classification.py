"""Defect-type classification (DualAnoDiff Table 3, AnomalyDiffusion): a torchvision ResNet-34 with a new head
(one class per defect type, in sorted order), trained on generated images only, tested on the real test images
of every defect type. Accuracy is counted over the whole test part (not averaged over batches), and per class.

The trunk starts from ImageNet weights when `harness.weights` resolves `resnet34`, else from a seeded random
initialisation (recorded with every result). Inputs are normalised with ImageNet's mean and std. Model
selection: the state with the best accuracy on held-out generated images (never the test part).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness import weights
from harness.device import default_device
from harness.downstream.data import ImageSet
from harness.metrics import detection
from harness.profiles import Profile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_classifier(n_classes: int, profile: str | Profile, explicit: str | None = None,
                     seed: int = 0) -> tuple[torch.nn.Module, weights.ResolvedWeights]:
    import torchvision

    resolved = weights.resolve("resnet34", profile, explicit)
    with weights.seeded(weights.RANDOM_SEED if resolved.is_random else seed):
        net = torchvision.models.resnet34(weights=None)
    if not resolved.is_random:
        net.load_state_dict(weights.load_state_dict(resolved))
    with weights.seeded(seed):
        net.fc = torch.nn.Linear(net.fc.in_features, n_classes)
    return net, resolved


def to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def predict(net: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    net.eval()
    out = [net(to_input(images[i:i + batch_size], device)).argmax(1).cpu().numpy()
           for i in range(0, len(images), batch_size)]
    net.train()
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def run(generated_train: ImageSet, generated_validation: ImageSet, test: ImageSet, classes: list[str],
        config: dict, profile: str | Profile, seed: int, explicit_weights: str | None = None,
        progress: bool = False) -> tuple[dict, weights.ResolvedWeights]:
    """Train, select on held-out generated images, test. Returns ({accuracy, per_class, predictions,
    history, best_epoch}, the weights the trunk started from)."""
    if classes != sorted(classes) or len(classes) < 2:
        raise ValueError(f"classification needs at least two defect types in sorted order, got {classes}")
    device = default_device()
    index = {c: i for i, c in enumerate(classes)}
    y_train = np.array([index[d] for d in generated_train.defect_types])
    net, resolved = build_classifier(len(classes), profile, explicit_weights, seed)
    net.to(device).train()
    optimiser = torch.optim.Adam(net.parameters(), lr=config["lr"])
    rng = np.random.default_rng(seed)
    batch = config["batch_size"]
    steps = math.ceil(len(generated_train) / batch)
    history, best, best_state = [], (-1.0, 0), None
    bar = tqdm(total=config["epochs"] * steps, desc="ResNet-34 classifier", disable=not progress, leave=False)
    for epoch in range(1, config["epochs"] + 1):
        order = rng.permutation(len(generated_train))
        for s in range(steps):
            chosen = order[s * batch:(s + 1) * batch]
            logits = net(to_input(generated_train.images[chosen], device))
            loss = F.cross_entropy(logits, torch.from_numpy(y_train[chosen]).to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            bar.update()
        if len(generated_validation) and (epoch % config["eval_every"] == 0 or epoch == config["epochs"]):
            predicted = predict(net, generated_validation.images, batch, device)
            score, _ = detection.accuracy(generated_validation.defect_types, [classes[i] for i in predicted])
            history.append((epoch, score))
            if score > best[0]:
                best, best_state = (score, epoch), copy.deepcopy(net.state_dict())
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    test_defects = [i for i, d in enumerate(test.defect_types) if d in index]
    predicted = [classes[i] for i in predict(net, test.images[test_defects], batch, device)]
    truth = [test.defect_types[i] for i in test_defects]
    overall, per_class = detection.accuracy(truth, predicted)
    return {"accuracy": overall, "per_class": per_class, "n": len(truth), "history": history,
            "best_epoch": best[1] if best_state is not None else config["epochs"],
            "predictions": list(zip([test.names[i] for i in test_defects], truth, predicted))}, resolved
