"""Benchmark: AnomalyDiffusion in the tiny profile on the smoke suite's data (weave, washer, tray; 128 px; the
shipped tiny backbone, as the demo and the smoke suite use it), one thread as one Ray job:

- per category: the fit (one per category, `masks: data` as the tiny default), generation time per image and the
  peak resident memory of both; per defect type BG-PSNR (pooled) and Mask-IoU as the leaderboard computes them,
  and the mean |sample - normal| inside the mask over the mean outside;
- per defect type: the mask generator's fit and the time per mask drawn, how many of the drawn masks passed, and the
  distance of the passed masks to the training masks (area and position, tests/claims.py) against random
  ellipses';
- a sample grid (target normal | mask | sample, two per defect type) written to $DEFECTBENCH_BENCH_OUT (default:
  results/bench/anomalydiffusion_smoke.png).

Times are printed in seconds and relative to the category's fit. Set DEFECTBENCH_BENCH_THREADS to change the thread
count (default 1).
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tabulate import tabulate

from harness.diffusion import backbone as backbones
from harness.diffusion import provision
from harness.diffusion.latents import resize_masks
from harness.generation import fit_method
from harness.methods import get_method_info, load_method
from harness.metrics.paired import mask_iou, psnr_from_error, squared_error_outside
from harness.profiles import get_profile
from harness.tasks import build_request, build_task

from ..claims import random_ellipses, shape_distance
from . import record
from .memory import peak_memory
from .smoke import smoke_data

pytestmark = pytest.mark.bench
CATEGORIES = ("weave", "washer", "tray")
N = 12  # the smoke suite's images per defect type


def _contrast(sample: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> float:
    diff = np.abs(sample.astype(float) - normal).mean(2)
    return float(diff[mask].mean() / max(diff[~mask].mean(), 1e-6))


def test_anomalydiffusion_on_the_smoke_data(tmp_path):
    torch.set_num_threads(int(os.environ.get("DEFECTBENCH_BENCH_THREADS", "1")))
    resolution = get_profile("tiny").resolution
    splits, normals = smoke_data(CATEGORIES)
    folder, _ = provision.provision("tiny", normals, progress=True)
    method = load_method("anomalydiffusion", "tiny")
    maskgen = importlib.import_module(sys.modules[get_method_info("anomalydiffusion").cls.__module__].__package__
                                      + ".maskgen")
    rows, mask_rows, tiles = [], [], []
    for name, split in splits.items():
        task = build_task(split, sorted(split.defects), resolution, 0)
        task.backbone = folder
        with peak_memory() as fit_peak:
            fit = fit_method(method, task, tmp_path / name)
        for defect in task.defect_types:
            request = build_request(task, method, defect, N, seed=0)
            with peak_memory() as generate_peak:
                clock = time.perf_counter()
                samples = list(method.generate(request, tmp_path / name))
                per_image = (time.perf_counter() - clock) / N
            pairs = list(zip(samples, request.targets))
            error = count = 0.0
            for sample, target in pairs:
                e, c = squared_error_outside(sample.image, target.normal.image, sample.mask)
                error, count = error + e, count + c
            rows.append([name, defect, round(fit), round(per_image, 2), round(fit_peak[0]), round(generate_peak[0]),
                         psnr_from_error(error, count),
                         np.nanmean([mask_iou(s.image, t.normal.image, s.mask) for s, t in pairs]),
                         np.mean([_contrast(s.image, t.normal.image, s.mask) for s, t in pairs])])
            tiles += [np.concatenate([t.normal.image, np.repeat(t.mask[..., None], 3, 2).astype(np.uint8) * 255,
                                      s.image], axis=1) for s, t in pairs[:2]]
            mask_rows.append([name, defect, *_mask_generator(maskgen, method, folder, task, defect, resolution)])
    print()
    print(tabulate(rows, headers=["category", "defect", "fit s", "s per image", "fit peak MB", "generation peak MB",
                                  "BG-PSNR", "Mask-IoU", "in/out"], floatfmt=".3g"))
    print(tabulate(mask_rows, headers=["category", "defect", "mask fit s", "s per mask drawn", "passed", "drawn",
                                       "area generated / training", "distance to training", "random ellipses"],
                   floatfmt=".3g"))
    out = Path(os.environ.get("DEFECTBENCH_BENCH_OUT", "results/bench/anomalydiffusion_smoke.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(np.concatenate(tiles, axis=0)).save(out)
    print(f"sample grid (normal | mask | sample): {out}")
    assert all(row[2] > 0 for row in rows)
    distances = [r[7] for r in mask_rows if r[7] == r[7]]  # NaN where none passed
    record.write(
        "anomalydiffusion",
        what=f"AnomalyDiffusion on the smoke data (tiny, 128 px, {torch.get_num_threads()} thread, the shipped "
             "backbone): per category the fit, generation per image, peak resident memory, BG-PSNR, Mask-IoU, in/out "
             "change; per defect type the mask generator's fit, time per mask drawn, masks passed, their distance to "
             "the training masks against random ellipses'; a sample grid",
        baseline="the category's fit",
        result=(f"fits {record.span([r[2] for r in rows], 0)} s per category, "
                f"{record.span([r[3] for r in rows], 2)} s per image, peak "
                f"{record.span([max(r[4], r[5]) / 1024 for r in rows], 2)} GB; BG-PSNR "
                f"{record.span([r[6] for r in rows])} dB, Mask-IoU {record.span([r[7] for r in rows], 2)}, in/out "
                f"{record.span([r[8] for r in rows])}; mask generator {record.span([r[2] for r in mask_rows], 0)} s "
                f"per defect type, {record.span([r[3] for r in mask_rows], 2)} s per mask drawn, "
                f"{sum(r[4] for r in mask_rows)} of {sum(r[5] for r in mask_rows)} "
                f"passed, distance to the training masks {record.span(distances, 2) if distances else 'none'} "
                f"against random ellipses' {record.span([r[8] for r in mask_rows], 2)}"),
        target="printed, no target",
        measured={"per_defect_type": rows, "mask_generator": mask_rows})


def _mask_generator(maskgen, method, folder: Path, task, defect: str, resolution: int) -> list:
    """One defect type's mask generator as a fit with `masks: generated` trains and samples it."""
    settings = method._mask_settings()
    training = resize_masks(np.stack([a.mask for a in task.anomalies_of(defect)]), resolution)
    backbone = backbones.load_frozen(folder)
    clock = time.perf_counter()
    vectors, _ = maskgen.fit(backbone, training, settings, seed=1)
    fit = time.perf_counter() - clock
    clock = time.perf_counter()
    drawn = maskgen.sample(backbone, vectors, settings, N, resolution, np.random.default_rng(0))
    per_mask = (time.perf_counter() - clock) / max(drawn.drawn, 1)
    passed = drawn.masks
    ellipses = shape_distance(random_ellipses(np.random.default_rng(1), 200, resolution), training)
    return [round(fit), round(per_mask, 2), len(passed), drawn.drawn,
            float(np.mean([m.mean() for m in passed]) / training.mean()) if passed else float("nan"),
            shape_distance(passed, training) if passed else float("nan"), ellipses]
