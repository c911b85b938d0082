"""From a split to what a method sees: the FewShotTask (training part only) and GenerationRequests.

Target normal images are drawn from the normal training images (each used once before any repeats); target
masks are training masks of the defect type, moved to a random place on the target image's foreground and
jittered; captions are the training captions of the defect type.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data.images import is_image_file
from harness.data.layouts import list_categories
from harness.data.model import Sample
from harness.data.splits import Split
from harness.errors import DataError, MethodError
from harness.imaging import estimate_foreground, jitter_mask
from harness.methods import FewShotTask, GenerationRequest, Item, Method, Target
from harness.seeding import stream


def to_item(sample: Sample, resolution: int) -> Item:
    mask = sample.load_mask(resolution) if sample.is_anomalous else None
    return Item(sample.key, sample.load_image(resolution), sample.defect_type, mask, sample.caption, sample.image)


def build_task(split: Split, defect_types: list[str], resolution: int, seed: int) -> FewShotTask:
    """The training part of `split` for the given defect types, loaded at `resolution`."""
    category = split.category
    anomalies = []
    for defect in defect_types:
        if defect not in split.defects:
            raise DataError(category.root / "test" / defect,
                            f"no defect type '{defect}' in category '{category.name}'; known: {', '.join(category.defect_types)}")
        train = split.defects[defect].train
        if not train:
            raise DataError(category.root / "test" / defect,
                            f"protocol '{split.protocol}' gives defect type '{defect}' no training images "
                            f"(it has {len(category.defects[defect])})")
        anomalies += [to_item(s, resolution) for s in train]
    if not split.normal_train:
        raise DataError(category.root / "train" / "good", "no normal training images")
    normals = [to_item(s, resolution) for s in split.normal_train]
    return FewShotTask(
        dataset=category.dataset, category=category.name, defect_types=list(defect_types), anomalies=anomalies,
        normals=normals, resolution=resolution, texture=category.texture, seed=seed,
        other_normals=_other_normals(category.root.parent, category.name), fold=split.fold, root=category.root,
    )


def _other_normals(root: Path, own: str) -> dict[str, list[Path]]:
    """train/good images of the data set's other categories (e.g. DRAEM's anomaly source), never test images."""
    try:
        names = list_categories(root)
    except DataError:
        return {}
    out = {}
    for name in names:
        folder = root / name / "train" / "good"
        if name != own and folder.is_dir():
            out[name] = sorted(p for p in folder.iterdir() if is_image_file(p))
    return out


def build_request(task: FewShotTask, method: Method, defect_type: str, n: int, seed: int) -> GenerationRequest:
    needs = method.needs
    rng = stream(seed, "targets", task.dataset, task.category, defect_type, task.fold)
    anomalies = task.anomalies_of(defect_type)
    if not anomalies:
        raise MethodError(f"no training anomalies of defect type '{defect_type}' in the task for '{task.category}'")
    order = rng.permutation(len(task.normals))
    foregrounds: dict[str, np.ndarray] = {}
    targets = []
    for i in range(n):
        target = Target()
        if needs & {"target_normal", "target_mask"}:
            normal = task.normals[order[i % len(order)]]
            if normal.id not in foregrounds:
                foregrounds[normal.id] = estimate_foreground(normal.image, task.texture)
            target.normal, target.normal_foreground = normal, foregrounds[normal.id]
        if "target_mask" in needs:
            source = anomalies[rng.integers(len(anomalies))]
            target.mask = jitter_mask(rng, source.mask, target.normal_foreground)
            target.mask_source = source.id
        if "caption" in needs:
            captioned = [a for a in anomalies if a.caption]
            if not captioned:
                raise DataError(Path(task.category) / defect_type,
                                f"method '{method.name}' needs captions but no training anomaly of '{defect_type}' has one")
            paired = [a for a in captioned if a.id == target.mask_source]  # the caption of the mask's own anomaly
            source = paired[0] if paired else captioned[rng.integers(len(captioned))]
            target.caption, target.caption_source = source.caption, source.id
        targets.append(target)
    return GenerationRequest(defect_type=defect_type, n=n, seed=seed, targets=targets, dataset=task.dataset,
                             category=task.category, fold=task.fold, root=task.root, backbone=task.backbone)
