"""Benchmark: the tiny diffusion base and background_aware on the smoke suite's data (weave, washer, tray; 128 px;
the embedded default settings), as `make demo` runs them. It measures what issue 13 set as targets, writes its
row, and fails where one is missed:

- the backbone (the shipped one): the autoencoder's reconstruction PSNR on held-out normal images per category
  (target >= 32 dB);
- per defect type: fit and generation times, BG-PSNR (pooled) and Mask-IoU as the leaderboard computes them (with
  each sample's own, refined mask), and the mean |sample - normal| inside that mask over the mean outside (target
  >= 5x); averages over categories;
- a sample grid (target normal | target mask | sample | refined mask, per row) written to
  $DEFECTBENCH_BENCH_OUT (default: results/bench/background_aware_smoke.png) for a person to look at.

Times are printed in seconds and relative to the first fit of the same run, so runs on other machines compare.
Set DEFECTBENCH_BENCH_THREADS to change the thread count (default 1, as one Ray job of the demo).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tabulate import tabulate

from harness.data.images import read_image
from harness.diffusion import backbone as backbones
from harness.diffusion import provision
from harness.diffusion.latents import decode, encode
from harness.generation import fit_method
from harness.methods import load_method
from harness.metrics.paired import mask_iou, psnr_from_error, squared_error_outside
from harness.profiles import get_profile
from harness.tasks import build_request, build_task

from . import record
from .smoke import smoke_data

pytestmark = pytest.mark.bench
CATEGORIES = ("weave", "washer", "tray")
N = 12  # the smoke suite's images per defect type


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def _contrast(sample: np.ndarray, normal: np.ndarray, mask: np.ndarray) -> float:
    diff = np.abs(sample.astype(float) - normal.astype(float)).mean(2)
    return float(diff[mask].mean() / max(diff[~mask].mean(), 1e-6))


def _tile(normal, target_mask, sample, refined) -> np.ndarray:
    def as_rgb(mask):
        return np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)

    return np.concatenate([normal, as_rgb(target_mask), sample, as_rgb(refined)], axis=1)


def test_background_aware_on_the_smoke_data(tmp_path, monkeypatch):
    torch.set_num_threads(int(os.environ.get("DEFECTBENCH_BENCH_THREADS", "1")))
    resolution = get_profile("tiny").resolution
    splits, normals = smoke_data(CATEGORIES)
    folder, _ = provision.provision("tiny", normals, progress=True)
    backbone = backbones.load_frozen(folder)
    vae_rows = []
    for name, split in splits.items():
        held_out = np.stack([read_image(s.image, resolution) for s in split.normal_test])
        vae_rows.append([name, len(held_out), _psnr(decode(backbone, encode(backbone, held_out)), held_out)])
    rows, tiles = [], []
    for name, split in splits.items():
        for defect in split.category.defect_types:
            method = load_method("background_aware", "tiny")
            task = build_task(split, [defect], resolution, 0)
            task.backbone = folder
            fit = fit_method(method, task, tmp_path / name / defect)
            clock = time.perf_counter()
            request = build_request(task, method, defect, N, seed=0)
            samples = list(method.generate(request, tmp_path / name / defect))
            generate = time.perf_counter() - clock
            error = count = 0.0  # with each sample's own (refined) mask, as the leaderboard's bg_psnr and mask_iou
            for sample, target in zip(samples, request.targets):
                e, c = squared_error_outside(sample.image, target.normal.image, sample.mask)
                error, count = error + e, count + c
            pairs = list(zip(samples, request.targets))
            rows.append([name, defect, fit, generate / N, psnr_from_error(error, count),
                         np.nanmean([mask_iou(s.image, t.normal.image, s.mask) for s, t in pairs]),
                         np.mean([_contrast(s.image, t.normal.image, s.mask) for s, t in pairs])])
            tiles += [_tile(t.normal.image, t.mask, s.image, s.mask) for s, t in list(zip(samples, request.targets))[:2]]
    by_category = [[c, *np.mean([r[4:] for r in rows if r[0] == c], axis=0)] for c in CATEGORIES]
    average = np.mean([r[1:] for r in by_category], axis=0)
    print()
    print(f"{torch.get_num_threads()} thread(s)")
    print(tabulate(vae_rows, headers=["category", "held-out normals", "autoencoder PSNR (dB), target >= 32"],
                   floatfmt=".2f"))
    print(tabulate([[*r[:2], r[2], r[2] / rows[0][2], r[3], *r[4:]] for r in rows],
                   headers=["category", "defect", "fit (s)", "x first fit", "s / image", "BG-PSNR", "Mask-IoU",
                            "in/out"], floatfmt=".3f"))
    print(tabulate(by_category + [["average", *average]],
                   headers=["category", "BG-PSNR (>= 32)", "Mask-IoU (>= 0.30)", "in/out (>= 5)"], floatfmt=".3f"))
    out = Path(os.environ.get("DEFECTBENCH_BENCH_OUT", "results/bench/background_aware_smoke.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(np.concatenate(tiles, axis=0)).save(out)
    print(f"sample grid: {out} (target normal | target mask | sample | refined mask)")
    assert all(r[2] > 0 for r in rows) and len(tiles) == 2 * len(rows)
    psnrs = [r[2] for r in vae_rows]
    record.write(
        "background_aware",
        what="background_aware on the smoke data with the shipped tiny backbone (128 px, "
             f"{torch.get_num_threads()} thread): the autoencoder's PSNR on held-out normals, per defect type fit + "
             f"{N} generations, BG-PSNR, Mask-IoU, in/out change, a sample grid",
        baseline="the first fit",
        result=(f"autoencoder {' / '.join(f'{v:.2f}' for v in psnrs)} dB; fits {record.span([r[2] for r in rows], 0)} s "
                f"({record.span([r[2] / rows[0][2] for r in rows], 2)}x the first), "
                f"{record.span([r[3] for r in rows], 2)} s per image; BG-PSNR {average[0]:.2f} dB, "
                f"Mask-IoU {average[1]:.3f}, in/out {average[2]:.1f} (averages over categories, the samples' refined "
                "masks as the leaderboard)"),
        target="autoencoder ≥ 32 dB, BG-PSNR ≥ 32, Mask-IoU ≥ 0.30, in/out ≥ 5 (issue 13)",
        measured={"autoencoder": vae_rows, "per_defect_type": rows, "by_category": by_category})
    assert min(psnrs) >= 32 and average[0] >= 32 and average[1] >= 0.30 and average[2] >= 5, (
        f"issue 13's targets missed: autoencoder {psnrs}, BG-PSNR / Mask-IoU / in-out {average}")
