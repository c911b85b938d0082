"""Run a method's fit and generate, and write what it made: images/, masks/ (PNG) and samples.jsonl.

The output folder appears only when generation finished: a killed or failing run leaves no half-written folder.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from harness.data.images import resize_image, resize_mask, save_image, save_mask
from harness.errors import MethodError
from harness.io import atomic_directory, atomic_write_json, write_jsonl
from harness.methods import FewShotTask, GeneratedSample, GenerationRequest, Method
from harness.tasks import build_request

from harness.data.samples import META_FILE, SAMPLES_FILE


def fit_method(method: Method, task: FewShotTask, workdir: Path) -> float:
    """Fit into `workdir`; returns the seconds it took."""
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    method.fit(task, workdir)
    return time.perf_counter() - start


def generate_to(method: Method, task: FewShotTask, defect_type: str, n: int, seed: int, out: Path,
                workdir: Path, meta: dict | None = None, overwrite: bool = False, progress: bool = True,
                resolution: int | None = None) -> Path:
    """Generate n samples of `defect_type` with an already fitted method and write them to `out`, at `resolution`
    (the profile's; None: the task's). A task loaded at the method's own working resolution (e.g. 512) gives
    samples at that size: they are resized as the loader resizes (image bicubic, mask bilinear at 1/2)."""
    resolution = resolution or task.resolution
    if not isinstance(n, int) or n < 1:
        raise MethodError(f"the number of samples to generate must be a positive integer, not {n!r}")
    request = build_request(task, method, defect_type, n, seed)
    normal_paths = {item.id: _relative(item.path, task.root) for item in task.normals}
    start = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        samples = method.generate(request, workdir)
        if resolution != task.resolution:
            samples = (_resized(sample, resolution) for sample in samples)
        rows = write_samples(samples, request, tmp, normal_paths, method.name, progress)
        atomic_write_json(tmp / META_FILE, {
            **(meta or {}), "method": method.name, "config": method.config, "profile": method.profile.name,
            "defect_type": defect_type, "n": n, "seed": seed, "category": task.category, "dataset": task.dataset,
            "resolution": resolution, "working_resolution": task.resolution, "seconds": round(time.perf_counter() - start, 3), "count": len(rows),
            "category_root": str(task.root) if task.root else None,  # where normal_path is relative to (this machine)
        })
    return out


def _resized(sample: GeneratedSample, size: int) -> GeneratedSample:
    image, mask = np.asarray(sample.image), np.asarray(sample.mask)
    if image.ndim != 3 or mask.shape != image.shape[:2]:
        return sample  # malformed: write_samples names what is wrong
    return dataclasses.replace(sample, image=resize_image(image, size), mask=resize_mask(mask.astype(bool), size))


def _relative(path: Path | None, root: Path | None) -> str | None:
    if path is None:
        return None
    return Path(path).relative_to(root).as_posix() if root and Path(path).is_relative_to(root) else str(path)


def write_samples(samples: Iterable[GeneratedSample], request: GenerationRequest, out: Path,
                  normal_paths: dict[str, str], method_name: str, progress: bool = True) -> list[dict]:
    rows = []
    bar = tqdm(total=request.n, desc=f"{method_name}: {request.defect_type}", unit="img", disable=not progress,
               leave=False)
    for index, sample in enumerate(samples):
        if index >= request.n:
            break
        _check_sample(sample, request, index, method_name)
        image_rel, mask_rel = f"images/{index:04d}.png", f"masks/{index:04d}.png"
        save_image(out / image_rel, sample.image)
        save_mask(out / mask_rel, sample.mask)
        rows.append({
            "index": index, "image": image_rel, "mask": mask_rel, "defect_type": sample.defect_type,
            "normal_id": sample.normal_id, "normal_path": normal_paths.get(sample.normal_id) if sample.normal_id else None,
            "mask_id": sample.mask_id, "caption": sample.caption, "extra": sample.extra,
            "stand_in": sample.stand_in,
        })
        bar.update(1)
    bar.close()
    if len(rows) != request.n:
        raise MethodError(f"method {method_name!r} made {len(rows)} samples of {request.defect_type!r}; {request.n} were asked for")
    write_jsonl(out / SAMPLES_FILE, rows)
    return rows


def _check_sample(sample: GeneratedSample, request: GenerationRequest, index: int, method_name: str) -> None:
    where = f"method {method_name!r}, sample {index}"
    image, mask = np.asarray(sample.image), np.asarray(sample.mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MethodError(f"{where}: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise MethodError(f"{where}: mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    if sample.defect_type != request.defect_type:
        raise MethodError(f"{where}: defect type {sample.defect_type!r}, but {request.defect_type!r} was asked for")
